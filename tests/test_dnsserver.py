"""The loopback DNS test server itself: addresses, answers, failures, counting."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.dnsserver import DnsServer


def ask(server: DnsServer, name: str, qtype: str = "TXT", *, host: str = "127.0.0.1",
        tcp: bool = False, timeout: float = 2.0) -> dns.message.Message:
    query = dns.message.make_query(name, qtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, host, port=server.port, timeout=timeout)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("tcp", [False, True])
def test_answers_on_both_addresses_and_transports(dns_server: DnsServer, host: str,
                                                  tcp: bool) -> None:
    answer = ask(dns_server, "pass.spf.test", host=host, tcp=tcp)
    assert answer.rcode() == dns.rcode.NOERROR
    assert b"v=spf1 ip4:127.0.0.0/8" in b"".join(answer.answer[0][0].strings)


def test_addressing(dns_server: DnsServer) -> None:
    assert dns_server.nameservers == [f"127.0.0.1:{dns_server.port}"]
    assert dns_server.addresses == [("127.0.0.1", dns_server.port)]
    assert dns_server.port != dns_server.backend_port


@pytest.mark.parametrize(("name", "rcode"), [
    ("nxdomain.spf.test", dns.rcode.NXDOMAIN),
    ("nosuch.invalid", dns.rcode.NXDOMAIN),  # stand-in root, not REFUSED
    ("x.servfail.test", dns.rcode.SERVFAIL),  # zone without a file
])
def test_failure_answers(dns_server: DnsServer, name: str, rcode: int) -> None:
    assert ask(dns_server, name).rcode() == rcode


@pytest.mark.parametrize("tcp", [False, True])
def test_dropped_names_get_no_answer(dns_server: DnsServer, tcp: bool) -> None:
    dns_server.reset_counts()
    with pytest.raises(dns.exception.Timeout):
        ask(dns_server, "sub.timeout.spf.test", tcp=tcp, timeout=0.3)
    assert dns_server.count("sub.timeout.spf.test", "TXT") == 1


def test_a_question_repeated_before_its_answer_is_a_retransmission(
        dns_server: DnsServer) -> None:
    dns_server.reset_counts()
    for _ in range(2):  # never answered: the second is a retry
        with pytest.raises(dns.exception.Timeout):
            ask(dns_server, "sub.timeout.spf.test", timeout=0.2)
    for _ in range(2):  # answered, then asked again: a second miss, no retry
        ask(dns_server, "pass.spf.test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # both sent at once
        sock.settimeout(2)
        for _ in range(2):
            sock.sendto(dns.message.make_query("fail.spf.test", "TXT").to_wire(),
                        ("127.0.0.1", dns_server.port))
        sock.recv(65535)
    assert dns_server.queries[("sub.timeout.spf.test", "TXT")] == 2
    assert dns_server.queries[("pass.spf.test", "TXT")] == 2
    assert dns_server.queries[("fail.spf.test", "TXT")] == 2
    retried = dns_server.retransmissions
    assert retried[("sub.timeout.spf.test", "TXT")] == 1
    assert retried[("pass.spf.test", "TXT")] == 0
    assert retried[("fail.spf.test", "TXT")] == 1
    dns_server.reset_counts()
    assert dns_server.retransmissions == {}


def test_long_answer_needs_tcp(dns_server: DnsServer) -> None:
    assert ask(dns_server, "long.spf.test").flags & dns.flags.TC
    assert len(b"".join(ask(dns_server, "long.spf.test", tcp=True).answer[0][0].strings)) > 1500


def test_counts_by_name_and_type(dns_server: DnsServer) -> None:
    dns_server.reset_counts()
    ask(dns_server, "Pass.SPF.test.")
    ask(dns_server, "pass.spf.test", "A", host="::1")
    ask(dns_server, "pass.spf.test", tcp=True)
    assert dns_server.queries[("pass.spf.test", "TXT")] == 2
    assert dns_server.count("pass.spf.test") == 3
    assert dns_server.count("pass.spf.test", "a") == 1
    assert dns_server.total_queries == 3
    dns_server.reset_counts()
    assert dns_server.total_queries == 0


def test_private_instance_starts_and_stops(tmp_path: Path) -> None:
    (tmp_path / "only.test.zone").write_text(
        "$ORIGIN only.test.\n$TTL 60\n@ IN SOA ns hostmaster 1 60 60 60 60\n@ IN NS ns\n"
        'ns IN A 127.0.0.1\n@ IN TXT "hello"\n'
    )
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="REFUSED for spf.test SOA"):  # not our zone
        DnsServer(tmp_path).start()
    assert time.monotonic() - start < 5  # a config error is reported at once
    with DnsServer(tmp_path, probe_zone="only.test") as server:
        port = server.port
        assert ask(server, "only.test").answer[0][0].strings == (b"hello",)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))  # released on stop


def test_broken_zone_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "bad.test.zone").write_text("this is not a zone file\n")
    with pytest.raises(RuntimeError, match=r"zone bad\.test .*\n.*error"):
        DnsServer(tmp_path, probe_zone="bad.test").start()


@pytest.mark.parametrize("tcp", [False, True])
def test_no_soa_names_lose_the_authority_section(dns_server: DnsServer, tcp: bool) -> None:
    stripped = ask(dns_server, "nx.nosoa.dns.test", tcp=tcp)
    assert (stripped.rcode(), stripped.authority) == (dns.rcode.NXDOMAIN, [])
    kept = ask(dns_server, "nx.dns.test", tcp=tcp)
    assert kept.rcode() == dns.rcode.NXDOMAIN
    assert [r.rdtype for r in kept.authority] == [dns.rdatatype.SOA]


def test_unanswered_predicate_drops_chosen_types(tmp_path: Path) -> None:
    (tmp_path / "only.test.zone").write_text(
        "$ORIGIN only.test.\n$TTL 60\n@ IN SOA ns hostmaster 1 60 60 60 60\n@ IN NS ns\n"
        'ns IN A 127.0.0.1\n@ IN TXT "hello"\n'
    )
    with DnsServer(tmp_path, probe_zone="only.test",
                   unanswered=lambda name, qtype: qtype == "TXT") as server:
        assert ask(server, "ns.only.test", "A").rcode() == dns.rcode.NOERROR
        with pytest.raises(dns.exception.Timeout):
            ask(server, "only.test", "TXT", timeout=0.3)
        assert server.count("only.test", "TXT") == 1
