"""SpfChecker against real zones served by NSD on loopback (tests/data/zones)."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dns.name
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfmilter.dnscache import DnsCache
from spfmilter.results import SpfResult
from spfmilter.spfcheck import SpfChecker, _Answer, _qname, _Session, normalize_domain, split_sender
from tests.dnsserver import DnsServer

HELO = "mail.spf.test"


@pytest.fixture(scope="module")
def checker(dns_server: DnsServer) -> SpfChecker:
    return SpfChecker(nameservers=dns_server.addresses, lookup_timeout=5)


def fresh(server: DnsServer, **kwargs: object) -> SpfChecker:
    """A checker with an empty cache."""
    return SpfChecker(nameservers=server.addresses, **kwargs)  # type: ignore[arg-type]


# (client ip, MAIL FROM, expected result)
MAILFROM_CASES = [
    ("127.0.0.1", "a@pass.spf.test", "pass"),
    ("::1", "a@pass.spf.test", "pass"),
    ("2001:db8:1::9", "a@pass.spf.test", "pass"),
    ("2001:db8:2::9", "a@pass.spf.test", "fail"),
    ("127.0.0.1", "a@fail.spf.test", "fail"),
    ("::1", "a@fail.spf.test", "fail"),
    ("192.0.2.10", "a@fail.spf.test", "pass"),
    ("2001:db8::10", "a@fail.spf.test", "pass"),
    ("127.0.0.1", "a@softfail.spf.test", "softfail"),
    ("::1", "a@softfail.spf.test", "softfail"),
    ("127.0.0.1", "a@neutral.spf.test", "neutral"),
    ("::1", "a@neutral.spf.test", "neutral"),
    ("127.0.0.1", "a@none.spf.test", "none"),
    ("::1", "a@none.spf.test", "none"),
    ("127.0.0.1", "a@nxdomain.spf.test", "none"),
    ("::1", "a@nosuch.invalid", "none"),
    ("127.0.0.1", "a@permerror.spf.test", "permerror"),
    ("::1", "a@permerror.spf.test", "permerror"),
    ("127.0.0.1", "a@twospf.spf.test", "permerror"),
    ("::1", "a@twospf.spf.test", "permerror"),
    ("127.0.0.1", "a@toomany.spf.test", "permerror"),
    ("::1", "a@toomany.spf.test", "permerror"),
    ("127.0.0.1", "a@ten.spf.test", "pass"),
    ("::1", "a@ten.spf.test", "pass"),
    ("127.0.0.1", "a@void.spf.test", "permerror"),
    ("::1", "a@void.spf.test", "permerror"),
    ("127.0.0.1", "a@void2.spf.test", "pass"),
    ("127.0.0.1", "a@include-none.spf.test", "permerror"),
    ("127.0.0.1", "a@redirect-none.spf.test", "permerror"),
    ("127.0.0.1", "a@servfail.test", "temperror"),
    ("::1", "a@servfail.test", "temperror"),
    ("127.0.0.1", "a@inc-servfail.spf.test", "temperror"),
    ("::1", "a@inc-servfail.spf.test", "temperror"),
    ("192.0.2.10", "a@inc-timeout.spf.test", "pass"),
    ("127.0.0.3", "a@a.spf.test", "pass"),
    ("::1", "a@a.spf.test", "pass"),
    ("127.0.0.1", "a@a.spf.test", "fail"),
    ("127.0.0.4", "a@mx.spf.test", "pass"),
    ("2001:db8::25", "a@mx.spf.test", "pass"),
    ("127.0.0.1", "a@mx.spf.test", "fail"),
    ("::1", "a@mx.spf.test", "fail"),
    ("::1", "a@ip6.spf.test", "pass"),
    ("2001:db8:6::1", "a@ip6.spf.test", "pass"),
    ("2001:db8:7::1", "a@ip6.spf.test", "fail"),
    ("127.0.0.1", "a@ip6.spf.test", "fail"),
    ("::ffff:127.0.0.1", "a@pass.spf.test", "pass"),
    ("127.0.0.5", "a@include.spf.test", "pass"),
    ("2001:db8:5::1", "a@include.spf.test", "pass"),
    ("127.0.0.1", "a@include.spf.test", "fail"),
    ("::1", "a@include.spf.test", "fail"),
    ("127.0.0.5", "a@redirect.spf.test", "pass"),
    ("2001:db8:5::1", "a@redirect.spf.test", "pass"),
    ("127.0.0.1", "a@redirect.spf.test", "fail"),
    ("127.0.0.1", "a@cname.spf.test", "pass"),
    ("::1", "a@cname.spf.test", "pass"),
    ("127.0.0.1", "a@long.spf.test", "pass"),
    ("::1", "a@long.spf.test", "pass"),
    ("127.0.0.6", "a@mi.spf.test", "pass"),
    ("2001:db8::6", "a@mi.spf.test", "pass"),
    ("127.0.0.1", "a@mi.spf.test", "fail"),
    ("::1", "a@mi.spf.test", "fail"),
    ("127.0.0.1", "alice@ml.spf.test", "pass"),
    ("::1", "alice@ml.spf.test", "pass"),
    ("127.0.0.1", "bob@ml.spf.test", "fail"),
    ("127.0.0.1", "x@md.spf.test", "pass"),
    ("127.0.0.2", "x@md.spf.test", "fail"),
    ("::1", "x@md.spf.test", "fail"),
    ("127.0.0.1", "x@bank.example", "fail"),
    ("192.0.2.80", "x@bank.example", "pass"),
    ("127.0.0.7", "x@sender.example", "fail"),
    ("192.0.2.50", "x@sender.example", "pass"),
]


@pytest.mark.parametrize(("ip", "sender", "expected"), MAILFROM_CASES)
def test_mailfrom_results(checker: SpfChecker, ip: str, sender: str, expected: str) -> None:
    result = checker.check_mailfrom(ip, sender, HELO)
    assert result.result == expected, result
    assert result.identity == "mailfrom"
    assert result.checked
    assert result.sender == sender
    assert result.domain == sender.split("@")[1]
    assert result.comment


def test_pass_comment_names_the_mechanism(checker: SpfChecker) -> None:
    assert checker.check_mailfrom("::1", "a@pass.spf.test", HELO).comment == "ip6:::1 matched"
    result = checker.check_mailfrom("127.0.0.1", "a@void.spf.test", HELO)
    assert result.comment == "Void lookup limit of 2 exceeded"
    assert checker.check_mailfrom("127.0.0.1", "a@none.spf.test", HELO).comment == (
        "no SPF record for none.spf.test")
    assert checker.check_mailfrom("127.0.0.1", "a@nxdomain.spf.test", HELO).comment == (
        "domain nxdomain.spf.test does not exist")


# -- explanations --------------------------------------------------------------

def test_explanation_is_expanded_exp_text(checker: SpfChecker) -> None:
    result = checker.check_mailfrom("127.0.0.1", "a@fail.spf.test", HELO)
    assert result.explanation == "127.0.0.1 is not allowed to send mail for fail.spf.test"
    six = checker.check_mailfrom("::1", "a@fail.spf.test", HELO)
    assert six.result == "fail"
    assert six.explanation.endswith(".1 is not allowed to send mail for fail.spf.test")


def test_explanation_only_for_fail(checker: SpfChecker) -> None:
    assert checker.check_mailfrom("192.0.2.10", "a@fail.spf.test", HELO).explanation == ""
    assert checker.check_mailfrom("127.0.0.1", "a@softfail.spf.test", HELO).explanation == ""
    # fail without exp=: pyspf's default text is not passed on as the domain's
    assert checker.check_mailfrom("127.0.0.1", "a@a.spf.test", HELO).explanation == ""


def test_hostile_explanations_come_back_raw(checker: SpfChecker) -> None:
    inject = checker.check_mailfrom("127.0.0.1", "a@inject.spf.test", HELO)
    assert (inject.result, inject.explanation) == (
        "fail", "nope) ; dmarc=pass header.from=bank.example (x")
    pct = checker.check_mailfrom("127.0.0.1", "50%off@pct.spf.test", HELO)
    assert (pct.result, pct.explanation) == ("fail", "100% sure 50%off\r\nX-Injected: yes")


def test_non_ascii_explanation_is_dropped(checker: SpfChecker) -> None:
    result = checker.check_mailfrom("::1", "a@utf8.spf.test", HELO)
    assert (result.result, result.explanation) == ("fail", "")


# -- processing limits ----------------------------------------------------------

def test_lookup_limit_message(checker: SpfChecker) -> None:
    result = checker.check_mailfrom("127.0.0.1", "a@toomany.spf.test", HELO)
    assert (result.result, result.comment) == ("permerror", "Too many DNS lookups")


@pytest.mark.parametrize(("limit", "void", "void2"), [
    (0, "permerror", "permerror"),
    (1, "permerror", "permerror"),
    (2, "permerror", "pass"),
    (3, "pass", "pass"),
])
def test_void_lookup_limit(dns_server: DnsServer, limit: int, void: str, void2: str) -> None:
    checker = fresh(dns_server, void_lookup_limit=limit)
    assert checker.check_mailfrom("127.0.0.1", "a@void.spf.test", HELO).result == void
    assert checker.check_mailfrom("127.0.0.1", "a@void2.spf.test", HELO).result == void2
    # the lookup of the sender's own record is not a mechanism's void lookup
    assert checker.check_mailfrom("127.0.0.1", "a@nxdomain.spf.test", HELO).result == "none"


def test_checkers_keep_their_own_limits_concurrently(dns_server: DnsServer) -> None:
    strict, lax = fresh(dns_server, void_lookup_limit=2), fresh(dns_server, void_lookup_limit=3)
    barrier = threading.Barrier(20)

    def run(i: int) -> str:
        barrier.wait()
        use = strict if i % 2 else lax
        return use.check_mailfrom("127.0.0.1", "a@void.spf.test", HELO).result

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(run, range(20)))
    assert results == ["pass" if i % 2 == 0 else "permerror" for i in range(20)]


# -- temporary errors -------------------------------------------------------------

def test_servfail_is_temperror(checker: SpfChecker) -> None:
    result = checker.check_mailfrom("127.0.0.1", "a@servfail.test", HELO)
    assert result.result == "temperror"
    assert "servfail.test" in result.comment


@pytest.mark.parametrize("sender", ["a@timeout.spf.test", "a@inc-timeout.spf.test"])
def test_timeout_is_temperror_within_deadline(dns_server: DnsServer, sender: str) -> None:
    checker = fresh(dns_server, lookup_timeout=1.5)
    dns_server.reset_counts()
    start = time.monotonic()
    result = checker.check_mailfrom("127.0.0.1", sender, HELO)
    elapsed = time.monotonic() - start
    assert result.result == "temperror"
    assert "timeout" in result.comment
    assert elapsed < 1.5 + 0.5
    assert dns_server.count("timeout.spf.test", "TXT") >= 1


def test_deadline_spent_means_no_more_queries(dns_server: DnsServer) -> None:
    checker = fresh(dns_server, lookup_timeout=1.0)
    session = _Session(checker, time.monotonic() - 1)  # deadline already passed
    dns_server.reset_counts()
    with pytest.raises(Exception, match="time limit"):
        checker._lookup(session, "pass.spf.test", "TXT")
    assert dns_server.total_queries == 0


def test_unexpected_error_is_temperror_and_logged(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(SpfChecker):
        def _resolve(self, session: _Session, name: str, qtype: str) -> _Answer:
            if name == "a.spf.test" and qtype == "A":
                raise ZeroDivisionError("simulated library bug")
            return super()._resolve(session, name, qtype)

    checker = Broken(nameservers=dns_server.addresses)
    with caplog.at_level(logging.WARNING, logger="spfmilter.spfcheck"):
        result = checker.check_mailfrom("127.0.0.3", "a@a.spf.test", HELO)
    assert result.result == "temperror"
    assert "ZeroDivisionError" in result.comment
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].exc_info is not None


# -- cache --------------------------------------------------------------------------

def test_repeated_check_makes_no_queries(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    dns_server.reset_counts()
    first = checker.check_mailfrom("127.0.0.4", "a@mx.spf.test", HELO)
    assert dns_server.count("mx.spf.test", "TXT") == 1
    assert dns_server.count("mx.spf.test", "MX") == 1
    assert dns_server.count("mail.mx.spf.test", "A") == 1
    dns_server.reset_counts()
    hits = checker.cache_hits
    second = checker.check_mailfrom("127.0.0.4", "a@mx.spf.test", HELO)
    assert second == first
    assert dns_server.total_queries == 0
    assert checker.cache_hits + checker.results.hits >= hits + 1
    assert checker.stats()["hits"] == checker.cache_hits


def test_negative_answers_are_cached(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    assert checker.check_mailfrom("127.0.0.1", "a@void2.spf.test", HELO).result == "pass"
    assert checker.check_mailfrom("127.0.0.1", "a@nxdomain.spf.test", HELO).result == "none"
    dns_server.reset_counts()
    assert checker.check_mailfrom("127.0.0.1", "a@void2.spf.test", HELO).result == "pass"
    assert checker.check_mailfrom("127.0.0.1", "a@nxdomain.spf.test", HELO).comment == (
        "domain nxdomain.spf.test does not exist")
    assert dns_server.total_queries == 0


def test_cache_is_shared_between_identities(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    checker.check_helo("127.0.0.1", HELO)
    dns_server.reset_counts()
    assert checker.check_mailfrom("127.0.0.1", "", HELO).result == "pass"
    assert dns_server.total_queries == 0


def test_cache_size_zero_disables_cache(dns_server: DnsServer) -> None:
    checker = fresh(dns_server, cache_size=0)
    checker.check_mailfrom("127.0.0.1", "a@pass.spf.test", HELO)
    dns_server.reset_counts()
    assert checker.check_mailfrom("127.0.0.1", "a@pass.spf.test", HELO).result == "pass"
    assert dns_server.count("pass.spf.test", "TXT") == 1
    assert checker.stats()["size"] == 0


def test_cache_is_bounded(dns_server: DnsServer) -> None:
    checker = fresh(dns_server, cache_size=3)
    for name in ("pass", "fail", "softfail", "neutral", "none"):
        checker.check_mailfrom("127.0.0.1", f"a@{name}.spf.test", HELO)
    stats = checker.stats()
    assert stats["size"] == 3
    assert stats["evictions"] >= 2
    dns_server.reset_counts()
    checker.check_mailfrom("127.0.0.1", "a@pass.spf.test", HELO)  # evicted long ago
    assert dns_server.count("pass.spf.test", "TXT") == 1


def test_ttl_expiry_requeries(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    dns_server.reset_counts()
    assert checker.check_mailfrom("127.0.0.1", "a@ttl1.spf.test", HELO).result == "pass"
    assert dns_server.count("ttl1.spf.test", "TXT") == 1
    time.sleep(1.2)  # the record's TTL is 1 s: the point of this test is real expiry
    assert checker.check_mailfrom("127.0.0.1", "a@ttl1.spf.test", HELO).result == "pass"
    assert dns_server.count("ttl1.spf.test", "TXT") == 2


def test_dns_cache_ttl_lru_and_caps() -> None:
    now = [100.0]
    cache: DnsCache[str] = DnsCache(2, max_ttl=50, max_negative_ttl=10, clock=lambda: now[0])
    cache.put("a", "A", 5)
    cache.put("neg", "", 3600, negative=True)
    cache.put("zero", "Z", 0)
    assert (cache.get("a"), cache.get("neg"), cache.get("zero")) == ("A", "", None)
    now[0] += 5
    assert cache.get("a") is None  # expired exactly at its TTL
    now[0] += 4.9
    assert cache.get("neg") == ""
    now[0] += 0.2
    assert cache.get("neg") is None  # negative TTL capped at 10
    cache.put("x", "X", 1000)
    cache.put("y", "Y", 1000)
    assert cache.get("x") == "X"  # x becomes most recent
    cache.put("z", "Z", 1000)
    assert (cache.get("y"), cache.get("x"), cache.get("z")) == (None, "X", "Z")
    now[0] += 50
    assert cache.get("x") is None  # positive TTL capped at 50
    assert cache.stats()["evictions"] == 1
    with pytest.raises(ValueError):
        DnsCache(-1)


# -- concurrency ---------------------------------------------------------------

def test_fifty_threads_at_once(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    cases = [c for c in MAILFROM_CASES if c[2] != "temperror"][:50]
    cases += MAILFROM_CASES[: 50 - len(cases)]
    assert len(cases) == 50
    barrier = threading.Barrier(len(cases))

    def run(case: tuple[str, str, str]) -> str:
        barrier.wait()
        return checker.check_mailfrom(case[0], case[1], HELO).result

    for _ in range(2):  # cold cache, then warm cache
        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(run, cases))
        assert results == [c[2] for c in cases]


# -- HELO -----------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "helo", "expected"), [
    ("127.0.0.1", "mail.spf.test", "pass"),
    ("::1", "mail.spf.test", "pass"),
    ("127.0.0.1", "MAIL.spf.test.", "pass"),
    ("127.0.0.2", "mail.spf.test", "fail"),
    ("2001:db8::1", "mail.spf.test", "fail"),
    ("127.0.0.1", "helo-fail.spf.test", "fail"),
    ("::1", "helo-fail.spf.test", "fail"),
    ("127.0.0.7", "fwd.example", "pass"),
    ("2001:db8:7::7", "fwd.example", "pass"),
    ("127.0.0.1", "nxdomain.spf.test", "none"),
])
def test_helo_checked(checker: SpfChecker, ip: str, helo: str, expected: str) -> None:
    result = checker.check_helo(ip, helo)
    assert (result.identity, result.result, result.checked) == ("helo", expected, True)
    domain = helo.rstrip(".")
    assert (result.domain, result.sender) == (domain, f"postmaster@{domain}")


@pytest.mark.parametrize("helo", [
    "[127.0.0.1]", "[IPv6:::1]", "127.0.0.1", "localhost", "mail", "", ".", "mail..spf.test",
    "mail.spf.test\r\n", "mail.spf.test\r\nX-Header: x", "a" * 300 + ".spf.test",
    "mail.\udcff.test", "exa mple.test", "x" * 250 + "." + "y" * 10,
])
def test_helo_not_checked(dns_server: DnsServer, checker: SpfChecker, helo: str) -> None:
    dns_server.reset_counts()
    result = checker.check_helo("127.0.0.1", helo)
    assert result == SpfResult("helo", "none", checked=False, comment=result.comment)
    assert result.comment
    assert dns_server.total_queries == 0


def test_idn_helo_is_checked_as_a_labels(checker: SpfChecker) -> None:
    result = checker.check_helo("127.0.0.1", "bücher.spf.test")
    assert (result.result, result.domain, result.checked) == (
        "none", "xn--bcher-kva.spf.test", True)


# -- MAIL FROM forms --------------------------------------------------------------

@pytest.mark.parametrize("sender", ["", "<>"])
def test_null_sender_uses_helo(checker: SpfChecker, sender: str) -> None:
    result = checker.check_mailfrom("127.0.0.1", sender, HELO)
    assert (result.result, result.domain, result.sender) == ("pass", HELO, f"postmaster@{HELO}")
    failing = checker.check_mailfrom("127.0.0.1", sender, "helo-fail.spf.test")
    assert (failing.result, failing.sender) == ("fail", "postmaster@helo-fail.spf.test")
    literal = checker.check_mailfrom("127.0.0.1", sender, "[127.0.0.1]")
    assert (literal.result, literal.checked, literal.domain) == ("none", False, "")


@pytest.mark.parametrize(("sender", "expected", "checked_as"), [
    ("<a@pass.spf.test>", "pass", "a@pass.spf.test"),
    ("@pass.spf.test", "pass", "postmaster@pass.spf.test"),
    ("pass.spf.test", "pass", "postmaster@pass.spf.test"),
    ("<@relay.example,@r2.example:a@pass.spf.test>", "pass", "a@pass.spf.test"),
    ('"odd@local"@pass.spf.test', "pass", '"odd@local"@pass.spf.test'),
    ("a@PASS.spf.test.", "pass", "a@PASS.spf.test"),
    ("\udcff\udcfe@pass.spf.test", "pass", "\udcff\udcfe@pass.spf.test"),
    ("bjørn@ml.spf.test", "fail", "bjørn@ml.spf.test"),
    ("\udcff@ml.spf.test", "fail", "\udcff@ml.spf.test"),
    ("a@bücher.spf.test", "none", "a@xn--bcher-kva.spf.test"),
])
def test_mailfrom_forms(checker: SpfChecker, sender: str, expected: str,
                        checked_as: str) -> None:
    result = checker.check_mailfrom("127.0.0.1", sender, HELO)
    assert (result.result, result.sender, result.checked) == (expected, checked_as, True)


@pytest.mark.parametrize("sender", [
    "a@", "<a@>", "a@localhost", "a@bad..spf.test", "a@[127.0.0.1]", "nodomain",
    "a@pass.spf.test\r\n", "a@exa mple.test", "a@" + "x" * 300 + ".test",
    "a@\udcffpass.spf.test", "a@1.2.3.4", "<<a@pass.spf.test>>",
])
def test_malformed_sender_domain_is_none(dns_server: DnsServer, checker: SpfChecker,
                                         sender: str) -> None:
    dns_server.reset_counts()
    result = checker.check_mailfrom("127.0.0.1", sender, HELO)
    assert (result.result, result.checked, result.domain) == ("none", False, "")
    assert "not a domain name" in result.comment
    assert dns_server.total_queries == 0


@pytest.mark.parametrize("ip", ["", "not-an-ip", "999.1.1.1", "/tmp/socket"])
def test_unusable_client_address(checker: SpfChecker, ip: str) -> None:
    for result in (checker.check_mailfrom(ip, "a@pass.spf.test", HELO),
                   checker.check_helo(ip, HELO)):
        assert (result.result, result.checked) == ("none", False)


def test_bracketed_client_address(checker: SpfChecker) -> None:
    assert checker.check_mailfrom("[IPv6:::1]", "a@ip6.spf.test", HELO).result == "pass"
    assert checker.check_helo("[127.0.0.1]", HELO).result == "pass"


# -- helpers ----------------------------------------------------------------------

def test_normalize_domain() -> None:
    assert normalize_domain("Mail.Example.") == "Mail.Example"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"
    assert normalize_domain("_spf.example") == "_spf.example"
    for bad in ("example", "1.2.3.4", "a..b", "a.b..", "[1.2.3.4]", "a b.c", "a\nb.c",
                "x" * 64 + ".example", ("a." * 127) + "com", "\udcff.example"):
        assert normalize_domain(bad) is None, bad


def test_split_sender() -> None:
    assert split_sender("") is None
    assert split_sender("<>") is None
    assert split_sender("<a@b.c>") == ("a", "b.c")
    assert split_sender('"x@y"@b.c') == ('"x@y"', "b.c")
    assert split_sender("b.c") == ("postmaster", "b.c")
    assert split_sender("@b.c") == ("postmaster", "b.c")
    assert split_sender("<@r.example:a@b.c>") == ("a", "b.c")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SpfChecker(nameservers=[("127.0.0.1", 53)], lookup_timeout=0)
    with pytest.raises(ValueError):
        SpfChecker(nameservers=[("127.0.0.1", 53)], void_lookup_limit=-1)
    with pytest.raises(ValueError):
        SpfChecker(nameservers=[("127.0.0.1", 53)], cache_size=-1)


def test_empty_inputs(checker: SpfChecker) -> None:
    assert checker.check_mailfrom("", "", "") == SpfResult(
        "mailfrom", "none", sender="", checked=False,
        comment=checker.check_mailfrom("", "", "").comment)
    null = checker.check_mailfrom("127.0.0.1", "", "")
    assert (null.result, null.checked, null.sender) == ("none", False, "postmaster@")
    no_helo = checker.check_mailfrom("127.0.0.1", "a@pass.spf.test", "")
    assert (no_helo.result, no_helo.checked) == ("pass", True)
    assert checker.check_helo("", "").checked is False


def test_result_cache_respects_local_part_macros(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    assert checker.check_mailfrom("127.0.0.2", "alice@ml.spf.test", HELO).result == "pass"
    assert checker.check_mailfrom("127.0.0.2", "bob@ml.spf.test", HELO).result == "fail"
    assert checker.check_mailfrom("127.0.0.2", "alice@ml.spf.test", HELO).result == "pass"
    # a record without %{l}: one cached outcome serves every local part
    dns_server.reset_counts()
    first = checker.check_mailfrom("127.0.0.2", "a@softfail.spf.test", HELO)
    hits = checker.results.hits
    second = checker.check_mailfrom("127.0.0.2", "b@softfail.spf.test", HELO)
    assert (first.result, second.result) == ("softfail", "softfail")
    assert second.sender == "b@softfail.spf.test"
    assert checker.results.hits == hits + 1


def test_temperror_is_not_cached(dns_server: DnsServer) -> None:
    checker = fresh(dns_server)
    assert checker.check_mailfrom("127.0.0.2", "a@servfail.test", HELO).result == "temperror"
    dns_server.reset_counts()
    assert checker.check_mailfrom("127.0.0.2", "a@servfail.test", HELO).result == "temperror"
    assert dns_server.total_queries >= 1


@settings(max_examples=int(os.environ.get("SPFMILTER_HYPOTHESIS_EXAMPLES", "300")),
          derandomize=True, deadline=None)
@given(st.one_of(
    st.lists(st.text("aZ09_-", min_size=0, max_size=70), min_size=1, max_size=6).map(".".join),
    st.text("aZ09.-_\\@ é\x00", max_size=40),
    st.lists(st.text("ab", min_size=60, max_size=63), min_size=3, max_size=5).map(".".join)))
def test_query_names_are_dnspythons(name: str) -> None:
    """_qname's shortcut builds the Name dns.name.from_text would, or raises as it does."""
    try:
        expected = dns.name.from_text(name)
    except Exception as exc:  # noqa: BLE001 - the same exception type is the point
        with pytest.raises(type(exc)):
            _qname(name)
        return
    got = _qname(name)
    assert got == expected and got.labels == expected.labels
