"""libmilter_ext end to end: real milter processes driven over their sockets."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import libmilter_ext as lm
from libmilter_ext import protocol as P
from libmilter_ext.testing import MilterClient, MilterError, session
from tests.procs import PYTHON, ROOT, Daemon, free_port, sigwaiting_threads, wait_until

MILTERS = Path(__file__).parent / "milters"


def _kitchen(workdir: Path, spec: str) -> Daemon:
    return Daemon([PYTHON, str(MILTERS / "kitchen.py"), spec], spec, workdir)


@pytest.fixture(scope="module")
def kitchen(shortdir):
    work = shortdir / "k"
    work.mkdir()
    with _kitchen(work, f"unix:{shortdir}/k.sock") as d:
        yield d


def _open(spec: str) -> MilterClient:
    return MilterClient(spec, timeout=10)


def _txn(c: MilterClient, sender: str = "<a@example.org>"):
    """MAIL, RCPT and DATA, as every MTA sends them before a message."""
    resp = c.mail(sender)
    assert c.rcpt("<rcpt@example.org>").continues
    assert c.data().continues
    return resp


def _headers(resp) -> dict[str, str]:
    return dict(resp.added_headers())


def _full(client: MilterClient, sender: str, do: str, *, headers=(), body=b"hello\r\n",
          ip="192.0.2.7", family="4", unknown=None):
    assert client.connect("client.example", ip, 4321, family, {"j": "mx.test"}).continues
    assert client.helo("helo.example").continues
    if unknown:
        assert client.unknown(unknown).continues
    assert client.mail(sender, "SIZE=10", macros={"i": "QID42", "{auth_authen}": "bob"}).continues
    assert client.rcpt("<gone@example.org>").continues
    assert client.data().continues
    return client.message([("X-Do", do), *headers], body, {"i": "QID42"})


def test_every_callback_sees_its_arguments(kitchen):
    with _open(kitchen.spec) as c:
        resp = _full(c, "<alice@example.org>", "seen", unknown="XYZZY arg")
    assert resp.action == "continue"
    seen = [v for k, v in resp.added_headers() if k.startswith("X-Seen-")]
    assert seen[0] == "connect client.example 2 ('192.0.2.7', 4321) j=mx.test"
    assert "unknown XYZZY arg" in seen
    assert "helo helo.example" in seen
    assert "mail <alice@example.org> SIZE=10 i=QID42 auth=bob" in seen
    assert "rcpt <gone@example.org> " in seen
    assert "data" in seen and "eoh" in seen
    assert seen[-1] == "eom i=QID42"
    assert _headers(resp)["X-Body-Length"] == str(len(b"hello\r\n"))


def test_macros_requested_per_stage(kitchen):
    with _open(kitchen.spec) as c:
        assert c.macro_requests[P.SMFIM_CONNECT] == ["j"]
        assert c.macro_requests[P.SMFIM_ENVFROM] == ["i", "{auth_authen}"]
        assert c.macro_requests[P.SMFIM_EOM] == ["i"]


@pytest.mark.parametrize("family,ip,expected", [
    ("6", "2001:db8::25", "connect h 10 ('2001:db8::25', 25, 0, 0)"),
    ("L", "/run/some.sock", "connect h 1 '/run/some.sock'"),
    ("U", None, "connect h 0 None"),
])
def test_host_address_shapes(kitchen, family, ip, expected):
    with _open(kitchen.spec) as c:
        assert c.connect("h", ip, 25, family, {"j": "mx"}).continues
        assert _txn(c, "<a@b.example>").continues
        resp = c.message([("X-Do", "seen")], b"")
    assert _headers(resp)["X-Seen-0"] == expected + " j=mx"


def test_every_action_reaches_the_mta(kitchen):
    do = ("addheader,insheader,chgheader,delheader,addrcpt,addrcpt_par,delrcpt,chgfrom,"
          "chgfrom_args,replacebody,quarantine,progress")
    with _open(kitchen.spec) as c:
        resp = _full(c, "<a@example.org>", do, headers=[("Subject", "hi"),
                                                        ("X-Delete-Me", "x")])
    kinds = [(m.kind, m.name, m.value, m.index, m.address, m.args) for m in resp.modifications]
    assert ("addheader", "X-Added", "appended", None, None, None) in kinds
    assert ("insheader", "X-Inserted", "at top", 0, None, None) in kinds
    assert ("chgheader", "Subject", "changed subject", 1, None, None) in kinds
    assert ("chgheader", "X-Delete-Me", "", 1, None, None) in kinds
    assert ("addrcpt", None, None, None, "<added@example.org>", None) in kinds
    assert ("addrcpt_par", None, None, None, "<added2@example.org>", "NOTIFY=NEVER") in kinds
    assert ("delrcpt", None, None, None, "<gone@example.org>", None) in kinds
    assert ("chgfrom", None, None, None, "<new@example.org>", None) in kinds
    assert ("chgfrom", None, None, None, "<new2@example.org>", "SIZE=1000") in kinds
    assert ("quarantine", None, "looks odd", None, None, None) in kinds
    assert resp.replaced_body == b"HELLO\r\n"
    assert resp.progress == 1


def test_actions_outside_eom_raise_a_clear_error(kitchen):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        resp = c.mail("<stage@example.org>")
    assert resp.action == "replycode" and resp.code == 550
    assert "StageError" in resp.text and "addheader is not allowed in envfrom" in resp.text


def test_multiline_reply_is_made_safe(kitchen):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        resp = c.mail("<reject@example.org>")
    assert (resp.action, resp.code, resp.xcode) == ("replycode", 550, "5.7.1")
    assert resp.lines[0] == "100%% rejected"  # on the wire; the MTA shows it as "100%"
    assert resp.lines[1] == "second line"
    assert all(len(line) <= 400 for line in resp.lines)
    assert "".join(resp.lines[2:]) == "x" * 700


@pytest.mark.parametrize("local,action", [
    ("rejectplain", "reject"), ("discard", "discard"), ("accept", "accept"),
])
def test_plain_verdicts(kitchen, local, action):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        assert c.mail(f"<{local}@example.org>").action == action


@pytest.mark.parametrize("local,code,xcode,text", [
    ("rejectnotext", 550, "5.7.1", ""),
    ("rejectnoxcode", 553, None, "only text"),
])
def test_setreply_with_or_without_text(kitchen, local, code, xcode, text):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        resp = c.mail(f"<{local}@example.org>")
    assert (resp.action, resp.code, resp.xcode, resp.text or "") == ("replycode", code, xcode,
                                                                     text)


def test_crlf_in_reply_text_becomes_two_lines(kitchen):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        resp = c.mail("<tempfail@example.org>")
    assert (resp.code, resp.xcode, resp.lines) == (451, "4.7.1", ["try again", "later"])


def test_exception_gives_failsafe_and_is_logged(kitchen):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        assert c.mail("<raise@example.org>").action == "tempfail"
        # the same connection keeps working
        assert c.mail("<ok@example.org>").continues
    err = kitchen.stderr()
    assert "exception in envfrom callback: envfrom exploded" in err
    assert "Traceback (most recent call last)" in err


def test_bad_return_value_is_a_failsafe_too(kitchen):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        assert c.mail("<badverdict@example.org>").action == "tempfail"
    assert "returned 'nonsense', not a verdict" in kitchen.stderr()


def test_exception_in_noreply_stage_is_answered_later(kitchen):
    with _open(kitchen.spec) as c:
        assert c.protocol & P.SMFIP_NR_HDR
        c.connect("h", "192.0.2.1", 1)
        _txn(c)
        assert c.header("X-Raise", "1").action == "noreply"
        resp = c.eoh()  # the next stage that answers carries the fail-safe
    assert resp.action == "tempfail"
    assert "exception in header callback: header exploded" in kitchen.stderr()


def test_8bit_header_round_trips_byte_identical(kitchen):
    raw = b"caf\xe9 \xff\xfe na\xc3\xafve"
    with _open(kitchen.spec) as c:
        resp = _full(c, "<a@example.org>", "echo", headers=[("X-8bit", raw)])
    echo = [m for m in resp.modifications if m.name == "X-Echo"]
    assert len(echo) == 1 and echo[0].value_bytes == raw


def test_rset_aborts_and_second_transaction_works(kitchen):
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        c.mail("<one@example.org>")
        c.abort()
        _txn(c, "<two@example.org>")
        resp = c.message([("X-Do", "seen")], b"")
    h = _headers(resp)
    assert h["X-Aborts"] == "1"
    assert any(v.startswith("mail <two@example.org>") for v in h.values())


def test_negotiation_skips_stages_not_overridden(shortdir):
    work = shortdir / "m"
    work.mkdir()
    spec = f"unix:{shortdir}/m.sock"
    with Daemon([PYTHON, str(MILTERS / "minimal.py"), spec], spec, work):
        with _open(spec) as c:
            for flag in (P.SMFIP_NOCONNECT, P.SMFIP_NOHELO, P.SMFIP_NORCPT, P.SMFIP_NOBODY,
                         P.SMFIP_NOHDRS, P.SMFIP_NOEOH, P.SMFIP_NOUNKNOWN, P.SMFIP_NODATA):
                assert c.protocol & flag, hex(flag)
            assert not c.protocol & P.SMFIP_NOMAIL
            assert c.connect("h", "192.0.2.1", 1).action == "skipped"
            assert c.helo("x").action == "skipped"
            assert c.mail("<reject@x.example>").action == "reject"


@pytest.mark.parametrize("kind", ["inet", "inet6"])
def test_tcp_sockets(shortdir, kind):
    host = "127.0.0.1" if kind == "inet" else "::1"
    port = free_port(socket.AF_INET if kind == "inet" else socket.AF_INET6, host)
    spec = f"{kind}:{port}@{host}"
    work = shortdir / kind
    work.mkdir()
    with _kitchen(work, spec):
        result = session(spec, ip="198.51.100.9", helo="h.example", sender="<accept@x.example>")
    assert list(result)[-1] == "mail" and result["mail"].action == "accept"


def test_100_concurrent_connections(kitchen):
    results: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            r = session(kitchen.spec, ip=f"192.0.2.{i % 250 + 1}", helo=f"h{i}.example",
                        sender="<slow@example.org>", headers=[("X-Do", "stats")], timeout=60)
            results.append(list(r.values())[-1].action)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert results == ["continue"] * 100
    with _open(kitchen.spec) as c:
        c.connect("h", "192.0.2.1", 1)
        _txn(c)
        peak = int(_headers(c.message([("X-Do", "stats")], b""))["X-Peak"])
    assert peak >= 10, "callbacks of different connections did not overlap"


def test_no_leak_over_thousands_of_connections(shortdir):
    work = shortdir / "leak"
    work.mkdir()
    spec = f"unix:{shortdir}/leak.sock"
    with _kitchen(work, spec) as d:
        def burst(n: int) -> None:
            for i in range(n):
                r = session(spec, ip="192.0.2.1", helo="h.example", sender="<a@example.org>",
                            headers=[("X-8bit", b"caf\xe9"), ("Subject", f"m{i}")],
                            body=b"x" * 2000)
                assert list(r.values())[-1].action == "continue"
        burst(1000)
        before = d.rss_kib()
        burst(4000)
        after = d.rss_kib()
        with _open(spec) as c:
            c.connect("h", "192.0.2.1", 1)
            _txn(c)
            live = int(_headers(c.message([("X-Do", "stats")], b""))["X-Live"])
    assert live <= 1, f"{live} handler objects still alive after their connections closed"
    assert after - before < 2048, f"RSS grew {after - before} KiB over 4000 connections"


def test_sighup_does_not_stop_and_sigterm_stops_cleanly(shortdir):
    work = shortdir / "sig"
    work.mkdir()
    spec = f"unix:{shortdir}/sig.sock"
    d = _kitchen(work, spec).start()
    try:
        for n in range(1, 4):  # the first as soon as the socket accepts
            d.proc.send_signal(signal.SIGHUP)
            # one at a time: a SIGHUP sent while another is pending merges with it
            wait_until(lambda n=n: d.stdout().count("hup") == n)
            r = session(spec, ip="192.0.2.1", helo="h", sender="<accept@x.example>")
            assert r["mail"].action == "accept"
        # libmilter's signal thread (started before the first session) never sigwaits
        assert sigwaiting_threads(d.proc.pid) == []
    finally:
        code = d.stop(signal.SIGTERM)
    assert code == 0
    assert d.stdout().count("hup") == 3
    assert "stopped" in d.stdout()
    with pytest.raises(MilterError):
        session(spec, ip="192.0.2.1", helo="h", sender="<a@x.example>", timeout=2)


def test_miltertest_drives_the_extension(kitchen, shortdir):
    script = shortdir / "t.lua"
    script.write_text(f"""
conn = mt.connect("{kitchen.spec}", 40, 0.25)
if conn == nil then error("cannot connect") end
if mt.conninfo(conn, "client.example", "192.0.2.8") ~= nil then error("conninfo") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("conninfo reply") end
if mt.helo(conn, "helo.example") ~= nil then error("helo") end
if mt.mailfrom(conn, "<a@example.org>") ~= nil then error("mail") end
if mt.rcptto(conn, "<bad@example.org>") ~= nil then error("rcpt") end
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error("rcpt should be rejected") end
if mt.rcptto(conn, "<good@example.org>") ~= nil then error("rcpt2") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("rcpt2 reply") end
if mt.data(conn) ~= nil then error("data") end
if mt.header(conn, "X-Do", "insheader,addheader") ~= nil then error("header") end
if mt.eoh(conn) ~= nil then error("eoh") end
if mt.bodystring(conn, "hello\\r\\n") ~= nil then error("body") end
if mt.eom(conn) ~= nil then error("eom") end
if not mt.eom_check(conn, MT_HDRINSERT, "X-Inserted", "at top") then error("insheader") end
if not mt.eom_check(conn, MT_HDRADD, "X-Added", "appended") then error("addheader") end
if mt.getreply(conn) ~= SMFIR_CONTINUE then error("eom reply") end
mt.disconnect(conn)
print("miltertest-ok")
""")
    out = subprocess.run(["miltertest", "-s", str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "miltertest-ok" in out.stdout


def test_python_layer_reply_sanitiser():
    assert lm.reply_lines(("a%b", None, "c\r\nd\x00e")) == ["a%%b", "c", "d e"]
    assert lm.reply_lines(()) == []
    long = lm.reply_lines(("word " * 300,))
    assert len(long) > 1 and all(len(x) <= 400 for x in long)
    assert len(lm.reply_lines(["x\n"] * 100)) == 32


def test_version_and_constants_agree_with_wire_protocol():
    assert lm.version()[0] >= 1
    for name in ("SMFIP_NOCONNECT", "SMFIP_NR_HDR", "SMFIP_NR_BODY", "SMFIF_CHGFROM",
                 "SMFIF_SETSYMLIST", "SMFIM_EOH"):
        assert getattr(lm, name) == getattr(P, name), name


def test_example_sample_milter(shortdir):
    work = shortdir / "sample"
    work.mkdir()
    spec = f"unix:{shortdir}/sample.sock"
    with Daemon([PYTHON, str(ROOT / "examples" / "sample.py"), "--socket", spec], spec,
                work) as d:
        ok = session(spec, ip="192.0.2.1", helo="h", sender="<a@example.org>",
                     headers=[("Subject", "hello")])
        spam = session(spec, ip="192.0.2.1", helo="h", sender="<a@example.org>",
                       headers=[("Subject", "cheap VIAGRA")])
    assert list(ok.values())[-1].action == "accept"
    assert ("X-Sample-Milter", "seen") in list(ok.values())[-1].added_headers()
    last = list(spam.values())[-1]
    assert (last.action, last.code, last.text) == ("replycode", 550, "We don't want that here.")
    assert "connect from" in d.stdout() and "header Subject: cheap VIAGRA" in d.stdout()


def test_message_milter_sees_the_whole_mime_message(shortdir):
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "caf\u00e9 report"
    msg["X-Shout"] = "yes"
    msg.set_content("hello there\n" + "filler line\n" * 300)
    msg.add_attachment(b"\x00\x01" * 5000, maintype="application", subtype="octet-stream",
                       filename="data.bin")
    raw = msg.as_bytes()
    head, body = raw.split(b"\n\n", 1)
    headers = []
    for line in head.decode().split("\n"):
        if line[:1] in (" ", "\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + "\r\n" + line)
        else:
            name, value = line.split(":", 1)
            headers.append((name, value.strip()))
    work = shortdir / "whole"
    work.mkdir()
    spec = f"unix:{shortdir}/whole.sock"
    with Daemon([PYTHON, str(MILTERS / "whole_message.py"), spec], spec, work):
        result = session(spec, ip="192.0.2.1", helo="h", sender="<a@example.org>",
                         headers=headers, body=body.replace(b"\n", b"\r\n"))
    last = list(result.values())[-1]
    h = dict(last.added_headers())
    assert h["X-Parts"] == "2"
    assert h["X-Subject"] == "caf\u00e9 report"
    assert h["X-Attachments"] == "data.bin"
    assert last.replaced_body.startswith(b"HELLO THERE\nFILLER LINE\n")


def test_daemon_settings_calls():
    old = lm.setmaxdatasize(1024 * 1024)
    assert old in (65535, 262143, 1048575, 1024 * 1024)
    assert lm.setmaxdatasize(old) == 1024 * 1024
    lm.setbacklog(32)
    lm.setdbg(0)
    lm.settimeout(600)
    with pytest.raises(ValueError):
        lm.settimeout(-1)
    with pytest.raises(lm.MilterError):
        lm._milter.setconn("nonsense:spec")
        lm._milter.opensocket(False)


def test_header_names_filter_in_c(shortdir):
    work = shortdir / "filt"
    work.mkdir()
    spec = f"unix:{shortdir}/filt.sock"
    headers = [("Received", "x"), ("SUBJECT", "a"), ("X-Other", "b"), ("X-Wanted", "c"),
               ("subject", "d")]
    with Daemon([PYTHON, str(MILTERS / "filtered.py"), spec], spec, work):
        ok = session(spec, ip="192.0.2.1", helo="h", sender="<a@example.org>",
                     headers=headers)
        boom = session(spec, ip="192.0.2.1", helo="h", sender="<a@example.org>",
                       headers=[("X-Wanted", "raise"), ("X-Other", "skipped in C")])
    assert dict(list(ok.values())[-1].added_headers())["X-Seen"] == "SUBJECT,X-Wanted,subject"
    # a fail-safe verdict pending from a wanted header is not lost by the filter
    assert list(boom.values())[-1].action == "tempfail"
