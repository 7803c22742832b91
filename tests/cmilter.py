"""Build and run ``bench/noop_milter.c``, the C milter tests drive clients against.

libmilter notices a stop request only between two 5-second waits on its
listening socket (``MI_CHK_TIME``), so stopping one milter can take up to
5 s.  Tests that run several should signal them all before waiting for any:
``start_c_milter`` + ``stop_c_milters`` do that, ``running_c_milter`` is the
one-milter context manager.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from libmilter_ext.testing import parse_socket_spec

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "noop_milter.c"
MFAPI_H = Path("/usr/include/libmilter/mfapi.h")


class CMilterError(RuntimeError):
    """The C milter could not be built, started or stopped."""


def build_noop_milter(directory: str | os.PathLike[str]) -> Path:
    """Compile bench/noop_milter.c into ``directory``; return the binary's path.

    The binary is named after a hash of the source, so an existing build is
    reused only while the source is unchanged.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise CMilterError("gcc not found: install gcc (scripts/setup does)")
    if not MFAPI_H.exists():
        raise CMilterError(f"{MFAPI_H} missing: install libmilter-dev (scripts/setup does)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = Path(directory) / f"noop_milter-{digest}"
    if target.exists():
        return target
    Path(directory).mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    cmd = [gcc, "-O2", "-Wall", "-pthread", "-o", str(partial), str(SOURCE), "-lmilter"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CMilterError(f"building {SOURCE} failed: {' '.join(cmd)}\n{result.stderr}")
    os.replace(partial, target)
    return target


def default_binary() -> Path:
    """The no-op milter built in a per-user cache directory under the temp dir."""
    cache = Path(tempfile.gettempdir()) / f"spfmilter-cmilter-{os.getuid()}"
    return build_noop_milter(cache)


def wait_until_accepting(spec: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Poll ``spec`` until it accepts a connection; fail if ``proc`` dies first."""
    family, address = parse_socket_spec(spec)
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise CMilterError(f"milter on {spec} exited with {proc.returncode}: {err.strip()}")
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(address)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise CMilterError(
                        f"milter on {spec} not accepting after {timeout}s: {exc}"
                    ) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def start_c_milter(
    spec: str, *args: str, binary: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the no-op milter on ``spec`` with extra ``args``; return once it accepts."""
    exe = binary or default_binary()
    proc = subprocess.Popen(
        [str(exe), *args, spec],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_until_accepting(spec, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop_c_milters(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 15.0) -> list[int]:
    """SIGTERM all ``procs``, then wait for each; return their exit statuses.

    A milter still running after ``timeout`` is killed and reported as an error.
    """
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    stuck = []
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stuck.append(proc.args)
        if proc.stderr:
            proc.stderr.close()
    if stuck:
        raise CMilterError(f"milters ignored SIGTERM for {timeout}s: {stuck}")
    return [proc.returncode for proc in procs]


@contextmanager
def running_c_milter(
    spec: str, *args: str, binary: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run the no-op milter on ``spec`` for the ``with`` block, then SIGTERM it.

    After the block, the Popen's ``returncode`` tells whether it stopped cleanly.
    """
    proc = start_c_milter(spec, *args, binary=binary, env=env)
    try:
        yield proc
    finally:
        stop_c_milters([proc])
