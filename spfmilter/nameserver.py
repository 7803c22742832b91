"""Parsing DNS answers so that bad records do not sink good ones.

dnspython refuses a whole answer when one record's data is invalid, such as
a TXT record with no strings at all (RFC 1035 3.3.14 wants at least one;
RFC 7208 test suite case ``null-text``).  Our SPF check would then get a
timeout or temperror for a domain whose other records are fine.
:func:`parse_wire` (what spfmilter.dnsclient parses with) keeps every
well-formed record when strict parsing fails and drops records whose data
holds a value their type does not allow.  Any other malformation still
fails the answer, as with dnspython alone.

:class:`TolerantNameserver` does the same for dnspython's own Resolver (a
name server object, dnspython >= 2.4): spfmilter's lookups went through it
before spfmilter.dnsclient; bench/bench_dns_query.py measures it as the
"resolver" path.
"""

from __future__ import annotations

import inspect
import socket
import struct
import time
from typing import Any

import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.query

try:
    from dns.nameserver import Do53Nameserver
except ImportError:  # dnspython < 2.4: servers are addresses, nothing to subclass.
    # dnscompat.make_resolver makes no server objects there, and those releases
    # keep a TXT record without strings anyway (checked with 2.1 and 2.3).
    Do53Nameserver = object  # type: ignore[assignment,misc]

MAX_UDP = 65535


#: dnspython 2.1 to 2.3 have no continue_on_error (and keep a TXT record without strings).
_CONTINUES = "continue_on_error" in inspect.signature(dns.message.from_wire).parameters


def parse_wire(wire: bytes, *, answer_only: bool = False, **options: Any) -> dns.message.Message:
    """The message in *wire*; records whose data is invalid are dropped.

    *answer_only*: parse the header, question and answer sections only (the
    authority and additional sections come back empty).  Other *options* go
    to dns.message.from_wire.  Raises dns.exception.FormError (or a
    subclass) for any other malformation.
    """
    if answer_only and len(wire) >= 12:
        # NSCOUNT and ARCOUNT to 0: dnspython stops after the answer section
        wire = wire[:8] + b"\0\0\0\0" + wire[12:]
        options["ignore_trailing"] = True
    try:
        return dns.message.from_wire(wire, **options)
    except dns.exception.FormError as exc:
        if not isinstance(exc.__cause__, ValueError) or not _CONTINUES:
            raise
    # A record's data has a value its type does not allow: parse again without it.
    # dnspython wraps such a ValueError; short or overrunning data and broken
    # sections are FormErrors of their own and still fail the whole answer.
    response = dns.message.from_wire(wire, continue_on_error=True, **options)
    for error in response.errors:
        if not isinstance(error.exception.__cause__, ValueError):
            raise error.exception
    return response


def parse(request: dns.message.Message, wire: bytes, **options: Any) -> dns.message.Message:
    """The response to *request* in *wire*, as :func:`parse_wire` (TSIG checked)."""
    return parse_wire(wire, keyring=request.keyring, request_mac=request.mac, **options)


def read_exact(sock: socket.socket, size: int) -> bytes:
    """*size* octets from the stream *sock*; EOFError if it ends first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("name server closed the TCP connection")
        data += chunk
    return data


class TolerantNameserver(Do53Nameserver):
    """Do53 server (UDP, then TCP on truncation) whose answers survive invalid records."""

    def query(self, request: dns.message.QueryMessage, timeout: float, source: str | None,
              source_port: int, max_size: bool, one_rr_per_rrset: bool = False,
              ignore_trailing: bool = False) -> dns.message.Message:
        options = dict(one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing)
        family = dns.inet.af_for_address(self.address)
        kind = socket.SOCK_STREAM if max_size else socket.SOCK_DGRAM
        deadline = time.monotonic() + timeout
        try:
            with socket.socket(family, kind) as sock:
                if source or source_port:
                    sock.bind((source or ("::" if family == socket.AF_INET6 else "0.0.0.0"),
                               source_port))
                sock.settimeout(timeout)
                sock.connect((self.address, self.port))  # UDP: only its answers arrive
                wire = request.to_wire()
                if max_size:
                    sock.sendall(struct.pack("!H", len(wire)) + wire)
                    (size,) = struct.unpack("!H", read_exact(sock, 2))
                    response = parse(request, read_exact(sock, size), **options)
                    if not request.is_response(response):
                        raise dns.query.BadResponse
                    return response
                sock.send(wire)
                while True:  # a late answer to an earlier try is not ours: keep listening
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout
                    sock.settimeout(left)
                    try:
                        response = parse(request, sock.recv(MAX_UDP), **options)
                    except dns.exception.FormError:
                        continue  # as dnspython's ignore_errors
                    if request.is_response(response):
                        break
        except socket.timeout:  # TimeoutError from Python 3.10
            raise dns.exception.Timeout(timeout=timeout) from None
        if response.flags & dns.flags.TC:
            raise dns.message.Truncated(message=response)
        return response
