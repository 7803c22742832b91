"""@libmilter_ext.deferred: stages answered in C, their methods run later.

Real milter processes (tests/milters/edges.py in its deferred, counting and
eager modes) driven over their sockets.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import libmilter_ext as lm
from libmilter_ext import protocol as P
from libmilter_ext.testing import MilterClient
from tests.procs import Daemon, edges_milter, wait_until

MILTERS = Path(__file__).parent / "milters"
DEFERRED_NR = (P.SMFIP_NR_CONN | P.SMFIP_NR_HELO | P.SMFIP_NR_HDR | P.SMFIP_NR_DATA
               | P.SMFIP_NR_UNKN)
NO_NR = P.SMFI_CURR_PROT & ~(DEFERRED_NR | P.SMFIP_NR_MAIL | P.SMFIP_NR_RCPT | P.SMFIP_NR_EOH
                             | P.SMFIP_NR_BODY)


_edges = edges_milter


@pytest.fixture(scope="module")
def deferred(shortdir):
    with _edges(shortdir, "deferred") as d:
        yield d


def _calls(daemon: Daemon, serial: str) -> list[str]:
    prefix = f"call {serial} "
    return [line[len(prefix):] for line in daemon.stdout().splitlines()
            if line.startswith(prefix)]


def _serials(daemon: Daemon) -> set[str]:
    return {line.split()[1] for line in daemon.stdout().splitlines() if line.startswith("call ")}


def _new_serial(daemon: Daemon, before: set[str]) -> str:
    (serial,) = _serials(daemon) - before
    return serial


def _wait_closed(daemon: Daemon, serial: str) -> None:
    """A deferred close() runs at the next GIL hold: open connections until it did."""
    def closed() -> bool:
        with MilterClient(daemon.spec):  # negotiation takes the GIL
            pass
        return f"close {serial} " in daemon.stdout()
    wait_until(closed)


def _session(c: MilterClient, host="ok.example", helo="ok.example"):
    """connect and HELO with macros; both are answered by C."""
    return (c.connect(host, "192.0.2.1", 25, macros={"j": "mx.test"}).action,
            c.helo(helo, macros={"{tls_version}": "TLSv1.3"}).action)


@pytest.mark.parametrize("offered,answer", [(P.SMFI_CURR_PROT, "noreply"), (NO_NR, "continue")])
def test_deferred_calls_run_in_order_with_their_macros_at_the_next_python_stage(
        deferred, offered, answer):
    before = _serials(deferred)
    with MilterClient(deferred.spec, protocol=offered) as c:
        assert c.protocol & DEFERRED_NR == DEFERRED_NR & offered
        assert _session(c) == (answer, answer)
        assert c.unknown("FOO bar").action == answer
        time.sleep(0.2)
        assert _serials(deferred) == before, "a deferred method ran before a Python stage"
        assert c.mail("<a@example.org>", macros={"i": "Q1"}).continues
        serial = _new_serial(deferred, before)
        assert c.rcpt("<ok@example.org>").continues
        assert c.data().action == answer
        resp = c.message([("Subject", "hi")], b"x\r\n")
    assert resp.action == "continue"
    expected = ["connect ok.example 2 ('192.0.2.1', 25) j=mx.test stage=connect",
                "helo ok.example tls=TLSv1.3", "unknown FOO bar", "envfrom <a@example.org> i=Q1",
                "rcpt <ok@example.org>", "data", "header Subject: hi"]
    assert dict(resp.added_headers())["X-Calls"] == ";".join(expected)
    _wait_closed(deferred, serial)
    assert _calls(deferred, serial) == expected  # each exactly once
    # close() ran later, at another connection's GIL hold, the connection gone
    assert f"close {serial} closed=True " in deferred.stdout()


def test_deferred_calls_run_at_close_when_no_python_stage_follows(deferred):
    # Replying stages here: with every stage no-reply, Debian's libmilter was seen
    # (in a C-level trace) to skip xxfi_unknown when UNKNOWN and QUIT came back to
    # back; an MTA that waits for each answer sends them one by one.
    before = _serials(deferred)
    with MilterClient(deferred.spec, protocol=NO_NR) as c:
        assert _session(c) == ("continue", "continue")
        assert c.unknown("NOOP").action == "continue"
    wait_until(lambda: len(_serials(deferred) - before) == 1)
    serial = _new_serial(deferred, before)
    _wait_closed(deferred, serial)
    assert _calls(deferred, serial) == [
        "connect ok.example 2 ('192.0.2.1', 25) j=mx.test stage=connect",
        "helo ok.example tls=TLSv1.3", "unknown NOOP"]
    close = next(line for line in deferred.stdout().splitlines()
                 if line.startswith(f"close {serial} "))
    # the close callback took the GIL for the waiting calls, so close() ran in it
    assert "closed=False" in close


def test_deferred_data_runs_at_abort(deferred):
    before = _serials(deferred)
    with MilterClient(deferred.spec) as c:
        _session(c)
        assert c.mail("<a@example.org>").continues
        assert c.rcpt("<ok@example.org>").continues
        assert c.data().action == "noreply"
        c.abort()
        assert c.mail("<b@example.org>").continues
        serial = _new_serial(deferred, before)
        assert _calls(deferred, serial)[-3:] == ["data", "abort", "envfrom <b@example.org> i=None"]


@pytest.mark.parametrize("helo,action,stage", [("raise.example", "tempfail", "helo"),
                                               ("reject.example", "reject", None)])
def test_helo_verdict_or_exception_is_answered_by_the_stage_that_ran_it(
        deferred, helo, action, stage):
    with MilterClient(deferred.spec) as c:
        assert _session(c, helo=helo) == ("noreply", "noreply")
        assert c.mail("<a@example.org>").action == action
        # a session verdict: the next MAIL gets it too, without calling Python
        assert c.mail("<b@example.org>").action == action
    if stage is not None:
        assert re.search(r"exception in helo callback: asked to raise", deferred.stderr())


def test_a_carried_verdict_keeps_the_reply_set_by_the_deferred_method(deferred):
    with MilterClient(deferred.spec) as c:
        _session(c, helo="reply.example")
        resp = c.mail("<a@example.org>")
    assert (resp.action, resp.code, resp.xcode, resp.text) == (
        "replycode", 550, "5.7.1", "helo reply.example refused")


def test_a_connect_verdict_drops_the_deferred_calls_after_it(deferred):
    before = _serials(deferred)
    with MilterClient(deferred.spec) as c:
        _session(c, host="reject.example")
        assert c.mail("<a@example.org>").action == "reject"
    serial = _new_serial(deferred, before)
    _wait_closed(deferred, serial)
    # helo never ran: had connect replied, libmilter's MTA would not have sent it on
    assert [c.split()[0] for c in _calls(deferred, serial)] == ["connect"]


def test_a_data_verdict_is_answered_by_the_next_python_stage(deferred):
    with MilterClient(deferred.spec) as c:
        _session(c)
        assert c.mail("<a@example.org>").continues
        assert c.rcpt("<reject@example.org>").continues
        assert c.data().action == "noreply"
        assert c.header("Subject", "hi").action == "noreply"  # deferred too
        assert c.eoh().action == "reject"
        c.abort()
        assert c.mail("<a@example.org>").continues  # the message scope ended


def test_more_deferred_calls_than_the_queue_holds_all_run_in_order(deferred):
    before = _serials(deferred)
    commands = [f"CMD{n} x" for n in range(20)]
    with MilterClient(deferred.spec) as c:
        _session(c)
        for command in commands:
            assert c.unknown(command).action == "noreply"
        resp = _message_after_mail(c)
    serial = _new_serial(deferred, before)
    calls = _calls(deferred, serial)
    assert [x for x in calls if x.startswith("unknown ")] == [f"unknown {x}" for x in commands]
    assert calls.index("envfrom <a@example.org> i=None") == 2 + len(commands)
    assert resp.action == "continue"


def test_deferred_header_fields_wait_in_order_within_the_queue_and_size_bounds(deferred):
    """Wanted fields beyond 16 calls or 64 KiB of text still reach header() once
    each, in order; fields the filter drops never do."""
    before = _serials(deferred)
    fields = [("X-Wanted", f"v{n}") for n in range(40)]
    fields[5:5] = [("X-Other", "not wanted"), ("X-Wanted", "big " + "b" * 40000)]
    fields[12:12] = [("Subject", "s " + "c" * 40000), ("X-Wanted", "d " + "d" * 60000)]
    with MilterClient(deferred.spec) as c:
        _session(c)
        assert c.mail("<a@example.org>").continues
        assert c.rcpt("<ok@example.org>").continues
        assert c.data().action == "noreply"
        for name, value in fields:
            assert c.header(name, value).action == "noreply"
        resp = c.message([], b"x\r\n")
    assert resp.action == "continue", deferred.stderr()[-3000:]
    wanted = [(n, v) for n, v in fields if n != "X-Other"]
    assert dict(resp.added_headers())["X-Headers"] == ",".join(n for n, _ in wanted)
    serial = _new_serial(deferred, before)
    _wait_closed(deferred, serial)
    calls = [x for x in _calls(deferred, serial) if x.startswith("header ")]
    assert calls == [f"header {n}: {v if len(v) <= 40 else f'{v[:20]}... ({len(v)})'}"
                     for n, v in wanted]


def test_deferred_header_fields_take_no_gil_of_their_own(deferred):
    """Ten wanted fields cost a message no more GIL entries than none; three of
    30,000 octets overflow the 64 KiB the waiting calls may hold once."""
    big = [("X-Wanted", f"{n} " + "v" * 30000) for n in range(3)]
    small = [("Subject", "hi")] + [("X-Wanted", str(n)) for n in range(9)]
    gil = []
    with MilterClient(deferred.spec) as c:
        _session(c)
        for fields in ([], [], small, big):
            assert c.mail("<a@example.org>").continues
            assert c.rcpt("<ok@example.org>").continues
            assert c.data().action == "noreply"
            resp = c.message(fields, b"x\r\n")
            gil.append(int(dict(resp.added_headers())["X-Gil"]))
            assert dict(resp.added_headers())["X-Headers"] == ",".join(n for n, _ in fields)
    none, ten, three_big = (b - a for a, b in zip(gil, gil[1:]))
    assert (ten, three_big) == (none, none + 1), gil


def _message_after_mail(c: MilterClient):
    assert c.mail("<a@example.org>").continues
    assert c.rcpt("<ok@example.org>").continues
    assert c.data().action == "noreply"
    return c.message([("Subject", "hi")], b"x\r\n")


def test_quit_nc_session_defers_too_and_the_old_close_runs_first(deferred):
    before = _serials(deferred)
    with MilterClient(deferred.spec) as c:
        negotiated = c.protocol
        serials = []
        for n in range(3):
            assert _session(c, host=f"s{n}.example") == ("noreply", "noreply")
            assert _message_after_mail(c).action == "continue"
            serials.append(_new_serial(deferred, before | set(serials)))
            c.quit_nc()
        assert c.protocol == negotiated
    out = deferred.stdout()
    for n, serial in enumerate(serials):
        assert _calls(deferred, serial)[0].startswith(f"connect s{n}.example ")
        if n:  # the previous session's (deferred) close ran before this one's calls
            assert out.index(f"close {serials[n - 1]} ") < out.index(f"call {serial} connect")


def test_only_stages_that_always_answer_can_be_deferred():
    with pytest.raises(TypeError, match="Bad.envfrom: only connect, helo, header, data, unknown"):
        class Bad(lm.Milter):
            @lm.deferred
            def envfrom(self, sender, *params):
                return lm.CONTINUE


def test_deferred_stages_are_negotiated_no_reply_when_offered():
    class Some(lm.Milter):
        @lm.deferred
        def helo(self, name):
            return lm.CONTINUE

        def envfrom(self, sender, *params):
            return lm.CONTINUE

    flags = Some.protocol_flags()
    assert flags & P.SMFIP_NR_HELO and not flags & P.SMFIP_NOHELO
    assert flags & P.SMFIP_NOCONNECT and not flags & P.SMFIP_NR_MAIL
    assert Some._deferral() == (P.SMFIP_NR_HELO, True)


def _gil_per_session(daemon: Daemon, sessions: int, wait_close: bool) -> list[int]:
    seen = []
    for n in range(sessions):
        with MilterClient(daemon.spec) as c:
            assert c.connect("ok.example", "192.0.2.1", 25).continues
            assert c.helo("ok.example").continues
            assert c.mail("<a@example.org>").continues
            assert c.rcpt("<r@example.org>").continues
            resp = c.message([("Subject", "hi")], b"x\r\n")
            seen.append(int(dict(resp.added_headers())["X-Gil"]))
        if wait_close:
            wait_until(lambda n=n: daemon.stdout().count("close") == n + 1)
    return [b - a for a, b in zip(seen, seen[1:])]


def test_gil_entries_per_session(shortdir):
    """Negotiation answers from the class's template without the GIL.  Eager:
    connect, helo, envfrom, eom and close take the GIL; deferred connect and helo
    with the default close: envfrom (which makes the handler) and eom."""
    with _edges(shortdir, "eager") as eager:
        assert _gil_per_session(eager, 4, wait_close=True) == [5, 5, 5]
    with _edges(shortdir, "counting") as counting:
        assert _gil_per_session(counting, 4, wait_close=False) == [2, 2, 2]


_WORDS = ("ok", "reject", "tempfail", "raise", "accept")
_ACTION = {"ok": "continue", "reject": "reject", "tempfail": "tempfail", "raise": "tempfail",
           "accept": "accept"}


def _first(*words: str) -> str:
    return next((_ACTION[w] for w in words if w != "ok"), "continue")


@settings(max_examples=int(os.environ.get("LIBMILTER_EXT_MODEL_EXAMPLES", "60")),
          derandomize=True, deadline=None)
@given(st.sampled_from(_WORDS), st.sampled_from(_WORDS), st.sampled_from(_WORDS),
       st.sampled_from(_WORDS), st.sampled_from(_WORDS))
def test_deferred_verdicts_follow_the_no_reply_model(deferred, host, helo, unknown, rcpt,
                                                     subject):
    """A deferred stage's verdict is a no-reply stage's: the stage that runs it answers
    it, for its scope (connect, helo, unknown: the session; data: the message)."""
    session = _first(host, helo, unknown)
    with MilterClient(deferred.spec) as c:
        assert _session(c, host=f"{host}.example", helo=f"{helo}.example") == ("noreply",) * 2
        assert c.unknown(f"{unknown} cmd").action == "noreply"
        got = [c.mail("<ok@example.org>").action]
        if got[-1] == "continue":
            got.append(c.rcpt(f"<{rcpt}@example.org>").action)
            assert c.data().action == "noreply"
            assert c.header("Subject", subject).action == "noreply"
            got.append(c.eoh().action)  # runs data() and header() first
        if session != "continue":
            assert got == [session]
        else:
            assert got == ["continue", "continue", _first(rcpt, subject)]
            c.abort()
            # the next transaction: the data verdict ended with the message
            assert c.mail("<ok@example.org>").action == "continue"
            assert c.rcpt("<ok@example.org>").action == "continue"


def test_a_second_helo_replaces_the_macros_the_first_deferred_helo_reads(deferred):
    """libmilter keeps one set of HELO macros: EHLO again (after STARTTLS, say)
    replaces them before the first, deferred, helo() runs."""
    before = _serials(deferred)
    with MilterClient(deferred.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25, macros={"j": "mx.test"}).continues
        assert c.helo("first.example", macros={"{tls_version}": "none"}).continues
        assert c.helo("second.example", macros={"{tls_version}": "TLSv1.3"}).continues
        assert c.mail("<a@example.org>").continues
    serial = _new_serial(deferred, before)
    assert _calls(deferred, serial)[1:3] == ["helo first.example tls=TLSv1.3",
                                             "helo second.example tls=TLSv1.3"]
