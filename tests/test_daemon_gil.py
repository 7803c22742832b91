"""How often spfmilter's daemon takes the GIL per SMTP session (a count, not a timing).

Negotiation answers from the class's template in C, connect, helo, header
and close are @deferred and header fields other than Authentication-Results
are filtered in C: a session takes the GIL at MAIL FROM (which makes the
handler and runs connect and helo) and end of message (which judges the
Authentication-Results fields) only.  End of message never lets go of it: its header
changes (two fields added, a forged Authentication-Results field deleted) are
queued in C and sent once eom() has returned, after the GIL is given back.
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


def _counts(daemon) -> tuple[int, int]:
    """(GIL entries of callbacks, GIL releases of actions) in the daemon so far."""
    lines = daemon.counts.read_text().splitlines() if daemon.counts.exists() else []
    os.kill(daemon.proc.pid, signal.SIGUSR1)
    wait_until(lambda: daemon.counts.exists()
               and len(daemon.counts.read_text().splitlines()) > len(lines))
    entries, releases = daemon.counts.read_text().splitlines()[-1].split()
    return int(entries), int(releases)


def _session(daemon, headers):
    result = session(daemon.spec, ip="127.0.0.2", helo="pass.spf.test",
                     sender="<user@pass.spf.test>", headers=headers, body=b"hi\r\n",
                     macros={"mail": {"i": "QID1"}})
    return list(result.values())[-1]


FORGED = ("Authentication-Results", "mx.test.example; spf=pass smtp.mailfrom=pass.spf.test")


@pytest.mark.parametrize("headers,per_session", [
    ((("Subject", "test"), ("From", "a@pass.spf.test")), 2),
    ((("Subject", "test"), ("Authentication-Results", "other.example; spf=pass")), 2),
    ((("Subject", "test"), FORGED, ("Authentication-Results", "other.example; x=y")), 2),
])
def test_gil_entries_per_session(counted, headers, per_session):
    assert _session(counted, headers).action == "continue"  # warm: HELO/MAIL results cached
    before = _counts(counted)[0]
    for _ in range(5):
        assert _session(counted, headers).action == "continue"
    assert _counts(counted)[0] - before == 5 * per_session


def test_eom_header_changes_release_the_gil_zero_times(counted):
    """Two fields added and a forged AR deleted: the MTA gets all three, no GIL hand-off."""
    assert _session(counted, (("Subject", "x"), FORGED)).action == "continue"
    before = _counts(counted)[1]
    for _ in range(5):
        last = _session(counted, (("Subject", "x"), FORGED))
        assert last.action == "continue"
        kinds = [(m.kind, m.name, m.index) for m in last.modifications]
        assert kinds == [("chgheader", "Authentication-Results", 1),
                         ("insheader", "Received-SPF", 0),
                         ("insheader", "Authentication-Results", 0)], kinds
    assert _counts(counted)[1] - before == 0
