"""The MTA side of the milter protocol (version 6), for tests and benchmarks.

``MilterClient`` talks to any milter the way Sendmail or Postfix would:
it negotiates, then honours what the milter asked for -- a stage negotiated
away (``SMFIP_NO*``) is not sent, a stage negotiated without reply
(``SMFIP_NR_*``) is sent without waiting -- and it sends each stage's macros
in front of the command.  Every call returns a ``Response``::

    with MilterClient("unix:/run/spfmilter/sock") as client:
        client.connect("mail.example.com", "192.0.2.1", 25000)
        client.helo("mail.example.com")
        if client.mail("alice@example.com").continues:
            ...

Each command goes out in one ``sendall`` together with its macro packet and
replies are read through a buffer, so the client is cheap enough to be a
benchmark's load generator.  Only the standard library and
``libmilter_ext.protocol`` are used; the C module is not needed.
"""
from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from . import protocol as P

__all__ = [
    "MilterClient",
    "MilterError",
    "Modification",
    "Response",
    "parse_socket_spec",
    "session",
]

Macros = Mapping[str, str]

_LEN = struct.Struct("!I")
_U32X3 = struct.Struct("!III")
_PORT = struct.Struct("!H")
_MIN_VERSION = 2
_RECV_SIZE = 65536

# Replies that end a stage, by wire code.
_VERDICTS = {
    P.SMFIR_CONTINUE: "continue",
    P.SMFIR_ACCEPT: "accept",
    P.SMFIR_REJECT: "reject",
    P.SMFIR_TEMPFAIL: "tempfail",
    P.SMFIR_DISCARD: "discard",
    P.SMFIR_REPLYCODE: "replycode",
    P.SMFIR_SKIP: "skip",
    P.SMFIR_SHUTDOWN: "shutdown",
    P.SMFIR_CONN_FAIL: "connfail",
}
_CONTINUING = frozenset({"continue", "noreply", "skipped"})
_XCODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?= |$)")


class MilterError(Exception):
    """The milter broke the protocol, timed out, or could not be reached."""


@dataclass(frozen=True)
class Modification:
    """One change a milter asked for at end of message.

    ``kind`` is ``addheader``, ``insheader``, ``chgheader``, ``addrcpt``,
    ``addrcpt_par``, ``delrcpt``, ``chgfrom``, ``replbody`` or ``quarantine``.
    Strings are decoded as UTF-8 with ``surrogateescape`` so 8-bit bytes
    survive (``value_bytes`` gives them back); ``data`` is the raw packet
    payload (for ``replbody``: the body chunk).
    """

    kind: str
    name: str | None = None
    value: str | None = None
    index: int | None = None
    address: str | None = None
    args: str | None = None
    data: bytes = b""

    @property
    def value_bytes(self) -> bytes | None:
        """``value`` as the bytes the milter sent."""
        return None if self.value is None else _enc(self.value)


@dataclass
class Response:
    """A milter's answer to one stage.

    ``action`` is the verdict: ``continue``, ``accept``, ``reject``,
    ``tempfail``, ``discard``, ``replycode`` (an SMTP reply in ``code``,
    ``xcode``, ``text``), ``skip`` (send no more body: the MTA goes on with end
    of message; it does not ``continue``), ``shutdown`` (421) or ``connfail`` -- or,
    with nothing read, ``noreply`` (stage negotiated without reply) and
    ``skipped`` (stage negotiated away or nothing to send).  ``lines`` are the
    reply's text lines without the code prefixes; ``text`` joins them with
    ``"\\n"``.  End of message also fills ``modifications`` and ``progress``
    (the number of SMFIR_PROGRESS packets).  ``packets`` are the (command,
    data) packets of the reply as they came, the verdict last: the exact
    command stream the MTA saw (left out of ``==`` and ``repr``).
    """

    action: str
    stage: str = ""
    code: int | None = None
    xcode: str | None = None
    text: str | None = None
    lines: list[str] = field(default_factory=list)
    modifications: list[Modification] = field(default_factory=list)
    progress: int = 0
    packets: list[tuple[bytes, bytes]] = field(default_factory=list, compare=False, repr=False)

    @property
    def continues(self) -> bool:
        """True when an MTA would go on with the transaction (not for ``skip``)."""
        return self.action in _CONTINUING

    @property
    def replaced_body(self) -> bytes | None:
        """The new body if the milter replaced it, else None."""
        chunks = [m.data for m in self.modifications if m.kind == "replbody"]
        return b"".join(chunks) if chunks else None

    def added_headers(self) -> list[tuple[str, str]]:
        """(name, value) of every addheader/insheader modification, in order."""
        return [
            (m.name or "", m.value or "")
            for m in self.modifications
            if m.kind in ("addheader", "insheader")
        ]


def parse_socket_spec(spec: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """Split a libmilter socket spec into an address family and address.

    Accepts ``unix:/path``, ``local:/path``, a bare ``/path``,
    ``inet:PORT@HOST`` and ``inet6:PORT@HOST`` (HOST defaults to loopback).
    """
    kind, sep, rest = spec.partition(":")
    if not sep:
        kind, rest = "unix", spec
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest:
            raise ValueError(f"{spec!r}: empty socket path")
        return socket.AF_UNIX, rest
    if kind in ("inet", "inet6"):
        port_text, _, host = rest.partition("@")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{spec!r}: expected {kind}:PORT@HOST with a port 1-65535")
        family = socket.AF_INET if kind == "inet" else socket.AF_INET6
        host = host.strip("[]") or ("127.0.0.1" if kind == "inet" else "::1")
        return family, (host, int(port_text))
    raise ValueError(f"{spec!r}: unknown socket type {kind!r} (unix, local, inet, inet6)")


def _enc(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(text: str | bytes, what: str) -> bytes:
    raw = _enc(text)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte: {text!r}")
    return raw + b"\0"


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    if len(data) > P.MILTER_MAX_DATA_SIZE:
        raise ValueError(
            f"{cmd!r} packet data is {len(data)} bytes, "
            f"more than the milter limit of {P.MILTER_MAX_DATA_SIZE}"
        )
    return _LEN.pack(len(data) + 1) + cmd + data


def _macro_packet(cmd: bytes, macros: Macros | None) -> bytes:
    if not macros:
        return b""
    parts = [cmd]
    for name, value in macros.items():
        if len(name) > 1 and not name.startswith("{"):
            name = "{" + name + "}"
        parts.append(_cstr(name, "macro name"))
        parts.append(_cstr(value, f"macro {name}"))
    return _packet(P.SMFIC_MACRO, b"".join(parts))


def _strings(data: bytes) -> list[bytes]:
    """The NUL-terminated strings of a packet payload."""
    items = data.split(b"\0")
    if items and items[-1] == b"":
        items.pop()
    return items


def _parse_reply_text(response: Response, data: bytes) -> None:
    raw = _dec(data.rstrip(b"\0"))
    lines = raw.split("\r\n")
    first = lines[0]
    if len(first) < 3 or not first[:3].isdigit():
        raise MilterError(f"malformed SMFIR_REPLYCODE text {raw!r}")
    response.code = int(first[:3])
    match = _XCODE.match(first[4:])
    response.xcode = match.group(0) if match else None
    text_lines = []
    for line in lines:
        rest = line[4:]
        if response.xcode and rest.startswith(response.xcode):
            rest = rest[len(response.xcode) + 1:]
        text_lines.append(rest)
    response.lines = text_lines
    response.text = "\n".join(text_lines)


def _mod_header(kind: str, data: bytes, indexed: bool) -> Modification:
    index = None
    payload = data
    if indexed:
        if len(data) < P.MILTER_LEN_BYTES:
            raise MilterError(f"{kind} reply too short: {data!r}")
        (index,) = _LEN.unpack_from(data)
        payload = data[P.MILTER_LEN_BYTES:]
    items = _strings(payload)
    if len(items) != 2:
        raise MilterError(f"malformed {kind} reply: {data!r}")
    return Modification(kind, name=_dec(items[0]), value=_dec(items[1]), index=index, data=data)


def _mod_address(kind: str, data: bytes) -> Modification:
    items = _strings(data)
    if not 1 <= len(items) <= 2:
        raise MilterError(f"malformed {kind} reply: {data!r}")
    args = _dec(items[1]) if len(items) == 2 else None
    return Modification(kind, address=_dec(items[0]), args=args, data=data)


def _parse_modification(cmd: bytes, data: bytes) -> Modification:
    if cmd == P.SMFIR_ADDHEADER:
        return _mod_header("addheader", data, indexed=False)
    if cmd == P.SMFIR_INSHEADER:
        return _mod_header("insheader", data, indexed=True)
    if cmd == P.SMFIR_CHGHEADER:
        return _mod_header("chgheader", data, indexed=True)
    if cmd == P.SMFIR_ADDRCPT:
        return _mod_address("addrcpt", data)
    if cmd == P.SMFIR_ADDRCPT_PAR:
        return _mod_address("addrcpt_par", data)
    if cmd == P.SMFIR_DELRCPT:
        return _mod_address("delrcpt", data)
    if cmd == P.SMFIR_CHGFROM:
        return _mod_address("chgfrom", data)
    if cmd == P.SMFIR_REPLBODY:
        return Modification("replbody", data=data)
    if cmd == P.SMFIR_QUARANTINE:
        return Modification("quarantine", value=_dec(data.rstrip(b"\0")), data=data)
    raise MilterError(f"unknown reply code {cmd!r} at end of message")


def _angle(address: str) -> str:
    return address if address.startswith("<") else f"<{address}>"


class MilterClient:
    """One MTA-to-milter connection speaking protocol version 6.

    ``actions`` and ``protocol`` are what this "MTA" offers in option
    negotiation (by default everything; 0 means the version 1 defaults
    ``SMFI_V1_ACTS``/``SMFI_V1_PROT``, as libmilter reads it).  After ``open()``, ``version``,
    ``actions`` and ``protocol`` hold what the milter asked for and
    ``macro_requests`` maps a macro stage (``protocol.SMFIM_*``) to the macro
    names the milter requested with ``smfi_setsymlist``.

    Call the stages in SMTP order (connect, helo, mail, rcpt, data, header,
    eoh, body, eom): libmilter ignores a command out of sequence without
    replying, which shows up here as a timeout.  ``abort()`` ends a
    transaction early; ``mail()`` may follow ``eom()`` or ``abort()``.
    """

    def __init__(
        self,
        socket_spec: str,
        *,
        timeout: float = 10.0,
        actions: int = P.SMFI_CURR_ACTS,
        protocol: int = P.SMFI_CURR_PROT,
    ) -> None:
        self.socket_spec = socket_spec
        self.timeout = timeout
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.version = 0
        self.actions = 0
        self.protocol = 0
        self.macro_requests: dict[int, list[str]] = {}
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def __repr__(self) -> str:
        state = "open" if self._sock is not None else "closed"
        return f"<MilterClient {self.socket_spec} {state}>"

    def __enter__(self) -> MilterClient:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connection -------------------------------------------------------

    def open(self) -> None:
        """Connect to the milter and negotiate options (SMFIC_OPTNEG)."""
        if self._sock is not None:
            raise MilterError(f"{self.socket_spec}: already open")
        family, address = parse_socket_spec(self.socket_spec)
        try:
            if family == socket.AF_UNIX:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(address)
                except OSError:
                    sock.close()
                    raise
            else:
                assert isinstance(address, tuple)
                sock = self._connect_inet(family, address)
        except OSError as exc:
            raise MilterError(
                f"cannot connect to milter at {self.socket_spec}: {_oserror_text(exc)}"
            ) from exc
        self._sock = sock
        self._buf.clear()
        try:
            self._negotiate()
        except BaseException:
            self._drop()
            raise

    def _connect_inet(
        self, family: socket.AddressFamily, address: tuple[str, int]
    ) -> socket.socket:
        infos = socket.getaddrinfo(address[0], address[1], family, socket.SOCK_STREAM)
        last: OSError | None = None
        for fam, kind, proto, _, sockaddr in infos:
            sock = socket.socket(fam, kind, proto)
            sock.settimeout(self.timeout)
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last or OSError(f"no address for {address[0]}")

    def _negotiate(self) -> None:
        offer = _U32X3.pack(P.SMFI_PROT_VERSION, self.offered_actions, self.offered_protocol)
        self._sendall(_packet(P.SMFIC_OPTNEG, offer), "option negotiation")
        cmd, data = self._read_packet("option negotiation")
        if cmd != P.SMFIC_OPTNEG:
            raise MilterError(
                f"{self.socket_spec}: expected an SMFIC_OPTNEG reply, got {cmd!r}"
            )
        if len(data) < P.MILTER_OPTLEN:
            raise MilterError(f"{self.socket_spec}: option negotiation reply too short")
        version, actions, protocol = _U32X3.unpack_from(data)
        if not _MIN_VERSION <= version <= P.SMFI_PROT_VERSION:
            raise MilterError(f"{self.socket_spec}: milter speaks protocol version {version}")
        # libmilter reads an offer of 0 as the version 1 defaults (engine.c).
        offered_actions = self.offered_actions or P.SMFI_V1_ACTS
        offered_protocol = self.offered_protocol or P.SMFI_V1_PROT
        if actions & ~offered_actions:
            extra = P.flag_names(actions & ~offered_actions, "SMFIF_")
            raise MilterError(f"{self.socket_spec}: milter wants actions not offered: {extra}")
        wanted = protocol & ~P.SMFI_INTERNAL
        if wanted & ~offered_protocol:
            extra = P.flag_names(wanted & ~offered_protocol, "SMFIP_")
            raise MilterError(
                f"{self.socket_spec}: milter wants protocol flags not offered: {extra}"
            )
        self.version, self.actions, self.protocol = version, actions, protocol
        self.macro_requests = _parse_symlists(data[P.MILTER_OPTLEN:], self.socket_spec)

    def close(self) -> None:
        """Send SMFIC_QUIT and close the connection; safe to call twice."""
        if self._sock is None:
            return
        try:
            self._sock.sendall(_packet(P.SMFIC_QUIT))
        except OSError:
            pass
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    # -- SMTP stages --------------------------------------------------------

    def connect(
        self,
        hostname: str,
        address: str | None = None,
        port: int = 0,
        family: str = "4",
        macros: Macros | None = None,
    ) -> Response:
        """Send the SMTP client's connection (family ``4``, ``6``, ``L`` or ``U``)."""
        data = _cstr(hostname, "hostname")
        if family == "U":
            data += P.SMFIA_UNKNOWN
        elif family in ("4", "6", "L"):
            if address is None:
                raise ValueError(f"family {family!r} needs an address")
            data += family.encode() + _PORT.pack(port) + _cstr(address, "address")
        else:
            raise ValueError(f"unknown address family {family!r} (4, 6, L, U)")
        return self._stage(
            "connect", P.SMFIC_CONNECT, data, macros, P.SMFIP_NOCONNECT, P.SMFIP_NR_CONN
        )

    def helo(self, name: str, macros: Macros | None = None) -> Response:
        """Send HELO/EHLO."""
        return self._stage(
            "helo", P.SMFIC_HELO, _cstr(name, "HELO name"), macros, P.SMFIP_NOHELO,
            P.SMFIP_NR_HELO,
        )

    def mail(self, sender: str, *args: str, macros: Macros | None = None) -> Response:
        """Send MAIL FROM; ``sender`` with or without <>, ``args`` ESMTP parameters."""
        data = b"".join(_cstr(a, "MAIL argument") for a in (_angle(sender), *args))
        return self._stage("mail", P.SMFIC_MAIL, data, macros, P.SMFIP_NOMAIL, P.SMFIP_NR_MAIL)

    def rcpt(self, rcpt: str, *args: str, macros: Macros | None = None) -> Response:
        """Send RCPT TO; ``rcpt`` with or without <>, ``args`` ESMTP parameters."""
        data = b"".join(_cstr(a, "RCPT argument") for a in (_angle(rcpt), *args))
        return self._stage("rcpt", P.SMFIC_RCPT, data, macros, P.SMFIP_NORCPT, P.SMFIP_NR_RCPT)

    def data(self, macros: Macros | None = None) -> Response:
        """Send DATA."""
        return self._stage("data", P.SMFIC_DATA, b"", macros, P.SMFIP_NODATA, P.SMFIP_NR_DATA)

    def header(self, name: str, value: str | bytes, macros: Macros | None = None) -> Response:
        """Send one header field; ``bytes`` values go out unchanged (8-bit headers).

        ``value`` is what follows the colon.  Unless the milter negotiated
        SMFIP_HDR_LEADSPC, one leading space is dropped, as Sendmail does
        (other blanks, a tab say, stay).
        """
        raw = _enc(value)
        if not self.protocol & P.SMFIP_HDR_LEADSPC and raw.startswith(b" "):
            raw = raw[1:]
        data = _cstr(name, "header name") + _cstr(raw, f"header {name}")
        return self._stage("header", P.SMFIC_HEADER, data, macros, P.SMFIP_NOHDRS, P.SMFIP_NR_HDR)

    def eoh(self, macros: Macros | None = None) -> Response:
        """Send end of headers."""
        return self._stage("eoh", P.SMFIC_EOH, b"", macros, P.SMFIP_NOEOH, P.SMFIP_NR_EOH)

    def body(self, chunk: bytes, macros: Macros | None = None) -> Response:
        """Send body bytes in chunks of at most 65535 bytes.

        Stops at the first reply that is not ``continue`` (``skip`` included:
        the milter wants no more body; ``eom()`` comes next) and returns it.
        An empty ``chunk`` sends nothing (``skipped``).
        """
        if self.protocol & P.SMFIP_NOBODY or not chunk:
            self._send_macros(P.SMFIC_BODY, macros)
            return Response("skipped", "body")
        size = P.MILTER_CHUNK_SIZE
        view = memoryview(chunk)
        packets = [
            _packet(P.SMFIC_BODY, bytes(view[i:i + size])) for i in range(0, len(view), size)
        ]
        packets[0] = _macro_packet(P.SMFIC_BODY, macros) + packets[0]
        if self.protocol & P.SMFIP_NR_BODY:
            self._sendall(b"".join(packets), "body")
            return Response("noreply", "body")
        response = Response("continue", "body")
        for packet in packets:
            self._sendall(packet, "body")
            response = self._read_reply("body")
            if response.action != "continue":
                break
        return response

    def eom(self, macros: Macros | None = None) -> Response:
        """Send end of message; collects modifications until the final verdict."""
        self.send_eom(macros)
        return self._read_reply("eom", modifications=True)

    def send_eom(self, macros: Macros | None = None) -> None:
        """Send end of message without waiting for the reply (see ``hang_up``)."""
        self._sendall(_macro_packet(P.SMFIC_BODYEOB, macros) + _packet(P.SMFIC_BODYEOB), "eom")

    def read_packet(self) -> tuple[bytes, bytes]:
        """One packet the milter sent, as (command, data): to follow a reply as it comes."""
        return self._read_packet("read_packet")

    def hang_up(self) -> None:
        """Close the connection at once, without SMFIC_QUIT: an MTA that gave up."""
        self._drop()

    def stray(self) -> bytes:
        """Bytes the milter sent that no reply took up, read without waiting.

        Replies arrive in order, so after a command's reply anything sent before
        it is already here: a non-empty result means the milter answered a stage
        it should not have (a no-reply stage, an abort) or answered twice.
        """
        sock = self._sock
        if sock is None:
            raise MilterError(f"{self.socket_spec}: connection is not open (stray)")
        extra = bytes(self._buf)
        self._buf.clear()
        sock.setblocking(False)
        try:
            while True:
                try:
                    chunk = sock.recv(_RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    return extra
                except OSError as exc:
                    self._drop()
                    raise MilterError(
                        f"{self.socket_spec}: reading stray replies failed: "
                        f"{_oserror_text(exc)}"
                    ) from exc
                if not chunk:
                    return extra
                extra += chunk
        finally:
            if self._sock is not None:
                sock.settimeout(self.timeout)

    def abort(self) -> None:
        """Abort the current message (SMFIC_ABORT; the milter does not reply)."""
        self._sendall(_packet(P.SMFIC_ABORT), "abort")

    def quit_nc(self) -> None:
        """End the SMTP connection but keep the milter connection (SMFIC_QUIT_NC).

        The next command must be ``connect()``: a new SMTP session over the
        same milter connection, as an MTA that reuses milter connections does.
        libmilter takes it only after an ``eom()`` answered ``continue`` or
        after ``unknown()``; anywhere else it ignores QUIT_NC and the CONNECT
        that follows, which then times out here.  (Neither Sendmail 8.18 nor
        Postfix sends QUIT_NC.)
        """
        self._sendall(_packet(P.SMFIC_QUIT_NC), "quit_nc")

    def unknown(self, command: str, macros: Macros | None = None) -> Response:
        """Send an SMTP command the MTA does not know."""
        return self._stage(
            "unknown", P.SMFIC_UNKNOWN, _cstr(command, "command"), macros,
            P.SMFIP_NOUNKNOWN, P.SMFIP_NR_UNKN,
        )

    def message(
        self,
        headers: Iterable[tuple[str, str | bytes]],
        body: bytes = b"",
        macros: Macros | None = None,
    ) -> Response:
        """Send headers, end of headers, body and end of message (``macros`` go with eom).

        Returns the first verdict that does not continue, else the eom response;
        a ``skip`` of the body goes on to end of message, as an MTA does.
        """
        for name, value in headers:
            response = self.header(name, value)
            if not response.continues:
                return response
        response = self.eoh()
        if not response.continues:
            return response
        response = self.body(body)
        if not response.continues and response.action != "skip":
            return response
        return self.eom(macros)

    # -- wire ---------------------------------------------------------------

    def _stage(
        self, stage: str, cmd: bytes, data: bytes, macros: Macros | None,
        skip_bit: int, noreply_bit: int,
    ) -> Response:
        # Macros go out even for a skipped stage, as Sendmail does: the milter
        # may read them at a later stage.
        if self.protocol & skip_bit:
            self._send_macros(cmd, macros)
            return Response("skipped", stage)
        self._sendall(_macro_packet(cmd, macros) + _packet(cmd, data), stage)
        if self.protocol & noreply_bit:
            return Response("noreply", stage)
        return self._read_reply(stage)

    def _send_macros(self, cmd: bytes, macros: Macros | None) -> None:
        if macros:
            self._sendall(_macro_packet(cmd, macros), "macros")

    def _sendall(self, payload: bytes, stage: str) -> None:
        sock = self._sock
        if sock is None:
            raise MilterError(f"{self.socket_spec}: connection is not open ({stage})")
        try:
            sock.sendall(payload)
        except OSError as exc:
            self._drop()
            raise MilterError(
                f"{self.socket_spec}: sending {stage} failed: {_oserror_text(exc)}"
            ) from exc

    def _fill(self, stage: str) -> None:
        sock = self._sock
        if sock is None:
            raise MilterError(f"{self.socket_spec}: connection is not open ({stage})")
        try:
            chunk = sock.recv(_RECV_SIZE)
        except socket.timeout as exc:
            self._drop()
            raise MilterError(
                f"{self.socket_spec}: timed out after {self.timeout:g}s waiting for "
                f"the reply to {stage}"
            ) from exc
        except OSError as exc:
            self._drop()
            raise MilterError(
                f"{self.socket_spec}: reading the reply to {stage} failed: {_oserror_text(exc)}"
            ) from exc
        if not chunk:
            self._drop()
            raise MilterError(
                f"{self.socket_spec}: milter closed the connection instead of replying to {stage}"
            )
        self._buf += chunk

    def _read_packet(self, stage: str) -> tuple[bytes, bytes]:
        buf = self._buf
        while len(buf) < 4:
            self._fill(stage)
        (size,) = _LEN.unpack_from(buf)
        if not 1 <= size <= P.MILTER_MAX_DATA_SIZE + 1:
            self._drop()
            raise MilterError(f"{self.socket_spec}: bad packet length {size} in reply to {stage}")
        end = 4 + size
        while len(buf) < end:
            self._fill(stage)
        cmd = bytes(buf[4:5])
        data = bytes(buf[5:end])
        del buf[:end]
        return cmd, data

    def _read_reply(self, stage: str, modifications: bool = False) -> Response:
        mods: list[Modification] = []
        packets: list[tuple[bytes, bytes]] = []
        progress = 0
        while True:
            cmd, data = self._read_packet(stage)
            packets.append((cmd, data))
            action = _VERDICTS.get(cmd)
            if action is not None:
                response = Response(action, stage, modifications=mods, progress=progress,
                                    packets=packets)
                if cmd == P.SMFIR_REPLYCODE:
                    _parse_reply_text(response, data)
                return response
            if not modifications:
                raise MilterError(f"{self.socket_spec}: unexpected reply {cmd!r} to {stage}")
            if cmd == P.SMFIR_PROGRESS:
                progress += 1
            else:
                mods.append(_parse_modification(cmd, data))


def _parse_symlists(data: bytes, spec: str) -> dict[int, list[str]]:
    requests: dict[int, list[str]] = {}
    pos = 0
    while pos < len(data):
        if pos + P.MILTER_LEN_BYTES > len(data):
            raise MilterError(f"{spec}: truncated macro list in option negotiation")
        (stage,) = _LEN.unpack_from(data, pos)
        pos += P.MILTER_LEN_BYTES
        end = data.find(b"\0", pos)
        if end < 0:
            raise MilterError(f"{spec}: unterminated macro list in option negotiation")
        requests[stage] = _dec(data[pos:end]).replace(",", " ").split()
        pos = end + 1
    return requests


def _oserror_text(exc: OSError) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return exc.strerror or str(exc)


def session(
    socket_spec: str,
    *,
    ip: str,
    helo: str,
    sender: str,
    rcpts: Sequence[str] = ("postmaster@localhost",),
    headers: Iterable[tuple[str, str | bytes]] = (),
    body: bytes = b"",
    macros: Mapping[str, Macros] | None = None,
    hostname: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Response]:
    """Play one SMTP session against a milter and quit.

    Runs connect, helo, mail, each rcpt, data and the message (headers,
    eoh, body, eom), stopping at the first verdict that does not continue.
    ``macros`` maps a stage name (``connect``, ``helo``, ``mail``, ``rcpt``,
    ``data``, ``eom``) to that stage's macros.  ``hostname`` defaults to
    the bracketed address an MTA uses without a PTR name.  The result maps
    stage names to responses (``rcpt:ADDRESS`` per recipient; the message
    phase under the stage that answered last), in order; its last entry is
    the verdict that ended the session.
    """
    stage_macros = macros or {}
    family = "6" if ":" in ip else "4"
    if hostname is None:
        hostname = f"[IPv6:{ip}]" if family == "6" else f"[{ip}]"
    results: dict[str, Response] = {}
    with MilterClient(socket_spec, timeout=timeout) as client:
        steps = [
            ("connect", lambda: client.connect(
                hostname, ip, 0, family, stage_macros.get("connect"))),
            ("helo", lambda: client.helo(helo, stage_macros.get("helo"))),
            ("mail", lambda: client.mail(sender, macros=stage_macros.get("mail"))),
        ]
        steps += [
            (f"rcpt:{r}", lambda r=r: client.rcpt(r, macros=stage_macros.get("rcpt")))
            for r in rcpts
        ]
        steps.append(("data", lambda: client.data(stage_macros.get("data"))))
        for key, step in steps:
            response = step()
            results[key] = response
            if not response.continues:
                return results
        response = client.message(headers, body, stage_macros.get("eom"))
        results[response.stage] = response
    return results
