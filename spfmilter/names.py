"""Canonical forms of client addresses and domain names, shared by every module.

Whatever compares an address or a domain (the skip lists, the SPF check, the
``[domain:NAME]`` overrides, logs and headers) uses the forms made here, so
two spellings of one client or one domain can never be judged differently.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: Distinct texts whose parse is remembered.  One SMTP connection asks for its
#: client's address at connect, HELO, MAIL FROM and in the skip lists; parsing
#: it once instead (ipaddress is slow) is worth a bounded cache shared by all.
PARSE_CACHE_SIZE = 2048


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def client_address(text: str) -> IPAddress | None:
    """The client address as an ``ipaddress`` object (see :func:`client_ip`), or None.

    Remembered per text (a pure function; the objects are immutable).
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def client_ip(text: str) -> str | None:
    """The client address in canonical text form, or None when it is not one.

    Brackets, an ``IPv6:`` tag and a zone index are dropped, and an
    IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) becomes its IPv4 address:
    RFC 7208 5 and 4.8 evaluate such a client as IPv4, and so do the skip lists.
    """
    address = client_address(text)
    return None if address is None else str(address)


def canonical_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network
                      ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``network``, with a range of IPv4-mapped addresses turned into its IPv4 range.

    Clients are compared in their :func:`client_ip` form, so a configured
    ``::ffff:10.0.0.0/104`` must mean ``10.0.0.0/8`` to match anything.
    """
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def ascii_domain(text: str) -> str:
    """``text`` as a lower-case A-label domain without a final dot.

    U-labels become A-labels (``bücher.example`` -> ``xn--bcher-kva.example``),
    the same conversion the SPF check applies to the domain it checks.  Raises
    ``ValueError`` when a label cannot be converted.
    """
    domain = text.strip()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{text!r} is not a domain name (bad international label)"
                             ) from None
    return domain.lower()
