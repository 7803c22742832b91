"""HELO hygiene: what is wrong with the name a client gave in HELO/EHLO.  Pure.

:func:`classify` takes the HELO text, the client address and our own names
and addresses, and returns its findings (none for a HELO that looks sound):

``literal_mismatch``
    an address literal (RFC 5321 4.1.3: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)
    that is not the client's address, compared as addresses (an IPv4-mapped
    address is its IPv4 address, as :func:`spfmilter.names.client_ip` makes it);
``is_us``
    one of our names, or a literal of one of our addresses, from a client that
    is not at one of our addresses;
``invalid``
    neither a domain name in RFC 5321 4.1.2 ``Domain`` syntax nor an address
    literal.

Choices made here (see spfmilter.cfg(5)):

* A single label (``localhost``, ``mailhost``) is valid ``Domain`` syntax and
  not ``invalid``: RFC 5321 2.3.5 asks for a fully qualified name, but that is
  a question of DNS, not of syntax (Postfix keeps the two apart as well:
  ``reject_invalid_helo_hostname`` and ``reject_non_fqdn_helo_hostname``).
* A name whose last label is all digits (``192.0.2.1`` without brackets) is
  ``invalid``: no top-level domain is numeric (RFC 1123 2.1, RFC 3696 2) and
  RFC 5321 4.1.3 wants addresses in brackets.
* A final dot, an underscore or an empty label is ``invalid`` (not in the
  grammar); a U-label is valid when it converts to an A-label (RFC 6531 3.7.1).
* A General-address-literal (``[tag:...]``) is ``invalid``: its tag must be
  registered and none but ``IPv6`` is.  An IPv6 zone index (``%eth0``) is not
  in the grammar either.
* An empty HELO (the client never sent one) has no finding: it claims nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

from . import names

#: Every finding, in the order :func:`classify` reports them.
FINDINGS = ("literal_mismatch", "is_us", "invalid")

_SUB_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")  # 4.1.2 + RFC 1035
_SNUM = re.compile(r"[0-9]{1,3}\Z")
_ALL_DIGITS = re.compile(r"[0-9]+\Z")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+\Z")
MAX_DOMAIN = 253  # RFC 1035 3.1: 255 octets in the wire form


def domain(text: str) -> str | None:
    """``text`` as a lower-case A-label domain name, or None unless it is RFC 5321 Domain."""
    if not text or text.endswith(".") or text != text.strip():
        return None
    try:
        ascii_name = names.ascii_domain(text)
    except ValueError:
        return None
    if len(ascii_name) > MAX_DOMAIN:
        return None
    labels = ascii_name.split(".")
    if not all(_SUB_DOMAIN.match(label) for label in labels):
        return None
    if _ALL_DIGITS.match(labels[-1]):
        return None
    return ascii_name


def literal(text: str) -> str | None:
    """The address of an RFC 5321 4.1.3 address literal, canonical (a mapped IPv6
    address as IPv4); None unless ``text`` is an IPv4 or IPv6 address literal."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        if not _IPV6_CHARS.match(inner):
            return None
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = \
                ipaddress.IPv6Address(inner)
        except ValueError:
            return None
    else:
        parts = inner.split(".")
        if len(parts) != 4 or not all(_SNUM.match(p) and int(p) <= 255 for p in parts):
            return None  # Snum allows leading zeros ("010" is 10), ipaddress does not
        address = ipaddress.IPv4Address(".".join(str(int(p)) for p in parts))
    return names.client_ip(str(address))


def our_forms(items: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Our names and addresses from a mixed list (names, addresses, literals),
    in the forms :func:`classify` compares; items that are neither are dropped."""
    return _our_forms(tuple(items))


@functools.lru_cache(maxsize=256)  # our names: the same few tuples over and over
def _our_forms(items: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    domains, addresses = set(), set()
    for item in items:
        item = item.strip()
        address = literal(item) or names.client_ip(item)
        if address is not None:
            addresses.add(address)
            continue
        name = domain(item[:-1] if item.endswith(".") else item)
        if name is not None:
            domains.add(name)
    return frozenset(domains), frozenset(addresses)


#: Distinct (HELO, client, our names) whose findings are remembered.
CLASSIFY_CACHE_SIZE = 512


def classify(helo: str, ip: str | None, ours: Iterable[str] = ()) -> tuple[str, ...]:
    """The findings (from :data:`FINDINGS`) for HELO ``helo`` of client ``ip``.

    ``ours`` are our names and addresses (domain names, IP addresses or address
    literals); ``ip`` None (a local client) compares with nothing.  A pure
    function, so its answers are remembered (bounded; see _classify).
    """
    if helo == "":
        return ()
    return _classify(helo, ip, tuple(ours))


@functools.lru_cache(maxsize=CLASSIFY_CACHE_SIZE)
def _classify(helo: str, ip: str | None, ours: tuple[str, ...]) -> tuple[str, ...]:
    our_domains, our_addresses = _our_forms(ours)
    client = names.client_ip(ip) if ip else None
    client_is_us = client is not None and client in our_addresses
    address = literal(helo)
    if address is not None:
        if client is None or address == client:
            return ()
        found = ["literal_mismatch"]
        if address in our_addresses and not client_is_us:
            found.append("is_us")
        return tuple(found)
    name = domain(helo)
    if name is None:
        return ("invalid",)
    if name in our_domains and not client_is_us:
        return ("is_us",)
    return ()


def note(findings: tuple[str, ...], helo: str) -> str:
    """A one-line text on ``findings`` for a header comment ("" when there are none).

    The findings come first, so that cutting a long HELO never hides them.
    """
    if not findings:
        return ""
    shown = helo if len(helo) <= 80 else helo[:77] + "..."
    return f"HELO {', '.join(findings)}: {shown}"
