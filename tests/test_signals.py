"""Signals and the milter loop: real milter processes, real signals.

A SIGHUP handler that raises, serving from a thread other than the main one,
and hundreds of SIGHUPs under load: the milter keeps answering throughout.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from libmilter_ext.testing import MilterClient, MilterError, parse_socket_spec, session
from tests.procs import (
    PYTHON,
    Daemon,
    sigwaiting_threads,
    takes_signal,
    wait_for_socket,
    wait_until,
)
from tests.test_daemon import _wait_for, write_config
from tests.test_daemon import run as spf_session

MILTERS = Path(__file__).parent / "milters"
# SIGHUP rounds under load; raise it for a long run by hand.
HUP_ROUNDS = int(os.environ.get("LIBMILTER_EXT_HUP_ROUNDS", "300"))


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sig-", dir="/tmp"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def signals_milter(workdir: Path, mode: str) -> Daemon:
    spec = f"unix:{workdir}/m.sock"
    return Daemon([PYTHON, str(MILTERS / "signals.py"), spec, mode], spec, workdir)


def full_session(spec: str) -> str:
    """One SMTP session through eom; returns the header the kitchen milter added."""
    result = session(spec, ip="192.0.2.1", helo="h.example", sender="<a@example.org>",
                     headers=[("X-Do", "addheader")], body=b"x\r\n")
    last = list(result.values())[-1]
    assert (last.stage, last.action) == ("eom", "continue"), result
    return dict(last.added_headers())["X-Added"]


# -- item 10: an exception in on_hup -------------------------------------------------


def test_exception_in_on_hup_is_logged_and_the_milter_keeps_serving(workdir: Path) -> None:
    milter = signals_milter(workdir, "hup-raises").start()
    try:
        for n in range(1, 4):  # the first as soon as the socket accepts
            milter.proc.send_signal(signal.SIGHUP)
            _wait_for(lambda n=n: milter.stderr().count("RuntimeError: reload exploded") == n)
            assert milter.proc.poll() is None
            assert full_session(milter.spec) == "appended"
        assert milter.stdout().count("hup") == 3
        assert milter.stderr().count("SIGHUP handler raising_hup failed; still serving") == 3
    finally:
        code = milter.stop(signal.SIGTERM)
    assert code == 0
    assert "stopped" in milter.stdout()


def test_spfmilter_reload_that_raises_keeps_the_running_config(workdir: Path,
                                                                dns_server) -> None:
    # nameservers = (none) makes the reload build a resolver from /etc/resolv.conf;
    # an empty one (bind-mounted in a private mount namespace) makes dnspython
    # raise NoResolverConfiguration, which is no ConfigError: it used to end main().
    resolv = workdir / "resolv.conf"
    resolv.write_text("")
    cfg = workdir / "spfmilter.cfg"
    write_config(cfg, workdir, dns_server, policy="mailfrom_softfail = reject")
    argv = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(resolv), PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"]
    with Daemon(argv, f"unix:{workdir}/spf.sock", workdir) as spf:
        assert spf_session(spf, sender="<u@softfail.spf.test>").code == 550
        good = cfg.read_text()
        ns = f"nameservers = {dns_server.nameservers[0]}"
        assert ns in good
        cfg.write_text(good.replace(ns, "nameservers =").replace(
            "mailfrom_softfail = reject", "mailfrom_softfail = accept"))
        spf.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "reload failed, keeping the running config" in spf.stderr())
        assert "NoResolverConfiguration" in spf.stderr()
        assert spf.proc.poll() is None
        # the old config and its resolver still decide
        assert spf_session(spf, sender="<u@softfail.spf.test>").code == 550
        cfg.write_text(good)
        spf.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "configuration reloaded" in spf.stderr())
        assert spf_session(spf, sender="<u@softfail.spf.test>").code == 550
        assert spf.stop(signal.SIGTERM) == 0


# -- item 11: serving from another thread ------------------------------------------------


def test_run_off_the_main_thread_without_signal_handling_is_refused(workdir: Path) -> None:
    milter = signals_milter(workdir, "thread-refused")
    with pytest.raises(RuntimeError, match="exited with 3 before"):
        milter.start()
    assert "refused: RuntimeError: libmilter_ext: serving from a thread other than the main" \
        " thread needs libmilter_ext.handle_signals() called in the main thread first" \
        in milter.stdout()
    assert not (workdir / "m.sock").exists()  # refused before the socket opened


def test_run_off_the_main_thread_stops_cleanly_on_sigterm(workdir: Path) -> None:
    milter = signals_milter(workdir, "thread").start()
    try:
        assert full_session(milter.spec) == "appended"
        _wait_for(lambda: "close" in milter.stdout())
        milter.proc.send_signal(signal.SIGHUP)  # on_hup given to run() in the thread
        _wait_for(lambda: "hup" in milter.stdout())
        assert full_session(milter.spec) == "appended"
    finally:
        code = milter.stop(signal.SIGTERM)
    assert code == 0  # not -15: the signal reached Python, run() returned in its thread
    assert milter.stdout().splitlines()[-2:] == ["run returned", "stopped"]
    with pytest.raises(MilterError):
        MilterClient(milter.spec, timeout=2).open()


def thread_taking(pid: int, sig: int) -> int:
    """A thread of pid, not the main one, that does not block sig."""
    for name in sorted(os.listdir(f"/proc/{pid}/task")):
        status = Path(f"/proc/{pid}/task/{name}/status").read_text()
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        if int(name) != pid and not blocked & 1 << (sig - 1):
            return int(name)
    raise AssertionError(f"every thread of {pid} but the main one blocks {sig}")


def test_a_signal_another_thread_takes_reaches_the_main_thread(workdir: Path) -> None:
    """The kernel hands a process's signal to another thread when the main one has one
    pending; the main thread, blocked in join() while run() serves in a thread,
    never ran Python's handler for it."""
    tgkill = ctypes.CDLL(None, use_errno=True).tgkill  # glibc 2.30+
    milter = signals_milter(workdir, "thread-untimed").start()
    try:
        assert full_session(milter.spec) == "appended"
        pid = milter.proc.pid
        worker = thread_taking(pid, signal.SIGHUP)  # the thread that called run()
        assert tgkill(pid, worker, signal.SIGHUP) == 0
        wait_until(lambda: "hup" in milter.stdout(), 10, "on_hup")
        assert full_session(milter.spec) == "appended"
        assert tgkill(pid, thread_taking(pid, signal.SIGTERM), signal.SIGTERM) == 0
        assert milter.proc.wait(20) == 0
    finally:
        if milter.proc.poll() is None:
            milter.proc.kill()
            milter.proc.wait()
    assert milter.stdout().splitlines()[-2:] == ["run returned", "stopped"]


# -- item 12: SIGHUP never reaches libmilter's signal thread ---------------------------


def test_hundreds_of_sighups_under_load_never_stop_the_milter(workdir: Path) -> None:
    milter = signals_milter(workdir, "usr1").start()
    pid = milter.proc.pid
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def load() -> None:
        count = 0
        try:
            while not stop.is_set():
                assert full_session(milter.spec) == "appended"
                count += 1
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.append(count)

    clients = [threading.Thread(target=load) for _ in range(4)]
    try:
        for client in clients:
            client.start()
        for n in range(1, HUP_ROUNDS + 1):
            # SIGUSR1 first: with a signal pending on the main thread the kernel
            # hands SIGHUP to any other thread that waits for it.
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGHUP)
            _wait_for(lambda n=n: milter.stdout().count("hup") >= n)
            assert milter.proc.poll() is None, f"milter died after {n} SIGHUPs"
        stop.set()
        for client in clients:
            client.join(60)
        assert errors == []
        assert len(done) == 4 and all(count > 0 for count in done), done
        # libmilter's signal thread (started before the first session) never sigwaits
        assert sigwaiting_threads(pid) == []
        # every connection completed, close() included
        # (counted as words: prints from the workers and the main thread interleave)
        _wait_for(lambda: milter.stdout().count("close") == sum(done))
    finally:
        stop.set()
        code = milter.stop(signal.SIGTERM)
    assert milter.stdout().count("hup") == HUP_ROUNDS
    assert code == 0 and milter.stdout().count("stopped") == 1
    assert milter.stdout().endswith("stopped\n")


# -- a signal at any point of start-up -----------------------------------------------

# Start-ups per signal; raise them for a long run by hand.
STARTUP_ROUNDS = int(os.environ.get("LIBMILTER_EXT_STARTUP_ROUNDS", "18"))
SPF_STARTUP_ROUNDS = int(os.environ.get("SPFMILTER_STARTUP_ROUNDS", "6"))
# Where in the start-up the signal goes: once the process takes (or holds) it,
# once the socket file exists, once the milter is ready; plus a random delay.
POINTS = ("takes", "socket", "ready")
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["hup", "term"])


def signal_during_start_up(daemon: Daemon, sig: int, point: str, delay: float,
                           ready: Callable[[], bool],
                           before: Callable[[], object] = lambda: None) -> str:
    """Spawn daemon, send sig at point of its start-up after delay s; says what it did.

    before() runs just before the signal is sent.
    """
    sock = Path(parse_socket_spec(daemon.spec)[1])
    daemon.spawn()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    reached = {"takes": lambda: takes_signal(pid, sig), "socket": sock.exists,
               "ready": ready}[point]
    deadline = time.monotonic() + 30
    while not reached():
        assert daemon.proc.poll() is None, \
            f"exited with {daemon.proc.returncode} before {point}:\n{daemon.stderr()}"
        assert time.monotonic() < deadline, f"{point} not reached in 30 s"
        time.sleep(0.0005)
    time.sleep(delay)
    before()
    daemon.proc.send_signal(sig)
    return f"{signal.Signals(sig).name} at {point} + {delay * 1000:.1f} ms"


def accepts(spec: str) -> bool:
    try:
        wait_for_socket(spec, timeout=0)
    except RuntimeError:
        return False
    return True


def stopped_cleanly(daemon: Daemon, where: str, code: int | None = None) -> None:
    """daemon stopped by its SIGTERM (sent already): exit 0, socket closed."""
    assert daemon.proc is not None
    code = daemon.proc.wait(30) if code is None else code
    assert code == 0, f"{where}: exit status {code}\n{daemon.stderr()}"
    assert not accepts(daemon.spec), f"{where}: socket still open"


@SIGNALS
def test_a_signal_at_any_point_of_start_up_reloads_once_or_stops_cleanly(workdir: Path,
                                                                          sig: int) -> None:
    """SIGHUP: on_hup runs exactly once and the milter serves; SIGTERM: a clean stop.

    run() in the main thread, or in another after handle_signals() (on_hup is
    then given only to run(), later than the signal may come).

    Before, a SIGHUP there could stop the milter (libmilter's signal thread took
    it before it was parked) or kill it (before main() took the signals).
    """
    rng = random.Random(7208 + sig)
    for round_ in range(STARTUP_ROUNDS):
        work = workdir / f"r{round_}"
        work.mkdir()
        spec = f"unix:{work}/m.sock"
        mode = ("hup", "thread")[round_ % 2]  # run() in the main thread, or in another
        milter = Daemon([PYTHON, str(MILTERS / "signals.py"), spec, mode], spec, work)
        point = POINTS[round_ % len(POINTS)]
        delay = rng.choice((0.0, rng.uniform(0, 0.02)))
        try:
            where = f"round {round_}, {mode}: " + signal_during_start_up(
                milter, sig, point, delay, lambda spec=spec: accepts(spec))
            if sig == signal.SIGHUP:
                try:
                    wait_until(lambda m=milter: "hup" in m.stdout() or m.proc.poll() is not None)
                except AssertionError:
                    raise AssertionError(f"{where}: no on_hup, no exit\nstdout:\n"
                                         f"{milter.stdout()}\nstderr:\n{milter.stderr()}") from None
                assert milter.proc.poll() is None, \
                    f"{where}: exited with {milter.proc.returncode}\n{milter.stderr()}"
                wait_for_socket(spec, milter.proc)
                assert full_session(spec) == "appended", where
                assert milter.stdout().count("hup") == 1, where
                stopped_cleanly(milter, where, milter.stop(signal.SIGTERM))
            else:
                stopped_cleanly(milter, where)
                assert "hup" not in milter.stdout(), where
            assert milter.stdout().endswith("stopped\n"), where
        finally:
            if milter.proc is not None and milter.proc.poll() is None:
                milter.proc.kill()
                milter.proc.wait()


@SIGNALS
def test_spfmilter_signal_at_any_point_of_start_up(workdir: Path, dns_server,
                                                   sig: int) -> None:
    """SIGHUP: the config file as it was when the signal came decides, after one reload."""
    cfg = workdir / "spfmilter.cfg"
    new = workdir / "spfmilter.cfg.new"
    spec = f"unix:{workdir}/spf.sock"
    pidfile = workdir / "spf.pid"
    rng = random.Random(7208 + sig)
    for round_ in range(SPF_STARTUP_ROUNDS):
        work = workdir / f"r{round_}"
        work.mkdir()
        write_config(cfg, workdir, dns_server, policy="mailfrom_softfail = reject")
        spf = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"], spec, work)
        point = POINTS[round_ % len(POINTS)]
        delay = rng.choice((0.0, rng.uniform(0, 0.3 if point == "takes" else 0.02)))
        # for a SIGHUP, the file changes just before the signal, as an admin's edit would
        write_config(new, workdir, dns_server, policy="mailfrom_softfail = accept")
        edit = (lambda: os.replace(new, cfg)) if sig == signal.SIGHUP else (lambda: None)
        try:
            where = f"round {round_}: " + signal_during_start_up(
                spf, sig, point, delay, pidfile.exists, edit)
            if sig == signal.SIGHUP:
                wait_until(lambda d=spf: "configuration reloaded" in d.stderr()
                           or d.proc.poll() is not None, what=f"{where}: a reload or an exit")
                assert spf.proc.poll() is None, \
                    f"{where}: exited with {spf.proc.returncode}\n{spf.stderr()}"
                wait_for_socket(spec, spf.proc)
                reply = spf_session(spf, sender="<u@softfail.spf.test>")
                assert (reply.stage, reply.action) == ("eom", "continue"), f"{where}: {reply}"
                assert spf.stderr().count("configuration reloaded") == 1, where
                stopped_cleanly(spf, where, spf.stop(signal.SIGTERM))
            else:
                stopped_cleanly(spf, where)
                assert "configuration reloaded" not in spf.stderr(), where
            assert "spfmilter stopped" in spf.stderr(), where
            assert not pidfile.exists() and not (workdir / "spf.sock").exists(), where
        finally:
            if spf.proc is not None and spf.proc.poll() is None:
                spf.proc.kill()
                spf.proc.wait()
