"""How often spfmilter's daemon takes the GIL per SMTP session (a count, not a timing).

Negotiation answers from the class's template in C, connect, helo and close
are @deferred and header fields other than Authentication-Results are
filtered in C: a session takes the GIL at MAIL FROM (which makes the handler
and runs connect and helo) and end of message only, and once more per
Authentication-Results field.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from libmilter_ext.testing import session
from tests.procs import PYTHON, Daemon, wait_until
from tests.test_daemon import write_config

MILTERS = Path(__file__).parent / "milters"


@pytest.fixture(scope="module")
def counted(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfg", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "spfmilter.cfg"
        write_config(cfg, work, dns_server)
        counts = work / "counts"
        daemon = Daemon([PYTHON, str(MILTERS / "gil_spfmilter.py"), str(counts), "-c",
                         str(cfg), "run", "--stderr"], f"unix:{work}/spf.sock", work)
        daemon.counts = counts
        with daemon:
            yield daemon


def _entries(daemon) -> int:
    lines = daemon.counts.read_text().split() if daemon.counts.exists() else []
    os.kill(daemon.proc.pid, signal.SIGUSR1)
    wait_until(lambda: daemon.counts.exists() and len(daemon.counts.read_text().split())
               > len(lines))
    return int(daemon.counts.read_text().split()[-1])


def _session(daemon, headers) -> str:
    result = session(daemon.spec, ip="127.0.0.2", helo="pass.spf.test",
                     sender="<user@pass.spf.test>", headers=headers, body=b"hi\r\n",
                     macros={"mail": {"i": "QID1"}})
    return list(result.values())[-1].action


@pytest.mark.parametrize("headers,per_session", [
    ((("Subject", "test"), ("From", "a@pass.spf.test")), 2),
    ((("Subject", "test"), ("Authentication-Results", "other.example; spf=pass")), 3),
])
def test_gil_entries_per_session(counted, headers, per_session):
    assert _session(counted, headers) == "continue"  # warm: the HELO/MAIL results cached
    before = _entries(counted)
    for _ in range(5):
        assert _session(counted, headers) == "continue"
    assert _entries(counted) - before == 5 * per_session
