"""The application benchmark's load: a message mix over the bench zones and its client.

Every message is one whole SMTP session as an MTA plays it to a milter, on a
new milter connection: negotiate, connect, HELO, MAIL FROM, RCPT, DATA,
headers, end of headers, body, end of message, quit -- stopping at the first
verdict that does not continue, as an MTA would.

Message *i* of a run is fully determined by *i*: its kind (a weighted, fixed
shuffle of KINDS), its client address and its names.  Names are
``LABEL.KIND.bench.test`` (bench/zones/bench.test.zone answers them with
wildcards): a cold message gets a label nobody used before, so every one of
its lookups of its own names misses any cache; a warm message reuses one of a
fixed set of ``warm_names`` labels that a warm-up pass has already sent.
"""

from __future__ import annotations

import random
import re
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from libmilter_ext.testing import Response, session

AUTHSERV_ID = "mx.bench.example"
RECIPIENT = "bob@mx.bench.example"
CONNECT_MACROS = {"j": AUTHSERV_ID, "daemon_name": "MTA"}
HEADERS = (
    ("Received", "from relay.example (relay.example [192.0.2.99]) by relay.example"),
    ("Authentication-Results", "other.example; dkim=pass header.d=example.org"),
    ("From", "Alice <alice@example.org>"),
    ("To", f"Bob <{RECIPIENT}>"),
    ("Subject", "application benchmark message"),
    ("Date", "Tue, 1 Jul 2025 12:00:00 +0000"),
    ("Message-ID", "<bench.1@example.org>"),
)
BODY = b"Hello Bob,\r\n\r\na small message for the spfmilter benchmark.\r\n" * 6


@dataclass(frozen=True)
class Kind:
    """One kind of message in the mix and the outcome the zones imply for it.

    ``helo``/``mailfrom`` name the bench zone subdomain of the HELO name and
    of the sender domain (``sender`` None: the null sender).  ``action`` is
    ``accept``, ``reject`` or ``tempfail``; the results are what both
    identities give (None: rejected before any header is written).
    """

    name: str
    weight: int
    ip: str
    mailfrom: str | None
    action: str
    xcode: str | None
    mailfrom_result: str | None
    helo: str = "helo"
    helo_result: str | None = "pass"


KINDS = (
    # mostly mail that passes, several ways
    Kind("pass", 30, "192.0.2.2", "pass", "accept", None, "pass"),
    Kind("pass-ipv6", 5, "2001:db8::2", "pass", "accept", None, "pass"),
    Kind("include", 15, "192.0.2.5", "include", "accept", None, "pass"),
    Kind("redirect", 8, "192.0.2.5", "redirect", "accept", None, "pass"),
    Kind("mx", 5, "192.0.2.4", "mx", "accept", None, "pass"),
    Kind("a", 4, "192.0.2.3", "a", "accept", None, "pass"),
    Kind("null-sender", 3, "192.0.2.2", None, "accept", None, "pass"),
    # the rest
    Kind("softfail", 8, "192.0.2.2", "softfail", "accept", None, "softfail"),
    Kind("neutral", 3, "192.0.2.2", "neutral", "accept", None, "neutral"),
    Kind("none", 5, "192.0.2.2", "none", "accept", None, "none"),
    Kind("nxdomain", 3, "192.0.2.2", "nx", "accept", None, "none"),
    Kind("fail", 6, "192.0.2.2", "fail", "reject", "5.7.23", None),
    Kind("helo-fail", 2, "192.0.2.2", "pass", "reject", "5.7.23", None, "badhelo", None),
    Kind("permerror", 2, "192.0.2.2", "permerror", "accept", None, "permerror"),
    Kind("temperror", 1, "192.0.2.2", "temperror", "tempfail", "4.7.24", None),
)


def _schedule(seed: int = 7208) -> tuple[int, ...]:
    slots = [index for index, kind in enumerate(KINDS) for _ in range(kind.weight)]
    random.Random(seed).shuffle(slots)
    return tuple(slots)


SCHEDULE = _schedule()


@dataclass(frozen=True)
class Message:
    index: int
    kind: Kind
    ip: str
    helo: str
    sender: str


def message(index: int, cold: str | None, warm_names: int) -> Message:
    """Message *index*: with ``cold`` a tag, names unique to (tag, index); else warm names."""
    kind = KINDS[SCHEDULE[index % len(SCHEDULE)]]
    label = f"{cold}m{index}" if cold is not None else f"w{index % warm_names}"
    helo = f"{label}.{kind.helo}.bench.test"
    sender = "<>"
    if kind.mailfrom is not None:
        sender = f"<u{index % 97}@{label}.{kind.mailfrom}.bench.test>"
    return Message(index, kind, kind.ip, helo, sender)


# -- outcomes ------------------------------------------------------------------------------

_SPF = re.compile(r"\bspf=([a-z]+)\b")
_PROP = re.compile(r"\bsmtp\.(helo|mailfrom)=")


@dataclass(frozen=True)
class Outcome:
    """What a milter decided for one message, reduced to what can be compared."""

    action: str  # accept, reject, tempfail, error, or another milter verdict
    code: int | None = None
    xcode: str | None = None
    results: tuple[tuple[str, str], ...] = ()  # (identity, result) from the AR field
    detail: str = ""

    def result(self, identity: str) -> str | None:
        return dict(self.results).get(identity)


def spf_results(value: str) -> tuple[tuple[str, str], ...]:
    """(identity, result) pairs of the ``spf=`` resinfos in an AR field value."""
    found = []
    for match in _SPF.finditer(value):
        prop = _PROP.search(value, match.end())
        if prop is not None:
            found.append((prop.group(1), match.group(1)))
    return tuple(sorted(set(found)))


def outcome(responses: dict[str, Response]) -> Outcome:
    """The Outcome of one session from session()'s responses."""
    final = list(responses.values())[-1]
    if final.stage == "eom" and final.action in ("continue", "accept"):  # OpenDMARC: accept
        values = [m.value or "" for m in final.modifications
                  if m.kind in ("insheader", "addheader")
                  and (m.name or "").lower() == "authentication-results"]
        return Outcome("accept", results=spf_results(" ".join(values)))
    if final.action == "replycode":
        action = "reject" if (final.code or 0) >= 500 else "tempfail"
        return Outcome(action, final.code, final.xcode, detail=f"at {final.stage}")
    return Outcome(final.action, detail=f"at {final.stage}")


#: The results of the kinds an enforcing milter rejects or defers, as a milter that
#: only writes headers reports them.
_UNENFORCED = {
    ("helo", "helo-fail"): "fail", ("mailfrom", "helo-fail"): "pass",
    ("mailfrom", "fail"): "fail", ("mailfrom", "temperror"): "temperror",
}


#: How OpenDMARC 1.4.2 writes an SPF result it computed itself: DMARC's outcomes
#: (pass, none, fail, temperror as "tempfail"); softfail, neutral and permerror
#: become "fail".
DMARC_SPF = {"softfail": "fail", "neutral": "fail", "permerror": "fail",
             "temperror": "tempfail"}


#: How unexpected() checks a milter's answers against what the zones imply.
ENFORCING = "enforcing"  # rejects and defers as the zones say, an AR field on what it accepts
HEADERS_ONLY = "headers-only"  # never rejects (OpenDMARC): only the SPF results in its field
NOOP = "noop"  # a no-op floor: continues at every stage and writes nothing
CHECKS = (ENFORCING, HEADERS_ONLY, NOOP)


def unexpected(msg: Message, got: Outcome, check: str = ENFORCING) -> bool:
    """True when got is not what the zones say (for identities the milter reported).

    ``check`` HEADERS_ONLY: the milter never rejects (OpenDMARC with
    RejectFailures false), so only the SPF results in its header are checked,
    as DMARC sees them (DMARC_SPF).  NOOP: the milter does no SPF at all;
    going through to the end of the message with nothing added is right,
    any other answer is not.
    """
    kind = msg.kind
    if check == NOOP:
        return got.action != "accept" or bool(got.results)
    headers_only = check == HEADERS_ONLY
    if headers_only:
        if got.action != "accept":
            return True
    elif got.action != kind.action or got.xcode != kind.xcode:
        return True
    if got.action == "accept":
        if not got.results:
            return True
        for identity, result in got.results:
            want = kind.helo_result if identity == "helo" else kind.mailfrom_result
            if headers_only and want is None:  # what a milter that rejected never wrote
                want = _UNENFORCED[(identity, kind.name)]
            if headers_only:
                want = DMARC_SPF.get(want, want)
            if result != want:
                return True
    return False


def same(a: Outcome, b: Outcome) -> bool:
    """Do two milters agree: same action and enhanced code, same result per shared identity."""
    if a.action != b.action or a.xcode != b.xcode:
        return False
    ra, rb = dict(a.results), dict(b.results)
    return all(ra[i] == rb[i] for i in ra.keys() & rb.keys())


def play(spec: str, msg: Message, timeout: float = 30.0) -> Outcome:
    """Send one message as one SMTP session; errors become an ``error`` Outcome."""
    try:
        responses = session(
            spec, ip=msg.ip, helo=msg.helo, sender=msg.sender, rcpts=(RECIPIENT,),
            headers=HEADERS, body=BODY, hostname=msg.helo, timeout=timeout,
            macros={"connect": CONNECT_MACROS, "mail": {"i": f"Q{msg.index:08X}"},
                    "eom": {"i": f"Q{msg.index:08X}"}},
        )
    except Exception as exc:  # counted and reported, never fatal for one message
        return Outcome("error", detail=f"{type(exc).__name__}: {exc}")
    return outcome(responses)


# -- one client process ----------------------------------------------------------------------


@dataclass
class WorkerResult:
    start: float
    end: float
    cpu_s: float
    latencies: list[float]
    outcomes: list[tuple[int, Outcome]]
    errors: int
    unexpected: int
    first_error: str = ""


def worker(spec: str, indices: Sequence[int], cold: str | None, warm_names: int,
           keep_outcomes: bool, barrier: Any, results: Any, check: str = ENFORCING) -> None:
    """Play the messages ``indices`` one after another once all workers are ready."""
    try:
        msgs = [message(i, cold, warm_names) for i in indices]
        barrier.wait()
        clock = time.perf_counter
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        latencies = []
        outcomes = []
        errors = bad = 0
        first_error = ""
        for msg in msgs:
            t0 = clock()
            got = play(spec, msg)
            latencies.append(clock() - t0)
            if got.action == "error":
                errors += 1
                first_error = first_error or got.detail
            elif unexpected(msg, got, check):
                bad += 1
            if keep_outcomes:
                outcomes.append((msg.index, got))
        end = time.monotonic()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        results.put(("ok", WorkerResult(start, end, cpu, latencies, outcomes, errors, bad,
                                        first_error)))
    except threading.BrokenBarrierError:
        results.put(("error", "another client process failed"))
    except BaseException as exc:  # reported to the parent, which fails the run
        barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))
