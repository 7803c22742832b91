"""A DNS client for the configured name servers: one question, one answer, cheaply.

SPF checks make many small lookups to one list of servers, with no search
list and a cache of our own; dnspython's ``Resolver`` does much more per
query than that needs (about a third of the CPU of one lookup went to its
machinery).  This client keeps the Resolver's behaviour where the suite
relies on it and does the rest with dnspython's own parts:

* the query is built by ``dns.renderer`` (EDNS0, a 1232-octet payload, RD),
  with a random ID from :mod:`secrets`;
* servers are tried in order, each try waiting at most ``attempt_timeout``;
  a timeout moves on to the next server and, once all were tried, all are
  tried again after a backoff (0.1 s, doubling to 2 s), until the lookup's
  deadline.  A server that answers SERVFAIL, REFUSED or another error rcode,
  something that does not parse, or a CNAME chain too long to follow (a loop)
  is not asked again in this lookup; when none is left: :class:`ServerFailure`;
* a truncated answer is asked again over TCP, from the same server;
* every answer is checked against the question: ID, QR, opcode, question
  section; anything else on the socket (a late answer to an earlier try, a
  forged one) is ignored and the wait goes on;
* answers are parsed by dnspython (:func:`spfmilter.nameserver.parse_wire`,
  which tolerates invalid records as before); an answer whose answer section
  holds the records asked for is parsed without its authority and
  additional sections, which nothing here reads (half the cost of parsing),
  and the plainest of them -- only records of the type asked at the
  question's name -- record by record by dnspython's rdata classes, without
  a Message (:func:`_direct_answer`; a fifth of the cost again).  Negative
  answers are parsed whole, for the SOA (RFC 2308) and EDNS rcode;
* the wait for an answer is a recv on a blocking socket bounded by
  SO_RCVTIMEO (a Python socket timeout would poll before each send and recv:
  more GIL hand-offs between libmilter's threads);
* where the C helper :mod:`spfmilter._udp` is built, the query goes out with
  the GIL held and the GIL is let go once per try, around the wait
  (``socket.send`` lets go of it too, though a datagram on a connected socket
  never waits: one hand-off more per query between libmilter's threads).
  Without the helper, or with ``native=False``, the socket module's send and
  recv do the same.

Sockets.  The client keeps idle connected UDP sockets per server, shared by
all threads: a try takes one (or makes one), and gives it back after a clean
answer; a socket carries up to :data:`SOCKET_USES` queries, then is closed
and the next try makes a new one (a new source port); a try that timed out,
failed, or saw a datagram that was not its answer also closes the socket.
The idle lists and the pool of query IDs take no lock (list pop and append
are atomic under the GIL) and outlive the threads: libmilter's worker pool
ends and starts threads, and per-thread sockets and IDs died with theirs (a
socket, connect, close and getrandom per new thread, each a GIL release).
Reuse saves a socket/connect/close per query (about 25 us of CPU) while an
off-path forger still has to guess a 16-bit ID and a source port that
changes every few dozen queries, and can only reach a connected socket from
the server's own address and port.  The usual setup, a resolver on loopback
or the local network, is not reachable off-path at all; an operator who
wants the full per-query port entropy runs a validating local resolver, as
RFC 7208 11.3 suggests anyway.
"""

from __future__ import annotations

import random
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.rrset
import dns.wire

from .nameserver import parse_wire, read_exact

try:
    from ._udp import exchange as _exchange
except ImportError:  # not built (no C compiler at install): the socket module's calls
    _exchange = None

#: UDP payload size we advertise with EDNS (the DNS flag day 2020 value).
EDNS_PAYLOAD = 1232
#: How long one try waits for one server (dnspython's Resolver default).
ATTEMPT_TIMEOUT = 2.0
#: Queries one UDP socket (one source port) carries before it is replaced.
SOCKET_USES = 32
#: Idle sockets kept per server (one per try under way at once, up to this).
MAX_IDLE_SOCKETS = 64
MAX_UDP = 65535
#: spfmilter._udp.exchange's signature: (fd, datagram or None, timeout) -> datagram.
_Exchange = Callable[[int, Optional[bytes], float], bytes]
_HEADER = struct.Struct("!HHHHHH")
_IDS = struct.Struct("!64H")  # query IDs drawn at once per thread
_ERROR_RCODES_WITHOUT_QUESTION = frozenset(
    {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED})


class ServerFailure(dns.exception.DNSException):
    """No configured server gave a usable answer (each failed or refused).

    ``chain_too_long``: every server answered, but with a CNAME chain too long
    to follow (a loop) -- a lasting condition, not a server failure.
    """

    def __init__(self, errors: Sequence[tuple[tuple[str, int], Exception]]) -> None:
        self.errors = list(errors)
        self.chain_too_long = bool(self.errors) and all(
            isinstance(exc, dns.message.ChainTooLong) for _server, exc in self.errors)
        super().__init__("; ".join(f"{host}:{port}: {exc!r}" for (host, port), exc in errors))


class Reply(NamedTuple):
    """What a server said about one question.

    ``rrset`` holds the records at the end of the CNAME chain, None for
    NXDOMAIN or NODATA; ``ttl`` is how long the whole chain may be cached
    (for NXDOMAIN/NODATA the caller works it out from ``response`` and
    ``chain``, dnspython's resolve_chaining() of it).  A direct answer
    (:func:`_direct_answer`) has neither: they are None when ``rrset`` is not.
    """

    rrset: dns.rrset.RRset | None
    nxdomain: bool
    ttl: int
    response: dns.message.Message | None
    chain: dns.message.ChainingResult | None


_TIMEVAL = struct.Struct("@ll")  # struct timeval as Linux's ABIs have it: two C longs


def _timeval(seconds: float) -> bytes:
    """*seconds* (> 0) as a struct timeval for SO_RCVTIMEO, never all zero (no limit)."""
    whole = int(seconds)
    return _TIMEVAL.pack(whole, max(int((seconds - whole) * 1e6), 0 if whole else 1))


def _receive_timeout_works() -> bool:
    """Does this system take SO_RCVTIMEO as :func:`_timeval` writes it? (set, read back)"""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(2.0))
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                   _TIMEVAL.size) == _timeval(2.0)
    except (OSError, AttributeError):
        return False


#: Receive on a blocking socket with SO_RCVTIMEO as the limit.  A socket with a
#: Python timeout polls before each send and each recv, and each of those calls
#: lets go of the GIL: four hand-offs per query between libmilter's threads
#: instead of two.  Where the probe fails, the Python timeout as before.
_RECEIVE_TIMEOUT = _receive_timeout_works()
#: spfmilter._udp.exchange where it is built and SO_RCVTIMEO works (it waits with it).
NATIVE_EXCHANGE = _exchange if _RECEIVE_TIMEOUT else None


class _Socket:
    """A connected UDP socket and how many queries it carried; closed when dropped."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.socket(dns.inet.af_for_address(address[0]), socket.SOCK_DGRAM)
        self.uses = 0
        try:
            if _RECEIVE_TIMEOUT and socket.getdefaulttimeout() is not None:
                # blocking, whatever socket.setdefaulttimeout says (settimeout lets go of
                # the GIL: a new socket is blocking unless a default timeout was set)
                self.sock.settimeout(None)
            self.sock.connect(address)  # only the server's datagrams reach it
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __del__(self) -> None:  # a thread that ends drops its sockets
        sock = getattr(self, "sock", None)  # None: socket() itself failed
        if sock is not None:
            sock.close()


class _Bad(Exception):
    """This try got an answer that makes the server useless for this lookup."""


def _render_query(qid: int, qname: dns.name.Name, rdtype: int) -> bytes:
    """Our query as dnspython's renderer writes it (RD, one question, EDNS0)."""
    renderer = dns.renderer.Renderer(qid, dns.flags.RD, MAX_UDP)
    renderer.add_question(qname, rdtype, dns.rdataclass.IN)
    renderer.add_edns(0, 0, EDNS_PAYLOAD)
    renderer.write_header()
    return renderer.get_wire()


#: The OPT record dnspython renders for our EDNS settings: the query's last octets
#: after the header, the root name's single octet and QTYPE/QCLASS.
_OPT = _render_query(0, dns.name.root, dns.rdatatype.A)[_HEADER.size + 1 + 4:]
_QUERY_HEADER = struct.Struct("!HHHHHH")  # ID, flags, QD, AN, NS, AR counts
_CLASS_IN = struct.Struct("!HH")


def _query_wire(qid: int, qname: dns.name.Name, rdtype: int,
                question: bytes | None = None) -> bytes:
    """The same octets as :func:`_render_query` (a test checks), for a tenth of its CPU.

    The renderer builds an OPT rdata and a compression table per query; our
    queries differ only in ID and question, so the name comes from
    dnspython's Name.to_wire and the OPT record from the renderer, once.
    """
    return _QUERY_HEADER.pack(qid, dns.flags.RD, 1, 0, 0, 1) + (
        question or _question(qname, rdtype)) + _OPT


def _question(qname: dns.name.Name, rdtype: int) -> bytes:
    """The question section's octets for (*qname*, *rdtype*, IN), uncompressed."""
    return qname.to_wire() + _CLASS_IN.pack(rdtype, dns.rdataclass.IN)


def _answers(response: dns.message.Message, qid: int, qname: dns.name.Name,
             rdtype: int) -> bool:
    """Is *response* the answer to our query (as dnspython's Message.is_response)?"""
    if response.id != qid or not response.flags & dns.flags.QR \
            or dns.opcode.from_flags(response.flags) != dns.opcode.QUERY:
        return False
    if not response.question:  # some servers send their error without the question
        return response.rcode() in _ERROR_RCODES_WITHOUT_QUESTION
    if len(response.question) != 1:
        return False
    question = response.question[0]
    return (question.name == qname and question.rdtype == rdtype
            and question.rdclass == dns.rdataclass.IN)


_ANSWER_FLAGS = dns.flags.QR | 0x7800 | dns.flags.TC | 0xF  # QR, opcode, TC, rcode
_RR = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH
_POINTER_TO_QUESTION = b"\xc0\x0c"  # a compression pointer to the question's name


def _direct_answer(wire: bytes, qname: dns.name.Name, rdtype: int,
                   question: bytes | None = None) -> dns.rrset.RRset | None:
    """The records in *wire* when it is the plainest answer to our query, else None.

    Plainest: QR, a standard query, not truncated, NOERROR; one question,
    (*qname*, *rdtype*, IN); every answer record at the question's name (a
    compression pointer to it), of *rdtype* and class IN -- no CNAME.  That is
    most answers, and for them dnspython's message parse (names, sections,
    rrset lookups, resolve_chaining) is half the CPU of a lookup; here only
    the records' data are parsed, by dnspython (dns.rdata.from_wire_parser),
    and put in an RRset as its message parse would.  Anything else, or any
    record dnspython refuses, gives None: the caller parses the whole
    message as before (tests/test_dnsclient.py compares the two).
    *question*: :func:`_question` of *qname* and *rdtype*, if the caller has it.
    """
    _id, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(wire)
    if flags & _ANSWER_FLAGS != dns.flags.QR or qdcount != 1 \
            or rdtype == dns.rdatatype.RRSIG:  # an RRSIG set is keyed on what it covers
        return None
    if question is None:
        question = _question(qname, rdtype)
    end = _HEADER.size + len(question)
    # names compare without regard to ASCII case, as dnspython's; length octets are < 64
    if wire[_HEADER.size:end].lower() != question.lower():
        return None
    parser = dns.wire.Parser(wire, end)
    rdclass, rdtype = dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype)
    rrset = dns.rrset.RRset(qname, rdclass, rdtype)
    # dns.rdata.from_wire_parser without its per-record class lookup and enum checks
    rdata_class = dns.rdata.get_rdata_class(rdclass, rdtype)
    try:
        for _ in range(ancount):
            if parser.get_bytes(2) != _POINTER_TO_QUESTION:
                return None
            rr_type, rr_class, ttl, rdlen = parser.get_struct(_RR.format)
            if rr_type != rdtype or rr_class != dns.rdataclass.IN:
                return None
            with parser.restrict_to(rdlen):
                rdata = rdata_class.from_wire_parser(rdclass, rdtype, parser, None)
            rrset.add(rdata, 0 if ttl > 0x7FFFFFFF else ttl)  # as dnspython's parse
    except (dns.exception.DNSException, ValueError, TypeError, struct.error):
        return None  # the whole parse says what is wrong, or keeps the good records
    return rrset


def _reply(wire: bytes, qid: int, qname: dns.name.Name, rdtype: int,
           question: bytes | None = None) -> Reply | None:
    """The Reply in *wire*, None when it is not the answer to our query.

    Raises _Bad for an error rcode or an answer that cannot be followed,
    FormError for one that does not parse.
    """
    if len(wire) < _HEADER.size:
        return None
    rid, flags, _qd, ancount, _ns, _ar = _HEADER.unpack_from(wire)
    if rid != qid:
        return None  # not for this query: not even worth parsing
    if flags & 0xF == dns.rcode.NOERROR and ancount:  # the common case: records
        rrset = _direct_answer(wire, qname, rdtype, question)
        if rrset is not None:
            return Reply(rrset, False, rrset.ttl, None, None)
        response = parse_wire(wire, answer_only=True)
        if not _answers(response, qid, qname, rdtype):
            return None
        chain = response.resolve_chaining()
        if chain.answer is not None:
            return Reply(chain.answer, False, chain.minimum_ttl, response, chain)
    response = parse_wire(wire)  # a negative answer or an error: all sections
    if not _answers(response, qid, qname, rdtype):
        return None
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise _Bad(f"{dns.rcode.to_text(rcode)} answer")
    try:
        chain = response.resolve_chaining()
    except dns.message.ChainTooLong:
        raise
    except dns.exception.DNSException as exc:  # e.g. an answer beside NXDOMAIN
        raise _Bad(f"answer cannot be followed: {exc!r}") from None
    return Reply(chain.answer, rcode == dns.rcode.NXDOMAIN, chain.minimum_ttl, response,
                 chain)


class DnsClient:
    """Asks one question of *servers* ((address, port) pairs) within a deadline.

    ``rotate``: start at a random server each lookup (resolv.conf's option).
    ``native``: send and wait through :mod:`spfmilter._udp` where it is built
    (:data:`NATIVE_EXCHANGE`); False: the socket module's send and recv.
    One instance serves all threads.
    """

    def __init__(self, servers: Sequence[tuple[str, int]], *,
                 attempt_timeout: float = ATTEMPT_TIMEOUT, rotate: bool = False,
                 native: bool = True) -> None:
        if not servers:
            raise ValueError("no name servers")
        self.servers = [(host, int(port)) for host, port in servers]
        self.attempt_timeout = attempt_timeout
        self.rotate = rotate
        self.exchange = NATIVE_EXCHANGE if native else None
        self._ids: list[int] = []  # query IDs drawn ahead
        self._idle: dict[tuple[str, int], list[_Socket]] = {s: [] for s in self.servers}

    def query(self, qname: dns.name.Name, rdtype: int, deadline: float) -> Reply:
        """The answer to (*qname*, *rdtype*, IN) by *deadline* (time.monotonic()).

        Raises dns.exception.Timeout when the deadline passes, ServerFailure
        when no server is left that could answer (each failed, refused, or
        gave an answer that cannot be used, YXDOMAIN included).
        """
        servers = list(self.servers)
        if self.rotate and len(servers) > 1:
            start = random.randrange(len(servers))
            servers = servers[start:] + servers[:start]
        errors: list[tuple[tuple[str, int], Exception]] = []
        backoff = 0.1
        while True:
            for server in list(servers):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise dns.exception.Timeout(timeout=0)
                try:
                    return self._try(server, qname, rdtype,
                                     time.monotonic() + min(left, self.attempt_timeout))
                except dns.exception.Timeout:
                    continue  # maybe a lost datagram: this server stays in the list
                except (dns.message.ChainTooLong, _Bad, dns.exception.FormError, EOFError,
                        OSError) as exc:
                    servers.remove(server)
                    errors.append((server, exc))
            if not servers:
                raise ServerFailure(errors)
            left = deadline - time.monotonic()
            if left <= 0:
                raise dns.exception.Timeout(timeout=0)
            time.sleep(min(backoff, left))
            backoff = min(backoff * 2, 2.0)

    # -- one try --------------------------------------------------------------

    def _query_id(self) -> int:
        """A random query ID from the OS's generator, drawn for many at a time.

        One getrandom() per query (secrets.randbits) let go of the GIL for each,
        a hand-off between libmilter's threads.  Two threads that find the pool
        empty at once both refill it: no ID is used twice either way.
        """
        try:
            return self._ids.pop()
        except IndexError:
            ids = list(_IDS.unpack(secrets.token_bytes(_IDS.size)))
            qid = ids.pop()
            self._ids.extend(ids)
            return qid

    def _try(self, server: tuple[str, int], qname: dns.name.Name, rdtype: int,
             until: float) -> Reply:
        qid = self._query_id()
        question = _question(qname, rdtype)
        wire = _query_wire(qid, qname, rdtype, question)
        idle = self._idle[server]
        try:
            udp = idle.pop()  # this try's alone until it gives it back
        except IndexError:
            udp = _Socket(server)
        udp.uses += 1
        clean = False
        try:
            reply, clean = self._udp(udp.sock, wire, qid, qname, rdtype, until, question,
                                     self.exchange)
        finally:
            if clean and udp.uses < SOCKET_USES and len(idle) < MAX_IDLE_SOCKETS:
                idle.append(udp)
            else:
                udp.close()
        if reply is not None:
            return reply
        return self._tcp(server, wire, qid, qname, rdtype, until)

    @staticmethod
    def _udp(sock: socket.socket, wire: bytes, qid: int, qname: dns.name.Name,
             rdtype: int, until: float, question: bytes,
             exchange: _Exchange | None) -> tuple[Reply | None, bool]:
        """(the answer over UDP or None when it was truncated, whether the socket
        saw nothing but it); raises on a timeout or an error.

        *exchange*: :data:`NATIVE_EXCHANGE` (it sends *wire* with the first wait)
        or None (socket.send, then socket.recv).
        """
        unsent: bytes | None = wire
        if exchange is None:
            sock.send(wire)
            unsent = None
        clean = True
        while True:
            left = until - time.monotonic()
            if left <= 0:
                if unsent is not None:
                    sock.send(unsent)  # as the socket module's path: sent, then timed out
                raise dns.exception.Timeout(timeout=0)
            try:
                if exchange is not None:  # one GIL release: the wait (and any send's)
                    data = exchange(sock.fileno(), unsent, left)
                    unsent = None
                elif _RECEIVE_TIMEOUT:  # the kernel waits: one GIL release, not poll + recv
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
                    data = sock.recv(MAX_UDP)
                else:
                    sock.settimeout(left)
                    data = sock.recv(MAX_UDP)
            except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO
                raise dns.exception.Timeout(timeout=0) from None
            try:
                if len(data) >= _HEADER.size and _HEADER.unpack_from(data)[1] & dns.flags.TC:
                    # truncated: ask again over TCP; check only that it is our answer
                    response = parse_wire(data, question_only=True)
                    if _answers(response, qid, qname, rdtype):
                        return None, clean
                    reply = None
                else:
                    reply = _reply(data, qid, qname, rdtype, question)
            except dns.exception.FormError:
                reply = None  # as dnspython's ignore_errors: maybe not from the server
            if reply is not None:
                return reply, clean
            clean = False  # a late answer to an earlier try, or a forgery: keep listening

    def _tcp(self, server: tuple[str, int], wire: bytes, qid: int, qname: dns.name.Name,
             rdtype: int, until: float) -> Reply:
        left = until - time.monotonic()
        if left <= 0:
            raise dns.exception.Timeout(timeout=0)
        try:
            with socket.create_connection(server, timeout=left) as sock:
                sock.sendall(struct.pack("!H", len(wire)) + wire)
                (size,) = struct.unpack("!H", read_exact(sock, 2))
                data = read_exact(sock, size)
        except socket.timeout:
            raise dns.exception.Timeout(timeout=left) from None
        reply = _reply(data, qid, qname, rdtype)
        if reply is None:
            raise _Bad("TCP answer is not for our query")
        if _HEADER.unpack_from(data)[1] & dns.flags.TC:
            raise _Bad("truncated answer over TCP")
        return reply
