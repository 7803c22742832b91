"""What an MTA receives when eom writes: header changes queued in C, sent in order.

libmilter_ext queues eom's header changes (addheader, insheader, chgheader)
and sends them before the next other write or once eom returned.  The MTA
must see exactly the command stream it saw when each call wrote at once, and
every error must still come from the call that made it.  The milter is
tests/milters/scripted.py (see its docstring), driven over its socket.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libmilter_ext import protocol as P
from libmilter_ext.testing import MilterClient
from tests.procs import PYTHON, Daemon, wait_until

MILTERS = Path(__file__).parent / "milters"
_EXAMPLES = int(os.environ.get("LIBMILTER_EXT_EOM_EXAMPLES", "60"))

# The actions an op needs, and the name its StageError gives.
_FLAGS = {"add": (P.SMFIF_ADDHDRS, "addheader"), "ins": (P.SMFIF_ADDHDRS, "addheader"),
          "chg": (P.SMFIF_CHGHDRS, "chgheader"), "addrcpt": (P.SMFIF_ADDRCPT, "addrcpt"),
          "addrcpt_par": (P.SMFIF_ADDRCPT_PAR, "addrcpt"),
          "delrcpt": (P.SMFIF_DELRCPT, "delrcpt"), "chgfrom": (P.SMFIF_CHGFROM, "chgfrom"),
          "body": (P.SMFIF_CHGBODY, "replacebody"),
          "quarantine": (P.SMFIF_QUARANTINE, "quarantine")}
_FLAG_NAMES = {P.SMFIF_ADDHDRS: "SMFIF_ADDHDRS", P.SMFIF_CHGHDRS: "SMFIF_CHGHDRS",
               P.SMFIF_ADDRCPT: "SMFIF_ADDRCPT", P.SMFIF_ADDRCPT_PAR: "SMFIF_ADDRCPT_PAR",
               P.SMFIF_DELRCPT: "SMFIF_DELRCPT", P.SMFIF_CHGFROM: "SMFIF_CHGFROM",
               P.SMFIF_CHGBODY: "SMFIF_CHGBODY", P.SMFIF_QUARANTINE: "SMFIF_QUARANTINE"}


@pytest.fixture(scope="module")
def scripted():
    with tempfile.TemporaryDirectory(prefix="lmw", dir="/tmp") as d:
        spec = f"unix:{d}/s.sock"
        with Daemon([PYTHON, str(MILTERS / "scripted.py"), spec], spec, Path(d)) as daemon:
            yield daemon


def _run(daemon: Daemon, script: dict, actions: int = P.SMFI_CURR_ACTS):
    """One message whose eom runs script; the eom response."""
    with MilterClient(daemon.spec, actions=actions) as c:
        assert c.mail("<a@example.org>").continues
        assert c.rcpt("<r@example.org>").continues
        return c.message([("X-Script", json.dumps(script))], b"body\r\n")


def _z(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\0"


def _idx(i: int) -> bytes:
    return struct.pack("!I", i)


def _texts(kind: str, args: list) -> list[tuple[str, str]]:
    """The op's text arguments, as the C layer names them, in the order it checks them."""
    if kind == "add":
        return [("header name", args[0]), ("header value", args[1])]
    if kind == "ins":
        return [("header name", args[1]), ("header value", args[2])]
    if kind == "chg":
        return [("header name", args[0]), ("header value", args[2] or "")]
    if kind in ("addrcpt", "delrcpt", "quarantine"):
        return [("reason" if kind == "quarantine" else "address", args[0])]
    if kind in ("addrcpt_par", "chgfrom"):
        return [("address", args[0]), ("ESMTP arguments", args[1] or "")]
    return []


def _error(kind: str, args: list, actions: int) -> str | None:
    """The exception text the op raises at its call (as the C layer words it), or None."""
    flag, name = _FLAGS.get(kind, (0, ""))
    if flag and not actions & flag:
        return (f"StageError: {name} needs the {_FLAG_NAMES[flag]} action, "
                "which was not negotiated")
    texts = _texts(kind, args)
    for what, text in texts:
        if "\0" in text:
            return f"ValueError: {what} must not contain NUL characters"
    if kind in ("add", "ins", "chg"):  # libmilter refuses these before writing
        call = "smfi_insheader" if kind == "ins" and args[0] >= 0 else \
            "smfi_chgheader" if kind == "chg" else "smfi_addheader"
        if not texts[0][1] or kind == "chg" and args[1] < 0:
            return f"MilterError: {call} failed"
    elif texts and not texts[0][1]:
        return f"MilterError: smfi_{kind} failed"
    return None


def _packets(kind: str, args: list) -> list[tuple[bytes, bytes]]:
    """What libmilter writes for an op that did not raise."""
    if kind == "add":
        return [(P.SMFIR_ADDHEADER, _z(args[0]) + _z(args[1]))]
    if kind == "ins":
        if args[0] < 0:
            return [(P.SMFIR_ADDHEADER, _z(args[1]) + _z(args[2]))]
        return [(P.SMFIR_INSHEADER, _idx(args[0]) + _z(args[1]) + _z(args[2]))]
    if kind == "chg":
        return [(P.SMFIR_CHGHEADER, _idx(args[1]) + _z(args[0]) + _z(args[2] or ""))]
    if kind == "addrcpt":
        return [(P.SMFIR_ADDRCPT, _z(args[0]))]
    if kind == "addrcpt_par":
        return [(P.SMFIR_ADDRCPT_PAR, _z(args[0]) + _z(args[1]))]
    if kind == "delrcpt":
        return [(P.SMFIR_DELRCPT, _z(args[0]))]
    if kind == "chgfrom":
        return [(P.SMFIR_CHGFROM, _z(args[0]) + (_z(args[1]) if args[1] is not None else b""))]
    if kind == "body":
        body = bytes([args[0]]) * args[1]
        size = P.MILTER_CHUNK_SIZE
        return [(P.SMFIR_REPLBODY, body[i:i + size]) for i in range(0, max(len(body), 1), size)]
    if kind == "quarantine":
        return [(P.SMFIR_QUARANTINE, _z(args[0]))]
    if kind == "progress":
        return [(P.SMFIR_PROGRESS, b"")]
    return []  # reply: kept for the verdict


def expected(script: dict, actions: int) -> list[tuple[bytes, bytes]]:
    """The command stream an MTA sees when every call writes at once, in call order."""
    out: list[tuple[bytes, bytes]] = []
    reply: str | None = None
    ops = list(script["do"]) + (script.get("on_exception", []) if script["end"] == "raise"
                                else [])
    for kind, *args in ops:
        error = _error(kind, args, actions)
        if error is not None:
            out.append((P.SMFIR_ADDHEADER, _z("X-Err") + _z(error)))
            continue
        if kind == "reply":
            reply = f"{args[0]} {args[0][0]}.7.1 {args[1]}"
        out += _packets(kind, args)
    end = "tempfail" if script["end"] == "raise" else script["end"]
    code_class = "5" if end == "reject" else "4"
    if end in ("reject", "tempfail") and reply is not None and reply[0] == code_class:
        out.append((P.SMFIR_REPLYCODE, _z(reply)))
    else:
        out.append(({"continue": P.SMFIR_CONTINUE, "accept": P.SMFIR_ACCEPT,
                     "reject": P.SMFIR_REJECT, "tempfail": P.SMFIR_TEMPFAIL,
                     "discard": P.SMFIR_DISCARD}[end], b""))
    return out


# -- the property: the same command stream as immediate writes ----------------

_names = st.sampled_from(["X-A", "Subject", "Authentication-Results", "", "Bad\0Name"])
_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8) \
    | st.sampled_from(["a\r\nb", "\tfolded\r\n next", "caf\u00e9", "nul\0here", ""])
_addresses = st.sampled_from(["<a@example.org>", "<b@example.net>", "", "<x\0y>"])
_esmtp = st.sampled_from(["NOTIFY=NEVER", "SIZE=10", "A\0B"])
_index = st.integers(-2, 6)
_ops = st.one_of(
    st.tuples(st.just("add"), _names, _values),
    st.tuples(st.just("ins"), _index, _names, _values),
    st.tuples(st.just("chg"), _names, _index, st.none() | _values),
    st.tuples(st.just("addrcpt"), _addresses),
    st.tuples(st.just("addrcpt_par"), _addresses, _esmtp),
    st.tuples(st.just("delrcpt"), _addresses),
    st.tuples(st.just("chgfrom"), _addresses, st.none() | _esmtp),
    st.tuples(st.just("body"), st.sampled_from([0, 65, 255]),
              st.sampled_from([0, 1, 100, 65535, 65536, 70000])),
    st.tuples(st.just("quarantine"), st.sampled_from(["odd", "", "a\0b"])),
    st.tuples(st.just("progress")),
    st.tuples(st.just("reply"), st.sampled_from(["550", "451"]),
              st.text("abcXYZ", min_size=1, max_size=6)),
)
_header_ops = st.one_of(
    st.tuples(st.just("add"), _names, _values),
    st.tuples(st.just("chg"), _names, _index, st.none() | _values),
)
_scripts = st.fixed_dictionaries({
    "do": st.lists(_ops, max_size=10),
    "end": st.sampled_from(["continue", "accept", "reject", "tempfail", "discard", "raise"]),
    "on_exception": st.lists(_header_ops, max_size=2),
})
_optional = [f for f in _FLAG_NAMES if f != P.SMFIF_ADDHDRS]
_actions = st.lists(st.sampled_from(_optional), unique=True).map(
    lambda flags: P.SMFIF_ADDHDRS | sum(flags))


@settings(max_examples=_EXAMPLES, derandomize=True, deadline=None)
@given(script=_scripts, actions=_actions)
def test_the_mta_sees_the_same_commands_in_call_order(scripted, script, actions):
    script = json.loads(json.dumps(script))  # the lists the milter gets
    resp = _run(scripted, script, actions)
    assert resp.packets == expected(script, actions)


# -- the same, case by case ---------------------------------------------------

def test_header_changes_keep_their_order_around_other_writes(scripted):
    script = {"do": [["add", "X-1", "one"], ["chg", "Subject", 1, None], ["addrcpt", "<n@x>"],
                     ["ins", 0, "X-2", "two"], ["progress"], ["chgfrom", "<f@x>", None],
                     ["add", "X-3", "three"], ["body", 66, 3], ["add", "X-4", "four"]],
              "end": "continue"}
    resp = _run(scripted, script)
    assert [cmd for cmd, _ in resp.packets] == [
        P.SMFIR_ADDHEADER, P.SMFIR_CHGHEADER, P.SMFIR_ADDRCPT, P.SMFIR_INSHEADER,
        P.SMFIR_PROGRESS, P.SMFIR_CHGFROM, P.SMFIR_ADDHEADER, P.SMFIR_REPLBODY,
        P.SMFIR_ADDHEADER, P.SMFIR_CONTINUE]
    assert resp.packets == expected(script, P.SMFI_CURR_ACTS)


@pytest.mark.parametrize("op,actions,error", [
    (["chg", "Subject", 1, "x"], P.SMFI_CURR_ACTS & ~P.SMFIF_CHGHDRS,
     "StageError: chgheader needs the SMFIF_CHGHDRS action, which was not negotiated"),
    (["chg", "Subject", -1, "x"], P.SMFI_CURR_ACTS, "MilterError: smfi_chgheader failed"),
    (["add", "", "x"], P.SMFI_CURR_ACTS, "MilterError: smfi_addheader failed"),
    (["ins", 0, "", "x"], P.SMFI_CURR_ACTS, "MilterError: smfi_insheader failed"),
    (["add", "X-A", "a\0b"], P.SMFI_CURR_ACTS,
     "ValueError: header value must not contain NUL characters"),
    (["ins", 2, "X\0A", "ab"], P.SMFI_CURR_ACTS,
     "ValueError: header name must not contain NUL characters"),
])
def test_header_errors_are_raised_at_the_call(scripted, op, actions, error):
    script = {"do": [["add", "X-Before", "1"], op, ["add", "X-After", "2"]], "end": "continue"}
    resp = _run(scripted, script, actions)
    assert resp.added_headers() == [("X-Before", "1"), ("X-Err", error), ("X-After", "2")]


def test_cr_lf_in_a_header_value_goes_out_unchanged_as_before(scripted):
    resp = _run(scripted, {"do": [["add", "X-Folded", "a\r\n\tb"],
                                  ["chg", "Subject", 1, "c\r\n d"]], "end": "continue"})
    assert [(m.name, m.value) for m in resp.modifications] == [("X-Folded", "a\r\n\tb"),
                                                                ("Subject", "c\r\n d")]


def test_addheader_not_negotiated_raises_at_the_call(scripted):
    resp = _run(scripted, {"do": [["add", "X-A", "1"], ["quarantine", "q"]], "end": "continue"},
                P.SMFI_CURR_ACTS & ~P.SMFIF_ADDHDRS)
    assert resp.packets == [(P.SMFIR_QUARANTINE, b"q\0"), (P.SMFIR_CONTINUE, b"")]
    wait_until(lambda: "err StageError: addheader needs the SMFIF_ADDHDRS action, which was "
               "not negotiated" in scripted.stdout())


def test_an_exception_after_two_addheaders_still_sends_them(scripted):
    resp = _run(scripted, {"do": [["add", "X-1", "a"], ["add", "X-2", "b"]], "end": "raise",
                           "on_exception": [["add", "X-Failed", "eom"]]})
    assert resp.packets == [(P.SMFIR_ADDHEADER, b"X-1\0a\0"), (P.SMFIR_ADDHEADER, b"X-2\0b\0"),
                            (P.SMFIR_ADDHEADER, b"X-Failed\0eom\0"), (P.SMFIR_TEMPFAIL, b"")]
    wait_until(lambda: "on_exception eom: RuntimeError: the script raised" in scripted.stdout())


def test_progress_reaches_the_mta_when_called(scripted):
    go = scripted.workdir / "progress-go"
    script = {"do": [["add", "X-1", "a"], ["progress"], ["wait", go.name], ["add", "X-2", "b"]],
              "end": "continue"}
    with MilterClient(scripted.spec) as c:
        assert c.mail("<a@example.org>").continues
        assert c.rcpt("<r@example.org>").continues
        for name, value in [("X-Script", json.dumps(script))]:
            c.header(name, value)
        c.eoh()
        c.body(b"x\r\n")
        c.send_eom()
        # eom is still waiting for the file: what it wrote so far is here already
        assert c.read_packet() == (P.SMFIR_ADDHEADER, b"X-1\0a\0")
        assert c.read_packet() == (P.SMFIR_PROGRESS, b"")
        go.touch()
        assert c.read_packet() == (P.SMFIR_ADDHEADER, b"X-2\0b\0")
        assert c.read_packet() == (P.SMFIR_CONTINUE, b"")


# -- the MTA hanging up while eom runs -----------------------------------------

def _counters(daemon: Daemon) -> tuple[int, int]:
    """(GIL releases of actions, eom write failures) in the milter so far."""
    resp = _run(daemon, {"do": [["counters"]], "end": "continue"})
    releases, failures = dict(resp.added_headers())["X-Counters"].split()
    return int(releases), int(failures)


def _hang_up_during_eom(daemon: Daemon, script: dict, go: Path) -> None:
    c = MilterClient(daemon.spec)
    c.open()
    assert c.mail("<a@example.org>").continues
    assert c.rcpt("<r@example.org>").continues
    c.header("X-Script", json.dumps(script))
    c.eoh()
    c.body(b"x\r\n")
    c.send_eom()
    # libmilter drops a connection whose peer is gone before it reads the next
    # command, so hang up only once eom runs (and waits)
    wait_until(lambda: f"waiting for {go.name}" in daemon.stdout())
    c.hang_up()
    go.touch()  # only now does eom go on


def test_mta_hanging_up_before_eom_returns_is_counted_and_answered_failsafe(scripted):
    before = _counters(scripted)[1]
    go = scripted.workdir / "hangup-go"
    _hang_up_during_eom(scripted, {"do": [["wait", go.name], ["add", "X-A", "1"],
                                          ["add", "X-B", "2"]], "end": "continue"}, go)
    wait_until(lambda: "on_exception eom: MilterError: smfi_addheader failed for 'X-A' (a header "
               "change queued in eom, sent when eom returned)" in scripted.stdout())
    assert "exception in eom callback: smfi_addheader failed for 'X-A'" in scripted.stderr()
    assert _counters(scripted)[1] == before + 1  # and the milter goes on serving
    assert scripted.proc.poll() is None


def test_a_queued_change_that_fails_is_raised_by_the_next_write(scripted):
    go = scripted.workdir / "hangup-go2"
    _hang_up_during_eom(scripted, {"do": [["wait", go.name], ["add", "X-A", "1"],
                                          ["add", "X-B", "2"], ["addrcpt", "<n@x>"]],
                                   "end": "continue"}, go)
    wait_until(lambda: "err MilterError: smfi_addheader failed for 'X-A' (a header change "
               "queued in eom, sent before smfi_addrcpt, which was not sent)"
               in scripted.stdout())
    assert scripted.proc.poll() is None
    assert _run(scripted, {"do": [["add", "X-Ok", "1"]], "end": "accept"}).packets == [
        (P.SMFIR_ADDHEADER, b"X-Ok\0" + b"1\0"), (P.SMFIR_ACCEPT, b"")]


def test_eom_header_changes_release_the_gil_only_for_other_writes(scripted):
    before = _counters(scripted)[0]
    _run(scripted, {"do": [["add", "X-1", "a"], ["ins", 0, "X-2", "b"],
                           ["chg", "Subject", 1, None]], "end": "continue"})
    assert _counters(scripted)[0] == before  # the counters op itself only queues
    _run(scripted, {"do": [["add", "X-1", "a"], ["addrcpt", "<n@x>"], ["add", "X-2", "b"],
                           ["progress"]], "end": "continue"})
    assert _counters(scripted)[0] == before + 2


def test_queued_changes_are_freed(scripted):
    script = {"do": [["add", "X-A", "a" * 200], ["ins", 0, "X-B", "b"],
                     ["chg", "Subject", 1, None], ["addrcpt", "<n@x>"], ["add", "X-C", "c"]],
              "end": "continue"}

    def burst(n: int) -> None:
        for _ in range(n):
            assert len(_run(scripted, script).packets) == 6

    burst(1000)
    before = scripted.rss_kib()
    burst(5000)  # 20,000 changes queued, ~100 bytes and more each
    assert scripted.rss_kib() - before < 1024
