"""libmilter_ext.testing.MilterClient against the real C milter (bench/noop_milter.c).

The canned mode of the C milter (``-c``) answers fixed senders with fixed
verdicts and reports what it received in headers it adds at end of message,
so these tests check both directions of the wire: what the client sends and
how it parses real libmilter replies.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from libmilter_ext import protocol as P
from libmilter_ext.testing import (
    MilterClient,
    MilterError,
    Modification,
    Response,
    parse_socket_spec,
    session,
)
from tests.cmilter import build_noop_milter, running_c_milter, start_c_milter, stop_c_milters
from tests.procs import PYTHON, ROOT, Daemon

CHUNK = P.MILTER_CHUNK_SIZE
# What the negotiating milter asks for: two stages away, several without reply,
# and header values with their leading space.
NEGOTIATED = (
    P.SMFIP_NOHELO | P.SMFIP_NOUNKNOWN | P.SMFIP_NR_MAIL | P.SMFIP_NR_RCPT
    | P.SMFIP_NR_HDR | P.SMFIP_NR_BODY | P.SMFIP_HDR_LEADSPC
)
CANNED_ACTIONS = P.SMFI_CURR_ACTS & ~P.SMFIF_SETSYMLIST


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    # Short path: unix socket addresses are limited to about 100 bytes.
    path = Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_noop_milter(tmp_path_factory.mktemp("cmilter"))


@pytest.fixture(scope="module")
def milters(sockdir: Path, binary: Path) -> Iterator[dict[str, str]]:
    """Socket specs of C milters shared by this module, started together."""
    specs = {
        "noop": f"unix:{sockdir}/noop.sock",
        "unix": f"unix:{sockdir}/canned.sock",
        "inet": f"inet:{free_port('127.0.0.1')}@127.0.0.1",
        "inet6": f"inet6:{free_port('::1')}@::1",
        "negotiating": f"unix:{sockdir}/neg.sock",
    }
    args = {
        "noop": [],
        "unix": ["-c"],
        "inet": ["-c"],
        "inet6": ["-c"],
        "negotiating": [
            "-c", "-p", hex(NEGOTIATED), "-m", "2={auth_authen} {mail_addr}", "-m", "5=i",
        ],
    }
    procs = []
    try:
        for name, spec in specs.items():
            procs.append(start_c_milter(spec, *args[name], binary=binary))
        yield specs
    finally:
        codes = stop_c_milters(procs)
    assert codes == [0] * len(specs)


@pytest.fixture(params=["unix", "inet", "inet6"])
def canned(request: pytest.FixtureRequest, milters: dict[str, str]) -> str:
    """A canned-mode C milter over each socket type."""
    return milters[request.param]


def begin(client: MilterClient, sender: str = "alice@example.com") -> None:
    """Open a transaction up to and including DATA, checking each step continues."""
    for response in (
        client.connect("mx.example.net", "192.0.2.1", 2525),
        client.helo("mx.example.net"),
        client.mail(sender),
        client.rcpt("bob@example.org"),
        client.data(),
    ):
        assert response.continues, response


def added(response: Response) -> dict[str, str]:
    """The headers the canned milter added, by name."""
    return dict(response.added_headers())


# -- protocol constants ------------------------------------------------------


def header_defines(path: str, prefix: str) -> dict[str, int | bytes]:
    values: dict[str, int | bytes] = {}
    pattern = re.compile(rf"^#\s*define\s+({prefix}\w+)\s+(0x[0-9A-Fa-f]+L?|'.'|\d+)(?=\s|$)", re.M)
    for name, raw in pattern.findall(Path(path).read_text()):
        if raw.startswith("'"):
            values[name] = raw[1].encode()
        else:
            values[name] = int(raw.rstrip("L"), 0)
    return values


def test_protocol_constants_match_installed_headers() -> None:
    wanted = {
        **header_defines("/usr/include/libmilter/mfdef.h", "SMFI[CRPA]_"),
        **header_defines("/usr/include/libmilter/mfapi.h", "SMFI[FM]_"),
    }
    # Internal to libmilter, not part of the wire protocol.
    for internal in ("SMFIP_TEST", "SMFIM_FIRST", "SMFIM_LAST"):
        del wanted[internal]
    assert {"SMFIC_OPTNEG", "SMFIR_REPLYCODE", "SMFIP_NR_BODY", "SMFIM_EOH"} <= set(wanted)
    ours = {name: getattr(P, name, None) for name in wanted}
    assert ours == wanted
    assert P.SMFIP_NOHREPL == P.SMFIP_NR_HDR
    assert P.SMFI_CURR_PROT == 0x1FFFFF


def test_flag_names() -> None:
    assert P.flag_names(P.SMFIP_NOHELO | P.SMFIP_NR_MAIL, "SMFIP_") == [
        "SMFIP_NOHELO", "SMFIP_NR_MAIL",
    ]
    assert P.flag_names(P.SMFIF_ADDHDRS | 0x4000, "SMFIF_") == ["SMFIF_ADDHDRS", "0x4000"]


# -- socket specs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("unix:/run/m.sock", (socket.AF_UNIX, "/run/m.sock")),
        ("local:/run/m.sock", (socket.AF_UNIX, "/run/m.sock")),
        ("/run/m.sock", (socket.AF_UNIX, "/run/m.sock")),
        ("inet:8891@10.0.0.1", (socket.AF_INET, ("10.0.0.1", 8891))),
        ("inet:8891", (socket.AF_INET, ("127.0.0.1", 8891))),
        ("inet6:8891@[::1]", (socket.AF_INET6, ("::1", 8891))),
        ("inet6:8891", (socket.AF_INET6, ("::1", 8891))),
    ],
)
def test_parse_socket_spec(spec: str, expected: tuple[object, object]) -> None:
    assert parse_socket_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [("inet:x@host", "PORT@HOST"), ("inet:0@host", "PORT@HOST"), ("tcp:1@h", "unknown socket"),
     ("unix:", "empty socket path")],
)
def test_parse_socket_spec_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_socket_spec(spec)


# -- negotiation ---------------------------------------------------------------


def test_negotiation_of_a_plain_milter(milters: dict[str, str]) -> None:
    with MilterClient(milters["noop"]) as client:
        # Every callback registered, no xxfi_negotiate: nothing to skip, no actions.
        assert (client.version, client.actions, client.protocol) == (6, 0, 0)
        assert client.macro_requests == {}


def test_negotiation_of_a_milter_with_actions(canned: str) -> None:
    with MilterClient(canned) as client:
        assert (client.version, client.actions, client.protocol) == (6, CANNED_ACTIONS, 0)


def test_negotiated_flags_and_macro_requests(milters: dict[str, str]) -> None:
    with MilterClient(milters["negotiating"]) as client:
        assert client.protocol == NEGOTIATED
        assert client.actions == CANNED_ACTIONS | P.SMFIF_SETSYMLIST
        assert client.macro_requests == {
            P.SMFIM_ENVFROM: ["{auth_authen}", "{mail_addr}"],
            P.SMFIM_EOM: ["i"],
        }


def test_milter_refuses_an_mta_without_the_actions_it_needs(canned: str) -> None:
    client = MilterClient(canned, actions=P.SMFIF_ADDHDRS)
    with pytest.raises(MilterError, match="closed the connection"):
        client.open()


# -- sessions --------------------------------------------------------------------


def test_full_session_on_the_noop_milter(milters: dict[str, str]) -> None:
    with MilterClient(milters["noop"]) as client:
        assert client.connect("h", "192.0.2.1").action == "continue"
        assert client.unknown("XFOO").action == "continue"
        assert client.helo("h").action == "continue"
        assert client.mail("a@example.com", "SIZE=10", "BODY=8BITMIME").action == "continue"
        assert client.rcpt("b@example.org", "NOTIFY=NEVER").action == "continue"
        assert client.data().action == "continue"
        final = client.message([("Subject", "hi"), ("From", "a@example.com")], b"body\r\n")
        assert final == Response("continue", "eom")


def test_full_session_reports_connection_and_counts(canned: str) -> None:
    with MilterClient(canned) as client:
        begin(client)
        final = client.message([("Subject", "hi"), ("To", "b@example.org")], b"hello\r\n")
    assert final.action == "continue"
    assert added(final)["X-Noop-Connect"] == "mx.example.net 4 192.0.2.1 2525"
    assert added(final)["X-Noop-Helo"] == "mx.example.net"
    assert added(final)["X-Noop-Counts"] == "headers=2 chunks=1 bytes=7"


@pytest.mark.parametrize(
    ("args", "reported"),
    [
        (("2001:db8::7", 587, "6"), "host.test 6 2001:db8::7 587"),
        (("/run/smtp.sock", 0, "L"), "host.test L /run/smtp.sock 0"),
        ((None, 0, "U"), "host.test U  0"),
    ],
)
def test_connect_families(
    milters: dict[str, str], args: tuple[str | None, int, str], reported: str
) -> None:
    with MilterClient(milters["inet6"]) as client:
        address, port, family = args
        assert client.connect("host.test", address, port, family).action == "continue"
        client.helo("host.test")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        final = client.message([], b"")
    assert added(final)["X-Noop-Connect"] == reported


def test_canned_modifications_are_parsed(canned: str) -> None:
    with MilterClient(canned) as client:
        begin(client)
        final = client.message([("Subject", "hi")], b"x")
    kinds = [m.kind for m in final.modifications]
    assert kinds == ["addheader"] * 5 + [
        "insheader", "chgheader", "addrcpt", "addrcpt_par", "delrcpt", "chgfrom",
        "replbody", "quarantine",
    ]
    mods = final.modifications[5:]
    assert mods[0] == Modification(
        "insheader", name="X-Noop-First", value="inserted", index=1,
        data=b"\0\0\0\x01X-Noop-First\0inserted\0",
    )
    assert (mods[1].name, mods[1].index, mods[1].value) == ("Subject", 1, "changed subject")
    assert (mods[2].address, mods[2].args) == ("<added@example.org>", None)
    assert (mods[3].address, mods[3].args) == ("<par@example.org>", "NOTIFY=NEVER")
    assert mods[4].address == "<gone@example.org>"
    assert (mods[5].address, mods[5].args) == ("<new@example.org>", "SIZE=100")
    assert final.replaced_body == b"replaced body\r\n"
    assert mods[7].value == "held for review"
    assert final.progress == 1
    assert (final.action, final.stage, final.code) == ("continue", "eom", None)


def test_multiline_reply(canned: str) -> None:
    with MilterClient(canned) as client:
        client.connect("h", "192.0.2.1")
        response = client.mail("reject@example.com")
    assert (response.action, response.stage) == ("replycode", "mail")
    assert (response.code, response.xcode) == (550, "5.7.1")
    assert response.lines == ["first line", "second line", "third line"]
    assert response.text == "first line\nsecond line\nthird line"
    assert not response.continues


def test_single_line_reply(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        client.connect("h", "192.0.2.1")
        response = client.mail("<tempfail@example.com>")
    assert (response.action, response.code, response.xcode) == ("replycode", 451, "4.7.1")
    assert response.lines == ["try again later"]


def test_plain_verdicts(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        client.connect("h", "192.0.2.1")
        assert client.mail("accept@example.com").action == "accept"
        assert client.mail("discard@example.com").action == "discard"
        assert client.mail("a@example.com").action == "continue"
        rejected = client.rcpt("reject@example.org")
        assert (rejected.action, rejected.code, rejected.text) == ("reject", None, None)
        # A rejected recipient does not end the transaction.
        assert client.rcpt("ok@example.org").action == "continue"
        assert client.unknown("REJECTME please").action == "reject"
        assert client.unknown("NOOP").action == "continue"


def test_reject_at_end_of_message(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client, sender="eomreject@example.com")
        final = client.message([("Subject", "x")], b"body")
    assert (final.stage, final.action) == ("eom", "replycode")
    assert (final.code, final.xcode) == (550, "5.7.0")
    assert final.text == "rejected at end of message"
    assert final.modifications == []


# -- what the client sends -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "raw"),
    [
        (b"caf\xe9 \xff", b"caf\xe9 \xff"),
        ("caf\udce9", b"caf\xe9"),
        ("café", "café".encode()),
        # Sendmail drops exactly one leading space, nothing else (milter.c, milter_headers)
        ("  padded", b" padded"),
        (" one", b"one"),
        ("\ttab", b"\ttab"),
        (" \tmixed", b"\tmixed"),
    ],
)
def test_header_bytes_reach_the_milter(
    milters: dict[str, str], value: str | bytes, raw: bytes
) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client)
        final = client.message([("X-Echo", value)])
    echo = [m for m in final.modifications if m.name == "X-Noop-Echo"]
    assert [m.value_bytes for m in echo] == [raw]


def test_header_with_nul_is_refused(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client)
        with pytest.raises(ValueError, match="NUL"):
            client.header("X-Bad", "a\0b")


@pytest.mark.parametrize(
    ("size", "chunks"), [(0, 0), (1, 1), (CHUNK, 1), (CHUNK + 1, 2), (2 * CHUNK + 10, 3)]
)
def test_body_is_split_into_chunks(milters: dict[str, str], size: int, chunks: int) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client)
        client.eoh()
        response = client.body(b"b" * size)
        assert response.action == ("skipped" if size == 0 else "continue")
        final = client.eom()
    assert added(final)["X-Noop-Counts"] == f"headers=0 chunks={chunks} bytes={size}"


def test_body_skip_stops_sending_body(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client, sender="skip@example.com")
        client.eoh()
        response = client.body(b"s" * (3 * CHUNK))
        assert (response.action, response.continues) == ("skip", False)
        final = client.eom()
    assert added(final)["X-Noop-Counts"] == f"headers=0 chunks=1 bytes={CHUNK}"


def test_message_goes_on_to_eom_after_a_body_skip(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client, sender="skip@example.com")
        final = client.message([("Subject", "s")], b"s" * (2 * CHUNK))
    assert (final.stage, final.action) == ("eom", "continue")
    assert added(final)["X-Noop-Counts"] == f"headers=1 chunks=1 bytes={CHUNK}"


def test_macros_are_sent_before_their_command(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        client.connect("h", "192.0.2.1")
        client.mail("a@example.com", "AUTH=<>", macros={"auth_authen": "alice"})
        client.rcpt("b@example.org")
        final = client.message([], b"", macros={"i": "4Q1D"})
    assert added(final)["X-Noop-Macro-auth"] == "alice"
    assert added(final)["X-Noop-Macro-i"] == "4Q1D"


def test_abort_then_second_transaction(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client)
        client.header("Subject", "first")
        client.header("X-Echo", "first message")
        client.abort()
        assert client.mail("c@example.com").action == "continue"
        assert client.rcpt("d@example.org").action == "continue"
        final = client.message([("Subject", "second")], b"two")
    assert added(final)["X-Noop-Counts"] == "headers=1 chunks=1 bytes=3"
    assert "X-Noop-Echo" not in added(final)


def test_quit_nc_starts_a_new_smtp_session_on_the_same_connection(
    milters: dict[str, str],
) -> None:
    with MilterClient(milters["unix"]) as client:
        begin(client)
        assert client.message([], b"one").action == "continue"
        client.quit_nc()
        client.connect("second.example", "198.51.100.9", 40000)
        client.helo("second.example")
        client.mail("e@example.com")
        client.rcpt("f@example.org")
        final = client.message([], b"two")
    assert added(final)["X-Noop-Connect"] == "second.example 4 198.51.100.9 40000"


def test_negotiated_stages_are_skipped_or_not_awaited(milters: dict[str, str]) -> None:
    with MilterClient(milters["negotiating"]) as client:
        assert client.connect("h.example", "192.0.2.3", 25).action == "continue"
        assert client.helo("h.example") == Response("skipped", "helo")
        assert client.mail("a@example.com").action == "noreply"
        assert client.rcpt("b@example.org").action == "noreply"
        assert client.unknown("XFOO").action == "skipped"
        assert client.data().action == "continue"
        assert client.header("X-Echo", " lead").action == "noreply"
        assert client.eoh().action == "continue"
        assert client.body(b"z" * (CHUNK + 5)).action == "noreply"
        final = client.eom(macros={"i": "QID"})
    # Had the milter answered a no-reply stage, eom would have read that stray
    # "continue" instead of the modifications.
    assert final.action == "continue"
    assert added(final)["X-Noop-Helo"] == ""
    assert added(final)["X-Noop-Counts"] == f"headers=1 chunks=2 bytes={CHUNK + 5}"
    assert added(final)["X-Noop-Echo"] == " lead"  # SMFIP_HDR_LEADSPC keeps the space
    assert added(final)["X-Noop-Macro-i"] == "QID"


def test_message_stops_at_the_first_verdict(milters: dict[str, str]) -> None:
    with MilterClient(milters["unix"]) as client:
        client.connect("h", "192.0.2.1")
        response = client.mail("reject@example.com")
        assert response.action == "replycode"
        # A new transaction after the rejection still works.
        assert client.mail("a@example.com").action == "continue"


def test_session_helper_plays_a_whole_session(milters: dict[str, str]) -> None:
    results = session(
        milters["inet6"], ip="2001:db8::5", helo="client.example", sender="a@example.com",
        rcpts=["b@example.org", "c@example.org"], headers=[("Subject", "s")], body=b"hi",
        macros={"eom": {"i": "S1"}},
    )
    assert list(results) == [
        "connect", "helo", "mail", "rcpt:b@example.org", "rcpt:c@example.org", "data", "eom",
    ]
    final = results["eom"]
    assert added(final)["X-Noop-Connect"] == "[IPv6:2001:db8::5] 6 2001:db8::5 0"
    assert added(final)["X-Noop-Macro-i"] == "S1"


def test_session_helper_stops_at_a_rejection(milters: dict[str, str]) -> None:
    results = session(milters["unix"], ip="192.0.2.8", helo="h", sender="reject@example.com")
    assert list(results) == ["connect", "helo", "mail"]
    assert results["mail"].code == 550


# -- errors ---------------------------------------------------------------------


def test_dead_unix_socket(sockdir: Path) -> None:
    spec = f"unix:{sockdir}/nobody-listens.sock"
    with pytest.raises(MilterError, match=rf"cannot connect to milter at {spec}: No such file"):
        MilterClient(spec).open()


def test_dead_inet_port() -> None:
    spec = f"inet:{free_port('127.0.0.1')}@127.0.0.1"
    with pytest.raises(MilterError, match=r"cannot connect to milter at inet:\d+@127.0.0.1: "
                       "Connection refused"):
        MilterClient(spec).open()


def test_calls_on_a_closed_client_fail_clearly(milters: dict[str, str]) -> None:
    client = MilterClient(milters["unix"])
    with pytest.raises(MilterError, match="not open"):
        client.helo("h")
    client.open()
    client.close()
    client.close()
    with pytest.raises(MilterError, match="not open"):
        client.mail("a@example.com")


def test_timeout_waiting_for_negotiation(sockdir: Path) -> None:
    path = sockdir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(path))
        silent.listen(1)  # never accepts, never answers
        started = time.monotonic()
        with pytest.raises(MilterError, match="timed out after 0.3s waiting for the reply to "
                           "option negotiation"):
            MilterClient(f"unix:{path}", timeout=0.3).open()
        assert time.monotonic() - started < 3


def test_timeout_in_a_stage(milters: dict[str, str]) -> None:
    client = MilterClient(milters["unix"], timeout=0.3)
    client.open()
    client.connect("h", "192.0.2.1")
    with pytest.raises(MilterError, match="timed out after 0.3s waiting for the reply to mail"):
        client.mail("sleep@example.com")  # the canned milter sleeps 2 s
    with pytest.raises(MilterError, match="not open"):
        client.rcpt("b@example.org")


# -- protocol errors, from a scripted fake milter ------------------------------------


def read_packet(conn: socket.socket) -> tuple[bytes, bytes]:
    head = conn.recv(4, socket.MSG_WAITALL)
    (size,) = struct.unpack("!I", head)
    body = conn.recv(size, socket.MSG_WAITALL) if size else b""
    return body[:1], body[1:]


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def optneg(actions: int = 0, protocol: int = 0, extra: bytes = b"") -> bytes:
    return packet(P.SMFIC_OPTNEG, struct.pack("!III", 6, actions, protocol) + extra)


@contextmanager
def fake_milter(sockdir: Path, script: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-connection milter on a unix socket that runs ``script``."""
    path = sockdir / f"fake-{threading.get_ident()}-{time.monotonic_ns()}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(5)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                script(conn)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"unix:{path}"
    finally:
        thread.join(10)
        server.close()
    assert errors == []


def test_fake_milter_replies_are_parsed(sockdir: Path) -> None:
    seen: list[tuple[bytes, bytes]] = []

    def script(conn: socket.socket) -> None:
        seen.append(read_packet(conn))
        conn.sendall(optneg(P.SMFIF_ADDHDRS, P.SMFIP_NR_CONN, b"\0\0\0\x01{x} {y}\0"))
        seen.append(read_packet(conn))  # the connect macro packet
        seen.append(read_packet(conn))  # connect, sent without waiting
        seen.append(read_packet(conn))  # helo
        conn.sendall(packet(P.SMFIR_REPLYCODE, b"550 no enhanced code here\0"))
        seen.append(read_packet(conn))  # mail
        conn.sendall(packet(P.SMFIR_SHUTDOWN))
        seen.append(read_packet(conn))  # quit

    with fake_milter(sockdir, script) as spec, MilterClient(spec) as client:
        assert client.macro_requests == {P.SMFIM_HELO: ["{x}", "{y}"]}
        assert client.connect("h", "192.0.2.1", 25, macros={"j": "mta"}).action == "noreply"
        helo = client.helo("h")
        assert (helo.code, helo.xcode, helo.text) == (550, None, "no enhanced code here")
        assert client.mail("<>").action == "shutdown"
    assert seen == [
        (P.SMFIC_OPTNEG, struct.pack("!III", 6, P.SMFI_CURR_ACTS, P.SMFI_CURR_PROT)),
        (P.SMFIC_MACRO, b"Cj\0mta\0"),
        (P.SMFIC_CONNECT, b"h\x004\x00\x19192.0.2.1\0"),
        (P.SMFIC_HELO, b"h\0"),
        (P.SMFIC_MAIL, b"<>\0"),
        (P.SMFIC_QUIT, b""),
    ]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (optneg(P.SMFIF_ADDHDRS | 0x8000), "actions not offered"),
        (optneg(0, 0x00400000), "protocol flags not offered"),
        (packet(P.SMFIR_CONTINUE), "expected an SMFIC_OPTNEG reply"),
        (packet(P.SMFIC_OPTNEG, b"\0\0\0\x06"), "reply too short"),
        (struct.pack("!I", 0), "bad packet length 0"),
    ],
)
def test_bad_negotiation_replies(sockdir: Path, reply: bytes, message: str) -> None:
    def script(conn: socket.socket) -> None:
        read_packet(conn)
        conn.sendall(reply)
        conn.recv(100)  # until the client hangs up

    with fake_milter(sockdir, script) as spec:
        client = MilterClient(spec, actions=P.SMFI_V2_ACTS, protocol=P.SMFI_V2_PROT)
        with pytest.raises(MilterError, match=message):
            client.open()


def test_modification_outside_end_of_message_is_an_error(sockdir: Path) -> None:
    def script(conn: socket.socket) -> None:
        read_packet(conn)
        conn.sendall(optneg())
        read_packet(conn)
        conn.sendall(packet(P.SMFIR_ADDHEADER, b"X\0y\0"))
        conn.recv(100)

    with fake_milter(sockdir, script) as spec, MilterClient(spec) as client:
        with pytest.raises(MilterError, match=r"unexpected reply b'h' to connect"):
            client.connect("h", "192.0.2.1")


# -- stopping ---------------------------------------------------------------------


def test_c_milter_stops_cleanly_on_sigterm(sockdir: Path, binary: Path) -> None:
    spec = f"unix:{sockdir}/term.sock"
    with running_c_milter(spec, binary=binary) as proc:
        with MilterClient(spec) as client:
            begin(client)
            assert client.message([], b"x").action == "continue"
        assert proc.poll() is None
    assert proc.returncode == 0


# -- as Sendmail does, against Python milters on the extension ------------------------

MILTERS = Path(__file__).parent / "milters"


@contextmanager
def python_milter(sockdir: Path, script: str, *args: str) -> Iterator[str]:
    """A tests/milters script serving on a fresh unix socket (a real process)."""
    work = Path(tempfile.mkdtemp(prefix="pm-", dir=sockdir))
    spec = f"unix:{work}/m.sock"
    with Daemon([PYTHON, str(MILTERS / script), spec, *args], spec, work):
        yield spec


def test_offer_of_zero_means_the_version_1_defaults(sockdir: Path) -> None:
    # libmilter reads actions=0/protocol=0 in OPTNEG as SMFI_V1_ACTS/SMFI_V1_PROT
    # (engine.c, st_optionneg); the kitchen milter then asks for the V1 actions.
    with python_milter(sockdir, "kitchen.py") as spec:
        with MilterClient(spec, actions=0, protocol=0) as client:
            assert client.actions == P.SMFI_V1_ACTS
            assert client.protocol & ~P.SMFI_V1_PROT == 0
            begin(client)
            final = client.message([("X-Do", "addheader")], b"x")
    assert ("X-Added", "appended") in final.added_headers()


@pytest.mark.parametrize(
    ("mode", "sent", "raw_lines"),
    [
        # SMFIP_HDR_LEADSPC: the value is what followed the colon, written back as is.
        ("leadspc", [("Subject", " hello"), ("X-Tab", "\ttabbed"), ("X-Tight", "tight")],
         [b"Subject: hello", b"X-Tab:\ttabbed", b"X-Tight:tight"]),
        # Without it the MTA drops one space and the milter puts one back.
        ("plain", [("Subject", " hello"), ("X-Two", "  two")],
         [b"Subject: hello", b"X-Two:  two"]),
    ],
)
def test_message_milter_spools_headers_as_sent(
    sockdir: Path, mode: str, sent: list[tuple[str, str]], raw_lines: list[bytes]
) -> None:
    with python_milter(sockdir, "leadspc_message.py", mode) as spec:
        with MilterClient(spec) as client:
            assert bool(client.protocol & P.SMFIP_HDR_LEADSPC) == (mode == "leadspc")
            begin(client)
            final = client.message(sent, b"body\r\n")
    got = added(final)
    assert [bytes.fromhex(got[f"X-Raw-{i}"]) for i in range(len(raw_lines))] == raw_lines
    assert f"X-Raw-{len(raw_lines)}" not in got
    assert got["X-Subject"] == "hello"


# -- without the compiled module ------------------------------------------------------

DRIVE = """
import json, sys
from libmilter_ext.testing import session
result = session(sys.argv[1], ip="192.0.2.1", helo="h.example", sender="a@example.com",
                 headers=[("X-Echo", " pure")], body=b"x")
last = list(result.values())[-1]
print(json.dumps([last.action, dict(last.added_headers())]))
"""


def _drive_without_c(argv: list[str], spec: str, env: dict[str, str]) -> tuple[str, dict]:
    out = subprocess.run([*argv, "-c", DRIVE, spec], capture_output=True, text=True,
                         timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stderr
    action, headers = json.loads(out.stdout)
    return action, headers


def test_testing_works_from_the_pure_python_files_alone(
    sockdir: Path, milters: dict[str, str], tmp_path: Path
) -> None:
    # What pip installs on a machine without libmilter: the .py files, no _milter.
    package = tmp_path / "libmilter_ext"
    package.mkdir()
    for source in (ROOT / "libmilter_ext").glob("*.py"):
        shutil.copy(source, package)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)}
    action, headers = _drive_without_c([PYTHON, "-S"], milters["unix"], env)
    assert action == "continue"
    assert headers["X-Noop-Echo"] == "pure"
    assert headers["X-Noop-Connect"] == "[192.0.2.1] 4 192.0.2.1 0"


BLOCKED = """
import importlib.abc, sys
class NoC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "libmilter_ext._milter":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoC())
"""


def test_testing_imports_with_the_c_module_blocked(sockdir: Path) -> None:
    script = BLOCKED + DRIVE + """
import libmilter_ext as lm
assert lm._milter.__name__ == "libmilter_ext._unbuilt", lm._milter
try:
    lm.run(lm.Milter, "unix:/nonexistent/x.sock", "x")
except ImportError as exc:
    print(exc, file=sys.stderr)
else:
    raise SystemExit("run() served without the C module")
"""
    with python_milter(sockdir, "kitchen.py") as spec:
        out = subprocess.run([PYTHON, "-c", script, spec], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             check=False)
    assert out.returncode == 0, out.stderr
    action, headers = json.loads(out.stdout)
    assert action == "continue" and headers == {}
    assert "libmilter_ext.register needs the compiled module libmilter_ext._milter" in out.stderr
