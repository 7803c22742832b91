"""The SysV init script (etc/spfmilter.init) driving the real daemon.

Runs the script with /bin/sh as an admin would, against the venv's spfmilter
and a config in a temp dir: unix socket and PID file in a directory the
daemon creates.  The daemon keeps the test's user (``user =``): a daemon that
drops to another user needs an interpreter that user can read, and the
venv's lives under /root here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libmilter_ext import testing

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "etc" / "spfmilter.init"
SPFMILTER = Path(sys.executable).parent / "spfmilter"

# LSB exit codes of "status".
RUNNING, DEAD_WITH_PIDFILE, STOPPED = 0, 1, 3


@dataclass
class Setup:
    dir: Path
    config: Path
    socket: Path
    pidfile: Path
    env: dict[str, str]

    def write_config(self, authserv_id: str = "mx.example.net", extra: str = "") -> None:
        self.config.write_text(f"""\
[milter]
socket = unix:{self.socket}
pidfile = {self.pidfile}
user =
group =
log_target = stderr

[spf]
authserv_id = {authserv_id}
{extra}""")

    def init(self, action: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/sh", str(INIT), action], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def pid(self) -> int:
        return int(self.pidfile.read_text())


def alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped by init) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def authserv_id_seen(socket_path: Path) -> str:
    """Play one SMTP session from localhost (an internal host: no DNS needed)
    and return the authserv-id of the Authentication-Results field added."""
    results = testing.session(f"unix:{socket_path}", ip="127.0.0.1", helo="localhost",
                              sender="someone@example.com", timeout=10)
    last = list(results.values())[-1]
    assert last.continues, results
    fields = [value for name, value in last.added_headers()
              if name == "Authentication-Results"]
    assert len(fields) == 1, last
    return fields[0].split(";")[0].strip()


@pytest.fixture
def setup() -> Iterator[Setup]:
    # A short path: unix socket paths are limited to about 100 bytes.
    base = Path(tempfile.mkdtemp(prefix="sfi", dir="/tmp"))
    run_dir = base / "run"  # created by the daemon
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SPFMILTER": str(SPFMILTER),
        "CONFIG": str(base / "spfmilter.cfg"),
        "START_TIMEOUT": "20",
        "STOP_TIMEOUT": "20",
    }
    s = Setup(base, base / "spfmilter.cfg", run_dir / "spfmilter.sock",
              run_dir / "spfmilter.pid", env)
    s.write_config()
    yield s
    # Kill a daemon that a failed test left behind (the one this test started).
    try:
        pid = s.pid()
        if alive(pid) and b"spfmilter" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    shutil.rmtree(base, ignore_errors=True)


def test_start_status_reload_stop(setup: Setup) -> None:
    assert setup.init("status").returncode == STOPPED

    started = setup.init("start")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = setup.pid()
    assert alive(pid)
    assert setup.socket.is_socket()
    assert authserv_id_seen(setup.socket) == "mx.example.net"

    status = setup.init("status")
    assert status.returncode == RUNNING and str(pid) in status.stdout

    again = setup.init("start")
    assert again.returncode == 0 and "already running" in again.stdout
    assert setup.pid() == pid

    # Reload: same process, new settings for the next connection.
    setup.write_config(authserv_id="reloaded.example.net")
    reloaded = setup.init("reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    deadline = time.monotonic() + 10
    while authserv_id_seen(setup.socket) != "reloaded.example.net":
        assert time.monotonic() < deadline, "SIGHUP did not reload the config"
        time.sleep(0.1)
    assert alive(pid) and setup.pid() == pid

    stopped = setup.init("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(pid)
    assert not setup.pidfile.exists()
    assert not setup.socket.exists()
    assert setup.init("status").returncode == STOPPED
    assert setup.init("stop").returncode == 0  # stopping a stopped service is fine


def test_reload_refuses_a_broken_config_and_keeps_running(setup: Setup) -> None:
    assert setup.init("start").returncode == 0
    pid = setup.pid()
    setup.write_config(extra="lookup_timeout = soon\n")
    refused = setup.init("reload")
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert alive(pid)
    assert authserv_id_seen(setup.socket) == "mx.example.net"
    setup.write_config()
    assert setup.init("stop").returncode == 0
    assert not alive(pid)


def test_restart_gives_a_new_process(setup: Setup) -> None:
    assert setup.init("start").returncode == 0
    first = setup.pid()
    restarted = setup.init("restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    second = setup.pid()
    assert second != first and alive(second) and not alive(first)
    assert authserv_id_seen(setup.socket) == "mx.example.net"
    assert setup.init("stop").returncode == 0


def test_status_of_a_dead_daemon_and_stop_cleans_up(setup: Setup) -> None:
    # A PID file whose process is gone, as after a crash or kill -9.
    gone = subprocess.Popen(["true"])
    gone.wait()
    setup.pidfile.parent.mkdir()
    setup.pidfile.write_text(f"{gone.pid}\n")
    assert setup.init("status").returncode == DEAD_WITH_PIDFILE
    assert setup.init("reload").returncode == 7  # LSB: program is not running
    assert setup.init("stop").returncode == 0
    assert not setup.pidfile.exists()
    assert setup.init("status").returncode == STOPPED


def test_start_reports_a_broken_config(setup: Setup) -> None:
    setup.write_config(extra="no_such_option = 1\n")
    failed = setup.init("start")
    assert failed.returncode != 0
    assert "no_such_option" in failed.stderr
    assert not setup.pidfile.exists()


def test_start_reports_a_socket_it_cannot_open(setup: Setup) -> None:
    setup.socket.parent.mkdir()
    setup.socket.mkdir()  # a directory where the socket should go
    failed = setup.init("start")
    assert failed.returncode != 0
    assert "socket" in failed.stderr
    assert not setup.pidfile.exists()


def test_usage(setup: Setup) -> None:
    proc = setup.init("bogus")
    assert proc.returncode == 2 and "Usage:" in proc.stderr
