"""``spfmilter test --trace``: the trace is the real evaluation, shown.

Over the test zones (NSD behind the counting relay, tests/dnsserver.py) every
scenario the checker and daemon tests use is checked traced and untraced: the
results agree, every query the relay saw is in the trace, and the trace's
counters match its own tree.  The real command runs as a process for the cases
an admin asks about (include, redirect, exp on fail, void lookups, a timeout,
the 10-lookup limit), in text and JSON.  A property test over random zones
(the generators of tests/test_cache_differential.py) checks that tracing
never changes a result.  SPFMILTER_TRACE_EXAMPLES=N runs N random examples.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import spf
from hypothesis import HealthCheck, given, settings

from spfmilter import trace
from spfmilter.results import SpfResult
from spfmilter.spfcheck import SpfChecker
from tests.dnsserver import DnsServer
from tests.test_cache_differential import ORIGIN, PHASES, Scenario, _Clock, _run, _write_zones
from tests.test_cache_differential import batches as zone_batches
from tests.test_cli import spfmilter
from tests.test_spfcheck import HELO, MAILFROM_CASES

EXAMPLES = int(os.environ.get("SPFMILTER_TRACE_EXAMPLES", "6"))

#: (identity, client, MAIL FROM or HELO name, expected result): the zones' scenarios
#: beyond test_spfcheck's MAIL FROM table (HELO names, dns.test, cache.test, edges.test).
MORE_CASES = [
    ("helo", "127.0.0.1", "mail.spf.test", "pass"),
    ("helo", "127.0.0.2", "mail.spf.test", "fail"),
    ("helo", "::1", "helo-fail.spf.test", "fail"),
    ("helo", "127.0.0.7", "fwd.example", "pass"),
    ("helo", "127.0.0.1", "nxdomain.spf.test", "none"),
    ("mailfrom", "127.0.0.1", "a@nullmx.dns.test", "pass"),
    ("mailfrom", "192.0.2.1", "a@nullmx.dns.test", "fail"),
    ("mailfrom", "127.0.0.1", "a" * 64 + "@longlocal.dns.test", "pass"),
    ("mailfrom", "127.0.0.1", "a@nodata.dns.test", "permerror"),
    ("mailfrom", "127.0.0.1", "a@nx.dns.test", "none"),
    ("mailfrom", "127.0.0.1", "a@nx.nosoa.dns.test", "none"),
    ("mailfrom", "127.0.0.1", "a@void-nosoa.dns.test", "permerror"),
    ("mailfrom", "127.0.0.1", "a@nulltext.dns.test", "pass"),
    ("mailfrom", "127.0.0.1", "a@cnameloop.dns.test", "pass"),
    ("mailfrom", "127.0.0.1", "alice@split.cache.test", "pass"),
    ("mailfrom", "127.0.0.1", "bob@split.cache.test", "fail"),
    ("mailfrom", "127.0.0.1", "bob@leak.cache.test", "fail"),
    ("mailfrom", "127.0.0.2", "a@deadexp.cache.test", "pass"),
    ("mailfrom", "127.0.0.1", "a@deadexp.cache.test", "fail"),
    ("mailfrom", "127.0.0.1", "a@receiver.cache.test", "fail"),
    ("mailfrom", "127.0.0.2", "a@v4only.edges.test", "pass"),
    ("mailfrom", "::ffff:127.0.0.2", "a@v4only.edges.test", "pass"),
    ("mailfrom", "127.0.0.1", "a@v4only.edges.test", "fail"),
    ("mailfrom", "127.0.0.3", "a@byip.edges.test", "pass"),
    ("mailfrom", "127.0.0.1", "a@xn--bcher-kva.edges.test", "softfail"),
    ("mailfrom", "127.0.0.1", "a@timeout.spf.test", "temperror"),
    ("mailfrom", "127.0.0.1", "a@inc-timeout.spf.test", "temperror"),
]
CASES = [("mailfrom", *case) for case in MAILFROM_CASES] + MORE_CASES
#: Budget of one check: the timeout cases spend all of it.
LOOKUP_TIMEOUT = 1


def _check(checker: SpfChecker, identity: str, ip: str, who: str) -> SpfResult:
    if identity == "helo":
        return checker.check_helo(ip, who)
    return checker.check_mailfrom(ip, who, HELO)


def _nodes(check: trace.Check, kind: type) -> list:
    return [n for n in check.walk() if isinstance(n, kind)]


def _asked(check: trace.Check) -> set[tuple[str, str]]:
    """(name, type) of every lookup in the trace that went to DNS."""
    return {(q.name, q.type) for q in _nodes(check, trace.Query)
            if q.cache == "miss" and (q.ttl is not None or q.error is not None)}


@pytest.mark.parametrize(("identity", "ip", "who", "expected"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2][:40]}" for c in CASES])
def test_trace_agrees_with_verdict(dns_server: DnsServer, identity: str, ip: str, who: str,
                                   expected: str) -> None:
    dns_server.reset_counts()
    with trace.tracing() as tracer:
        traced = _check(SpfChecker(nameservers=dns_server.addresses,
                                   lookup_timeout=LOOKUP_TIMEOUT), identity, ip, who)
    relay = set(dns_server.queries)
    plain = _check(SpfChecker(nameservers=dns_server.addresses, lookup_timeout=LOOKUP_TIMEOUT),
                   identity, ip, who)
    assert traced == plain
    assert traced.result == expected
    [check] = tracer.checks
    assert (check.identity, check.result, check.explanation, check.comment) == (
        identity, traced.result, traced.explanation, traced.comment)
    assert relay == _asked(check)  # every query the server saw, and no other
    terms = [t for t in _nodes(check, trace.Term) if t.name in trace.DNS_TERMS
             and t.lookup is not None]
    assert [t.lookup for t in terms] == list(range(1, check.lookups + 1))
    assert check.void_lookups == sum(q.void for q in _nodes(check, trace.Query))
    _assert_matched_term(check)
    json.dumps(tracer.as_json())  # always serialisable


def _assert_matched_term(check: trace.Check) -> None:
    """The term the trace marks as matched is the one the verdict names (or none)."""
    top = next((n for n in check.children if isinstance(n, trace.Record)), None)
    if top is None or check.result not in ("pass", "fail", "softfail", "neutral"):
        return
    while redirect := [t for t in top.children if isinstance(t, trace.Term)
                       and t.followed]:  # evaluated at the same level (RFC 7208 6.1)
        top = next(n for n in redirect[0].children if isinstance(n, trace.Record))
    matched = [t.term for t in top.children if isinstance(t, trace.Term) and t.matched]
    if check.comment.startswith("no mechanism matched"):
        assert matched == []
    else:
        assert [f"{m} matched" for m in matched] == [check.comment]


def test_cached_answers_show_as_hits(dns_server: DnsServer) -> None:
    checker = SpfChecker(nameservers=dns_server.addresses)
    first = checker.check_mailfrom("127.0.0.1", "a@include.spf.test", HELO)
    dns_server.reset_counts()
    with trace.tracing() as tracer:  # the result cache holds it: the trace evaluates anew
        again = checker.check_mailfrom("127.0.0.1", "a@include.spf.test", HELO)
    assert again == first
    assert dns_server.total_queries == 0
    queries = _nodes(tracer.checks[0], trace.Query)
    assert [(q.name, q.cache) for q in queries] == [
        ("include.spf.test", "hit"), ("_spf.include.spf.test", "hit")]
    assert all(0 < q.ttl <= 300 for q in queries)  # type: ignore[operator]


def test_untraced_checks_leave_no_trace(dns_server: DnsServer) -> None:
    checker = SpfChecker(nameservers=dns_server.addresses)
    with trace.tracing() as tracer:
        pass
    checker.check_mailfrom("127.0.0.1", "a@fail.spf.test", HELO)
    assert tracer.checks == []


# -- the command ----------------------------------------------------------------------

def _config(directory: Path, server: DnsServer) -> Path:
    path = directory / "trace.cfg"
    path.write_text(f"""\
[spf]
nameservers = {server.nameservers[0]}
lookup_timeout = {LOOKUP_TIMEOUT}
check_helo = no
[policy]
internal_hosts =
""", encoding="ascii")
    return path


def _command(server: DnsServer, ip: str, sender: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory(prefix="spftrace-") as tmp:
        out = spfmilter("-c", str(_config(Path(tmp), server)), "test", "--ip", ip,
                        "--helo", HELO, "--from", sender, "--trace", *extra)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


def test_command_text_trace_of_a_fail_through_include(dns_server: DnsServer) -> None:
    out = _command(dns_server, "127.0.0.1", "a@include.spf.test")
    lines = [line.strip() for line in out.splitlines()]
    for want in [
        "mailfrom check_host(ip=127.0.0.1, domain=include.spf.test, sender=a@include.spf.test,"
        " helo=mail.spf.test, receiver=localhost)",
        'DNS TXT include.spf.test  cache miss, ttl 300  -> '
        '"v=spf1 include:_spf.include.spf.test -all"',
        "include:_spf.include.spf.test  [lookup 1]  no match",
        "record of _spf.include.spf.test: v=spf1 ip4:127.0.0.5 ip6:2001:db8:5::/48 -all",
        "ip4:127.0.0.5  no match",
        "-all  match => fail",
        "result: fail (-all matched); DNS lookups 1 (limit 10), void lookups 0 (limit 2)",
        "mailfrom: fail (-all matched)",  # and the usual verdict after the tree
        "action: reject",
    ]:
        assert want in lines, (want, out)
    depth = {line.strip(): len(line) - len(line.lstrip()) for line in out.splitlines()}
    assert depth["ip4:127.0.0.5  no match"] > depth["include:_spf.include.spf.test  "
                                                    "[lookup 1]  no match"]


def _json(server: DnsServer, ip: str, sender: str) -> tuple[dict, dict]:
    data = json.loads(_command(server, ip, sender, "--json"))
    [check] = data["trace"]
    assert check["kind"] == "check"
    assert (check["result"], check["explanation"], check["comment"]) == (
        data["mailfrom"]["result"], data["mailfrom"]["explanation"], data["mailfrom"]["comment"])
    return data, check


def _walk(node: dict) -> list[dict]:
    return [node] + [n for child in node["children"] for n in _walk(child)]


def _terms(check: dict) -> dict[str, dict]:
    return {n["term"]: n for n in _walk(check) if n["kind"] == "term"}


def test_command_json_include_and_redirect(dns_server: DnsServer) -> None:
    _data, check = _json(dns_server, "127.0.0.5", "a@include.spf.test")
    include = _terms(check)["include:_spf.include.spf.test"]
    assert (include["matched"], include["lookup"], include["qualifier"]) == (True, 1, "pass")
    fetch, record = include["children"]
    assert (fetch["kind"], fetch["record"]) == ("fetch", record["text"])
    assert [(t["term"], t["matched"]) for t in record["children"]] == [("ip4:127.0.0.5", True)]
    _data, check = _json(dns_server, "127.0.0.1", "a@redirect.spf.test")
    redirect = _terms(check)["redirect=_spf.include.spf.test"]
    assert (redirect["modifier"], redirect["followed"], redirect["lookup"]) == (True, True, 1)
    assert [n["kind"] for n in redirect["children"]] == ["fetch", "record"]
    assert redirect["children"][1]["result"] == check["result"] == "fail"


def test_command_json_explanation_on_fail(dns_server: DnsServer) -> None:
    data, check = _json(dns_server, "127.0.0.1", "a@fail.spf.test")
    [exp] = [n for n in _walk(check) if n["kind"] == "explanation"]
    assert exp["spec"] == "_exp.fail.spf.test"
    assert exp["text"] == data["mailfrom"]["explanation"] == (
        "127.0.0.1 is not allowed to send mail for fail.spf.test")
    [query] = [n for n in exp["children"] if n["kind"] == "query"]
    assert query["answer"] == [["%{i} is not allowed to send mail for %{d}"]]
    [macro] = [n for n in exp["children"] if n["kind"] == "expansion"]
    assert macro["value"] == exp["text"]
    _data, passed = _json(dns_server, "192.0.2.10", "a@fail.spf.test")
    assert not [n for n in _walk(passed) if n["kind"] == "explanation"]  # only on fail


def test_command_json_void_lookups(dns_server: DnsServer) -> None:
    _data, check = _json(dns_server, "127.0.0.1", "a@void.spf.test")
    assert (check["result"], check["void_lookups"], check["void_limit"]) == ("permerror", 3, 2)
    queries = [n for n in _walk(check) if n["kind"] == "query" and n["type"] == "A"]
    assert [(q["rcode"], q["void"], q["void_lookups"]) for q in queries] == [
        ("NXDOMAIN", True, 1), ("NXDOMAIN", True, 2), ("NXDOMAIN", True, 3)]
    assert _terms(check)["a:nx3.void.spf.test"]["error"] == "Void lookup limit of 2 exceeded"


def test_command_json_timeout_is_temperror(dns_server: DnsServer) -> None:
    _data, check = _json(dns_server, "127.0.0.1", "a@inc-timeout.spf.test")
    assert check["result"] == "temperror"
    include = _terms(check)["include:timeout.spf.test"]
    [query] = [n for n in _walk(include) if n["kind"] == "query"]
    assert (query["name"], query["cache"], query["error"]) == (
        "timeout.spf.test", "miss", "DNS timeout for timeout.spf.test TXT")
    assert include["error"] == check["comment"]


def test_command_json_ten_lookup_limit(dns_server: DnsServer) -> None:
    _data, check = _json(dns_server, "127.0.0.1", "a@toomany.spf.test")
    assert (check["result"], check["comment"], check["lookups"]) == (
        "permerror", "Too many DNS lookups", 11)
    terms = [n for n in _walk(check) if n["kind"] == "term"]
    assert [t["lookup"] for t in terms] == list(range(1, 12))
    assert terms[-1]["term"] == "a:h11.spf.test"
    assert terms[-1]["error"] == "Too many DNS lookups"
    assert terms[-1]["children"] == []  # the eleventh lookup is never made
    _data, ten = _json(dns_server, "127.0.0.1", "a@ten.spf.test")
    assert (ten["result"], ten["lookups"]) == ("pass", 10)


# -- property: tracing never changes a result -------------------------------------------

@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=zone_batches())
def test_traced_result_equals_untraced(batch: list[Scenario]) -> None:
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="spftrace-") as tmp:
        _write_zones(Path(tmp), batch)
        with DnsServer(Path(tmp), probe_zone=ORIGIN) as server, \
                mock.patch.object(spf, "time", clock):
            plain = SpfChecker(nameservers=server.addresses, lookup_timeout=5)
            traced = SpfChecker(nameservers=server.addresses, lookup_timeout=5)
            for n, check in enumerate(c for s in batch for c in s.checks):
                clock.now += 1
                want = _run(plain, check)
                with trace.tracing() as tracer:
                    got = _run(traced, check)
                assert got == want, f"check {n}: {check}\n traced: {got}\n plain:  {want}"
                if got.checked:
                    assert tracer.checks[-1].result == got.result
                    _assert_matched_term(tracer.checks[-1])
                json.dumps(tracer.as_json())
