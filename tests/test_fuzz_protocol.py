"""A property-based fuzzer of the milter wire protocol against a real milter process.

Each example opens one to four connections at once to the kitchen milter
(``tests/milters/kitchen.py``, built on the extension), run twice: as it is,
and with connect, helo, header, data, unknown and close ``@deferred``.  A connection plays
either a well-formed MTA (a ``MilterClient`` following the milter's verdicts:
sessions, transactions, aborts and QUIT_NC anywhere the protocol allows) or a
hostile one (raw packets: wrong lengths, unknown commands, stages out of
order, huge macros, truncated packets, QUIT_NC and ABORT anywhere, noise).

Properties: the process never dies; a hostile connection is closed by the
milter once the peer stops sending (no thread left waiting); every
well-formed command gets its answer and nothing more; right after each
example a fresh well-formed session gets the right answers; RSS stays flat.

A second property compares an SMTP session played after QUIT_NC with the
same session on a fresh milter connection: the answers must be the same.

The suite runs a bounded, derandomized number of examples;
``LIBMILTER_EXT_FUZZ_EXAMPLES=20000`` makes a long run by hand (it prints
its case count, duration and RSS); ``LIBMILTER_EXT_FUZZ_SHRINK=1`` shrinks
a failing example (slow: a missing answer costs the reply timeout).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from libmilter_ext import protocol as P
from libmilter_ext.testing import MilterClient, MilterError, Response, parse_socket_spec
from tests.procs import PYTHON, Daemon

MILTERS = Path(__file__).parent / "milters"
EXAMPLES = int(os.environ.get("LIBMILTER_EXT_FUZZ_EXAMPLES", "120"))
# How long a reply or the milter's hang-up may take; well under the milter's
# own MTA timeout (30 s), so a thread stuck until that timeout fails here.
WAIT = 10.0
# LIBMILTER_EXT_FUZZ_REUSE=0: well-formed MTAs never send QUIT_NC (a long run
# that hunts other defects while a QUIT_NC one is open).
REUSE = os.environ.get("LIBMILTER_EXT_FUZZ_REUSE", "1") != "0"
# Shrinking a failure costs up to WAIT per step: only when asked for.
PHASES = [p for p in Phase if p != Phase.shrink or os.environ.get("LIBMILTER_EXT_FUZZ_SHRINK")]
# RSS growth allowed over the whole run, after a warm-up.
RSS_SLACK_KIB = 6 * 1024

COMMANDS = [
    P.SMFIC_ABORT, P.SMFIC_BODY, P.SMFIC_CONNECT, P.SMFIC_MACRO, P.SMFIC_BODYEOB,
    P.SMFIC_HELO, P.SMFIC_QUIT_NC, P.SMFIC_HEADER, P.SMFIC_MAIL, P.SMFIC_EOH,
    P.SMFIC_OPTNEG, P.SMFIC_QUIT, P.SMFIC_RCPT, P.SMFIC_DATA, P.SMFIC_UNKNOWN,
]
REPLIES = {
    P.SMFIR_ADDRCPT, P.SMFIR_DELRCPT, P.SMFIR_ADDRCPT_PAR, P.SMFIR_SHUTDOWN, P.SMFIR_ACCEPT,
    P.SMFIR_REPLBODY, P.SMFIR_CONTINUE, P.SMFIR_DISCARD, P.SMFIR_CHGFROM, P.SMFIR_CONN_FAIL,
    P.SMFIR_ADDHEADER, P.SMFIR_INSHEADER, P.SMFIR_SETSYMLIST, P.SMFIR_CHGHEADER,
    P.SMFIR_PROGRESS, P.SMFIR_QUARANTINE, P.SMFIR_REJECT, P.SMFIR_SKIP, P.SMFIR_TEMPFAIL,
    P.SMFIR_REPLYCODE, P.SMFIC_OPTNEG,
}
# MAIL FROM local parts the kitchen milter answers in different ways (not "slow").
SENDERS = ["a", "reject", "rejectnotext", "rejectnoxcode", "rejectplain", "tempfail",
           "discard", "accept", "raise", "stage", "badverdict"]
EOM_ACTIONS = ["addheader", "insheader", "chgheader", "delheader", "addrcpt", "addrcpt_par",
               "delrcpt", "chgfrom", "chgfrom_args", "replacebody", "quarantine", "progress",
               "echo", "seen", "reject"]


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def optneg(actions: int = P.SMFI_CURR_ACTS, protocol: int = P.SMFI_CURR_PROT) -> bytes:
    return packet(P.SMFIC_OPTNEG, struct.pack("!III", P.SMFI_PROT_VERSION, actions, protocol))


# -- strategies ---------------------------------------------------------------------

text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
               max_size=30)
raw = st.binary(max_size=60)
cstrings = st.lists(raw.map(lambda b: b.replace(b"\0", b"") + b"\0"), max_size=4).map(b"".join)


@st.composite
def macro_payload(draw: st.DrawFn) -> bytes:
    """An SMFIC_MACRO payload: a command byte and name/value pairs, sometimes huge."""
    cmd = draw(st.sampled_from(COMMANDS + [b"Z"]))
    if draw(st.booleans()):
        size = draw(st.integers(1000, P.MILTER_MAX_DATA_SIZE - 64))
        return cmd + b"{big}\0" + b"v" * size + b"\0"
    return cmd + draw(cstrings)


@st.composite
def hostile_packet(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(
        ["command", "command", "command", "unknown", "length", "macro", "quit_nc", "abort",
         "noise", "oversize", "optneg"]))
    if kind == "command":
        return packet(draw(st.sampled_from(COMMANDS)), draw(st.one_of(cstrings, raw)))
    if kind == "unknown":
        cmd = draw(st.binary(min_size=1, max_size=1).filter(lambda c: c not in COMMANDS))
        return packet(cmd, draw(raw))
    if kind == "length":  # the length field disagrees with what follows
        body = draw(st.sampled_from(COMMANDS)) + draw(raw)
        declared = draw(st.integers(0, len(body) + 100).filter(lambda n: n != len(body)))
        return struct.pack("!I", declared) + body
    if kind == "macro":
        return packet(P.SMFIC_MACRO, draw(macro_payload()))
    if kind == "quit_nc":
        return packet(P.SMFIC_QUIT_NC)
    if kind == "abort":
        return packet(P.SMFIC_ABORT)
    if kind == "oversize":
        return struct.pack("!I", draw(st.integers(P.MILTER_MAX_DATA_SIZE + 2, 2**32 - 1)))
    if kind == "optneg":
        version = draw(st.integers(0, 10))
        return packet(P.SMFIC_OPTNEG, struct.pack("!III", version, draw(st.integers(0, 2**32 - 1)),
                                                  draw(st.integers(0, 2**32 - 1))))
    return draw(st.binary(min_size=1, max_size=40))


@st.composite
def hostile_stream(draw: st.DrawFn) -> bytes:
    """What a broken or hostile MTA sends on one connection, possibly cut short."""
    start = draw(st.sampled_from(["optneg", "optneg", "optneg", "none"]))
    head = optneg(draw(st.integers(0, P.SMFI_CURR_ACTS)),
                  draw(st.integers(0, P.SMFI_CURR_PROT))) if start == "optneg" else b""
    stream = head + b"".join(draw(st.lists(hostile_packet(), max_size=25)))
    if stream and draw(st.booleans()):  # truncated
        stream = stream[:draw(st.integers(0, len(stream) - 1))]
    return stream


@dataclass
class Txn:
    sender: str
    rcpts: list[str]
    headers: list[tuple[str, str]]
    body: list[bytes]
    abort_at: int | None  # abort after this many steps, or run to eom


@dataclass
class Smtp:
    hostname: str
    family: str
    helo: str | None
    unknown: str | None
    txns: list[Txn] = field(default_factory=list)


txn = st.builds(
    Txn,
    sender=st.sampled_from(SENDERS),
    rcpts=st.lists(st.sampled_from(["rcpt", "bad", "gone", "x"]), min_size=1, max_size=3),
    headers=st.lists(st.one_of(
        st.tuples(st.just("X-Do"), st.lists(st.sampled_from(EOM_ACTIONS), max_size=4)
                  .map(", ".join)),
        st.tuples(st.sampled_from(["Subject", "X-8bit", "X-Raise", "X-Delete-Me"]), text)),
        max_size=5),
    body=st.lists(st.binary(max_size=300), max_size=3),
    abort_at=st.one_of(st.none(), st.integers(0, 12)),
)
smtp = st.builds(
    Smtp,
    hostname=st.sampled_from(["client.example", "[192.0.2.9]", "[IPv6:2001:db8::9]"]),
    family=st.sampled_from(["4", "6", "U"]),
    helo=st.one_of(st.none(), text.filter(bool)),
    unknown=st.one_of(st.none(), text.filter(bool)),
    txns=st.lists(txn, max_size=3),
)
# A milter connection: SMTP sessions separated by QUIT_NC.
wellformed = st.lists(smtp, min_size=1, max_size=3)
connection = st.one_of(wellformed.map(lambda s: ("mta", s)),
                       hostile_stream().map(lambda s: ("hostile", s)))
example = st.lists(connection, min_size=1, max_size=4)


# -- playing a connection ----------------------------------------------------------------


class Trace:
    """Every well-formed command and its answer: for failure messages and comparisons."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.answers: list[tuple[object, ...]] = []

    def __call__(self, response: Response) -> Response:
        self.steps.append(f"{response.stage}:{response.action}")
        self.answers.append((response.stage, response.action, response.code, response.xcode,
                             response.text, response.modifications))
        return response


def quit_nc_allowed(trace: Trace) -> bool:
    """libmilter takes QUIT_NC only after eom answered continue or after unknown
    (engine.c, next_states); elsewhere it ignores it and the CONNECT after it."""
    return bool(trace.steps) and trace.steps[-1] in ("eom:continue", "unknown:continue",
                                                      "unknown:noreply")


def play_transaction(client: MilterClient, t: Txn, trace: Trace) -> None:
    step = 0

    def go(response: Response) -> bool:
        nonlocal step
        trace(response)
        step += 1
        if t.abort_at is not None and step > t.abort_at:
            client.abort()
            trace.steps.append("abort")
            return False
        if not response.continues and response.action != "skip":
            if response.stage != "eom":
                client.abort()  # as Sendmail does after a rejection
            return False
        return True

    if not go(client.mail(f"<{t.sender}@example.org>", "SIZE=10",
                          macros={"i": "QID", "{auth_authen}": "bob"})):
        return
    accepted = 0
    for rcpt in t.rcpts:
        response = trace(client.rcpt(f"<{rcpt}@example.org>"))
        accepted += response.continues
        step += 1
        if response.action in ("accept", "discard", "tempfail"):
            client.abort()
            return
    if not accepted:
        client.abort()
        return
    if not go(client.data()):
        return
    for name, value in t.headers:
        if not go(client.header(name, value)):
            return
    if not go(client.eoh()):
        return
    for chunk in t.body:
        response = client.body(chunk)
        if response.action == "skip":
            trace(response)
            break
        if not go(response):
            return
    go(client.eom(macros={"i": "QID"}))


def play_smtp(client: MilterClient, s: Smtp, trace: Trace) -> None:
    """One SMTP session on an open milter connection."""
    address = None if s.family == "U" else ("2001:db8::9" if s.family == "6" else "192.0.2.9")
    if not trace(client.connect(s.hostname, address, 4000, s.family,
                                {"j": "mx.test"})).continues:
        return
    if s.helo is not None and not trace(client.helo(s.helo)).continues:
        return
    if s.unknown is not None:
        trace(client.unknown(s.unknown))
    for t in s.txns:
        play_transaction(client, t, trace)


def play_mta(spec: str, sessions: list[Smtp], trace: Trace) -> None:
    client = MilterClient(spec, timeout=WAIT)
    client.open()
    try:
        for n, s in enumerate(sessions):
            if n and REUSE and quit_nc_allowed(trace):
                client.quit_nc()
                trace.steps.append("quit_nc")
            elif n:  # a new milter connection, as an MTA does after QUIT
                assert client.stray() == b"", f"stray replies after {trace.steps}"
                client.close()
                client.open()
                trace.steps.append("reopen")
            play_smtp(client, s, trace)
        stray = client.stray()
        assert stray == b"", f"replies nobody asked for: {stray!r} after {trace.steps}"
    finally:
        client.close()


def read_replies(sock: socket.socket) -> bytes:
    """Everything the milter sends until it hangs up; fails if it does not within WAIT."""
    sock.settimeout(WAIT)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        except socket.timeout:
            raise AssertionError(f"milter kept the connection open {WAIT}s after the peer "
                                 "stopped sending") from None
        if not chunk:
            return bytes(data)
        data += chunk


def check_reply_stream(data: bytes) -> None:
    """Replies are well-formed packets with known codes (a last one may be cut off)."""
    pos = 0
    while pos + 5 <= len(data):
        (size,) = struct.unpack_from("!I", data, pos)
        assert 1 <= size <= P.MILTER_MAX_DATA_SIZE + 1, f"bad reply length {size}"
        assert data[pos + 4:pos + 5] in REPLIES, f"unknown reply {data[pos + 4:pos + 5]!r}"
        pos += 4 + size


def play_hostile(spec: str, stream: bytes) -> None:
    family, address = parse_socket_spec(spec)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(address)
        try:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the milter hung up first: fine
        check_reply_stream(read_replies(sock))


def fresh_session(spec: str) -> None:
    """A well-formed session right after an example gets the right answers."""
    with MilterClient(spec, timeout=WAIT) as client:
        assert client.connect("fresh.example", "192.0.2.1", 25, "4", {"j": "mx"}).continues
        assert client.helo("fresh.example").continues
        assert client.mail("<reject@example.org>").code == 550
        assert client.mail("<a@example.org>").continues
        assert client.rcpt("<r@example.org>").continues
        assert client.data().continues
        final = client.message([("X-Do", "addheader")], b"body\r\n", {"i": "Q"})
        assert (final.action, final.added_headers()) == ("continue", [("X-Added", "appended")])
        assert client.stray() == b""


# -- the property ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["plain", "deferred"])
def milter(request) -> Iterator[Daemon]:
    work = Path(tempfile.mkdtemp(prefix="fz-", dir="/tmp"))
    spec = f"unix:{work}/fuzz.sock"
    extra = ["--deferred"] if request.param == "deferred" else []
    try:
        with Daemon([PYTHON, str(MILTERS / "kitchen.py"), spec, *extra], spec, work) as d:
            yield d
            assert d.proc.poll() is None
            assert d.stop() == 0
            for sign in ("Fatal Python error", "SystemError", "Segmentation fault"):
                assert sign not in d.stderr()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_example(milter: Daemon, connections: list[tuple[str, object]]) -> None:
    errors: list[str] = []

    def play(kind: str, script: object) -> None:
        trace = Trace()
        try:
            if kind == "mta":
                play_mta(milter.spec, script, trace)  # type: ignore[arg-type]
            else:
                play_hostile(milter.spec, script)  # type: ignore[arg-type]
        except (AssertionError, MilterError, OSError) as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {exc} after {trace.steps}")

    threads = [threading.Thread(target=play, args=c) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * WAIT)
        assert not thread.is_alive(), "a connection did not finish"
    assert milter.proc.poll() is None, f"milter died ({milter.proc.returncode}): {errors}"
    assert errors == []
    fresh_session(milter.spec)


def test_fuzz_wire_protocol(milter: Daemon) -> None:
    for _ in range(50):  # warm-up: allocator arenas of the worker threads
        fresh_session(milter.spec)
    rss_start = milter.rss_kib()
    started = time.monotonic()
    cases = 0

    @settings(max_examples=EXAMPLES, derandomize=EXAMPLES <= 1000, deadline=None,
              database=None, suppress_health_check=list(HealthCheck), print_blob=True,
              phases=PHASES)
    @given(example)
    def prop(connections: list[tuple[str, object]]) -> None:
        nonlocal cases
        cases += 1
        run_example(milter, connections)

    prop()
    for _ in range(50):
        fresh_session(milter.spec)
    rss_end = milter.rss_kib()
    print(f"\nfuzz: {cases} cases in {time.monotonic() - started:.1f}s, "
          f"RSS {rss_start} -> {rss_end} KiB")
    assert rss_end - rss_start < RSS_SLACK_KIB, f"RSS grew {rss_end - rss_start} KiB"


# A transaction that ends in eom answered continue, so that QUIT_NC may follow.
CLEAN_END = Txn("a", ["rcpt"], [], [b"x"], None)


def test_fuzz_session_after_quit_nc_answers_as_on_a_fresh_connection(milter: Daemon) -> None:
    """QUIT_NC keeps the milter connection for a new SMTP session: that session's
    answers (verdicts, replies, modifications) must be those of a fresh connection."""

    @settings(max_examples=max(EXAMPLES // 2, 10), derandomize=EXAMPLES <= 1000,
              deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=PHASES)
    @given(st.lists(smtp.filter(lambda s: s.txns), min_size=2, max_size=3))
    def prop(sessions: list[Smtp]) -> None:
        reused: list[Trace] = []
        with MilterClient(milter.spec, timeout=WAIT) as client:
            for n, s in enumerate(sessions):
                if n:
                    assert quit_nc_allowed(reused[-1]), (
                        f"a plain transaction did not end in eom:continue: {reused[-1].steps}")
                    client.quit_nc()
                trace = Trace()
                play_smtp(client, s, trace)
                if n < len(sessions) - 1 and trace.answers[0][1] in ("continue", "noreply"):
                    play_transaction(client, CLEAN_END, trace)
                reused.append(trace)
            assert client.stray() == b""
        for s, trace in zip(sessions, reused):
            fresh = Trace()
            with MilterClient(milter.spec, timeout=WAIT) as client:
                play_smtp(client, s, fresh)
            assert fresh.answers == trace.answers[:len(fresh.answers)], (
                f"after QUIT_NC: {trace.steps}\non a fresh connection: {fresh.steps}")

    prop()
