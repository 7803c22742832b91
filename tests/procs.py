"""Start real daemons for tests and wait until their socket answers (no sleeps)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from libmilter_ext.testing import parse_socket_spec

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_socket(spec: str, proc: subprocess.Popen | None = None,
                    timeout: float = 15.0) -> None:
    """Poll until something accepts connections on spec, or fail loudly."""
    family, address = parse_socket_spec(spec)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {spec} opened")
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(address)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {spec} after {timeout}s") from None
            time.sleep(0.02)


class Daemon:
    """A real process serving a milter socket; stdout/stderr go to files."""

    def __init__(self, argv: Sequence[str], spec: str, workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.spec = spec
        self.workdir = workdir
        self.out = workdir / "stdout.log"
        self.err = workdir / "stderr.log"
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)  # a test run under systemd: not its service
        full_env["PYTHONPATH"] = str(ROOT)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.env = full_env
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> Daemon:
        """Start the process and return at once (start() also waits for the socket)."""
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self.env,
                                         cwd=self.workdir)
        return self

    def start(self) -> Daemon:
        self.spawn()
        try:
            wait_for_socket(self.spec, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\nstderr:\n{self.stderr()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process and wait for it; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{self.argv[0]} ignored signal {sig} for {timeout}s") from None
        return self.proc.returncode

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def edges_milter(workdir: Path, mode: str) -> Daemon:
    """tests/milters/edges.py in *mode*, on a unix socket in *workdir* (kept short)."""
    work = workdir / mode
    work.mkdir(exist_ok=True)
    spec = f"unix:{workdir}/{mode}.sock"
    return Daemon([PYTHON, str(Path(__file__).parent / "milters" / "edges.py"), spec, mode],
                  spec, work)


def sigwaiting_threads(pid: int) -> list[int]:
    """Threads of pid blocked in sigwait (libmilter's would be, were its sigwait libc's)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue
        if "sigtimedwait" in wchan:
            found.append(int(tid))
    return found


def takes_signal(pid: int, sig: int) -> bool:
    """True once pid's main thread catches or blocks sig: its start-up has claimed it.

    False also when the process is gone.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    mask = int(fields["SigCgt"], 16) | int(fields["SigBlk"], 16)
    return bool(mask & 1 << (sig - 1))


def wait_until(predicate: Callable[[], object], timeout: float = 20.0,
               what: str = "condition") -> None:
    """Poll predicate until it is true; AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached")
        time.sleep(0.02)
