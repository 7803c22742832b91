"""A real DNS server on loopback for the test suite.

Debian's NSD serves the zone files in ``tests/data/zones`` on a private
loopback port.  In front of it runs a small UDP/TCP relay that listens on
127.0.0.1 and ::1 (same port), counts every query it sees by (name, type),
drops queries under chosen names (or as a predicate chooses) so that
resolvers time out, and strips the authority section (so the SOA) from
answers under other chosen names, as some servers send negative answers.
Tests talk to the relay's port only.

Zones: every ``NAME.zone`` file in the zones folder (``root.zone`` is the
stand-in root ``.``, so unknown names get NXDOMAIN instead of REFUSED), plus
zones configured without a file, which NSD answers with SERVFAIL.
"""

from __future__ import annotations

import collections
import os
import selectors
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

ZONES_DIR = Path(__file__).parent / "data" / "zones"
NSD = "/usr/sbin/nsd"
NSD_CHECKZONE = "/usr/sbin/nsd-checkzone"
#: Zones that are configured but have no file: NSD answers SERVFAIL.
SERVFAIL_ZONES = ("servfail.test",)
#: Names (and everything below them) whose queries are never answered.
DROPPED_NAMES = ("timeout.spf.test",)
#: Names (and everything below them) whose answers lose their authority section.
NO_SOA_NAMES = ("nosoa.dns.test",)
#: Zone queried to decide that the server is up.
PROBE_ZONE = "spf.test"
START_TIMEOUT = 10.0
UPSTREAM_TIMEOUT = 5.0
#: Linux: kernel receive timestamps (struct timespec, CLOCK_REALTIME) of datagrams;
#: Python's socket module does not name it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _free_port(host: str) -> int:
    """Return a TCP+UDP port that was free on *host* a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as tcp:
        tcp.bind((host, 0))
        port = tcp.getsockname()[1]
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, port))
    return port


def wait_answering(
    host: str,
    port: int,
    zone: str,
    *,
    udp: bool,
    proc: subprocess.Popen[bytes] | None = None,
    name: str = "DNS server",
    log: Callable[[], str] = lambda: "",
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll with SOA queries for *zone* until *host*:*port* answers NOERROR, or raise.

    *proc* is the server process (its exit ends the wait at once), *log* gives
    its log text for the error message.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    query = dns.message.make_query(zone, "SOA")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{log()}")
        try:
            send = dns.query.udp if udp else dns.query.tcp
            answer = send(query, host, port=port, timeout=0.25)
        except (OSError, dns.exception.DNSException) as exc:
            last = repr(exc)
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                time.sleep(0.02)  # refused at once: do not spin
            continue
        if answer.rcode() == dns.rcode.NOERROR:
            return
        raise RuntimeError(  # up, but not serving the probe zone: a config error
            f"{name} at {host}:{port} answers {dns.rcode.to_text(answer.rcode())} "
            f"for {zone} SOA:\n{log()}"
        )
    raise RuntimeError(f"{name} at {host}:{port} not ready after {timeout}s ({last}):\n{log()}")


def _qkey(wire: bytes) -> tuple[str, str]:
    """(lower-case name without final dot, type mnemonic) of a query."""
    try:
        question = dns.message.from_wire(wire).question[0]
    except Exception:  # any garbage is counted, then relayed
        return ("<unparsable>", "")
    name = question.name.to_text(omit_final_dot=True).lower()
    return (name, dns.rdatatype.to_text(question.rdtype))


def _received_ns(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time of a datagram (SO_TIMESTAMPNS), else now."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds * 1_000_000_000 + nanoseconds
    return time.time_ns()


def _under(name: str, parents: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in parents)


def _without_authority(answer: bytes) -> bytes:
    message = dns.message.from_wire(answer)
    message.authority = []
    return message.to_wire()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


class _Front:
    """UDP/TCP relay on 127.0.0.1 and ::1 that counts and drops queries."""

    def __init__(self, upstream: tuple[str, int], drop: Sequence[str],
                 unanswered: Callable[[str, str], bool] | None = None,
                 no_soa: Sequence[str] = (),
                 listen: tuple[str, str] = ("127.0.0.1", "::1"),
                 late: float | None = None) -> None:
        self.upstream = upstream
        self.listen = listen
        self.drop = tuple(d.lower().rstrip(".") for d in drop)
        self.unanswered = unanswered
        self.no_soa = tuple(d.lower().rstrip(".") for d in no_soa)
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.retransmissions: collections.Counter[tuple[str, str]] = collections.Counter()
        # when the first answer in time to each question went out (time.time_ns());
        # an answer later than *late* seconds after its query comes too late for
        # the asker, which has given up on it (None: never too late)
        self._first_answer: dict[tuple[str, str], int] = {}
        self._late_ns = None if late is None else int(late * 1e9)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        self._listeners = self._bind()
        self.port = self._listeners[0].getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._loop = threading.Thread(target=self._serve, name="dns-front", daemon=True)

    def _bind(self) -> list[socket.socket]:
        last: OSError | None = None
        for _ in range(50):
            socks: list[socket.socket] = []
            try:
                port = 0
                for family, host in zip((socket.AF_INET, socket.AF_INET6), self.listen):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        sock = socket.socket(family, kind)
                        socks.append(sock)
                        if family == socket.AF_INET6:
                            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        if kind == socket.SOCK_DGRAM:
                            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                        sock.bind((host, port))
                        port = sock.getsockname()[1]
                        if kind == socket.SOCK_STREAM:
                            sock.listen(128)
                return socks
            except OSError as exc:
                last = exc
                for sock in socks:
                    sock.close()
        raise RuntimeError(f"no common free port on {' and '.join(self.listen)}: {last}")

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake_w.send(b"x")
        self._loop.join(5)
        with self._lock:
            conns = list(self._conns)
            workers = list(self._workers)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for worker in workers:
            worker.join(UPSTREAM_TIMEOUT + 1)
        for sock in (*self._listeners, self._wake_r, self._wake_w):
            sock.close()

    def reset(self) -> None:
        with self._lock:
            self.queries.clear()
            self.retransmissions.clear()
            self._first_answer.clear()

    def snapshot(self) -> collections.Counter[tuple[str, str]]:
        with self._lock:
            return collections.Counter(self.queries)

    def retransmitted(self) -> collections.Counter[tuple[str, str]]:
        with self._lock:
            return collections.Counter(self.retransmissions)

    def _admit(self, wire: bytes, received_ns: int) -> bool:
        """Count a query; False when it must go unanswered.

        A question asked again before an answer to it went out in time (by
        the kernel's receive time) is also counted as a retransmission: the
        asker cannot have had the answer, so it is no second cache miss.
        """
        key = _qkey(wire)
        with self._lock:
            if self.queries[key] and received_ns < self._first_answer.get(key, received_ns + 1):
                self.retransmissions[key] += 1
            self.queries[key] += 1
        if self.unanswered is not None and self.unanswered(*key):
            return False
        return not _under(key[0], self.drop)

    def _answering(self, wire: bytes, received_ns: int) -> None:
        """Just before an answer goes out: if in time, a query received later is no retry."""
        sent = time.time_ns()
        if self._late_ns is not None and sent - received_ns > self._late_ns:
            return
        with self._lock:
            self._first_answer.setdefault(_qkey(wire), sent)

    def _rewrite(self, wire: bytes, answer: bytes) -> bytes:
        """The answer as the client gets it: without authority under no_soa names."""
        if self.no_soa and _under(_qkey(wire)[0], self.no_soa):
            return _without_authority(answer)
        return answer

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        def run() -> None:
            try:
                target(*args)
            except OSError:
                pass  # peer went away or we are stopping
            except Exception as exc:  # keep for inspection
                self.errors.append(exc)
            finally:
                with self._lock:
                    self._workers.discard(thread)

        thread = threading.Thread(target=run, name="dns-front-worker", daemon=True)
        with self._lock:
            self._workers.add(thread)
        thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            for sock in self._listeners:
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r or self._stopping.is_set():
                        return
                    assert isinstance(sock, socket.socket)
                    try:
                        if sock.type == socket.SOCK_DGRAM:
                            wire, ancillary, _, client = sock.recvmsg(
                                65535, socket.CMSG_SPACE(16))
                            received = _received_ns(ancillary)
                            if self._admit(wire, received):
                                self._spawn(self._relay_udp, sock, wire, client, received)
                        else:
                            conn, _ = sock.accept()
                            with self._lock:
                                self._conns.add(conn)
                            self._spawn(self._serve_tcp, conn)
                    except OSError as exc:
                        self.errors.append(exc)

    def _relay_udp(self, listener: socket.socket, wire: bytes, client: tuple,
                   received_ns: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(UPSTREAM_TIMEOUT)
            up.sendto(wire, self.upstream)
            answer = up.recv(65535)
        self._answering(wire, received_ns)
        listener.sendto(self._rewrite(wire, answer), client)

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            with conn:
                while not self._stopping.is_set():
                    try:
                        (size,) = struct.unpack("!H", _recv_exact(conn, 2))
                    except ConnectionError:
                        return
                    wire = _recv_exact(conn, size)
                    received = time.time_ns()
                    if not self._admit(wire, received):
                        continue
                    with socket.create_connection(self.upstream, UPSTREAM_TIMEOUT) as up:
                        up.sendall(struct.pack("!H", len(wire)) + wire)
                        (size,) = struct.unpack("!H", _recv_exact(up, 2))
                        answer = self._rewrite(wire, _recv_exact(up, size))
                    self._answering(wire, received)
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
        finally:
            with self._lock:
                self._conns.discard(conn)


class DnsServer:
    """NSD on loopback behind a counting relay; use as a context manager.

    ``host``/``port`` (and ``host6``) address the relay, which answers on
    127.0.0.1 and ::1 alike (or on other addresses of this host, e.g. in a
    network namespace, given as *host* and *host6*).  ``queries`` counts
    queries seen by (name, type), names lower-case without the final dot;
    ``retransmissions`` those of them that repeated a question before an
    answer to it went out in time (a resolver's retry, not a second cache
    miss); an answer sent more than *late* seconds after its query is too
    late for the resolver (give its timeout), by default none is.
    Queries under ``drop`` names, or for which ``unanswered(name, type)`` is
    true, get no answer; answers under ``no_soa`` names lose their authority
    section.
    """

    host = "127.0.0.1"
    host6 = "::1"

    def __init__(
        self,
        zones_dir: Path = ZONES_DIR,
        *,
        servfail_zones: Sequence[str] = SERVFAIL_ZONES,
        drop: Sequence[str] = DROPPED_NAMES,
        unanswered: Callable[[str, str], bool] | None = None,
        no_soa: Sequence[str] = NO_SOA_NAMES,
        probe_zone: str = PROBE_ZONE,
        host: str | None = None,
        host6: str | None = None,
        late: float | None = None,
    ) -> None:
        self.host = host or self.host
        self.host6 = host6 or self.host6
        self.zones_dir = Path(zones_dir).resolve()
        self.probe_zone = probe_zone
        self.servfail_zones = tuple(servfail_zones)
        self.drop = tuple(drop)
        self.unanswered = unanswered
        self.no_soa = tuple(no_soa)
        self.late = late
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._front: _Front | None = None
        self.backend_port = 0

    # -- public API -----------------------------------------------------

    @property
    def port(self) -> int:
        return self._running_front().port

    @property
    def nameservers(self) -> list[str]:
        """``["127.0.0.1:PORT"]``: the form a config file takes."""
        return [f"{self.host}:{self.port}"]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", PORT)]``: the form SpfChecker takes."""
        return [(self.host, self.port)]

    @property
    def queries(self) -> collections.Counter[tuple[str, str]]:
        """A snapshot of the query counts by (name, type)."""
        return self._running_front().snapshot()

    @property
    def retransmissions(self) -> collections.Counter[tuple[str, str]]:
        """Of ``queries``, the retries: asked again before the first answer went out."""
        return self._running_front().retransmitted()

    @property
    def total_queries(self) -> int:
        return sum(self.queries.values())

    def count(self, name: str, qtype: str | None = None) -> int:
        """Queries seen for *name* (any type unless *qtype* is given)."""
        name = name.lower().rstrip(".")
        return sum(
            n for (qname, t), n in self.queries.items()
            if qname == name and (qtype is None or t == qtype.upper())
        )

    def reset_counts(self) -> None:
        self._running_front().reset()

    def start(self) -> DnsServer:
        if self._proc is not None:
            raise RuntimeError("DnsServer already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="spfmilter-nsd-")
        try:
            self._start_nsd()
            self._front = _Front((self.host, self.backend_port), self.drop,
                                 self.unanswered, self.no_soa, (self.host, self.host6),
                                 self.late)
            self._front.start()
            for host in (self.host, self.host6):
                self._wait_ready(host, self.port, udp=False)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------

    def _running_front(self) -> _Front:
        if self._front is None:
            raise RuntimeError("DnsServer is not running")
        return self._front

    def _zones(self) -> list[tuple[str, str]]:
        zones = []
        for path in sorted(self.zones_dir.glob("*.zone")):
            name = path.name[: -len(".zone")]
            zones.append(("." if name == "root" else name, str(path)))
        assert self._tmp is not None
        for name in self.servfail_zones:
            zones.append((name, os.path.join(self._tmp.name, "missing", name + ".zone")))
        return zones

    def _check_zones(self) -> None:
        """Run nsd-checkzone on every zone file so a typo fails loudly, with its line."""
        for name, path in self._zones():
            if not os.path.exists(path):
                continue
            check = subprocess.run([NSD_CHECKZONE, name, path], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"zone {name} ({path}):\n{check.stdout}{check.stderr}")

    def _write_config(self, port: int) -> str:
        assert self._tmp is not None
        tmp = self._tmp.name
        lines = [
            "server:",
            f"    ip-address: {self.host}@{port}",
            f"    port: {port}",
            "    do-ip6: no",
            "    server-count: 1",
            '    username: ""',
            '    chroot: ""',
            '    database: ""',
            f'    zonesdir: "{self.zones_dir}"',
            f'    pidfile: "{tmp}/nsd.pid"',
            f'    zonelistfile: "{tmp}/zone.list"',
            f'    xfrdfile: "{tmp}/xfrd.state"',
            f'    xfrdir: "{tmp}"',
            "    rrl-ratelimit: 0",
            "    verbosity: 1",
            "    hide-version: yes",
            "    tcp-count: 200",
            "    zonefiles-write: 0",
            "remote-control:",
            "    control-enable: no",
        ]
        for name, path in self._zones():
            lines += ["zone:", f'    name: "{name}"', f'    zonefile: "{path}"']
        conf = os.path.join(tmp, "nsd.conf")
        with open(conf, "w", encoding="ascii") as fh:
            fh.write("\n".join(lines) + "\n")
        return conf

    def _start_nsd(self) -> None:
        if not os.path.exists(NSD):
            raise RuntimeError(f"{NSD} not found: install Debian package nsd")
        assert self._tmp is not None
        self._check_zones()
        log_path = os.path.join(self._tmp.name, "nsd.log")
        failures = []
        for _ in range(3):  # another process may grab the port we picked
            port = _free_port(self.host)
            conf = self._write_config(port)
            with open(log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    [NSD, "-d", "-c", conf],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            try:
                self._wait_ready(self.host, port, udp=True)
            except RuntimeError as exc:
                failures.append(str(exc))
                self._proc.kill()
                self._proc.wait()
                self._proc = None
                continue
            self.backend_port = port
            return
        raise RuntimeError("NSD did not start:\n" + "\n---\n".join(failures))

    def _wait_ready(self, host: str, port: int, *, udp: bool) -> None:
        wait_answering(host, port, self.probe_zone, udp=udp, proc=self._proc, name="nsd",
                       log=self._nsd_log)

    def _nsd_log(self) -> str:
        if self._tmp is None:
            return ""
        try:
            with open(os.path.join(self._tmp.name, "nsd.log"), encoding="utf-8",
                      errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    """One NSD + relay for the whole test session."""
    with DnsServer() as server:
        yield server


@pytest.fixture
def dns_counts(dns_server: DnsServer) -> DnsServer:
    """The session DNS server with its query counts reset for this test."""
    dns_server.reset_counts()
    return dns_server
