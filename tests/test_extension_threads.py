"""libmilter's worker threads come and go; their Python thread states go with them.

Under load Debian's libmilter starts a worker thread for each session it cannot
hand to an idle one and ends the spare ones again.  libmilter_ext keeps a
thread state per worker thread (not per callback) and, when the thread ends,
leaves its deletion to the next callback that holds the GIL, so an ending
thread never queues for the GIL.  A real milter (tests/milters/threads.py)
counts the interpreter's thread states against the process's threads.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from libmilter_ext.testing import MilterClient
from tests.procs import PYTHON, Daemon

MILTER = Path(__file__).parent / "milters" / "threads.py"
BURST = 12


@pytest.fixture
def daemon():
    with tempfile.TemporaryDirectory(prefix="lmt", dir="/tmp") as d:
        spec = f"unix:{d}/threads.sock"
        with Daemon([PYTHON, str(MILTER), spec], spec, Path(d)) as proc:
            yield proc


def _session(spec: str, sender: str) -> dict[str, int]:
    with MilterClient(spec, timeout=30) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.helo("ok.example").continues
        assert c.mail(sender).continues
        assert c.rcpt("<r@example.org>").continues
        resp = c.message([("Subject", "hi")], b"x\r\n")
        return {name: int(value) for name, value in resp.added_headers()}


def test_ended_worker_threads_leave_no_thread_state(daemon):
    errors: list[BaseException] = []

    def sleepy() -> None:
        try:
            _session(daemon.spec, "<sleep@example.org>")
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    for _ in range(2):  # two bursts: the pool grows, shrinks and grows again
        clients = [threading.Thread(target=sleepy) for _ in range(BURST)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        assert not errors, errors[0]
    readings = [_session(daemon.spec, "<a@example.org>") for _ in range(5)]
    last = readings[-1]
    # The bursts ran on many worker threads, and most of them have ended ...
    assert last["X-Seen"] >= BURST
    assert last["X-Tasks"] < last["X-Seen"]
    # ... yet the interpreter holds no more thread states than there are threads
    # (a thread ending during a reading can make one reading miss by one).
    assert any(r["X-States"] <= r["X-Tasks"] for r in readings), readings
