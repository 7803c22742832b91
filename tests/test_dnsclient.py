"""spfmilter.dnsclient: the query octets, the answer-only parse, and the transport.

The query and the shortened parse are checked against dnspython doing the
whole job (property tests); the transport against the test NSD, directly and
through a small UDP responder here that relays to it and can misbehave on
purpose (stay silent, say SERVFAIL, send datagrams that are not the answer
first), and records where each query came from.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfmilter import dnsclient
from spfmilter.dnsclient import SOCKET_USES, DnsClient, ServerFailure, _Bad, _render_query, _reply
from spfmilter.nameserver import parse_wire
from spfmilter.spfcheck import _negative_ttl
from tests.dnsserver import DnsServer

try:
    from spfmilter import _udp
except ImportError:  # the 'native' fixture fails the transport tests then
    _udp = None

EXAMPLES = int(os.environ.get("SPFMILTER_HYPOTHESIS_EXAMPLES", "200"))
TXT = dns.rdatatype.TXT
LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=63)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(lambda labels: dns.name.from_text(
    ".".join(labels) + "."))
RDTYPE = st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX, TXT,
                          dns.rdatatype.PTR, dns.rdatatype.SPF, dns.rdatatype.SOA])


# -- the query: dnspython's octets -----------------------------------------------

@settings(max_examples=EXAMPLES, derandomize=True, deadline=None)
@given(qid=st.integers(0, 0xFFFF), qname=NAME, rdtype=RDTYPE)
def test_query_octets_are_the_renderers(qid: int, qname: dns.name.Name, rdtype: int) -> None:
    wire = dnsclient._query_wire(qid, qname, rdtype)
    assert wire == _render_query(qid, qname, rdtype)
    query = dns.message.from_wire(wire)
    assert (query.id, query.flags, query.edns, query.payload) == (
        qid, dns.flags.RD, 0, dnsclient.EDNS_PAYLOAD)
    assert [(q.name, q.rdtype) for q in query.question] == [(qname, rdtype)]


# -- the answer: the shortened parse says what the whole one says ---------------

def _response(qid: int, rcode: int, chain: list[int], final: bool, soa: int | None,
              extras: bool) -> tuple[bytes, dns.name.Name]:
    """A response to x.example.test TXT: CNAMEs with TTLs *chain*, maybe the TXT
    records at its end, maybe an SOA (its TTL and minimum *soa*), maybe NS and A
    records in the authority and additional sections."""
    qname = dns.name.from_text("x.example.test.")
    query = dns.message.make_query(qname, TXT, use_edns=0)
    query.id = qid
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    names = [qname] + [dns.name.from_text(f"c{i}.example.test.") for i in range(len(chain))]
    for owner, target, ttl in zip(names, names[1:], chain):
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME",
                                                   target.to_text()))
    if final:
        response.answer.append(dns.rrset.from_text(names[-1], 300, "IN", "TXT", '"v=spf1 -all"'))
    if soa is not None:
        response.authority.append(dns.rrset.from_text(
            "example.test.", soa, "IN", "SOA", f"ns.example.test. h.example.test. 1 2 3 4 {soa}"))
    if extras:
        response.authority.append(dns.rrset.from_text("example.test.", 60, "IN", "NS",
                                                      "ns.example.test."))
        response.additional.append(dns.rrset.from_text("ns.example.test.", 60, "IN", "A",
                                                       "192.0.2.53"))
    return response.to_wire(), qname


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None)
@given(qid=st.integers(0, 0xFFFF),
       rcode=st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL]),
       chain=st.lists(st.integers(0, 2**31 - 1), max_size=18), final=st.booleans(),
       soa=st.one_of(st.none(), st.integers(0, 2**31 - 1)), extras=st.booleans())
def test_reply_agrees_with_dnspythons_whole_parse(qid: int, rcode: int, chain: list[int],
                                                  final: bool, soa: int | None,
                                                  extras: bool) -> None:
    wire, qname = _response(qid, rcode, chain, final, soa, extras)
    whole = dns.message.from_wire(wire)
    if rcode == dns.rcode.SERVFAIL:  # the rcode first, as dnspython's Resolver
        with pytest.raises(_Bad, match="SERVFAIL"):
            _reply(wire, qid, qname, TXT)
        return
    try:
        expected = whole.resolve_chaining()
    except dns.message.ChainTooLong:
        with pytest.raises(dns.message.ChainTooLong):
            _reply(wire, qid, qname, TXT)
        return
    except dns.message.AnswerForNXDOMAIN:
        with pytest.raises(_Bad):
            _reply(wire, qid, qname, TXT)
        return
    reply = _reply(wire, qid, qname, TXT)
    assert reply is not None
    assert reply.nxdomain == (rcode == dns.rcode.NXDOMAIN)
    assert reply.rrset == expected.answer
    if expected.answer is not None:
        assert reply.ttl == expected.minimum_ttl
    else:  # a negative answer keeps everything the negative TTL needs
        assert _negative_ttl(reply.response, reply.chain) == _negative_ttl(whole)
    assert _reply(wire, qid ^ 1, qname, TXT) is None  # another ID: not ours
    assert _reply(wire, qid, dns.name.from_text("y.example.test."), TXT) is None


#: Answer records for the direct-answer property test: (owner, type, TTL, data).
_RECORD = st.tuples(
    st.sampled_from(["x.example.test.", "X.Example.TEST.", "y.example.test."]),
    st.sampled_from(["TXT", "A"]),
    st.sampled_from([0, 60, 300, 2**31 - 1, 2**31, 2**32 - 1]),
    st.sampled_from(['"v=spf1 -all"', '"v=spf1 " "a" "-all"', '""', "192.0.2.1", "192.0.2.2"]))


def _direct_response(qid: int, question: str, records: list[tuple[str, str, int, str]],
                     empty_txt: bool) -> bytes:
    """A NOERROR response to *question* TXT with *records* (one rrset per record,
    so repeats and mixed TTLs stay on the wire), maybe a TXT without strings
    last (no EDNS: the answer section ends the message)."""
    query = dns.message.make_query(question, TXT, use_edns=False)
    query.id = qid
    response = dns.message.make_response(query)
    for owner, rdtype, ttl, data in records:
        if (rdtype == "A") == data[0].isdigit():
            response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, data))
    wire = response.to_wire()
    if empty_txt:  # dnspython will not render one: a record with RDLENGTH 0, by hand
        rr = b"\xc0\x0c" + struct.pack("!HHIH", TXT, 1, 60, 0)
        count = struct.unpack_from("!H", wire, 6)[0] + 1
        wire = wire[:6] + struct.pack("!H", count) + wire[8:] + rr
    return wire


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None)
@given(qid=st.integers(0, 0xFFFF), question=st.sampled_from(["x.example.test.",
                                                            "X.EXAMPLE.test."]),
       records=st.lists(_RECORD, min_size=1, max_size=5), empty_txt=st.booleans())
def test_direct_answers_agree_with_dnspythons_whole_parse(qid: int, question: str,
                                                          records: list, empty_txt: bool
                                                          ) -> None:
    """The shortcut for plain answers (dnsclient._direct_answer) gives the records,
    TTL and verdict of dnspython's whole parse, whatever the case, owners, types,
    repeats and TTLs of the records; with a record dnspython refuses, the whole
    parse decides (and drops it, as parse_wire does)."""
    wire = _direct_response(qid, question, records, empty_txt)
    qname = dns.name.from_text("x.example.test.")
    whole = parse_wire(wire)
    expected = whole.resolve_chaining()
    reply = _reply(wire, qid, qname, TXT)
    assert reply is not None
    assert reply.rrset == expected.answer
    if expected.answer is not None:
        assert reply.ttl == expected.minimum_ttl
        assert reply.rrset.ttl == expected.answer.ttl
    else:
        assert _negative_ttl(reply.response, reply.chain) == _negative_ttl(whole)
    assert _reply(wire, qid ^ 1, qname, TXT) is None
    assert _reply(wire, qid, dns.name.from_text("x.example.test2."), TXT) is None
    assert _reply(wire, qid, qname, dns.rdatatype.SPF) is None


# -- the transport ----------------------------------------------------------------

class Responder:
    """A UDP server on 127.0.0.1 relaying to *upstream*; ``mode`` says how it misbehaves.

    pass: relays.  silent: never answers.  servfail: answers SERVFAIL.
    foreign: before the answer, sends it with another ID and an answer to
    another question.  pair: holds each query until a second one came, then
    relays both (two queries under way at once).  ``sources`` lists the
    client address of every query.
    """

    def __init__(self, upstream: tuple[str, int], mode: str = "pass") -> None:
        self.upstream = upstream
        self.mode = mode
        self.sources: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _ask_upstream(self, wire: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(2)
            up.sendto(wire, self.upstream)
            return up.recv(65535)

    def _serve(self) -> None:
        held: list[tuple[bytes, tuple[str, int]]] = []
        while not self._stop.is_set():
            try:
                wire, client = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.sources.append(client)
            if self.mode == "silent":
                continue
            if self.mode == "pair":
                held.append((wire, client))
                if len(held) == 2:
                    for wire, client in held:
                        self.sock.sendto(self._ask_upstream(wire), client)
                    held = []
                continue
            query = dns.message.from_wire(wire)
            if self.mode == "servfail":
                response = dns.message.make_response(query)
                response.set_rcode(dns.rcode.SERVFAIL)
                self.sock.sendto(response.to_wire(), client)
                continue
            answer = self._ask_upstream(wire)
            if self.mode == "foreign":
                other = dns.message.from_wire(answer)
                other.id ^= 0x5555
                self.sock.sendto(other.to_wire(), client)  # another ID
                other = dns.message.from_wire(answer)
                other.question[0].name = dns.name.from_text("other.spf.test.")
                self.sock.sendto(other.to_wire(), client)  # another question
                self.sock.sendto(b"\x00", client)  # not DNS at all
            self.sock.sendto(answer, client)


@pytest.fixture(params=[True, False], ids=["helper", "socket-module"])
def native(request) -> bool:
    """Each transport test runs on spfmilter._udp and on the socket module's calls."""
    if request.param:
        assert dnsclient.NATIVE_EXCHANGE is not None, "spfmilter._udp is not built"
    return request.param


@pytest.fixture
def responders(dns_server: DnsServer) -> Iterator[list[Responder]]:
    made: list[Responder] = []

    def make(mode: str = "pass") -> Responder:
        made.append(Responder((dns_server.host, dns_server.port), mode))
        return made[-1]

    yield make  # type: ignore[misc]
    for responder in made:
        responder.close()


def _spf_text(reply: dnsclient.Reply) -> bytes:
    assert reply.rrset is not None
    return b"".join(reply.rrset[0].strings)


def _ask(client: DnsClient, name: str = "pass.spf.test", seconds: float = 5.0
         ) -> dnsclient.Reply:
    return client.query(dns.name.from_text(name), TXT, time.monotonic() + seconds)


def test_answers_from_the_server(dns_server: DnsServer, native: bool) -> None:
    client = DnsClient(dns_server.addresses, native=native)
    assert _spf_text(_ask(client)).startswith(b"v=spf1")
    nx = _ask(client, "nxdomain.spf.test")
    assert (nx.rrset, nx.nxdomain) == (None, True)
    assert _negative_ttl(nx.response) == 60
    long = _ask(client, "long.spf.test")  # over 1232 octets: truncated, then TCP
    assert len(_spf_text(long)) > 1232


def test_datagrams_that_are_not_the_answer_are_ignored(responders, native: bool) -> None:
    foreign = responders("foreign")
    client = DnsClient([foreign.address], native=native)
    assert _spf_text(_ask(client)).startswith(b"v=spf1")
    _ask(client)
    # the socket that saw them is not used again: a new source port
    assert foreign.sources[0][1] != foreign.sources[1][1]


def test_one_socket_serves_the_client_for_a_while(responders, native: bool) -> None:
    relay = responders("pass")
    client = DnsClient([relay.address], native=native)
    for _ in range(SOCKET_USES + 1):
        _ask(client)
    ports = [port for _host, port in relay.sources]
    assert len(set(ports[:SOCKET_USES])) == 1
    assert ports[SOCKET_USES] != ports[0]  # then a new one

    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(_ask(client) is not None))
    thread.start()
    thread.join(10)
    assert seen == [True]
    # another thread takes the idle socket: threads that end do not take theirs along
    assert relay.sources[-1][1] == ports[SOCKET_USES]


def test_tries_under_way_at_once_have_sockets_of_their_own(responders, native: bool) -> None:
    relay = responders("pair")  # answers only once both queries are in
    client = DnsClient([relay.address], native=native)
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(_spf_text(_ask(client))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 2 and all(a.startswith(b"v=spf1") for a in answers)
    first, second = (port for _host, port in relay.sources)
    assert first != second
    _ask(client)  # both went back idle: the next try takes one of them
    assert relay.sources[-1][1] in (first, second)



@pytest.mark.parametrize("mode", ["silent", "servfail"])
def test_a_failing_server_is_passed_over(responders, dns_server: DnsServer, mode: str,
                                        native: bool) -> None:
    bad = responders(mode)
    client = DnsClient([bad.address, (dns_server.host, dns_server.port)], attempt_timeout=0.3,
                       native=native)
    assert _spf_text(_ask(client)).startswith(b"v=spf1")
    assert len(bad.sources) == 1


def test_servers_that_never_answer_are_asked_again_until_the_deadline(responders,
                                                                      native: bool) -> None:
    first, second = responders("silent"), responders("silent")
    client = DnsClient([first.address, second.address], attempt_timeout=0.2, native=native)
    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        _ask(client, seconds=1.2)
    assert time.monotonic() - started < 1.2 + 0.5  # the deadline, not a try more
    assert len(first.sources) >= 2 and len(second.sources) >= 2  # around again, after backoff


def test_every_server_failing_is_a_server_failure(responders, native: bool) -> None:
    first, second = responders("servfail"), responders("servfail")
    client = DnsClient([first.address, second.address], native=native)
    with pytest.raises(ServerFailure) as info:
        _ask(client)
    assert not info.value.chain_too_long
    assert [server for server, _exc in info.value.errors] == [first.address, second.address]
    assert (len(first.sources), len(second.sources)) == (1, 1)  # each asked once


def test_a_cname_loop_is_told_apart(dns_server: DnsServer, native: bool) -> None:
    with pytest.raises(ServerFailure) as info:
        DnsClient(dns_server.addresses, native=native).query(
            dns.name.from_text("loop1.compat.test"), dns.rdatatype.A, time.monotonic() + 5)
    assert info.value.chain_too_long


# -- GIL releases per query ------------------------------------------------------

#: Socket methods that let go of the GIL (Py_BEGIN_ALLOW_THREADS in CPython's
#: socketmodule.c), and other builtins that do (posix, time, select, spfmilter._udp).
_SOCKET_RELEASING = {"send", "sendall", "sendto", "recv", "recvfrom", "recv_into", "connect",
                     "close", "settimeout", "setblocking", "detach"}
_RELEASING = (os.urandom, time.sleep, select.select, *([_udp.exchange] if _udp else []))


def _releasing_calls(action) -> list[str]:
    """The GIL-releasing builtins *action* calls, in order (a profile hook sees each)."""
    calls: list[str] = []

    def hook(_frame, event, arg) -> None:
        if event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        if (isinstance(owner, socket.socket) and arg.__name__ in _SOCKET_RELEASING) \
                or any(arg is f for f in _RELEASING):
            calls.append(arg.__name__)

    sys.setprofile(hook)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def test_a_query_lets_go_of_the_gil_once(dns_server: DnsServer, native: bool) -> None:
    """On a socket made before, one try makes one GIL release with the helper (the
    wait: the send goes out with the GIL held), two without (socket.send, socket.recv)."""
    client = DnsClient(dns_server.addresses, native=native)
    _ask(client)  # the socket is made (socket, connect) and the query IDs drawn
    names = iter(f"q{n}.pass.spf.test" for n in range(10))
    before = _udp.stats() if _udp is not None else (0, 0)
    per_query = [_releasing_calls(lambda: _ask(client, next(names))) for _ in range(10)]
    after = _udp.stats() if _udp is not None else (0, 0)
    expected = ["exchange"] if native else ["send", "recv"]
    assert per_query == [expected] * 10
    if native:
        assert (after[0] - before[0], after[1] - before[1]) == (10, 10)  # one release each
    else:
        assert after == before
    # a new thread (libmilter's pool starts them) takes the idle socket and the IDs
    # drawn: no socket, connect or getrandom of its own
    in_thread: list[list[str]] = []
    thread = threading.Thread(target=lambda: in_thread.append(
        _releasing_calls(lambda: _ask(client, "new-thread.pass.spf.test"))))
    thread.start()
    thread.join(10)
    assert in_thread == [expected]


@pytest.fixture
def udp():
    """spfmilter._udp; scripts/setup builds it (with libmilter_ext._milter)."""
    assert _udp is not None, "spfmilter._udp is not built"
    return _udp


def test_exchange_on_a_full_send_buffer_still_releases_once(udp) -> None:
    """EAGAIN with the GIL held: the send waits for room in the one released section."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, peer:
        ours.setblocking(False)
        queued = 0
        while True:  # fill the peer's queue (net.unix.max_dgram_qlen)
            try:
                ours.send(b"filler")
            except BlockingIOError:
                break
            queued += 1
        ours.setblocking(True)

        def drain_then_answer() -> None:
            got = [peer.recv(100) for _ in range(queued + 1)]
            peer.send(b"answer to " + got[-1])

        thread = threading.Thread(target=drain_then_answer)
        before = udp.stats()
        thread.start()
        assert udp.exchange(ours.fileno(), b"query", 10.0) == b"answer to query"
        thread.join(10)
        after = udp.stats()
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_exchange_fails_as_the_socket_module_does(udp) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))  # nothing listens: ICMP port unreachable
        with pytest.raises(ConnectionRefusedError):
            udp.exchange(sock.fileno(), b"query", 5.0)
        with pytest.raises(BlockingIOError):  # nothing came within the timeout
            udp.exchange(sock.fileno(), None, 0.05)
        with pytest.raises(ValueError):
            udp.exchange(sock.fileno(), None, 0.0)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        udp.exchange(fd, b"query", 1.0)  # closed: EBADF
    assert info.value.errno == errno.EBADF
