"""Signals and the milter loop: real milter processes, real signals.

A SIGHUP handler that raises, serving from a thread other than the main one,
and hundreds of SIGHUPs under load: the milter keeps answering throughout.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from libmilter_ext.testing import MilterClient, MilterError, session
from tests.procs import PYTHON, Daemon, sigwaiting_threads
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
        # Until libmilter's own signal thread is parked, a SIGHUP may still stop it.
        _wait_for(lambda: sigwaiting_threads(milter.proc.pid) == [])
        for n in range(1, 4):
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
        _wait_for(lambda: sigwaiting_threads(pid) == [])  # libmilter's is parked
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
        # every connection completed, close() included
        # (counted as words: prints from the workers and the main thread interleave)
        _wait_for(lambda: milter.stdout().count("close") == sum(done))
    finally:
        stop.set()
        code = milter.stop(signal.SIGTERM)
    assert milter.stdout().count("hup") == HUP_ROUNDS
    assert code == 0 and milter.stdout().count("stopped") == 1
    assert milter.stdout().endswith("stopped\n")


# -- a SIGTERM at start-up, while libmilter's signal thread is being parked -----------

# Start/stop cycles; raise it for a long run by hand (the race was 1 in 20-80 here).
STARTUP_ROUNDS = int(os.environ.get("LIBMILTER_EXT_STARTUP_ROUNDS", "40"))


def test_sigterm_right_after_start_always_stops_the_milter(workdir: Path) -> None:
    """A SIGTERM that libmilter's signal thread took just before being parked was lost."""
    for round_ in range(STARTUP_ROUNDS):
        spec = f"unix:{workdir}/s{round_}.sock"
        work = workdir / f"s{round_}"
        work.mkdir()
        milter = Daemon([PYTHON, str(MILTERS / "minimal.py"), spec], spec, work).start()
        try:
            with MilterClient(spec, timeout=10) as client:
                client.connect("h", "192.0.2.1", 1)
        finally:
            # stop() raises when SIGTERM is ignored for 20 s
            assert milter.stop(signal.SIGTERM) == 0, milter.stderr()
