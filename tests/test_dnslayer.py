"""SpfChecker's DNS layer against NSD: void lookups (RFC 7208 4.6.4), negative caching
(RFC 2308 5).  Zone: tests/data/zones/dns.test.zone; the relay strips the SOA from
answers under nosoa.dns.test."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfmilter.nameserver import parse
from spfmilter.spfcheck import DEFAULT_NEGATIVE_TTL, SpfChecker, _negative_ttl
from tests.dnsserver import DnsServer

HELO = "mail.spf.test"
LONG_LOCAL = "x" * 64  # one octet over a DNS label


def fresh(server: DnsServer, **kwargs: object) -> SpfChecker:
    return SpfChecker(nameservers=server.addresses, **kwargs)  # type: ignore[arg-type]


# -- void lookups: only NXDOMAIN/NODATA answers to a mechanism's lookup ----------

@pytest.mark.parametrize(("ip", "sender", "expected", "comment"), [
    ("127.0.0.1", "a@nullmx.dns.test", "pass", "ip4:127.0.0.0/8 matched"),
    ("192.0.2.99", "a@nullmx.dns.test", "fail", "-all matched"),
    ("127.0.0.1", f"{LONG_LOCAL}@longlocal.dns.test", "pass", "ip4:127.0.0.0/8 matched"),
    ("192.0.2.99", f"{LONG_LOCAL}@longlocal.dns.test", "fail", "-all matched"),
    ("127.0.0.1", "a@nodata.dns.test", "permerror", "Void lookup limit of 2 exceeded"),
    ("127.0.0.1", "a@void-nosoa.dns.test", "permerror", "Void lookup limit of 2 exceeded"),
])
def test_void_lookups(dns_server: DnsServer, ip: str, sender: str, expected: str,
                      comment: str) -> None:
    result = fresh(dns_server).check_mailfrom(ip, sender, HELO)
    assert (result.result, result.comment) == (expected, comment)


def test_null_mx_asks_nothing_after_the_mx(dns_counts: DnsServer) -> None:
    assert fresh(dns_counts).check_mailfrom("127.0.0.1", "a@nullmx.dns.test",
                                             HELO).result == "pass"
    assert set(dns_counts.queries) == {("nullmx.dns.test", "TXT"), ("nullmx.dns.test", "MX")}


def test_names_dns_cannot_carry_are_not_asked(dns_counts: DnsServer) -> None:
    fresh(dns_counts).check_mailfrom("127.0.0.1", f"{LONG_LOCAL}@longlocal.dns.test", HELO)
    assert set(dns_counts.queries) == {("longlocal.dns.test", "TXT")}


@pytest.mark.parametrize(("limit", "expected"), [(2, "permerror"), (3, "pass")])
def test_nodata_counts_against_the_limit(dns_server: DnsServer, limit: int,
                                         expected: str) -> None:
    checker = fresh(dns_server, void_lookup_limit=limit)
    assert checker.check_mailfrom("127.0.0.1", "a@nodata.dns.test", HELO).result == expected


# -- negative caching -------------------------------------------------------------

@pytest.mark.parametrize(("sender", "name", "qtype"), [
    ("a@nx.nosoa.dns.test", "nx.nosoa.dns.test", "TXT"),  # NXDOMAIN without SOA
    ("a@nosoa.dns.test", "nosoa.dns.test", "TXT"),  # NODATA without SOA
    ("a@void-nosoa.dns.test", "nx1.nosoa.dns.test", "A"),  # a mechanism's lookup
])
def test_negative_answer_without_soa_is_not_cached(dns_counts: DnsServer, sender: str,
                                                   name: str, qtype: str) -> None:
    checker = fresh(dns_counts)
    first = checker.check_mailfrom("127.0.0.1", sender, HELO)
    second = checker.check_mailfrom("127.0.0.1", sender, HELO)
    assert first == second
    assert first.result in ("none", "permerror")
    assert dns_counts.count(name, qtype) == 2
    assert checker.cache.get((name, qtype)) is None


@pytest.mark.parametrize(("sender", "name", "ttl"), [
    ("a@nx.dns.test", "nx.dns.test", 20),  # SOA TTL 20 < minimum 3600
    ("a@ns.spf.test", "ns.spf.test", 60),  # NODATA; minimum 60 < SOA TTL 300
    ("a@nxdomain.spf.test", "nxdomain.spf.test", 60),
])
def test_negative_answer_with_soa_lives_min_of_soa_ttl_and_minimum(
        dns_counts: DnsServer, sender: str, name: str, ttl: int) -> None:
    checker = fresh(dns_counts)
    assert checker.check_mailfrom("127.0.0.1", sender, HELO).result == "none"
    assert checker.check_mailfrom("127.0.0.1", sender, HELO).result == "none"
    assert dns_counts.count(name, "TXT") == 1
    entry = checker.cache.get_entry((name, "TXT"))
    assert entry is not None
    left = entry[0] - time.monotonic()
    assert ttl - 10 < left <= ttl


def _negative(rcode: int, authority: list[dns.rrset.RRset],
              answer: list[dns.rrset.RRset] = ()) -> dns.message.Message:
    query = dns.message.make_query("x.example.test", "TXT")
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.answer = list(answer)
    response.authority = authority
    return dns.message.from_wire(response.to_wire())  # as from a server: indexed sections


def _soa(owner: str, ttl: int, minimum: int) -> dns.rrset.RRset:
    return dns.rrset.from_text(owner, ttl, "IN", "SOA",
                               f"ns.{owner} host.{owner} 1 3600 600 86400 {minimum}")


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR])
def test_negative_ttl(rcode: int) -> None:
    assert DEFAULT_NEGATIVE_TTL == 0
    assert _negative_ttl(_negative(rcode, [])) == 0
    assert _negative_ttl(_negative(rcode, [_soa("example.test.", 300, 60)])) == 60
    assert _negative_ttl(_negative(rcode, [_soa("example.test.", 20, 3600)])) == 20
    # an SOA of some other zone says nothing about this name
    assert _negative_ttl(_negative(rcode, [_soa("other.test.", 300, 60)])) == 0
    cname = dns.rrset.from_text("x.example.test.", 5, "IN", "CNAME", "y.example.test.")
    assert _negative_ttl(_negative(rcode, [_soa("example.test.", 300, 60)], [cname])) == 5


# -- answers dnspython alone refuses --------------------------------------------

@pytest.mark.parametrize(("ip", "expected"), [("127.0.0.1", "pass"), ("192.0.2.99", "fail")])
@pytest.mark.parametrize("domain", ["nulltext.dns.test", "cnameloop.dns.test"])
def test_bad_records_beside_good_ones(dns_server: DnsServer, domain: str, ip: str,
                                      expected: str) -> None:
    assert fresh(dns_server).check_mailfrom(ip, f"a@{domain}", HELO).result == expected


def test_record_without_strings_is_dropped_the_rest_kept(dns_server: DnsServer) -> None:
    query = dns.message.make_query("nulltext.dns.test", "TXT")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query.to_wire(), (dns_server.host, dns_server.port))
        wire = sock.recv(65535)
    good = (b"v=spf1 ip4:", b"127.0.0.0/8 ip6:::1 -all")
    try:
        dns.message.from_wire(wire)  # what dnspython alone does
    except dns.exception.FormError:  # recent releases: the whole answer refused
        kept = [good]
    else:  # dnspython 2.1 to 2.3 keep the record without strings: nothing to drop
        kept = [(), good]
    response = parse(query, wire)
    assert sorted(rd.strings for rd in response.answer[0]) == kept
    broken = wire[:-1]  # the last record's data cut short: the whole answer fails
    with pytest.raises(dns.exception.FormError):
        parse(query, broken)


@settings(max_examples=int(os.environ.get("SPFMILTER_HYPOTHESIS_EXAMPLES", "200")),
          derandomize=True, deadline=None)
@given(rcode=st.sampled_from([dns.rcode.NXDOMAIN, dns.rcode.NOERROR]),
       soa=st.one_of(st.none(), st.tuples(st.integers(0, 2**31 - 1),
                                           st.integers(0, 2**31 - 1))),
       cname_ttls=st.lists(st.integers(0, 2**31 - 1), max_size=3),
       other_zone=st.booleans())
def test_negative_ttl_is_min_of_soa_ttl_minimum_and_cnames(
        rcode: int, soa: tuple[int, int] | None, cname_ttls: list[int],
        other_zone: bool) -> None:
    names = [f"c{i}.example.test." for i in range(len(cname_ttls))] + ["x.example.test."]
    chain = [dns.rrset.from_text(name, ttl, "IN", "CNAME", target)
             for name, target, ttl in zip(["x.example.test.", *names], names, cname_ttls)]
    authority = [] if soa is None else [
        _soa("other.test." if other_zone else "example.test.", *soa)]
    ttl = _negative_ttl(_negative(rcode, authority, chain))
    if soa is None or other_zone:
        assert ttl == 0  # no SOA for this name: not cached (RFC 2308 5)
    else:
        assert ttl == min([*soa, *cname_ttls])


def test_nameserver_on_ipv6(dns_server: DnsServer) -> None:
    checker = SpfChecker(nameservers=[(dns_server.host6, dns_server.port)])
    assert checker.check_mailfrom("::1", "a@nulltext.dns.test", HELO).result == "pass"
    assert checker.check_mailfrom("::1", "a@long.spf.test", HELO).result == "pass"  # TCP


# -- every kind of lookup, mixed: the void count is the NXDOMAIN/NODATA answers ------

#: (term, void lookups it makes) for a client none of them authorizes (192.0.2.200).
VOID_KINDS = [
    ("ip4:192.0.2.1", 0),
    ("a:has-a.v.test", 0),
    ("a:nodata.v.test", 1),  # NODATA
    ("a:nx.v.test", 1),  # NXDOMAIN
    ("a:cname-nx.v.test", 1),  # NXDOMAIN at the end of a CNAME
    ("a:loop1.v.test", 0),  # CNAME loop: no data, no answer to count
    ("a:%{l}.v.test", 0),  # a 64-octet label: never asked
    ("mx:nullmx.v.test", 0),  # MX 0 . (RFC 7505)
    ("mx:nodata.v.test", 1),  # NODATA for the MX
    ("mx:mx-nx.v.test", 1),  # its exchange is NXDOMAIN
    ("mx:mx-ok.v.test", 0),
    ("exists:nx.v.test", 1),
]
VOID_ZONE = """$ORIGIN v.test.
$TTL 300
@	IN SOA	ns hostmaster 1 3600 600 86400 300
@	IN NS	ns
ns	IN A	127.0.0.1
has-a	IN A	192.0.2.1
nodata	IN TXT	"no addresses"
cname-nx	IN CNAME	gone.v.test.
loop1	IN CNAME	loop2
loop2	IN CNAME	loop1
nullmx	IN MX	0 .
mx-nx	IN MX	10 gone.v.test.
mx-ok	IN MX	10 has-a.v.test.
"""


def _void_records() -> list[tuple[str, ...]]:
    """A fixed-seed sample of term combinations ($SPFMILTER_VOID_EXAMPLES of them)."""
    import random

    rng = random.Random(4604)
    count = int(os.environ.get("SPFMILTER_VOID_EXAMPLES", "150"))
    singles = [(kind,) for kind, _ in VOID_KINDS]
    return singles + [tuple(rng.choice(VOID_KINDS)[0] for _ in range(rng.randint(2, 6)))
                      for _ in range(count)]


@pytest.fixture(scope="module")
def void_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[DnsServer, list[tuple[str, ...]]]]:
    records = _void_records()
    lines = [VOID_ZONE]
    for number, terms in enumerate(records):
        lines.append(f'r{number}\tIN TXT\t"v=spf1 {" ".join(terms)} -all"')
    zones = tmp_path_factory.mktemp("voidzone")
    (zones / "v.test.zone").write_text("\n".join(lines) + "\n", encoding="ascii")
    with DnsServer(zones, servfail_zones=(), drop=(), no_soa=(), probe_zone="v.test") as server:
        yield server, records


def test_void_count_is_the_nxdomain_and_nodata_answers(
        void_server: tuple[DnsServer, list[tuple[str, ...]]]) -> None:
    server, records = void_server
    checker = fresh(server)
    voids = dict(VOID_KINDS)
    wrong = []
    for number, terms in enumerate(records):
        expected = "permerror" if sum(voids[t] for t in terms) > 2 else "fail"
        got = checker.check_mailfrom("192.0.2.200", f"{LONG_LOCAL}@r{number}.v.test", HELO)
        if got.result != expected:
            wrong.append((terms, expected, got.result, got.comment))
    assert not wrong, f"{len(wrong)} of {len(records)} wrong: {wrong[:5]}"
