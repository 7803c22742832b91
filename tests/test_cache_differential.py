"""Differential test of the caches: a cached SpfChecker answers as an uncached one.

Hypothesis generates zone sets -- SPF records whose macros are split at random
points into character-strings, include/redirect chains, exp= texts, ptr and
exists, A/MX/PTR data, TTLs of 0, 1 and 300 s -- and a sequence of checks from
v4, v6 and v4-mapped clients with varying HELO names, senders and receivers.
Each example is one batch of scenarios served by a fresh NSD (tests/dnsserver.py);
every check goes through one checker with both caches on and one with both off
(``cache_size=0``), and the two SpfResults must be equal.  pyspf's clock
(``%{t}``) is the test's and ticks once per check, so a cached ``%{t}`` shows.

SPFMILTER_DIFF_EXAMPLES=N runs N examples instead of the suite's few (by hand);
SPFMILTER_DIFF_SHRINK=1 shrinks a failing example (slow: one NSD start per try).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import spf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from spfmilter.spfcheck import SpfChecker
from tests.dnsserver import ZONES_DIR, DnsServer

ORIGIN = "diff.test"
EXAMPLES = int(os.environ.get("SPFMILTER_DIFF_EXAMPLES", "25"))
#: Shrinking restarts NSD for every candidate (minutes): only when asked for.
PHASES = [Phase.explicit, Phase.generate] + (
    [Phase.shrink] if os.environ.get("SPFMILTER_DIFF_SHRINK") else [])
TTLS = (0, 1, 300)
LOCALS = ("alice", "mallory", "postmaster", "Alice", "a.b-c")
RECEIVERS = ("mx1.example", "mx2.example", "")
QUALIFIERS = ("", "+", "-", "~", "?")
DOMAIN_MACROS = ("%{l}", "%{l}", "%{i}", "%{ir}.%{v}", "%{h}", "%{d}", "%{o}", "%{d2}",
                 "%{p}", "%{l1r-}", "%{s}", "%{c}")
EXP_PIECES = ("sender", "%{s}", "%{l}", "%{o}", "%{d}", "%{i}", "%{c}", "%{r}", "%{h}",
              "%{v}", "%{p}", "%{t}", "%{d2}", "%{lr-}", "%{ir}", "%%", "%_", "%-",
              "rejected", "by")


@dataclass(frozen=True)
class Check:
    identity: str  # "mailfrom" or "helo"
    ip: str
    sender: str  # "" for the null sender
    helo: str
    receiver: str


@dataclass(frozen=True)
class Scenario:
    records: tuple[tuple[str, int, str, str], ...]  # (owner, ttl, type, rdata)
    checks: tuple[Check, ...]


def _txt(text: str, cuts: list[int]) -> str:
    """*text* as TXT rdata, split into character-strings at *cuts*."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


@st.composite
def scenarios(draw: st.DrawFn, k: int) -> Scenario:
    """Names under s<k>.diff.test, clients in 127.0.<k>.0/24 and 2001:db8:<k>::/48."""
    zone = f"s{k}.{ORIGIN}"
    ndom = draw(st.integers(1, 4))
    doms = [f"dom{j}.{zone}" for j in range(ndom)]
    hosts = [f"host{n}.{zone}" for n in (1, 2, 3)]
    ttl_of: dict[tuple[str, str], int] = {}
    records: list[tuple[str, int, str, str]] = []

    ttls = st.sampled_from(TTLS) if draw(st.booleans()) else st.just(300)

    def add(owner: str, rtype: str, rdata: str) -> None:
        ttl = ttl_of.setdefault((owner, rtype), draw(ttls))
        records.append((owner, ttl, rtype, rdata))

    def split(text: str) -> str:
        # cuts at random, and often inside a macro (where a per-string scan goes wrong)
        cuts = draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=3))
        for at, char in enumerate(text):
            if char == "%":
                cuts.append(at + draw(st.sampled_from((0, 0, 1, 2, 3))))
        return _txt(text, cuts)

    for n, host in enumerate(hosts, 1):
        add(host, "A", f"127.0.{k}.{n}")
        add(host, "AAAA", f"2001:db8:{k}::{n}")
    for dom in doms:
        for n in draw(st.sets(st.integers(1, 3), max_size=2)):
            add(dom, "A", f"127.0.{k}.{n}")
        for n in draw(st.sets(st.integers(1, 3), max_size=2)):
            add(dom, "MX", f"10 host{n}.{zone}.")
    for n in (1, 2, 3):  # PTR of 127.0.k.n: validated, unvalidated or absent
        target = draw(st.sampled_from([*hosts, *doms, f"nohost.{zone}", None]))
        if target is not None:
            add(f"{n}.{k}.0.127.in-addr.arpa.", "PTR", target + ".")
    # names the macro-bearing exists: terms find for some clients and senders
    for name in ("alice", f"127.0.{k}.1", f"1.{k}.0.127.in-addr", f"good.{zone}", doms[0],
                 ORIGIN, hosts[0]):
        add(f"{name}.m.{zone}", "A", "127.0.0.2")
    for n in (0, 1):
        words = draw(st.lists(st.sampled_from(EXP_PIECES), min_size=1, max_size=6))
        add(f"e{n}.{zone}", "TXT", split(" ".join(words)))
    add(f"alice.e.{zone}", "TXT", split("only alice %{l} sees this"))

    def term() -> str:
        q = draw(st.sampled_from(QUALIFIERS))
        n = draw(st.integers(1, 3))
        other = draw(st.sampled_from(doms))
        macro = draw(st.sampled_from(DOMAIN_MACROS))
        return q + draw(st.sampled_from([  # repeated entries weigh more
            f"ip4:127.0.{k}.{n}", f"ip4:127.0.{k}.0/30", f"ip6:2001:db8:{k}::{n}",
            "a", f"a:host{n}.{zone}", "a/30", "mx", f"mx:{other}", "ptr", f"ptr:{zone}",
            *[f"exists:{macro}.m.{zone}"] * 5, f"a:{macro}.m.{zone}",
            *[f"include:{other}"] * 2, "include:x.servfail.test",
        ]))

    for dom in doms:
        terms = [term() for _ in range(draw(st.integers(0, 4)))]
        end = draw(st.sampled_from(["-all", "-all", "~all", "?all", "+all", "", "redirect"]))
        if end == "redirect":
            end = f"redirect={draw(st.sampled_from(doms))}"
        terms.append(end)
        exp = draw(st.sampled_from([None, f"e0.{zone}", f"e0.{zone}", f"e1.{zone}",
                                    f"e2.{zone}", f"%{{l}}.e.{zone}", "x.servfail.test"]))
        if exp is not None:
            terms.append(f"exp={exp}")
        add(dom, "TXT", split(" ".join(["v=spf1", *filter(None, terms)])))

    ips = [f"127.0.{k}.1", f"127.0.{k}.2", f"127.0.{k}.4", f"::ffff:127.0.{k}.1",
           f"2001:db8:{k}::1", f"2001:db8:{k}::9"]
    helos = [f"good.{zone}", f"bad.{zone}", doms[0], f"Good.S{k}.{ORIGIN}"]
    fields = {
        "identity": st.sampled_from(("mailfrom", "mailfrom", "helo")),
        "ip": st.sampled_from(ips),
        "local": st.sampled_from((*LOCALS, None)),
        "domain": st.sampled_from([*doms, *(d.upper() for d in doms)]),
        "helo": st.sampled_from(helos),
        "receiver": st.sampled_from(RECEIVERS),
    }
    # each check differs from the one before in one input: where a cache key
    # misses an input, two such neighbours get one answer
    now = {name: draw(strategy) for name, strategy in fields.items()}
    checks = []
    for _ in range(draw(st.integers(4, 30))):
        changed = draw(st.sampled_from(sorted(fields)))
        now[changed] = draw(fields[changed])
        checks.append(Check(
            identity=now["identity"], ip=now["ip"],
            sender="" if now["local"] is None else f"{now['local']}@{now['domain']}",
            helo=now["domain"] if now["identity"] == "helo" and draw(st.booleans())
            else now["helo"],
            receiver=now["receiver"]))
    return Scenario(tuple(records), tuple(checks))


@st.composite
def batches(draw: st.DrawFn) -> list[Scenario]:
    return [draw(scenarios(k)) for k in range(1, draw(st.integers(1, 6)) + 1)]


def _write_zones(directory: Path, batch: list[Scenario]) -> None:
    shutil.copy(ZONES_DIR / "root.zone", directory / "root.zone")
    head = (f"@ 300 IN SOA ns.{ORIGIN}. hostmaster.{ORIGIN}. 1 3600 600 86400 60\n"
            f"@ 300 IN NS ns.{ORIGIN}.\n")
    forward = [f"$ORIGIN {ORIGIN}.\n", head, "ns 300 IN A 127.0.0.1\n"]
    reverse = ["$ORIGIN in-addr.arpa.\n", head]
    for scenario in batch:
        for owner, ttl, rtype, rdata in scenario.records:
            lines = reverse if owner.endswith(".in-addr.arpa.") else forward
            name = owner if owner.endswith(".") else owner + "."
            lines.append(f"{name} {ttl} IN {rtype} {rdata}\n")
    (directory / f"{ORIGIN}.zone").write_text("".join(forward), encoding="ascii")
    (directory / "in-addr.arpa.zone").write_text("".join(reverse), encoding="ascii")


class _Clock:
    """pyspf's view of time.time(): the test moves it on once per check."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now


def _run(checker: SpfChecker, check: Check):
    if check.identity == "helo":
        return checker.check_helo(check.ip, check.helo, receiver=check.receiver)
    return checker.check_mailfrom(check.ip, check.sender, check.helo, receiver=check.receiver)


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=batches())
def test_cached_checker_answers_as_uncached(batch: list[Scenario]) -> None:
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="spfdiff-") as tmp:
        _write_zones(Path(tmp), batch)
        with DnsServer(Path(tmp), probe_zone=ORIGIN) as server, \
                mock.patch.object(spf, "time", clock):
            cached = SpfChecker(nameservers=server.addresses, lookup_timeout=5)
            uncached = SpfChecker(nameservers=server.addresses, lookup_timeout=5,
                                  cache_size=0)
            for n, check in enumerate(c for s in batch for c in s.checks):
                clock.now += 1
                want = _run(uncached, check)
                got = _run(cached, check)
                assert got == want, f"check {n}: {check}\n cached:   {got}\n uncached: {want}"
    if "SPFMILTER_DIFF_EXAMPLES" in os.environ:  # progress of a long run by hand
        print(f"example: {len(batch)} scenarios, {sum(len(s.checks) for s in batch)} checks, "
              f"{sum(len(s.records) for s in batch)} records, result cache hits "
              f"{cached.results.hits}, DNS cache hits {cached.cache.hits}", flush=True)
