"""spfmilter.dnscompat: resolvers from (address, port) pairs on every dnspython we support.

Which branch runs depends on the installed dnspython: the main suite has a
recent one (name server objects), scripts/test-lowest runs these tests with
dnspython 2.1 (addresses plus nameserver_ports).
"""

from __future__ import annotations

import dns.rdatatype
import dns.resolver
import dns.version
import pytest

from spfmilter import dnscompat
from spfmilter.dnscompat import make_resolver

#: dnspython 2.4 brought dns.nameserver; before it, addresses and a port map.
OBJECTS = dns.version.MAJOR > 2 or (dns.version.MAJOR == 2 and dns.version.MINOR >= 4)


def test_the_feature_test_agrees_with_the_release() -> None:
    assert dnscompat.NAMESERVER_OBJECTS is OBJECTS


def test_resolver_asks_the_given_server_on_its_port(dns_server) -> None:
    [(host, port)] = dns_server.addresses
    assert port != 53
    resolver = make_resolver(dns_server.addresses)
    answer = resolver.resolve("pass.spf.test", "TXT", lifetime=5, search=False)
    assert answer.rdtype == dns.rdatatype.TXT
    assert any(b"".join(r.strings).startswith(b"v=spf1") for r in answer)
    assert (answer.nameserver, answer.port) == (host, port)


def test_several_servers_keep_their_order_and_ports() -> None:
    pairs = [("127.0.0.1", 5301), ("::1", 5302)]
    resolver = make_resolver(pairs)
    if OBJECTS:
        assert [(ns.address, ns.port) for ns in resolver.nameservers] == pairs
    else:
        assert resolver.nameservers == ["127.0.0.1", "::1"]
        assert resolver.nameserver_ports == dict(pairs)


def test_one_address_on_two_ports() -> None:
    pairs = [("127.0.0.1", 5301), ("127.0.0.1", 5302)]
    if OBJECTS:
        assert [ns.port for ns in make_resolver(pairs).nameservers] == [5301, 5302]
    else:  # one port per address is all dnspython < 2.4 can say
        with pytest.raises(ValueError, match="127.0.0.1 on two ports .* dnspython 2.4"):
            make_resolver(pairs)


def test_server_factory_wraps_configured_and_system_servers() -> None:
    made: list[tuple[str, int]] = []

    def factory(host: str, port: int) -> object:
        made.append((host, port))
        return dns.nameserver.Do53Nameserver(host, port)

    make_resolver([("127.0.0.1", 5301)], factory)
    system = make_resolver((), factory)  # /etc/resolv.conf
    if OBJECTS:
        assert made[0] == ("127.0.0.1", 5301)
        assert len(made) == 1 + len(system.nameservers)
    else:  # no name server objects to make
        assert made == []
        assert all(isinstance(ns, str) for ns in system.nameservers)


def _no_nameservers(resolver, name: str) -> dns.resolver.NoNameservers:
    with pytest.raises(dns.resolver.NoNameservers) as info:
        resolver.resolve(name, "A", lifetime=5, search=False)
    return info.value


def test_a_cname_loop_is_told_apart_from_a_server_failure(dns_server) -> None:
    resolver = make_resolver(dns_server.addresses)
    assert dnscompat.chain_too_long(_no_nameservers(resolver, "loop1.compat.test"))
    servfail = _no_nameservers(resolver, "x.servfail.test")
    assert servfail.kwargs["errors"]  # every release says why
    assert not dnscompat.chain_too_long(servfail)
    assert dnscompat.RECORDS_ANSWER_ERRORS is (dns.version.MINOR >= 2 or dns.version.MAJOR > 2)


def test_system_servers_are_resolv_confs() -> None:
    servers, timeout, rotate = dnscompat.system_servers()
    resolver = dns.resolver.Resolver()
    assert [host for host, _port in servers] == [getattr(ns, "address", ns)
                                                 for ns in resolver.nameservers]
    assert all(isinstance(port, int) and 0 < port < 65536 for _host, port in servers)
    assert (timeout, rotate) == (resolver.timeout, resolver.rotate)
