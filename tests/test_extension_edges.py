"""libmilter_ext at the edges of the protocol: real milter processes over their sockets.

The milters are tests/milters/edges.py in its three modes; see its docstring.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libmilter_ext import protocol as P
from libmilter_ext.testing import MilterClient, MilterError
from tests.procs import PYTHON, ROOT, Daemon, edges_milter, wait_until

MILTERS = Path(__file__).parent / "milters"
RCPTS = ("<r1@example.org>", "<r2@example.org>", "<r3@example.org>")


_edges = edges_milter


@pytest.fixture(scope="module")
def noreply(shortdir):
    with _edges(shortdir, "noreply") as d:
        yield d


@pytest.fixture(scope="module")
def replying(shortdir):
    with _edges(shortdir, "replying") as d:
        yield d


@pytest.fixture(scope="module")
def rawhook(shortdir):
    with _edges(shortdir, "rawhook") as d:
        yield d


def _rcpts(c: MilterClient) -> list[str]:
    return [c.rcpt(r).action for r in RCPTS]


def _message(c: MilterClient, headers=(("Subject", "hi"), ("X-Other", "o"),
                                        ("X-Wanted", "w")), body=b"hello\r\n"):
    assert c.mail("<a@example.org>").continues
    assert c.rcpt("<r@example.org>").continues
    assert c.data().continues
    return c.message(list(headers), body)


def _added(resp) -> dict[str, str]:
    return dict(resp.added_headers())


# -- 1. SMFIC_QUIT_NC: a new SMTP session on a kept milter connection --------

@pytest.mark.parametrize("mode", ["noreply", "replying"])
def test_quit_nc_keeps_negotiation_and_renews_the_handler(request, mode):
    daemon = request.getfixturevalue(mode)
    with MilterClient(daemon.spec) as c:
        negotiated = c.protocol
        handlers = []
        for session in range(3):
            assert c.connect(f"ok{session}.example", "192.0.2.1", 25).continues
            assert c.helo("ok.example").continues
            resp = _message(c)
            assert resp.action == "continue", (session, resp)
            added = _added(resp)
            assert added["X-Headers"] == "Subject,X-Wanted"  # the filter is kept
            assert added["X-Chunks"] == "1"
            handlers.append(added["X-Handler"])
            c.quit_nc()
        assert c.protocol == negotiated
    assert len(set(handlers)) == 3, "each SMTP session gets its own handler object"
    closes = [line for line in daemon.stdout().splitlines() if line.startswith("close ")]
    # libmilter calls close for a session before it reads the next CONNECT
    assert {f"close {h}" for h in handlers[:2]} <= set(closes)


def test_quit_nc_ends_the_scope_of_a_connect_verdict(noreply):
    with MilterClient(noreply.spec) as c:
        assert c.connect("reject.example", "192.0.2.1", 25).action == "noreply"
        assert c.mail("<a@example.org>").action == "noreply"
        assert _rcpts(c) == ["reject"] * 3
        c.abort()
        c.quit_nc()
        assert c.connect("ok.example", "192.0.2.1", 25).action == "noreply"
        assert _message(c).action == "continue"


# -- 2. a verdict carried from a no-reply stage keeps its scope -------------

@pytest.mark.parametrize("stage", ["connect", "helo"])
@pytest.mark.parametrize("word,action", [("reject", "reject"), ("tempfail", "tempfail"),
                                         ("raise", "tempfail"), ("accept", "accept")])
def test_session_verdict_holds_for_the_whole_connection(noreply, stage, word, action):
    with MilterClient(noreply.spec) as c:
        host = f"{word}.example" if stage == "connect" else "ok.example"
        assert c.connect(host, "192.0.2.1", 25).action == "noreply"
        assert c.helo(f"{word}.example" if stage == "helo" else "ok.example").continues
        for _ in range(2):  # two transactions: the verdict outlives abort and MAIL
            assert c.mail("<a@example.org>").action == "noreply"
            if action == "accept":  # the MTA sends nothing more for this message
                assert c.rcpt(RCPTS[0]).action == "accept"
            else:
                assert _rcpts(c) == [action] * 3
            c.abort()


@pytest.mark.parametrize("word,action", [("reject", "reject"), ("tempfail", "tempfail"),
                                         ("raise", "tempfail")])
def test_envfrom_verdict_holds_until_the_transaction_ends(noreply, word, action):
    with MilterClient(noreply.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.helo("ok.example").continues
        assert c.mail(f"<{word}@example.org>").action == "noreply"
        assert _rcpts(c) == [action] * 3
        c.abort()
        resp = _message(c)  # the next transaction is judged on its own
    assert resp.action == "continue"
    assert _added(resp)["X-Chunks"] == "1"


def test_message_verdict_ends_at_eom_and_filtered_headers_stay_out(noreply):
    with MilterClient(noreply.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        resp = _message(c, headers=[("Subject", "reject"), ("X-Other", "x")])
        assert resp.action == "reject"
        assert not resp.modifications  # eom() itself did not run
        resp = _message(c)
    assert resp.action == "continue"
    assert _added(resp)["X-Headers"] == "Subject,X-Wanted"


# -- 3. SKIP only from a replying body(), and only when the MTA offers it ----

def test_skip_from_body_is_negotiated_and_sent(replying):
    with MilterClient(replying.spec) as c:
        assert c.protocol & P.SMFIP_SKIP
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.mail("<a@example.org>").continues
        assert c.rcpt("<r@example.org>").continues
        assert c.data().continues
        for name, value in (("Subject", "s"),):
            assert c.header(name, value).continues
        assert c.eoh().continues
        assert c.body(b"skip" + b"x" * (2 * P.MILTER_CHUNK_SIZE)).action == "skip"
        resp = c.eom()
    assert resp.action == "continue"
    assert _added(resp)["X-Chunks"] == "1"


def test_skip_from_body_without_smfip_skip_is_an_error(replying):
    with MilterClient(replying.spec, protocol=P.SMFI_CURR_PROT & ~P.SMFIP_SKIP) as c:
        assert not c.protocol & P.SMFIP_SKIP
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        resp = _message(c, body=b"skip me\r\n")
    assert resp.action == "tempfail"
    assert "body() returned SKIP: the MTA did not offer SMFIP_SKIP" in replying.stderr()


def test_skip_from_another_stage_is_an_error(replying):
    with MilterClient(replying.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.mail("<skip@example.org>").action == "tempfail"
    assert "envfrom() returned SKIP: only body() may" in replying.stderr()


def test_skip_from_noreply_body_is_an_error_answered_at_eom(noreply):
    with MilterClient(noreply.spec) as c:
        assert not c.protocol & P.SMFIP_SKIP
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        resp = _message(c, body=b"skip me\r\n")
    assert resp.action == "tempfail"
    assert "body() returned SKIP: a no-reply body() cannot skip" in noreply.stderr()


# -- 7. failing error hooks still answer the MTA ----------------------------

def test_on_exception_raising_systemexit_answers_tempfail(replying):
    with MilterClient(replying.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.mail("<exit@example.org>").action == "tempfail"
        assert _message(c).action == "continue"  # the process and connection live on
    assert "on_exception for envfrom raised SystemExit" in replying.stderr()


def test_on_exception_returning_nonsense_answers_tempfail(replying):
    with MilterClient(replying.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.mail("<hook99@example.org>").action == "tempfail"
    assert "on_exception for envfrom returned 99, not a verdict" in replying.stderr()


@pytest.mark.parametrize("local,logged", [
    ("exit", "SystemExit: 4"),
    ("hook99", "error hook returned 99 for envfrom, not a verdict"),
])
def test_c_layer_survives_a_broken_error_hook(rawhook, local, logged):
    with MilterClient(rawhook.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        assert c.mail(f"<{local}@example.org>").action == "tempfail"
        assert _message(c).action == "continue"
    assert logged in rawhook.stderr()
    assert rawhook.proc.poll() is None


# -- 4. the header_names filter ---------------------------------------------

def test_filtered_headers_never_reach_python_while_a_verdict_is_pending(noreply):
    with MilterClient(noreply.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        resp = _message(c, headers=[("Subject", "reject"), ("X-Other", "o-pending"),
                                    ("X-Wanted", "w-pending")])
    assert resp.action == "reject"
    out = noreply.stdout()
    assert "header Subject: reject" in out
    assert "o-pending" not in out and "w-pending" not in out


@pytest.mark.parametrize("names,error", [
    (frozenset({""}), "M.header_names: '' is not a header field name"),
    (frozenset({"X-Pr\u00fcfung"}), "M.header_names: 'X-Pr\u00fcfung' is not a header field"),
    (frozenset({"Subject:"}), "'Subject:' is not a header field name"),
    ("Subject", "M.header_names must be a set of header names, not str"),
    (frozenset({b"Subject"}), "M.header_names: b'Subject' is not a str"),
])
def test_bad_header_names_are_refused_when_the_class_is_defined(names, error):
    import libmilter_ext as lm

    with pytest.raises((TypeError, ValueError)) as info:
        class M(lm.Milter):
            header_names = names
    assert error in str(info.value)


def test_c_layer_checks_the_filter_terminator(shortdir):
    with _edges(shortdir, "badfilter") as d:
        with MilterClient(d.spec) as c:
            assert c.connect("ok.example", "192.0.2.1", 25).action == "tempfail"
    assert "set_header_filter: want b'name\\0name\\0\\0'" in d.stderr()


# -- 5. reply lines limited in bytes -----------------------------------------

def test_reply_lines_are_cut_by_bytes_not_characters(replying):
    with MilterClient(replying.spec) as c:
        assert c.connect("ok.example", "192.0.2.1", 25).continues
        resp = c.mail("<euro@example.org>")
    assert (resp.action, resp.code, resp.xcode) == ("replycode", 550, "5.7.1")
    assert "".join(resp.lines[:-1]) == "\u20ac" * 400
    assert resp.lines[-1] == "100%% sure"
    assert all(len(line.encode()) <= 400 for line in resp.lines)


# -- 6. _negotiate answering any sequence of two ints -----------------------

def test_negotiate_may_answer_a_list(shortdir):
    with _edges(shortdir, "listneg") as d:
        with MilterClient(d.spec) as c:
            assert c.protocol & P.SMFIP_NOUNKNOWN
            assert c.connect("ok.example", "192.0.2.1", 25).continues
            assert _added(_message(c))["X-Chunks"] == "1"


def test_negotiate_answering_nonsense_is_a_clear_type_error(shortdir):
    with _edges(shortdir, "shortneg") as d:
        with MilterClient(d.spec) as c:
            assert c.connect("ok.example", "192.0.2.1", 25).action == "tempfail"
    err = d.stderr()
    assert "TypeError: _negotiate() must return two unsigned ints (actions, protocol)" in err
    assert "SystemError" not in err


_EXAMPLES = int(os.environ.get("LIBMILTER_EXT_EXAMPLES", "200"))


@settings(max_examples=_EXAMPLES, derandomize=True, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=1500)), max_size=6))
def test_reply_lines_property(texts):
    """Every line fits libmilter and SMTP in bytes; no text is lost but blanks at cuts."""
    import libmilter_ext as lm

    lines = lm.reply_lines(texts)
    assert len(lines) <= 32
    for line in lines:
        raw = line.encode("utf-8", "surrogateescape")
        assert len(raw) <= 400
        assert not set(raw) & (set(range(0x20)) - {0x09}) and b"\x7f" not in raw
        assert "%" not in line.replace("%%", "")
    if len(lines) < 32:
        kept = "".join(line.replace("%%", "%") for line in lines)
        given_text = "".join(t for t in texts if t is not None)
        squash = str.maketrans("", "", " \t\r\n" + "".join(map(chr, range(0x20))) + "\x7f")
        cleaned = re.sub("[\ud800-\udc7f\udd00-\udfff]", "?", given_text)
        assert kept.translate(squash) == cleaned.translate(squash)


# -- 8. workers leaving while the interpreter finalizes ---------------------

_SIGTERM_ROUNDS = int(os.environ.get("LIBMILTER_EXT_SIGTERM_ROUNDS", "4"))


def _sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


def _slow_session(spec: str, answered: list[str]) -> None:
    try:
        with MilterClient(spec, timeout=30) as c:
            c.connect("h", "192.0.2.1", 1)
            answered.append(c.mail("<slow@example.org>").action)
    except MilterError as exc:  # the milter went away: also an answer
        answered.append(f"closed: {exc}")


@pytest.mark.parametrize("variant", ["plain", "deferred"])
def test_sigterm_with_slow_connections_in_flight_stops_cleanly(shortdir, variant):
    """12 connections inside a slow callback, then SIGTERM: a clean exit, every time.
    deferred: the kitchen with @deferred connect/helo/data/unknown/close."""
    extra = ["--deferred"] if variant == "deferred" else []
    for round_ in range(_SIGTERM_ROUNDS):
        work = shortdir / f"term{variant}{round_}"
        work.mkdir()
        spec = f"unix:{shortdir}/term{variant}{round_}.sock"
        d = Daemon([PYTHON, str(MILTERS / "kitchen.py"), spec, *extra], spec, work).start()
        answered: list[str] = []
        threads = [threading.Thread(target=_slow_session, args=(spec, answered))
                   for _ in range(12)]
        for t in threads:
            t.start()
        try:
            pid = d.proc.pid
            wait_until(lambda: _sockets(pid) >= 13)  # noqa: B023  (the listener and 12 clients)
        finally:
            code = d.stop(signal.SIGTERM)
        for t in threads:
            t.join(30)
        err = d.stderr()
        assert code == 0, f"round {round_}: exit {code}\n{err}"
        assert "Fatal Python error" not in err and "Exception ignored" not in err, err
        assert "stopped" in d.stdout()
        assert len(answered) == 12


# -- 9. sub-interpreters are refused -----------------------------------------

_SUBINTERP = """
import sys, _testcapi
if sys.argv[1] == "main-first":
    import libmilter_ext._milter
code = '''
try:
    import libmilter_ext._milter
except ImportError as exc:
    print("REFUSED", exc, flush=True)
else:
    print("IMPORTED", flush=True)
'''
_testcapi.run_in_subinterp(code)
import libmilter_ext
print("MAIN", libmilter_ext.version()[0] >= 1, flush=True)
"""


@pytest.mark.parametrize("order", ["sub-first", "main-first"])
def test_import_in_a_sub_interpreter_is_refused(order):
    out = subprocess.run([PYTHON, "-c", _SUBINTERP, order], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED "), out.stdout + out.stderr
    assert "sub-interpreter" in lines[0] or "subinterpreters" in lines[0]
    assert lines[1] == "MAIN True"


# -- a model of carried verdicts, checked against the real milter -----------

_WORDS = ("ok", "reject", "tempfail", "raise", "accept")
_ACTION = {"ok": "continue", "reject": "reject", "tempfail": "tempfail", "raise": "tempfail",
           "accept": "accept"}


def _first(*words: str) -> str:
    return next((_ACTION[w] for w in words if w != "ok"), "continue")


def _transaction(c: MilterClient, mail: str, subject: str) -> list[str]:
    """One MAIL transaction; returns the replying stages' actions until one ends it."""
    assert c.mail(f"<{mail}@example.org>").action == "noreply"
    got = [c.rcpt("<r@example.org>").action]
    if got[-1] == "continue":
        got.append(c.data().action)
        assert c.header("Subject", subject).action == "noreply"
        got.append(c.eoh().action)
        if got[-1] == "continue":
            assert c.body(b"x\r\n").action == "noreply"
            got.append(c.eom().action)
    if got[-1] != "continue":
        c.abort()
    return got


@settings(max_examples=int(os.environ.get("LIBMILTER_EXT_MODEL_EXAMPLES", "60")),
          derandomize=True, deadline=None)
@given(st.sampled_from(_WORDS), st.sampled_from(_WORDS), st.sampled_from(_WORDS),
       st.sampled_from(_WORDS))
def test_carried_verdicts_follow_the_model(noreply, host, helo, mail, subject):
    """As if every no-reply stage had replied: its verdict, for its scope."""
    session = _first(host, helo)
    message = _first(mail)
    with MilterClient(noreply.spec) as c:
        assert c.connect(f"{host}.example", "192.0.2.1", 25).action == "noreply"
        assert c.helo(f"{helo}.example").action == "noreply"
        got = _transaction(c, mail, subject)
        if session != "continue":
            assert got == [session]
        elif message != "continue":
            assert got == [message]
        else:
            header = _first(subject)
            assert got == ["continue", "continue", header] + (["continue"] * (header == "continue"))
        # the next transaction: only a session verdict still holds
        again = _transaction(c, "ok", "fine")
        assert again == ([session] if session != "continue" else ["continue"] * 4)
        if session == "accept":
            # libmilter is back in its HELO state after an ACCEPT, where it
            # ignores QUIT_NC (engine.c next_states): end the connection instead
            return
        c.quit_nc()  # and a new SMTP session starts clean, still negotiated
        assert c.connect("ok.example", "192.0.2.1", 25).action == "noreply"
        assert _transaction(c, "ok", "fine") == ["continue"] * 4


def test_quit_nc_session_whose_negotiation_was_forgotten_gets_the_failsafe(shortdir):
    work = shortdir / "park"
    work.mkdir()
    spec = f"unix:{shortdir}/park.sock"
    with Daemon([PYTHON, str(MILTERS / "edges.py"), spec, "replying", "1"], spec, work) as d:
        with MilterClient(spec) as first, MilterClient(spec) as second:
            for n, c in enumerate((first, second), 1):  # the second close pushes out the first
                assert c.connect("ok.example", "192.0.2.1", 25).continues
                assert _message(c).action == "continue"
                c.quit_nc()
                wait_until(lambda n=n: d.stdout().count("close ") >= n)
            assert second.connect("ok.example", "192.0.2.1", 25).continues
            assert _message(second).action == "continue"
            assert first.connect("ok.example", "192.0.2.1", 25).action == "tempfail"
    assert "negotiation is not known (forgotten after SMFIC_QUIT_NC)" in d.stderr()
