"""spfmilter behind a real caching resolver: Debian's unbound in front of the test NSD.

The same checks as with NSD direct must give the same results through unbound;
the TTLs unbound counts down must bound how long our caches keep an answer
(seen as queries reaching NSD); negative answers and SERVFAIL pass through;
a resolver that is down gives temperror within the lookup deadline, and
checks recover once it is back.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from spfmilter.spfcheck import SpfChecker
from tests.dnsserver import DnsServer
from tests.procs import PYTHON, Daemon
from tests.test_daemon import FAIL, TEMPERROR, run, spf_results, write_config
from tests.test_spfcheck import HELO, MAILFROM_CASES
from tests.unbound import Unbound, unbound  # noqa: F401  (module fixture)

#: Lookup deadline of the checkers here (seconds).
LOOKUP_TIMEOUT = 2.0
#: Generous bound on how far past its deadline a failed check may return: not a
#: speed test, only "the deadline was kept rather than a resolver timeout waited out".
DEADLINE_SLACK = 3.0
#: TTL of everything in countdown.test (records and negative answers), in seconds.
COUNTDOWN_TTL = 6

TIMEOUT_CASES = [
    ("127.0.0.1", "a@timeout.spf.test", "temperror"),
    ("127.0.0.1", "a@inc-timeout.spf.test", "temperror"),
]
HELO_CASES = [
    ("127.0.0.1", "mail.spf.test"), ("::1", "mail.spf.test"), ("127.0.0.2", "mail.spf.test"),
    ("127.0.0.1", "helo-fail.spf.test"), ("127.0.0.7", "fwd.example"),
    ("127.0.0.1", "nxdomain.spf.test"),
]


def outcome(result: object) -> tuple:
    return (result.identity, result.result, result.domain, result.sender,  # type: ignore
            result.explanation, result.comment, result.checked)  # type: ignore


@pytest.fixture(scope="module")
def direct(dns_server: DnsServer) -> SpfChecker:
    return SpfChecker(nameservers=dns_server.addresses, lookup_timeout=LOOKUP_TIMEOUT)


@pytest.fixture(scope="module")
def via_unbound(unbound: Unbound) -> SpfChecker:  # noqa: F811
    return SpfChecker(nameservers=unbound.addresses, lookup_timeout=LOOKUP_TIMEOUT)


@pytest.fixture
def own_unbound(dns_server: DnsServer) -> Iterator[Unbound]:
    """An unbound of this test's own: empty cache, free to stop and restart."""
    with Unbound(dns_server) as resolver:
        yield resolver


# -- same results as NSD direct ------------------------------------------------

@pytest.mark.parametrize(("ip", "sender", "expected"), MAILFROM_CASES + TIMEOUT_CASES)
def test_mailfrom_same_as_direct(direct: SpfChecker, via_unbound: SpfChecker,
                                 ip: str, sender: str, expected: str) -> None:
    through = via_unbound.check_mailfrom(ip, sender, HELO)
    assert through.result == expected, through
    assert outcome(through) == outcome(direct.check_mailfrom(ip, sender, HELO))


@pytest.mark.parametrize(("ip", "helo"), HELO_CASES)
def test_helo_same_as_direct(direct: SpfChecker, via_unbound: SpfChecker,
                             ip: str, helo: str) -> None:
    through = via_unbound.check_helo(ip, helo)
    assert through.checked
    assert outcome(through) == outcome(direct.check_helo(ip, helo))


def test_daemon_with_unbound_as_nameserver(unbound: Unbound) -> None:  # noqa: F811
    """The real daemon with ``nameservers`` = unbound: verdicts as with NSD direct."""
    with tempfile.TemporaryDirectory(prefix="spfr", dir="/tmp") as tmp:
        workdir = Path(tmp)
        cfg = workdir / "spfmilter.cfg"
        write_config(cfg, workdir, unbound)
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{workdir}/spf.sock", workdir) as daemon:
            assert spf_results(run(daemon)) == {"helo": "pass", "mailfrom": "pass"}
            resp = run(daemon, sender="<user@fail.spf.test>")
            assert (resp.code, resp.xcode) == FAIL
            assert "127.0.0.2 is not allowed to send mail for fail.spf.test" in resp.text
            assert spf_results(run(daemon, sender="<u@nxdomain.spf.test>"))["mailfrom"] == "none"
            assert spf_results(run(daemon, sender="<u@long.spf.test>"))["mailfrom"] == "pass"
            resp = run(daemon, sender="<u@servfail.test>")
            assert (resp.code, resp.xcode) == TEMPERROR
            assert f"nameservers = {unbound.nameservers[0]}" in cfg.read_text()


# -- TTLs counted down by unbound ----------------------------------------------

def test_countdown_ttls_are_honoured(dns_server: DnsServer, own_unbound: Unbound) -> None:
    """An answer fetched late in its life at unbound expires early in our cache too.

    Timeline (TTL 6 s at NSD, positive and negative alike): unbound caches
    the answers at t=0; a fresh checker fetches them from unbound at t~3, with
    ~3 s left; at t~7 unbound's copies have expired, ours must have too, so
    asking again reaches NSD once more.  A cache that restarted the full TTL
    at t~3 would still answer at t~7 (until t~9) without a query.
    """
    names = {"ttl6.countdown.test": "pass", "nodata.countdown.test": "none",
             "gone.countdown.test": "none"}
    for name in names:  # t=0: unbound fetches from NSD and caches for 6 s
        query = dns.message.make_query(name, "TXT")
        dns.query.udp(query, own_unbound.host, port=own_unbound.port, timeout=LOOKUP_TIMEOUT)
    start = time.monotonic()
    dns_server.reset_counts()

    time.sleep(COUNTDOWN_TTL / 2)
    checker = SpfChecker(nameservers=own_unbound.addresses, lookup_timeout=LOOKUP_TIMEOUT)
    for name, expected in names.items():
        assert checker.check_mailfrom("127.0.0.1", f"a@{name}", HELO).result == expected
        entry = checker.cache.get_entry((name, "TXT"))
        assert entry is not None, f"{name} was not cached"
        # unbound's TTL, counted down from 6, not 6 again (+1: whole seconds)
        assert entry[0] <= start + COUNTDOWN_TTL + 1, (name, entry[0] - start)
    assert sum(dns_server.count(name, "TXT") for name in names) == 0, dns_server.queries

    time.sleep(max(0.0, start + COUNTDOWN_TTL + 1 - time.monotonic()))
    for name, expected in names.items():
        assert checker.check_mailfrom("127.0.0.1", f"a@{name}", HELO).result == expected
        assert dns_server.count(name, "TXT") == 1, (name, dns_server.queries)


# -- negative answers and SERVFAIL --------------------------------------------

def test_negative_answers_are_cached_by_unbound(dns_server: DnsServer,
                                                 own_unbound: Unbound) -> None:
    """NXDOMAIN and NODATA reach us as none, and unbound answers them again from its cache."""
    senders = ["a@nxdomain.spf.test", "a@none.spf.test", "a@nosuch.invalid"]
    dns_server.reset_counts()
    for sender in senders:
        checker = SpfChecker(nameservers=own_unbound.addresses, lookup_timeout=LOOKUP_TIMEOUT)
        assert checker.check_mailfrom("127.0.0.1", sender, HELO).result == "none"
    upstream = dns_server.total_queries
    assert upstream >= len(senders)
    for sender in senders:  # fresh checkers: only unbound's cache is warm
        checker = SpfChecker(nameservers=own_unbound.addresses, lookup_timeout=LOOKUP_TIMEOUT)
        result = checker.check_mailfrom("127.0.0.1", sender, HELO)
        assert result.result == "none"
        assert "does not exist" in result.comment or "no SPF record" in result.comment
    assert dns_server.total_queries == upstream, dns_server.queries


def test_servfail_is_temperror_and_not_cached(via_unbound: SpfChecker) -> None:
    for _ in range(2):
        result = via_unbound.check_mailfrom("127.0.0.1", "a@servfail.test", HELO)
        assert result.result == "temperror"
        assert result.comment == "DNS server failure for servfail.test TXT"
    assert via_unbound.results.get(("mailfrom", "127.0.0.1", "servfail.test", HELO, None)) \
        is None


# -- the resolver down ---------------------------------------------------------

def _check_down(resolver: Unbound) -> tuple[object, float]:
    checker = SpfChecker(nameservers=resolver.addresses, lookup_timeout=LOOKUP_TIMEOUT)
    started = time.monotonic()
    result = checker.check_mailfrom("127.0.0.1", "a@pass.spf.test", HELO)
    return result, time.monotonic() - started


def test_hung_resolver_is_temperror_by_deadline_then_recovers(own_unbound: Unbound) -> None:
    own_unbound.pause()  # its socket stays open: queries are never answered
    try:
        result, elapsed = _check_down(own_unbound)
    finally:
        own_unbound.resume()
    assert result.result == "temperror"  # type: ignore[attr-defined]
    assert "timeout" in result.comment or "time limit" in result.comment  # type: ignore
    assert elapsed < LOOKUP_TIMEOUT + DEADLINE_SLACK  # the deadline, not a resolver timeout
    result, _ = _check_down(own_unbound)
    assert result.result == "pass"  # type: ignore[attr-defined]


def test_stopped_resolver_is_temperror_then_recovers_on_restart(own_unbound: Unbound) -> None:
    checker = SpfChecker(nameservers=own_unbound.addresses, lookup_timeout=LOOKUP_TIMEOUT)
    assert checker.check_mailfrom("127.0.0.1", "a@fail.spf.test", HELO).result == "fail"
    own_unbound.stop()  # nothing listens on the port now
    result, elapsed = _check_down(own_unbound)
    assert result.result == "temperror"  # type: ignore[attr-defined]
    # the port's refusal does not cut the wait short: the lookup times out
    # a closed port answers with ICMP (server failure), a lost one times out
    assert result.comment in ("DNS timeout for pass.spf.test TXT",  # type: ignore
                              "DNS server failure for pass.spf.test TXT")
    assert elapsed < LOOKUP_TIMEOUT + DEADLINE_SLACK
    own_unbound.start()  # same port: the configured nameserver works again
    assert checker.check_mailfrom("127.0.0.1", "a@pass.spf.test", HELO).result == "pass"
    # what was cached before the outage still serves
    assert checker.check_mailfrom("127.0.0.1", "a@fail.spf.test", HELO).result == "fail"
