"""Soak: many messages through the real spfmilter daemon, normal and hostile, at 8 connections.

One real daemon (``python -m spfmilter run``), one real DNS server
(tests/dnsserver.py: NSD behind the counting relay, serving tests/data/zones
and bench/zones; servfail.test answers SERVFAIL, timeout.spf.test is never
answered), and 8 client processes playing whole SMTP sessions with
libmilter_ext.testing, each on a new milter connection.  Message *i* is fully
determined by *i* and the seed:

* normal: bench_app_load's message mix (pass, include, redirect, mx, a, null
  sender, softfail, neutral, none, NXDOMAIN, fail, HELO fail, permerror,
  SERVFAIL temperror) with its expected verdicts;
* DNS: a sender domain that answers SERVFAIL, and rarely one that never
  answers (a resolver timeout: temperror after ``--lookup-timeout``);
* hostile: header names and values that are not UTF-8, a 64 KiB header (the
  most one milter packet holds), control characters (no CR/LF/NUL), ``%`` and
  ``;()"\\`` in HELO and MAIL FROM, senders without ``@``, with a source
  route, with a quoted local part, 300-character local parts, IP-literal,
  empty and 255+-character HELO names, missing macros, 100 recipients, forged
  Authentication-Results fields;
* drops: a normal message whose client closes the connection at a random
  stage of the transaction.

It prints whether the daemon is alive at the end, protocol errors and
timeouts other than the deliberate drops (goal 0), header fields that do not
re-parse or break the 998-octet line limit (goal 0), wrong verdicts on the
normal and DNS messages (goal 0), and the daemon's RSS after a warm-up and at
the end (goal: flat).  Exit status 0 when every goal is met, 1 otherwise.

    .venv/bin/python bench/soak.py                      # 100,000 messages
    .venv/bin/python bench/soak.py --messages 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import authres  # noqa: E402
from bench_app_load import (  # noqa: E402
    AUTHSERV_ID,
    BODY,
    CONNECT_MACROS,
    HEADERS,
    RECIPIENT,
    Outcome,
    message,
    outcome,
    play,
    unexpected,
)
from bench_spfmilter import RSS_FLAT_FRACTION, RSS_FLAT_MIB  # noqa: E402
from benchlib import machine_line, note, proc_rss_kib  # noqa: E402

from libmilter_ext.testing import MilterClient, Response, session  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.procs import PYTHON, Daemon  # noqa: E402

CONNECTIONS = 8
WARM_NAMES = 200
CLIENT_TIMEOUT = 30.0
#: Header fields spfmilter may insert; nothing else may appear.
OUR_FIELDS = {"authentication-results", "received-spf"}
#: The largest header value one milter packet carries with the name X-Big (65535 octets).
BIG = 65535 - len("X-Big") - 2
TEMPERROR = Outcome("tempfail", 451, "4.7.24")


# -- the messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One soak message: a session to play and what to check of its answer."""

    index: int
    category: str  # normal, dns, hostile, drop
    name: str
    params: dict[str, Any]
    expect: Outcome | None = None  # a verdict to compare (normal and dns messages)
    drop_after: int = -1  # drops: how many stages to play before closing


def _hostile(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A hostile session: (name, session() keyword arguments)."""
    pick = rng.randrange(17)
    helo, sender = "pass.spf.test", "<u@pass.spf.test>"
    headers: list[tuple[str, str | bytes]] = list(HEADERS)
    macros: dict[str, dict[str, str]] | None = None
    rcpts: tuple[str, ...] = (RECIPIENT,)
    name = ""
    if pick == 0:
        name = "8bit-headers"
        headers += [("X-\udcff\udcfe8bit", b"caf\xe9 \xff\xfe"), ("Subject", b"\xc3\x28 \x80")]
    elif pick == 1:
        name = "64k-header"
        headers.append(("X-Big", "y" * BIG))
    elif pick == 2:
        name = "control-chars"
        helo = "ctl\x01\x07\x1b\x7f.example"
        sender = "<c\x02t\x1fl@pass.spf.test\x0b>"
        headers.append(("X-Ctl", "a\x01b\x1bc\x7f"))
    elif pick == 3:
        name = "specials"
        helo = 'h%{i}%%;()"\\.example'
        sender = '<%{l}%-;()"\\@pass.spf.test>'
    elif pick == 4:
        name = "no-at"
        sender = rng.choice(["<pass.spf.test>", "<nodomain>", "<%>", "<;()>"])
    elif pick == 5:
        name = "source-route"
        sender = "<@relay.example,@r2.example:user@pass.spf.test>"
    elif pick == 6:
        name = "quoted-local"
        sender = rng.choice(['<"a b"@pass.spf.test>', '<"a\\"b;(c)"@pass.spf.test>',
                             '<"unterminated@pass.spf.test>'])
    elif pick == 7:
        name = "long-local"
        sender = f"<{'l' * 300}@pass.spf.test>"
    elif pick == 8:
        name = "ip-literal-helo"
        helo = rng.choice(["[192.0.2.2]", "[IPv6:2001:db8::2]", "[999.1.2.3]"])
    elif pick == 9:
        name = "empty-helo"
        helo = ""
    elif pick == 10:
        name = "long-helo"
        helo = ".".join(["h" * 63] * 4) + ".example"
    elif pick == 11:
        name = "missing-macros"
        macros = {}
    elif pick == 12:
        name = "100-rcpts"
        rcpts = tuple(f"r{n}@mx.bench.example" for n in range(100))
    elif pick == 13:
        name = "forged-ar"
        headers += [("Authentication-Results", f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=x"),
                    ("Authentication-Results", b"mx.bench.example\xff; dkim=pass"),
                    ("authentication-results", f" ({AUTHSERV_ID.upper()}) x; none")]
    elif pick == 14:
        name = "long-domain"
        sender = f"<u@{'d' * 63}.{'e' * 63}.{'f' * 63}.spf.test>"
    elif pick == 15:
        name = "8bit-envelope"
        helo = "h\udce9llo.example"
        sender = "<\udcff\udcfe@pass.spf.test>"
    else:
        name = "null-sender-odd-helo"
        sender = "<>"
        helo = rng.choice(["localhost", "x", "-.example", "a..b"])
    if macros is None:
        macros = {"connect": CONNECT_MACROS, "mail": {"i": "QH"}, "eom": {"i": "QH"}}
    return name, dict(ip=rng.choice(["192.0.2.2", "2001:db8::2"]), helo=helo, sender=sender,
                      rcpts=rcpts, headers=headers, body=BODY, macros=macros)


def case(index: int, seed: int, timeout_every: int) -> Case:
    """Message ``index`` of a soak run with ``seed``."""
    rng = random.Random(seed * 1_000_003 + index)
    roll = rng.random()
    macros = {"connect": CONNECT_MACROS, "mail": {"i": f"Q{index:08X}"},
              "eom": {"i": f"Q{index:08X}"}}
    if timeout_every and index % timeout_every == timeout_every - 1:
        return Case(index, "dns", "dns-timeout",
                    dict(ip="192.0.2.2", helo="w1.helo.bench.test",
                         sender="<u@timeout.spf.test>", rcpts=(RECIPIENT,), headers=HEADERS,
                         body=BODY, macros=macros), TEMPERROR)
    if roll < 0.02:
        return Case(index, "dns", "dns-servfail",
                    dict(ip="192.0.2.2", helo="w2.helo.bench.test",
                         sender=f"<u{index % 7}@servfail.test>", rcpts=(RECIPIENT,),
                         headers=HEADERS, body=BODY, macros=macros), TEMPERROR)
    if roll < 0.24:
        name, params = _hostile(rng)
        return Case(index, "hostile", name, params)
    msg = message(index, None, WARM_NAMES)
    params = dict(ip=msg.ip, helo=msg.helo, sender=msg.sender, rcpts=(RECIPIENT,),
                  headers=HEADERS, body=BODY, hostname=msg.helo, macros=macros)
    expect = Outcome(msg.kind.action, xcode=msg.kind.xcode,
                     results=tuple(sorted(
                         (i, r) for i, r in (("helo", msg.kind.helo_result),
                                             ("mailfrom", msg.kind.mailfrom_result))
                         if r is not None)))
    if roll < 0.28:
        return Case(index, "drop", f"drop-{msg.kind.name}", params,
                    drop_after=rng.randrange(1, 10))
    return Case(index, "normal", msg.kind.name, params, expect)


# -- playing and checking ------------------------------------------------------------------------


def _drop(spec: str, c: Case) -> None:
    """Play the first ``c.drop_after`` stages of the session, then close the socket abruptly."""
    p = c.params
    client = MilterClient(spec, timeout=CLIENT_TIMEOUT)
    client.open()
    m = p["macros"]
    steps: list[Callable[[], Response]] = [
        lambda: client.connect(p.get("hostname") or f"[{p['ip']}]", p["ip"], 0,
                               "6" if ":" in p["ip"] else "4", m.get("connect")),
        lambda: client.helo(p["helo"]),
        lambda: client.mail(p["sender"], macros=m.get("mail")),
        lambda: client.rcpt(RECIPIENT),
        lambda: client.data(),
        lambda: client.header(*HEADERS[0]),
        lambda: client.header(*HEADERS[1]),
        lambda: client.eoh(),
        lambda: client.body(BODY),
    ]
    try:
        for step in steps[: c.drop_after]:
            if not step().continues:
                break
    finally:
        client._drop()  # no QUIT: the connection just goes away


def header_problems(final: Response) -> list[str]:
    """What is wrong with the header changes of an answer (empty: nothing)."""
    problems = []
    for mod in final.modifications:
        name = (mod.name or "").lower()
        if mod.kind in ("insheader", "addheader"):
            if name not in OUR_FIELDS:
                problems.append(f"inserted {mod.name!r}")
                continue
            value = mod.value or ""
            lines = f"{mod.name}: {value}".split("\n")
            if "\r" in value or any(line[:1] != " " for line in lines[1:]):
                problems.append(f"{mod.name}: CR/LF other than folding")
            if any(len(line.encode("utf-8", "surrogateescape")) > 998 for line in lines):
                problems.append(f"{mod.name}: line over 998 octets")
            if name == "authentication-results":
                try:
                    parsed = authres.AuthenticationResultsHeader.parse(
                        f"Authentication-Results: {value}")
                except Exception as exc:  # authres raises several kinds
                    problems.append(f"AR does not parse: {exc}")
                    continue
                if parsed.authserv_id != AUTHSERV_ID or \
                        {r.method for r in parsed.results} - {"spf", "none"}:
                    problems.append(f"AR says {value!r}")
        elif mod.kind == "chgheader" and (name != "authentication-results" or mod.value):
            problems.append(f"changed {mod.name!r}")
        elif mod.kind not in ("chgheader",):
            problems.append(f"modification {mod.kind}")
    return problems


@dataclass
class Tally:
    """Counts of one client process (or of the whole run)."""

    messages: Counter[str] = field(default_factory=Counter)  # by category
    errors: int = 0  # protocol errors and timeouts outside deliberate drops
    drop_errors: int = 0  # a drop that failed before it dropped (counted as an error too)
    wrong_verdicts: int = 0
    header_problems: int = 0
    examples: list[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (dataclasses.asdict would mangle the Counter)."""
        return {"messages": dict(self.messages), "errors": self.errors,
                "drop_errors": self.drop_errors, "wrong_verdicts": self.wrong_verdicts,
                "header_problems": self.header_problems, "examples": list(self.examples)}

    def add(self, other: Tally) -> None:
        self.messages.update(other.messages)
        self.errors += other.errors
        self.drop_errors += other.drop_errors
        self.wrong_verdicts += other.wrong_verdicts
        self.header_problems += other.header_problems
        for text in other.examples:
            self.example(text)


def play_case(spec: str, c: Case, tally: Tally) -> None:
    tally.messages[c.category] += 1
    if c.category == "drop":
        try:
            _drop(spec, c)
        except Exception as exc:  # a drop must not fail before it drops
            tally.errors += 1
            tally.drop_errors += 1
            tally.example(f"#{c.index} {c.name}: {type(exc).__name__}: {exc}")
        return
    try:
        responses = session(spec, timeout=CLIENT_TIMEOUT, **c.params)
    except Exception as exc:  # MilterError, socket timeout, reset: all count
        tally.errors += 1
        tally.example(f"#{c.index} {c.name}: {type(exc).__name__}: {exc}")
        return
    final = list(responses.values())[-1]
    problems = header_problems(final)
    if problems:
        tally.header_problems += 1
        tally.example(f"#{c.index} {c.name}: {'; '.join(problems)}")
    if c.expect is not None:
        got = outcome(responses)
        msg = message(c.index, None, WARM_NAMES)
        wrong = unexpected(msg, got) if c.category == "normal" else \
            (got.action, got.xcode) != (c.expect.action, c.expect.xcode)
        if wrong:
            tally.wrong_verdicts += 1
            tally.example(f"#{c.index} {c.name}: got {got}, expected {c.expect}")


def client_process(spec: str, indices: range, seed: int, timeout_every: int,
                   done: Any, results: Any) -> None:
    tally = Tally()
    try:
        for index in indices:
            play_case(spec, case(index, seed, timeout_every), tally)
            with done.get_lock():
                done.value += 1
    except BaseException as exc:  # reported, never silent
        tally.errors += 1
        tally.example(f"client process died: {type(exc).__name__}: {exc}")
    results.put(tally.as_dict())


def run_clients(spec: str, start: int, count: int, seed: int, timeout_every: int,
                done: Any) -> Tally:
    """Messages start .. start+count-1 over CONNECTIONS client processes."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=client_process,
                         args=(spec, range(start + n, start + count, CONNECTIONS), seed,
                               timeout_every, done, results))
             for n in range(CONNECTIONS)]
    for proc in procs:
        proc.start()
    total = Tally()
    for _ in procs:
        got = results.get()
        part = Tally(Counter(got["messages"]), got["errors"], got["drop_errors"],
                     got["wrong_verdicts"], got["header_problems"], got["examples"])
        total.add(part)
    for proc in procs:
        proc.join()
    return total


# -- the daemon ----------------------------------------------------------------------------------


def write_config(workdir: Path, nameserver: str, lookup_timeout: float) -> tuple[Path, str]:
    spec = f"unix:{workdir}/spf.sock"
    path = workdir / "spfmilter.cfg"
    path.write_text(f"""\
[milter]
socket = {spec}
user =
group =
pidfile =
log_target = stderr
log_level = info
on_error = tempfail

[spf]
authserv_id = {AUTHSERV_ID}
nameservers = {nameserver}
lookup_timeout = {lookup_timeout:g}

[policy]
internal_hosts =

[headers]
received_spf = yes
mailfrom = address
""", encoding="ascii")
    return path, spec


def zones_dir(tmp: Path) -> Path:
    """tests/data/zones and bench/zones in one folder for DnsServer."""
    folder = tmp / "zones"
    folder.mkdir()
    for source in (ROOT / "tests" / "data" / "zones", BENCH / "zones"):
        for zone in source.glob("*.zone"):
            (folder / zone.name).symlink_to(zone)
    return folder


@dataclass
class Report:
    messages: int
    seconds: float
    alive: bool
    tally: Tally
    rss_kib: list[tuple[int, int]]  # (messages done, RSS KiB)
    rss_start_kib: int
    rss_end_kib: int
    daemon_tracebacks: int

    @property
    def rss_flat(self) -> bool:
        grown = (self.rss_end_kib - self.rss_start_kib) / 1024
        return grown <= max(RSS_FLAT_MIB, RSS_FLAT_FRACTION * self.rss_start_kib / 1024)

    @property
    def ok(self) -> bool:
        t = self.tally
        return (self.alive and t.errors == 0 and t.wrong_verdicts == 0
                and t.header_problems == 0 and self.rss_flat and self.daemon_tracebacks == 0)

    def text(self) -> str:
        t = self.tally
        by = ", ".join(f"{k} {v}" for k, v in sorted(t.messages.items()))
        assert sum(t.messages.values()) == self.messages, t.messages
        lines = [
            machine_line(),
            f"messages: {self.messages} in {self.seconds:.1f} s "
            f"({self.messages / max(self.seconds, 1e-9):.0f}/s) at {CONNECTIONS} connections "
            f"({by})",
            f"daemon alive: {'yes' if self.alive else 'NO'}",
            f"protocol errors and timeouts (not counting deliberate drops): {t.errors}",
            f"header fields that do not re-parse or break 998 octets: {t.header_problems}",
            f"wrong verdicts on normal and DNS messages: {t.wrong_verdicts}",
            f"tracebacks and internal errors in the daemon's log: {self.daemon_tracebacks}",
            f"RSS: start {self.rss_start_kib / 1024:.1f} MiB, end {self.rss_end_kib / 1024:.1f} "
            f"MiB ({'flat' if self.rss_flat else 'GREW'}); samples (messages: MiB) "
            + " ".join(f"{n}:{k / 1024:.1f}" for n, k in self.rss_kib),
            f"result: {'all goals met' if self.ok else 'GOALS MISSED'}",
        ]
        lines += [f"  e.g. {text}" for text in t.examples]
        return "\n".join(lines)


def soak(messages: int, seed: int, lookup_timeout: float, timeout_every: int,
         warmup: int) -> Report:
    with tempfile.TemporaryDirectory(prefix="spfsoak") as tmp_name:
        tmp = Path(tmp_name)
        with DnsServer(zones_dir(tmp)) as dns:
            cfg, spec = write_config(tmp, dns.nameservers[0], lookup_timeout)
            daemon = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                            spec, tmp)
            with daemon:
                assert daemon.proc is not None
                pid = daemon.proc.pid
                done = multiprocessing.get_context("fork").Value("l", 0)
                note(f"warm-up: {warmup} messages")
                run_clients(spec, 0, warmup, seed, timeout_every, done)
                rss_start = proc_rss_kib(pid)
                samples = [(0, rss_start)]
                done.value = 0
                stop = threading.Event()

                def sample() -> None:
                    every = max(1.0, min(30.0, messages / 2000))
                    while not stop.wait(every):
                        samples.append((done.value, proc_rss_kib(pid)))
                        note(f"{done.value}/{messages} messages, RSS "
                             f"{samples[-1][1] / 1024:.1f} MiB")

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                t0 = time.monotonic()
                tally = run_clients(spec, warmup, messages, seed, timeout_every, done)
                seconds = time.monotonic() - t0
                stop.set()
                sampler.join()
                rss_end = proc_rss_kib(pid)
                samples.append((messages, rss_end))
                alive = daemon.proc.poll() is None
                if alive:  # and still answering a normal message rightly
                    last = message(0, None, WARM_NAMES)
                    alive = not unexpected(last, play(spec, last))
                log = daemon.stderr()
                tracebacks = log.count("Traceback") + log.count("internal error in ")
            return Report(messages, seconds, alive, tally, _thin(samples), rss_start, rss_end,
                          tracebacks)


def _thin(samples: list[tuple[int, int]], keep: int = 12) -> list[tuple[int, int]]:
    if len(samples) <= keep:
        return samples
    step = (len(samples) - 1) / (keep - 1)
    return [samples[round(i * step)] for i in range(keep)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--lookup-timeout", type=float, default=2.0,
                        help="spfmilter's [spf] lookup_timeout (each DNS timeout costs this)")
    parser.add_argument("--timeout-every", type=int, default=2000,
                        help="one message in this many meets a DNS timeout (0: none)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="messages before the RSS start figure (default: 5%%, 100-2000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    warmup = args.warmup or max(100, min(2000, args.messages // 20))
    report = soak(args.messages, args.seed, args.lookup_timeout, args.timeout_every, warmup)
    print(report.text(), flush=True)
    if args.json:
        data = {"messages": report.messages, "seconds": report.seconds,
                "alive": report.alive, **report.tally.as_dict(),
                "rss_start_kib": report.rss_start_kib, "rss_end_kib": report.rss_end_kib,
                "rss_samples_kib": report.rss_kib, "rss_flat": report.rss_flat,
                "daemon_tracebacks": report.daemon_tracebacks, "ok": report.ok}
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
