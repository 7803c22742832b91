"""Negotiation from the class's template without the GIL, the handler made lazily.

A real milter process (tests/milters/edges.py in its lazy mode) whose factory
is replaced with set_factory() while connections are open.
"""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import pytest

import libmilter_ext as lm
from libmilter_ext.testing import MilterClient
from tests.milters.edges import ListNegotiation, Replying
from tests.procs import PYTHON, Daemon, wait_until

MILTERS = Path(__file__).parent / "milters"


@pytest.fixture()
def lazy():
    with tempfile.TemporaryDirectory(prefix="lml", dir="/tmp") as d:
        work = Path(d)
        spec = f"unix:{work}/lazy.sock"
        with Daemon([PYTHON, str(MILTERS / "edges.py"), spec, "lazy"], spec, work) as daemon:
            yield daemon


def _switch(daemon: Daemon, word: str) -> None:
    n = daemon.stdout().count(f"factory {word}")
    (daemon.workdir / "factory").write_text(word)
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: daemon.stdout().count(f"factory {word}") > n)


def _message(client: MilterClient, local: str = "ok") -> dict[str, str]:
    """HELO .. EOM with a Subject and an X-Wanted field; the eom's X- fields
    (LazyFirst filters both in, LazySecond only X-Wanted)."""
    client.helo("ok.example")
    assert client.mail(f"<{local}@example.org>").action == "continue"
    client.rcpt("<r@example.org>")
    client.data()
    client.header("Subject", "ok")
    client.header("X-Wanted", "ok")
    client.eoh()
    eom = client.eom()
    assert eom.action == "continue"
    return dict(eom.added_headers())


def test_connection_keeps_the_factory_it_negotiated_with(lazy):
    with MilterClient(lazy.spec) as first:
        first.connect("ok.example", "192.0.2.1", 25, "4")  # deferred: no handler yet
        _switch(lazy, "second")
        with MilterClient(lazy.spec) as second:
            second.connect("ok.example", "192.0.2.2", 25, "4")
            got = _message(second)
            assert (got["X-Class"], got["X-Headers"]) == ("LazySecond", "X-Wanted")
        got = _message(first)
        assert (got["X-Class"], got["X-Headers"]) == ("LazyFirst", "Subject,X-Wanted")
        first.quit_nc()  # a new session on the kept milter connection: still its class
        first.connect("ok.example", "192.0.2.1", 25, "4")
        got = _message(first)
        assert (got["X-Class"], got["X-Headers"]) == ("LazyFirst", "Subject,X-Wanted")


@pytest.mark.parametrize("word,logged", [
    ("wrong", "milter factory made a LazyFirst for a connection negotiated for"),
    ("raise", "the factory is broken on purpose"),
])
def test_a_factory_failing_at_the_first_python_stage_answers_the_failsafe(lazy, word,
                                                                         logged):
    _switch(lazy, word)
    with MilterClient(lazy.spec) as client:
        assert client.connect("ok.example", "192.0.2.1", 25, "4").action == "noreply"
        assert client.helo("ok.example").action == "tempfail"  # the first Python stage
        assert client.mail("<ok@example.org>").action == "tempfail"  # the whole session
    wait_until(lambda: logged in lazy.stderr())
    assert "cannot create the milter for a connection (helo)" in lazy.stderr()
    _switch(lazy, "first")  # and the next connection is served again
    with MilterClient(lazy.spec) as client:
        client.connect("ok.example", "192.0.2.1", 25, "4")
        assert _message(client)["X-Class"] == "LazyFirst"


def test_template_is_the_negotiation_of_the_class_and_none_when_overridden():
    offer = lm.ALL_ACTIONS | lm.SMFIF_SETSYMLIST, 0x1FFFFF
    actions, protocol, symlists, header_filter, deferred, close = \
        Replying._negotiation_template(*offer)
    assert (actions, protocol & ~0x1FFFFF) == (lm.ALL_ACTIONS, 0)
    assert header_filter == b"subject\0x-wanted\0\0" and symlists == ()
    assert (deferred, close) == (0, False)  # close() overridden, not deferred
    assert ListNegotiation._negotiation_template(*offer) is None  # asked per connection


def test_kept_connection_takes_a_new_factory_of_the_same_class(lazy):
    """A parked (closed, QUIT_NC-resumable) context does not keep a replaced
    factory alive when the new one makes the same class: its next session gets
    the new one; of another class it keeps its own (see the test above)."""
    with MilterClient(lazy.spec) as client:
        client.connect("ok.example", "192.0.2.1", 25, "4")
        assert _message(client)["X-Factory"] == "first"
        client.quit_nc()
        _switch(lazy, "again")
        client.connect("ok.example", "192.0.2.1", 25, "4")
        got = _message(client)
        assert (got["X-Class"], got["X-Factory"]) == ("LazyFirst", "again")
