"""systemd readiness (Type=notify): the real daemon against a notify socket the test listens on.

The daemon starts as root and drops to nobody, as a unit without User= would
run it; the notify socket sits in a directory only root may enter, so the
daemon reaches it after the drop only because it connected before.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spfmilter import sdnotify
from tests.procs import PYTHON, Daemon
from tests.test_daemon import _wait_for, run, write_config

RECV_TIMEOUT = 15.0


class NotifySocket:
    """What systemd does: a unix datagram socket collecting the daemon's messages."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(sdnotify.socket_address(address))
        self.sock.settimeout(RECV_TIMEOUT)

    def next(self) -> dict[str, str]:
        """The next datagram as {NAME: VALUE}."""
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def until(self, name: str) -> list[dict[str, str]]:
        """Datagrams up to and including the first that has name=1."""
        got = [self.next()]
        while got[-1].get(name) != "1":
            got.append(self.next())
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def rundir() -> Iterator[Path]:
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory(prefix="spfn", dir="/tmp") as d:
        base = Path(d)
        base.chmod(0o755)
        run_dir = base / "run"
        run_dir.mkdir()
        os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
        private = base / "notify"  # like /run/systemd: root's, closed to others
        private.mkdir(mode=0o700)
        yield base


@pytest.fixture(params=["path", "abstract"])
def notify(request, rundir) -> Iterator[NotifySocket]:
    """A path socket in a directory closed to others, or an abstract one."""
    if request.param == "path":
        sock = NotifySocket(str(rundir / "notify" / "n.sock"))
    else:
        sock = NotifySocket(f"@spfmilter-test-{os.getpid()}-{rundir.name}")
    yield sock
    sock.close()


def _uids(pid: int) -> list[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]


def test_ready_reload_status_stopping_after_privilege_drop(dns_server, rundir, notify):
    nobody = pwd.getpwnam("nobody")
    cfg = rundir / "c.cfg"
    run_dir = rundir / "run"
    write_config(cfg, run_dir, dns_server)
    cfg.write_text(cfg.read_text().replace("user =\ngroup =\n",
                                           "user = nobody\ngroup = nogroup\n"))
    spec = f"unix:{run_dir}/spf.sock"
    if not notify.env_value.startswith("@"):  # the premise: nobody could not open it itself
        probe = subprocess.run(
            [PYTHON, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX,"
             " socket.SOCK_DGRAM); s.connect(sys.argv[1])", notify.env_value],
            user=nobody.pw_uid, group=nobody.pw_gid, capture_output=True, text=True)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr
    proc = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"], spec,
                  rundir, env={"NOTIFY_SOCKET": notify.env_value})
    try:
        proc.start()
        ready = notify.until("READY")
        # READY comes once the socket is open and root is gone, never before.
        assert _uids(proc.proc.pid) == [str(nobody.pw_uid)] * 4
        assert ready[-1]["STATUS"] == f"serving on {spec}, 0 connections"
        assert not any("RELOADING" in m or "STOPPING" in m for m in ready)
        assert run(proc).action == "continue"
        assert run(proc, sender="<u@fail.spf.test>").code == 550

        before = time.monotonic_ns() // 1000
        proc.proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        after = notify.until("READY")
        assert after[-1]["STATUS"] == f"serving on {spec}, 2 connections"
        _wait_for(lambda: "configuration reloaded" in proc.stderr(), timeout=30)

        cfg.write_text(cfg.read_text() + "\n[policy]\nmailfrom_fail = maybe\n")
        proc.proc.send_signal(signal.SIGHUP)  # a refused reload still ends in READY=1
        assert notify.next()["RELOADING"] == "1"
        assert notify.until("READY")[-1]["READY"] == "1"
        _wait_for(lambda: "reload refused" in proc.stderr(), timeout=30)
        assert run(proc).action == "continue"
    finally:
        code = proc.stop(signal.SIGTERM)
    stopping = notify.until("STOPPING")
    assert code == 0
    assert stopping[-1]["STATUS"] == "stopping"
    assert "NOTIFY_SOCKET" not in proc.stderr() and "Traceback" not in proc.stderr()


def test_unreachable_notify_socket_is_logged_and_the_milter_serves(dns_server, tmp_path):
    cfg = tmp_path / "c.cfg"
    write_config(cfg, tmp_path, dns_server)
    missing = str(tmp_path / "no-such.sock")
    with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                f"unix:{tmp_path}/spf.sock", tmp_path,
                env={"NOTIFY_SOCKET": missing}) as proc:
        assert run(proc).action == "continue"
    assert f"NOTIFY_SOCKET {missing}:" in proc.stderr()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = sdnotify.Notifier(None)
    assert not notifier.active
    assert not notifier.ready("x") and not notifier.reloading() and not notifier.stopping()
    reporter = sdnotify.StatusReporter(notifier, lambda: "x", interval=0.01).start()
    reporter.stop()
    assert reporter.last == ""  # never even asked for a status


@pytest.mark.parametrize("value,address", [
    ("/run/systemd/notify", "/run/systemd/notify"), ("@abstract", "\0abstract"),
    ("@", None), ("vsock:2:1234", None), ("relative/path", None),
])
def test_socket_address_forms(value, address):
    assert sdnotify.socket_address(value) == address


def test_status_reporter_sends_only_changes(tmp_path):
    receiver = NotifySocket(str(tmp_path / "n.sock"))
    counter = {"n": 0}
    notifier = sdnotify.Notifier(receiver.env_value)
    reporter = sdnotify.StatusReporter(notifier, lambda: f"{counter['n']} connections",
                                       interval=0.02).start()
    try:
        assert reporter.last == "0 connections"  # the start status goes with READY=1
        counter["n"] = 3
        assert receiver.next() == {"STATUS": "3 connections"}
        counter["n"] = 4
        assert receiver.next() == {"STATUS": "4 connections"}  # nothing sent in between
    finally:
        reporter.stop()
        notifier.close()
        receiver.close()
