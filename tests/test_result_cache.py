"""SpfChecker's result cache keyed on the inputs evaluation read (real NSD, tests/data/zones)."""

from __future__ import annotations

from spfmilter.spfcheck import SpfChecker
from tests.dnsserver import DnsServer

HELO = "mail.spf.test"


def fresh(server: DnsServer) -> SpfChecker:
    return SpfChecker(nameservers=server.addresses, lookup_timeout=5)


def test_record_without_macros_serves_every_sender_helo_and_receiver(dns_server):
    checker = fresh(dns_server)
    first = checker.check_mailfrom("127.0.0.2", "a@softfail.spf.test", HELO, receiver="mx1")
    hits = checker.results.hits
    second = checker.check_mailfrom("127.0.0.2", "b@softfail.spf.test", "other.spf.test",
                                    receiver="mx2")
    assert (first.result, second.result) == ("softfail", "softfail")
    assert checker.results.hits == hits + 1
    assert len(checker.results) == 1


def test_split_macro_keys_on_the_local_part(dns_server):
    checker = fresh(dns_server)
    assert checker.check_mailfrom("127.0.0.2", "alice@split.cache.test", HELO).result == "pass"
    assert checker.check_mailfrom("127.0.0.2", "mallory@split.cache.test", HELO).result == "fail"
    assert checker.check_mailfrom("127.0.0.2", "alice@split.cache.test", "x.spf.test").result \
        == "pass"
    assert len(checker.results) == 2  # one per local part; the HELO is not read


def test_receiver_is_keyed_only_where_expanded(dns_server):
    checker = fresh(dns_server)
    one = checker.check_mailfrom("127.0.0.2", "u@receiver.cache.test", HELO, receiver="mx1.a")
    two = checker.check_mailfrom("127.0.0.2", "u@receiver.cache.test", HELO, receiver="mx2.a")
    assert one.explanation.startswith("mx1.a takes no mail")
    assert two.explanation.startswith("mx2.a takes no mail")
    unknown = checker.check_mailfrom("127.0.0.2", "u@receiver.cache.test", HELO)
    assert unknown.explanation.startswith("unknown takes no mail")  # pyspf's word for none


def test_cached_outcome_keeps_the_case_of_the_domain(dns_server):
    checker = fresh(dns_server)
    assert checker.check_mailfrom("127.0.0.2", "a@none.spf.test", HELO).comment == (
        "no SPF record for none.spf.test")
    assert checker.check_mailfrom("127.0.0.2", "a@NONE.spf.test", HELO).comment == (
        "no SPF record for NONE.spf.test")


def test_time_macro_outcome_is_not_cached(dns_server):
    checker = fresh(dns_server)
    result = checker.check_mailfrom("127.0.0.2", "u@time.cache.test", HELO)
    assert result.result == "fail" and result.explanation.startswith("refused at ")
    assert len(checker.results) == 0
    assert len(checker.cache) > 0  # its DNS answers are cached all the same


def test_failed_exp_lookup_is_not_cached(dns_server):
    checker = SpfChecker(nameservers=dns_server.addresses, lookup_timeout=0.5)
    result = checker.check_mailfrom("127.0.0.5", "u@deadexp.cache.test", HELO)
    assert (result.result, result.explanation) == ("fail", "")
    assert len(checker.results) == 0
    passed = checker.check_mailfrom("127.0.0.2", "u@deadexp.cache.test", HELO)
    assert (passed.result, passed.comment) == ("pass", "a:mail.cache.test matched")
