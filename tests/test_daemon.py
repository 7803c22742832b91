"""spfmilter end to end: the real daemon, the real DNS server, the milter protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import authres
import pytest

from libmilter_ext.testing import MilterClient, MilterError, session
from spfmilter.headers import unfold
from tests.procs import PYTHON, ROOT, Daemon, wait_until

AUTHSERV = "mx.test.example"
AR = "Authentication-Results"

# The replies spfmilter gives, named once.
FAIL = (550, "5.7.23")
PERMERROR = (550, "5.7.24")
TEMPERROR = (451, "4.7.24")


def write_config(path: Path, workdir: Path, dns, extra: str = "", policy: str = "") -> None:
    path.write_text(f"""\
[milter]
socket = unix:{workdir}/spf.sock
user =
group =
pidfile = {workdir}/spf.pid
log_target = stderr
log_level = info
timeout = 30

[spf]
authserv_id = {AUTHSERV}
nameservers = {dns.nameservers[0]}
lookup_timeout = 2

[policy]
internal_hosts = 127.0.0.1/32
trusted_relays = 127.0.0.9/32
forwarders = fwd.example
{policy}

[headers]
received_spf = yes

[domain:softfail-strict.spf.test]
mailfrom_softfail = reject
{extra}
""")


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="spfd", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def daemon(workdir, dns_server):
    cfg = workdir / "spfmilter.cfg"
    write_config(cfg, workdir, dns_server)
    d = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
               f"unix:{workdir}/spf.sock", workdir)
    d.cfg = cfg
    with d:
        yield d


def run(daemon, ip="127.0.0.2", helo="pass.spf.test", sender="<user@pass.spf.test>",
        headers=(("Subject", "test"),), macros=None):
    """One SMTP session; returns the last (deciding) response."""
    result = session(daemon.spec, ip=ip, helo=helo, sender=sender, headers=headers,
                     body=b"hello\r\n", macros=macros or {"mail": {"i": "QID1"}})
    return list(result.values())[-1]


def ar_of(resp) -> authres.AuthenticationResultsHeader:
    values = [m.value for m in resp.modifications if m.kind == "insheader" and m.name == AR]
    assert len(values) == 1, resp.modifications
    ins = [m for m in resp.modifications if m.kind == "insheader"]
    # each insert at index 0 goes above the previous ones: the last one ends on top
    assert ins[-1].name == AR and ins[-1].index == 0, "AR must be inserted at the top"
    return authres.AuthenticationResultsHeader.parse(f"{AR}: {values[0]}")


def spf_results(resp) -> dict[str, str]:
    """{"helo": result, "mailfrom": result} from the AR header."""
    out = {}
    for r in ar_of(resp).results:
        assert r.method == "spf"
        for p in r.properties:
            out[p.name] = (r.result, p.value)
    return {("helo" if k == "helo" else "mailfrom"): v[0] for k, v in out.items()}


def test_pass_gets_header_at_top(daemon):
    resp = run(daemon)
    assert resp.action == "continue"
    hdr = ar_of(resp)
    assert hdr.authserv_id == AUTHSERV
    assert [(r.result, r.properties[0].name, r.properties[0].value) for r in hdr.results] == [
        ("pass", "helo", "pass.spf.test"), ("pass", "mailfrom", "pass.spf.test")]
    rspf = [m.value for m in resp.modifications if m.name == "Received-SPF"]
    assert len(rspf) == 1 and rspf[0].startswith("pass ")


def test_fail_rejected_with_rfc7372_code_and_explanation(daemon):
    resp = run(daemon, sender="<user@fail.spf.test>")
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", FAIL)
    assert "127.0.0.2 is not allowed to send mail for fail.spf.test" in resp.text
    line = ("qid=QID1 ip=127.0.0.2 helo=pass.spf.test sender=<user@fail.spf.test> "
            "helo_spf=pass mailfrom_spf=fail action=reject")
    _wait_for(lambda: line in daemon.stderr())  # logging goes through a queue


@pytest.mark.parametrize("domain,expected", [
    ("softfail.spf.test", "softfail"), ("neutral.spf.test", "neutral"),
    ("none.spf.test", "none"), ("nxdomain.spf.test", "none"),
    ("permerror.spf.test", "permerror"), ("toomany.spf.test", "permerror"),
    ("void.spf.test", "permerror"), ("twospf.spf.test", "permerror"),
    ("include.spf.test", "fail"), ("ten.spf.test", "pass"), ("cname.spf.test", "pass"),
    ("long.spf.test", "pass"), ("md.spf.test", "fail"),
])
def test_default_policy_accepts_with_header(daemon, domain, expected):
    if expected == "fail":
        resp = run(daemon, ip="127.0.0.5", sender=f"<u@{domain}>")
        expected = "pass"  # include.spf.test passes 127.0.0.5; md passes only 127.0.0.1
        if domain == "md.spf.test":
            assert (resp.action, resp.code) == ("replycode", 550)
            return
    else:
        resp = run(daemon, sender=f"<u@{domain}>")
    assert resp.action == "continue"
    assert spf_results(resp)["mailfrom"] == expected


@pytest.mark.parametrize("domain", ["servfail.test", "inc-servfail.spf.test",
                                    "timeout.spf.test"])
def test_temperror_tempfails(daemon, domain):
    resp = run(daemon, sender=f"<u@{domain}>")
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", TEMPERROR)


def test_ipv6_client(daemon):
    assert spf_results(run(daemon, ip="::1", sender="<u@ip6.spf.test>")) == {
        "helo": "pass", "mailfrom": "pass"}
    resp = run(daemon, ip="::1", sender="<u@mx.spf.test>")
    assert (resp.code, resp.xcode) == FAIL


def test_macros_and_mechanisms(daemon):
    assert spf_results(run(daemon, ip="127.0.0.6", sender="<u@mi.spf.test>"))["mailfrom"] == \
        "pass"
    assert spf_results(run(daemon, sender="<alice@ml.spf.test>"))["mailfrom"] == "pass"
    assert run(daemon, sender="<bob@ml.spf.test>").code == 550
    assert spf_results(run(daemon, ip="127.0.0.3", helo="a.spf.test",
                           sender="<u@a.spf.test>")) == {"helo": "pass", "mailfrom": "pass"}


def test_helo_fail_is_rejected(daemon):
    resp = run(daemon, helo="helo-fail.spf.test", sender="<u@pass.spf.test>")
    assert (resp.code, resp.xcode) == FAIL
    assert "helo" in resp.text.lower()


def test_helo_ip_literal_and_single_label_are_not_checked(daemon):
    for helo in ("[127.0.0.2]", "localhost"):
        results = spf_results(run(daemon, helo=helo))
        assert results == {"mailfrom": "pass"}, helo


def test_null_sender_uses_helo(daemon):
    resp = run(daemon, ip="::1", helo="mail.spf.test", sender="<>")
    assert spf_results(resp) == {"helo": "pass", "mailfrom": "pass"}
    assert "mail.spf.test" in [p.value for r in ar_of(resp).results for p in r.properties]
    resp = run(daemon, ip="127.0.0.2", helo="mail.spf.test", sender="<>")
    assert (resp.code, resp.xcode) == FAIL


@pytest.mark.parametrize("ip,macros,why", [
    ("127.0.0.1", None, "internal host"),
    ("127.0.0.2", {"mail": {"{auth_authen}": "bob"}}, "authenticated"),
    ("127.0.0.9", None, "trusted relay"),
])
def test_skips(daemon, ip, macros, why):
    resp = run(daemon, ip=ip, sender="<u@fail.spf.test>", macros=macros)
    assert resp.action == "continue"
    hdr = ar_of(resp)
    assert [r.method for r in hdr.results] == ["none"] or not hdr.results
    raw = unfold([m.value for m in resp.modifications if m.name == AR][0])
    assert why in raw


def test_forwarder_is_skipped(daemon):
    resp = run(daemon, ip="127.0.0.7", helo="fwd.example", sender="<u@sender.example>")
    assert resp.action == "continue"
    assert "forwarder fwd.example" in unfold(
        [m.value for m in resp.modifications if m.name == AR][0])


def test_domain_override_makes_softfail_reject(daemon):
    assert run(daemon, sender="<u@softfail.spf.test>").action == "continue"
    resp = run(daemon, sender="<u@sub.softfail-strict.spf.test>")
    # no record there at all: none → accepted, the override is for softfail only
    assert resp.action == "continue"


def test_forged_ar_with_our_id_is_deleted_others_kept(daemon):
    headers = [(AR, f"{AUTHSERV}; spf=pass smtp.mailfrom=bank.example"),
               (AR, "other.example; dkim=pass header.d=bank.example"),
               (AR, f" {AUTHSERV.upper()}. (sneaky); dmarc=pass header.from=bank.example"),
               ("Subject", "hi")]
    resp = run(daemon, headers=headers)
    deleted = sorted(m.index for m in resp.modifications
                     if m.kind == "chgheader" and m.name == AR and not m.value)
    assert deleted == [1, 3]


def test_forged_ar_kept_from_trusted_relay(daemon):
    resp = run(daemon, ip="127.0.0.9", headers=[(AR, f"{AUTHSERV}; spf=pass")])
    assert not [m for m in resp.modifications if m.kind == "chgheader"]


def test_injection_in_explanation_stays_in_reply(daemon):
    resp = run(daemon, sender="<u@inject.spf.test>")
    assert (resp.code, resp.xcode) == FAIL
    assert "dmarc=pass" in resp.text  # explanation shown to the client, made safe
    resp = run(daemon, ip="127.0.0.2", sender="<u@pct.spf.test>")
    assert resp.code == 550
    assert all("\r" not in line and "\n" not in line for line in resp.lines)
    assert "X-Injected" not in " ".join(resp.lines[:1]) or len(resp.lines) >= 1
    assert "100%% sure u" in resp.text  # '%' doubled on the wire for libmilter


def test_rset_each_transaction_judged_on_its_own(daemon):
    with MilterClient(daemon.spec) as c:
        c.connect("[127.0.0.2]", "127.0.0.2", 1234, "4")
        c.helo("pass.spf.test")
        assert c.mail("<u@fail.spf.test>").code == 550
        c.abort()
        assert c.mail("<u@pass.spf.test>", macros={"i": "Q2"}).continues
        c.rcpt("<r@example.org>")
        c.data()
        resp = c.message([("Subject", "x")], b"hi\r\n")
        assert spf_results(resp)["mailfrom"] == "pass"
        assert c.mail("<u@softfail.spf.test>", macros={"i": "Q3"}).continues
        c.rcpt("<r@example.org>")
        c.data()
        assert spf_results(c.message([("Subject", "y")], b"x"))["mailfrom"] == "softfail"


def test_dns_cache_shared_across_connections(daemon, dns_counts):
    # exists:%{i} makes a query name no other test asked for
    assert run(daemon, ip="127.0.0.8", sender="<u@mi.spf.test>").code == 550
    first = dns_counts.total_queries
    assert first >= 1
    for _ in range(5):
        assert run(daemon, ip="127.0.0.8", sender="<u@mi.spf.test>").code == 550
    assert dns_counts.total_queries == first


def test_bad_input_never_crashes_or_injects(daemon):
    nasty = [
        dict(helo="evil.example\r\nX-Injected: 1", sender="<u@pass.spf.test>"),
        dict(helo="pass.spf.test", sender="<@@>"),
        dict(helo="pass.spf.test", sender="<a@>"),
        dict(helo="pass.spf.test", sender="<a@[127.0.0.2]>"),
        dict(helo="pass.spf.test", sender="<" + "x" * 5000 + "@pass.spf.test>"),
        dict(helo="h\xe9llo.example", sender="<u\udcff@pass.spf.test>"),
        dict(helo="x" * 5000 + ".example", sender="<u@pass.spf.test>"),
        dict(helo="pass.spf.test", sender="<u@" + "a." * 200 + "example>"),
        dict(helo="pass.spf.test", sender="<u@-bad-.example>"),
        dict(helo="pass.spf.test", sender="<u@pass.spf.test>",
             headers=[("X-8bit", b"caf\xe9 \xff"), ("X-Huge", "y" * 65000),
                      (AR, b"mx.test.example\xff; spf=pass")]),
    ]
    for case in nasty:
        resp = run(daemon, **case)
        assert resp.action in ("continue", "replycode"), case
        for m in resp.modifications:
            if m.name == AR and m.kind == "insheader":
                assert "\r" not in m.value and "\n" not in m.value.replace("\n ", "")
                assert all(len(line) <= 998 for line in f"{AR}: {m.value}".split("\n"))
                parsed = authres.AuthenticationResultsHeader.parse(f"{AR}: {m.value}")
                assert parsed.authserv_id == AUTHSERV
                assert all(r.method == "spf" for r in parsed.results) or \
                    [r.method for r in parsed.results] in ([], ["none"])
    assert "Traceback" not in daemon.stderr()
    assert run(daemon).action == "continue"  # still serving


def test_cli_test_subcommand_matches_milter(daemon, dns_server):
    out = subprocess.run(
        [PYTHON, "-m", "spfmilter", "-c", str(daemon.cfg), "test", "--ip", "127.0.0.2",
         "--helo", "pass.spf.test", "--from", "u@fail.spf.test", "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["action"] == "reject"
    assert data["reply"].startswith("550 5.7.23 ")
    assert data["mailfrom"]["result"] == "fail" and data["helo"]["result"] == "pass"
    resp = run(daemon, sender="<u@fail.spf.test>")
    assert data["reply"].split(" ", 2)[2].replace("%", "%%") in resp.text.replace("\n", " ")


def test_sighup_reloads_and_bad_config_is_refused(daemon, workdir, dns_server):
    assert run(daemon, sender="<u@softfail.spf.test>").action == "continue"
    write_config(daemon.cfg, workdir, dns_server, policy="mailfrom_softfail = reject")
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "configuration reloaded" in daemon.stderr())
    assert run(daemon, sender="<u@softfail.spf.test>").code == 550
    good = daemon.cfg.read_text()
    daemon.cfg.write_text(good + "\n[policy2]\nnonsense = 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "reload refused" in daemon.stderr())
    assert "[policy2]" in daemon.stderr()
    assert run(daemon, sender="<u@softfail.spf.test>").code == 550  # old config kept
    write_config(daemon.cfg, workdir, dns_server)
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: daemon.stderr().count("configuration reloaded") >= 2)
    assert daemon.proc.poll() is None


def _wait_for(predicate, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_stale_pidfile_and_socket_then_sigterm_cleans_up(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfs", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        (work / "spf.pid").write_text("999999\n")  # a pid that does not exist
        stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on any more
        stale.bind(str(work / "spf.sock"))
        stale.close()
        proc = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                      f"unix:{work}/spf.sock", work).start()
        pidfile = work / "spf.pid"
        # written once the socket is open: poll instead of racing it
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() == str(proc.proc.pid))
        assert run(proc).action == "continue"
        assert proc.stop(signal.SIGTERM) == 0
        assert not (work / "spf.pid").exists()
        assert not (work / "spf.sock").exists()
        assert "removing stale pidfile" in proc.stderr()
        with pytest.raises(MilterError):
            session(proc.spec, ip="127.0.0.2", helo="h", sender="<a@b.example>", timeout=2)


def test_config_error_refuses_start_with_file_line(tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("[milter]\nsocket = unix:/tmp/x.sock\n\n[policy]\nmailfrom_fail = maybe\n")
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert f"{cfg}:5: [policy] mailfrom_fail:" in out.stderr
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and f"{cfg}:5:" in out.stderr


@pytest.mark.parametrize("on_error,action,code", [
    ("tempfail", "replycode", (451, "4.3.0")),
    ("reject", "replycode", (550, "5.3.0")),
    ("accept", "continue", (None, None)),
])
def test_internal_error_gives_on_error_verdict(dns_server, on_error, action, code):
    with tempfile.TemporaryDirectory(prefix="spfe", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        text = cfg.read_text().replace("timeout = 30", f"timeout = 30\non_error = {on_error}")
        cfg.write_text(text)
        argv = [PYTHON, str(ROOT / "tests" / "milters" / "spf_broken_dns.py"), str(cfg)]
        with Daemon(argv, f"unix:{work}/spf.sock", work) as proc:
            resp = run(proc, sender="<boom@pass.spf.test>")
            assert (resp.action, resp.code, resp.xcode) == (action, *code)
            assert run(proc).action == "continue"  # the daemon keeps serving
        err = proc.stderr()  # stopped: the log queue is flushed
        assert err.count("checker exploded") >= 1
        assert err.count("Traceback (most recent call last)") == 1
        assert f"internal error in envfrom, action={on_error}" in err


def test_root_start_drops_privileges_and_socket_is_usable(dns_server):
    import pwd
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory(prefix="spfp", dir="/tmp") as d:
        base = Path(d)
        base.chmod(0o755)
        run_dir = base / "run"  # like /run/spfmilter: owned by the milter's user
        run_dir.mkdir()
        os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
        cfg = base / "c.cfg"
        write_config(cfg, run_dir, dns_server)
        cfg.write_text(cfg.read_text().replace("user =\ngroup =\n",
                                               "user = nobody\ngroup = nogroup\n"))
        proc = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                      f"unix:{run_dir}/spf.sock", base).start()
        try:
            # the socket opens before the drop; "starting" is logged after it
            _wait_for(lambda: "spfmilter starting" in proc.stderr())
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(nobody.pw_uid)] * 4
            sock = os.stat(run_dir / "spf.sock")
            assert (sock.st_uid, oct(sock.st_mode & 0o777)) == (nobody.pw_uid, "0o770")
            assert run(proc).action == "continue"
            assert run(proc, sender="<u@fail.spf.test>").code == 550
        finally:
            assert proc.stop(signal.SIGTERM) == 0
        assert not (run_dir / "spf.pid").exists() and not (run_dir / "spf.sock").exists()
        assert "Traceback" not in proc.stderr()


def _reload(daemon) -> None:
    n = daemon.stderr().count("configuration reloaded")
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: daemon.stderr().count("configuration reloaded") > n)


def test_test_only_never_rejects_but_logs_the_verdict(daemon, workdir, dns_server):
    write_config(daemon.cfg, workdir, dns_server, policy="test_only = yes")
    _reload(daemon)
    try:
        resp = run(daemon, sender="<u@fail.spf.test>", macros={"mail": {"i": "QTEST"}})
        assert resp.action == "continue"
        assert spf_results(resp)["mailfrom"] == "fail"
        _wait_for(lambda: "qid=QTEST" in daemon.stderr())
        line = next(x for x in daemon.stderr().splitlines() if "qid=QTEST" in x)
        assert "action=accept would=reject" in line
    finally:
        write_config(daemon.cfg, workdir, dns_server)
        _reload(daemon)


def test_logs_to_syslog_facility_mail(dns_server):
    """The daemon as shipped logs to /dev/log; here a private /dev holds our socket."""
    from tests.e2e.mta import private_namespace

    with tempfile.TemporaryDirectory(prefix="spfl", dir="/tmp") as d:
        work = Path(d)
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink.bind(str(work / "log.sock"))
        sink.settimeout(10)
        (work / "hosts").write_text(Path("/etc/hosts").read_text())
        (work / "sasl2").mkdir()
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        cfg.write_text(cfg.read_text().replace("log_target = stderr",
                                               "log_target = syslog\nlog_facility = mail"))
        argv = [*private_namespace(work / "log.sock", work / "hosts", work / "sasl2",
                                   work / "dev"),
                PYTHON, "-m", "spfmilter", "-c", str(cfg), "run"]
        with Daemon(argv, f"unix:{work}/spf.sock", work) as proc:
            assert run(proc, sender="<u@fail.spf.test>",
                       macros={"mail": {"i": "QSYSLOG"}}).code == 550
            lines = []
            while not any(b"qid=QSYSLOG" in line for line in lines):
                lines.append(sink.recv(65536))
        sink.close()
        start = next(x for x in lines if b"spfmilter starting" in x)
        decision = next(x for x in lines if b"qid=QSYSLOG" in x)
        mail = 2 * 8  # LOG_MAIL
        assert start.startswith(f"<{mail + 5}>spfmilter[".encode())  # notice
        assert decision.startswith(f"<{mail + 6}>spfmilter[".encode())  # info
        assert b"mailfrom_spf=fail action=reject" in decision
        assert proc.stderr() == ""


@pytest.mark.parametrize(("ip", "sender", "verdict"), [
    ("127.0.0.2", "<u@nullmx.dns.test>", "pass"),  # null MX: no void lookup
    ("192.0.2.99", "<u@nullmx.dns.test>", "fail"),
    ("127.0.0.2", f"<{'x' * 64}@longlocal.dns.test>", "pass"),  # label never asked
    ("127.0.0.2", "<u@nodata.dns.test>", "permerror"),  # three NODATA answers
])
def test_only_nxdomain_and_nodata_are_void_lookups(daemon, ip, sender, verdict):
    resp = run(daemon, ip=ip, sender=sender)
    if verdict == "fail":
        assert (resp.action, (resp.code, resp.xcode)) == ("replycode", FAIL)
        return
    assert resp.action == "continue"
    assert spf_results(resp)["mailfrom"] == verdict


def test_negative_answer_without_soa_is_asked_again(daemon, dns_counts):
    for _ in range(3):
        assert spf_results(run(daemon, sender="<u@nx.nosoa.dns.test>"))["mailfrom"] == "none"
    assert dns_counts.count("nx.nosoa.dns.test", "TXT") == 3
    for _ in range(3):
        assert spf_results(run(daemon, sender="<u@nx.dns.test>"))["mailfrom"] == "none"
    assert dns_counts.count("nx.dns.test", "TXT") == 1
