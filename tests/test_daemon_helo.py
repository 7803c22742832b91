"""HELO hygiene through the real daemon (milter protocol, NSD) and ``spfmilter test``."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from pathlib import Path

import authres
import pytest

from spfmilter.headers import unfold
from tests.procs import PYTHON, Daemon
from tests.test_cli import ENV
from tests.test_daemon import AR, AUTHSERV, _wait_for, run, write_config

HYGIENE_REJECT = (550, "5.7.1")
HYGIENE_TEMPFAIL = (451, "4.7.1")
POLICY = """\
helo_literal_mismatch = reject
helo_is_us = reject
helo_invalid = accept
"""


@pytest.fixture(scope="module")
def daemon(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfh", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "spfmilter.cfg"
        write_config(cfg, work, dns_server, policy=POLICY)
        proc = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                      f"unix:{work}/spf.sock", work)
        proc.cfg = cfg
        proc.dns = dns_server
        with proc:
            yield proc


def _ar(resp) -> str:
    values = [m.value for m in resp.modifications if m.kind == "insheader" and m.name == AR]
    assert len(values) == 1, resp.modifications
    return unfold(values[0])


def test_mismatched_literal_is_rejected_with_the_configured_reply(daemon):
    resp = run(daemon, helo="[127.0.0.3]", macros={"mail": {"i": "QHELO1"}})
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", HYGIENE_REJECT)
    assert resp.text == "HELO [127.0.0.3] is not the address of the client 127.0.0.2"
    line = ("qid=QHELO1 ip=127.0.0.2 helo=[127.0.0.3] sender=<user@pass.spf.test> "
            "helo_spf=none mailfrom_spf=pass helo_finding=literal_mismatch action=reject "
            "reason=\"helo literal_mismatch\"")
    _wait_for(lambda: line in daemon.stderr())


@pytest.mark.parametrize("ip,helo", [
    ("127.0.0.2", "[127.0.0.2]"),
    ("127.0.0.2", "[127.000.000.002]"),
    ("127.0.0.2", "[IPv6:::ffff:127.0.0.2]"),
    ("::ffff:127.0.0.2", "[127.0.0.2]"),  # a mapped client is its IPv4 address
    ("::1", "[IPv6:0:0:0:0:0:0:0:1]"),
])
def test_literal_of_the_client_is_accepted_without_note(daemon, ip, helo):
    resp = run(daemon, ip=ip, helo=helo)
    assert resp.action == "continue"
    value = _ar(resp)
    assert value.startswith(f"{AUTHSERV};") and "HELO" not in value


@pytest.mark.parametrize("ip,macros,why", [
    ("127.0.0.1", None, "internal host"),
    ("127.0.0.2", {"mail": {"{auth_authen}": "bob"}}, "authenticated"),
    ("127.0.0.9", None, "trusted relay"),
])
def test_exempt_clients_are_not_judged_on_their_helo(daemon, ip, macros, why):
    resp = run(daemon, ip=ip, helo="[192.0.2.99]", macros=macros)
    assert resp.action == "continue"
    value = _ar(resp)
    assert why in value and "HELO" not in value


def test_our_names_default_is_the_j_macro_and_the_authserv_id(daemon):
    us = {"connect": {"j": "mail.ours.example"}}
    resp = run(daemon, helo="MAIL.ours.example", macros=us)
    assert ((resp.code, resp.xcode)) == HYGIENE_REJECT
    assert resp.text == ("HELO MAIL.ours.example claims to be this host, "
                         "but the client 127.0.0.2 is not")
    assert run(daemon, helo="mail.ours.example").action == "continue"  # no j: not ours
    assert (run(daemon, helo=AUTHSERV).code, run(daemon, helo=AUTHSERV, macros=us).code) \
        == (550, 550)


def test_a_literal_of_our_connection_address_is_us(daemon):
    ours = {"connect": {"{daemon_addr}": "127.0.0.50"}, "mail": {"i": "QHELO2"}}
    resp = run(daemon, helo="[127.0.0.50]", macros=ours)
    assert (resp.code, resp.xcode) == HYGIENE_REJECT
    _wait_for(lambda: "qid=QHELO2 ip=127.0.0.2 helo=[127.0.0.50] sender=<user@pass.spf.test> "
              "helo_spf=none mailfrom_spf=pass helo_finding=literal_mismatch,is_us action=reject"
              in daemon.stderr())
    # a client at our own address saying so is not lying
    resp = run(daemon, ip="127.0.0.50", helo=AUTHSERV, macros=ours)
    assert resp.action == "continue"


def test_accepted_finding_is_a_comment_in_the_header_and_a_log_field(daemon):
    resp = run(daemon, helo="bad_name.spf.test", macros={"mail": {"i": "QHELO3"}})
    assert resp.action == "continue"
    value = _ar(resp)
    assert value.startswith(f"{AUTHSERV} (HELO invalid: bad_name.spf.test); spf=")
    parsed = authres.AuthenticationResultsHeader.parse(f"{AR}: {value}")
    assert [(r.method, r.result, r.properties[0].name) for r in parsed.results] == [
        ("spf", "none", "helo"), ("spf", "pass", "mailfrom")]
    _wait_for(lambda: "qid=QHELO3 ip=127.0.0.2 helo=bad_name.spf.test "
              "sender=<user@pass.spf.test> helo_spf=none mailfrom_spf=pass "
              "helo_finding=invalid action=accept reason=policy" in daemon.stderr())


def test_control_characters_in_helo_reach_neither_header_nor_log(daemon):
    helo = "evil\r\nX-Injected: yes\r\n\tmore"
    resp = run(daemon, helo=helo, macros={"mail": {"i": "QHELO4"}})
    assert resp.action == "continue"
    raw = [m.value for m in resp.modifications if m.name == AR][0]
    assert "\r" not in raw and "\nX-Injected" not in raw
    assert all(line.startswith(" ") for line in raw.split("\n")[1:])
    assert unfold(raw).startswith(f"{AUTHSERV} (HELO invalid: evil X-Injected: yes more);")
    _wait_for(lambda: "qid=QHELO4" in daemon.stderr())
    line, = [x for x in daemon.stderr().splitlines() if "qid=QHELO4" in x]
    assert 'helo="evil\\x0d\\x0aX-Injected: yes\\x0d\\x0a\\x09more"' in line
    assert "helo_finding=invalid" in line


def test_spfmilter_test_shows_the_finding(daemon):
    base = [PYTHON, "-m", "spfmilter", "-c", str(daemon.cfg), "test", "--ip", "127.0.0.2",
            "--from", "u@pass.spf.test"]
    out = subprocess.run([*base, "--helo", "[127.0.0.3]", "--json"], capture_output=True,
                         text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["helo_findings"], data["action"], data["reason"], data["reply"]) == (
        ["literal_mismatch"], "reject", "helo literal_mismatch",
        "550 5.7.1 HELO [127.0.0.3] is not the address of the client 127.0.0.2")
    out = subprocess.run([*base, "--helo=-bad-.spf.test"], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "helo_finding: invalid\naction: accept\n" in out.stdout
    assert f"Authentication-Results: {AUTHSERV} (HELO invalid: -bad-.spf.test);" in out.stdout


def test_check_config_names_file_and_line(daemon, tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("[policy]\n# hygiene\nhelo_literal_mismatch = bounce\n")
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 1
    assert f"{cfg}:3: [policy] helo_literal_mismatch: 'bounce' is not one of" in out.stderr


def test_reload_to_tempfail_invalid_helo(daemon):
    write_config(daemon.cfg, daemon.cfg.parent, daemon.dns,
                 policy=POLICY.replace("helo_invalid = accept", "helo_invalid = tempfail"))
    before = daemon.stderr().count("configuration reloaded")
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: daemon.stderr().count("configuration reloaded") > before)
    resp = run(daemon, helo="no_such host")
    assert ((resp.code, resp.xcode)) == HYGIENE_TEMPFAIL
    assert resp.text == "HELO no_such host is neither a valid domain name nor an address literal"
