"""The one place that knows which dnspython release we run on (2.1 and later).

dnspython 2.4 made name servers objects (``dns.nameserver``); 2.1 to 2.3
(RHEL 9 has 2.1, Debian 12 has 2.3) take addresses plus a per-address port
map.  dnspython 2.1 also drops a server whose answer it cannot follow (a
CNAME loop) without saying why.  Everything else we use is the same in all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dns.message
import dns.resolver
import dns.version

try:
    import dns.nameserver
except ImportError:  # dnspython < 2.4
    NAMESERVER_OBJECTS = False
else:
    NAMESERVER_OBJECTS = True

#: dnspython 2.2 and later list an answer they cannot follow among NoNameservers' errors.
RECORDS_ANSWER_ERRORS = (dns.version.MAJOR, dns.version.MINOR) >= (2, 2)

#: Makes a name server object from (address, port), on dnspython >= 2.4.
ServerFactory = Callable[[str, int], Any]


def make_resolver(nameservers: Sequence[tuple[str, int]] = (),
                  server: ServerFactory | None = None) -> dns.resolver.Resolver:
    """A resolver asking *nameservers*, (address, port) pairs; none: /etc/resolv.conf's.

    On dnspython >= 2.4 each server is ``server(address, port)`` (default
    ``Do53Nameserver``).  Older releases know one port per address: two
    ports for the same address raise ValueError.
    """
    if not nameservers:
        resolver = dns.resolver.Resolver()
        if NAMESERVER_OBJECTS and server is not None:
            resolver.nameservers = [server(ns, resolver.port) if isinstance(ns, str) else ns
                                    for ns in resolver.nameservers]
        return resolver
    resolver = dns.resolver.Resolver(configure=False)
    if NAMESERVER_OBJECTS:
        make = server or dns.nameserver.Do53Nameserver
        resolver.nameservers = [make(host, port) for host, port in nameservers]
        return resolver
    ports: dict[str, int] = {}
    for host, port in nameservers:
        if ports.setdefault(host, port) != port:
            raise ValueError(f"name server {host} on two ports ({ports[host]}, {port}) needs "
                             f"dnspython 2.4 or later")
    resolver.nameservers = list(ports)
    resolver.nameserver_ports = ports
    return resolver


def system_servers() -> tuple[list[tuple[str, int]], float, bool]:
    """/etc/resolv.conf's name servers as (address, port) pairs, its timeout and rotate."""
    resolver = dns.resolver.Resolver()
    ports = getattr(resolver, "nameserver_ports", {})
    servers = []
    for ns in resolver.nameservers:
        if isinstance(ns, str):
            servers.append((ns, ports.get(ns, resolver.port)))
        else:  # a dns.nameserver object (dnspython >= 2.4)
            servers.append((ns.address, ns.port))
    return servers, float(resolver.timeout), bool(resolver.rotate)


def chain_too_long(exc: dns.resolver.NoNameservers) -> bool:
    """True when the servers answered, but with a CNAME chain too long to follow (a loop).

    dnspython 2.1 records every other failure (timeouts, SERVFAIL, bad
    answers) in the errors and only an answer it cannot follow in none: an
    empty list there means this case.
    """
    errors = exc.kwargs.get("errors") or []
    if not errors:
        return not RECORDS_ANSWER_ERRORS
    return all(isinstance(error[3], dns.message.ChainTooLong) for error in errors)
