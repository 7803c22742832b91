"""[policy] dmarc_defer through the real daemon and NSD (zone data: dmarc.test).

The sender is u@fail.spf.test from 127.0.0.2 (SPF fail, rejected by default);
the From field names the domain whose DMARC policy decides.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
from pathlib import Path

import pytest

import libmilter_ext.protocol as P
from libmilter_ext.testing import MilterClient
from spfmilter.milter import logvalue
from tests.procs import PYTHON, ROOT, Daemon
from tests.test_daemon import AR, FAIL, _wait_for, spf_results, write_config
from tests.test_daemon import run as run_session

SENDER = "<u@fail.spf.test>"
_qids = itertools.count(1)


def _daemon(dns, policy: str):
    with tempfile.TemporaryDirectory(prefix="spfd", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "spfmilter.cfg"
        write_config(cfg, work, dns, policy=policy)
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{work}/spf.sock", work) as proc:
            yield proc


@pytest.fixture(scope="module")
def deferring(dns_server):
    yield from _daemon(dns_server, "dmarc_defer = yes")


@pytest.fixture(scope="module")
def plain(dns_server):
    yield from _daemon(dns_server, "")


def run(daemon, from_values=("a@reject.dmarc.test",), *, helo="pass.spf.test",
        sender=SENDER):
    """One session with these From fields; returns (last response, its qid)."""
    qid = f"QD{next(_qids)}"
    headers = [("From", v) for v in from_values] + [("Subject", "test")]
    resp = run_session(daemon, helo=helo, sender=sender, headers=headers,
                       macros={"mail": {"i": qid}})
    return resp, qid


def log_line(daemon, qid: str) -> str:
    def find() -> str | None:
        return next((x for x in daemon.stderr().splitlines()
                     if f"qid={qid} " in x and " action=" in x and " reason=" in x), None)
    _wait_for(lambda: find() is not None)
    return find() or ""


@pytest.mark.parametrize("from_value,policy,where", [
    ("a@reject.dmarc.test", "reject", "reject.dmarc.test"),
    ("Some One <a@Quarantine.dmarc.test>", "quarantine", "quarantine.dmarc.test"),
    ("a@other.dmarc.test", "reject", "dmarc.test"),  # the org domain's sp=reject
    ("a@x.y.other.dmarc.test", "reject", "dmarc.test"),
    ("a@notfirst.dmarc.test", "reject", "dmarc.test"),  # its "p=...; v=" is no record
    ("a@mixed.dmarc.test", "reject", "mixed.dmarc.test"),
    ("a@reject.dmarc.test, b@reject.dmarc.test", "reject", "reject.dmarc.test"),
])
def test_enforcing_dmarc_policy_defers_the_reject(deferring, from_value, policy, where):
    resp, qid = run(deferring, [from_value])
    assert resp.stage == "eom" and resp.action == "continue"
    assert spf_results(resp) == {"helo": "pass", "mailfrom": "fail"}
    line = log_line(deferring, qid)
    assert " mailfrom_spf=fail action=accept would=reject reason=\"mailfrom fail\" " \
        f"dmarc={policy} deferred=dmarc" in line, line


@pytest.mark.parametrize("from_values,why", [
    (["a@none.dmarc.test"], "none"),
    (["a@dmarc.test"], "none"),  # the org domain itself: p=none, not sp=
    (["a@badp.dmarc.test"], "none"),  # p=bogus with rua=: p=none
    (["a@two.dmarc.test"], '"no usable record"'),
    (["a@pass.spf.test"], '"no record"'),
    ([], '"no From"'),
    (["a@reject.dmarc.test, b@none.dmarc.test"], '"several From domains"'),
    (["a@reject.dmarc.test", "b@none.dmarc.test"], '"several From domains"'),
    (["not an address"], '"unparseable From"'),
    (["a@servfail.test"], "temperror"),  # a DNS error: never fail open
])
def test_otherwise_the_spf_verdict_is_given_at_end_of_headers(deferring, plain, from_values,
                                                              why):
    resp, qid = run(deferring, from_values)
    assert resp.stage == "eoh"
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", FAIL)
    at_mail, _ = run(plain, from_values)
    assert at_mail.stage == "mail" and at_mail.text == resp.text  # the same reply
    line = log_line(deferring, qid)
    assert f" action=reject reason=\"mailfrom fail\" dmarc={why}" in line, line
    assert "deferred" not in line


def test_non_utf8_from_gives_the_spf_verdict(deferring):
    resp, qid = run(deferring, [b"\xff\xfe <a@reject.dmarc.test>"])
    assert (resp.stage, resp.code) == ("eoh", 550)
    assert 'dmarc="unparseable From"' in log_line(deferring, qid)


def test_helo_reject_is_never_deferred(deferring):
    resp, qid = run(deferring, helo="helo-fail.spf.test")
    assert (resp.stage, (resp.code, resp.xcode)) == ("mail", FAIL)
    line = log_line(deferring, qid)
    assert "reason=\"helo fail\"" in line and "dmarc=" not in line


def test_accepted_mail_is_not_looked_up(deferring, dns_counts):
    resp, qid = run(deferring, sender="<u@pass.spf.test>")
    assert resp.stage == "eom" and spf_results(resp)["mailfrom"] == "pass"
    assert "dmarc=" not in log_line(deferring, qid)
    assert dns_counts.count("_dmarc.reject.dmarc.test") == 0


def test_dmarc_lookups_share_the_dns_cache(deferring, dns_counts):
    for _ in range(3):
        resp, _qid = run(deferring, ["a@x.other.dmarc.test"])
        assert resp.stage == "eom"
    assert dns_counts.count("_dmarc.x.other.dmarc.test", "TXT") == 1
    assert dns_counts.count("_dmarc.dmarc.test", "TXT") <= 1


def _negotiated(daemon) -> tuple[int, dict]:
    with MilterClient(daemon.spec) as client:
        return client.protocol, client.macro_requests


def test_default_config_negotiates_neither_from_nor_eoh(plain, deferring):
    protocol, _ = _negotiated(plain)
    assert protocol & P.SMFIP_NOEOH and protocol & P.SMFIP_NOBODY
    resp, _ = run(plain, ["a@reject.dmarc.test"])
    assert resp.stage == "mail"  # rejected at MAIL FROM, as without the option
    protocol, macros = _negotiated(deferring)
    assert not protocol & P.SMFIP_NOEOH and protocol & P.SMFIP_NR_HDR
    assert protocol & P.SMFIP_NOBODY  # the body is never requested
    assert "i" in macros.get(P.SMFIM_EOH, "")


def test_other_fields_do_not_disturb_the_held_verdict(deferring):
    # the From field after 50 others, which the C filter answers without Python
    headers = [("X-Filler", str(n)) for n in range(50)] + [("From", "a@reject.dmarc.test")]
    qid = f"QD{next(_qids)}"
    resp = run_session(deferring, sender=SENDER, headers=headers, macros={"mail": {"i": qid}})
    assert resp.stage == "eom"
    assert [m.name for m in resp.modifications if m.kind == "insheader"].count(AR) == 1
    assert "deferred=dmarc" in log_line(deferring, qid)


# -- spfmilter test --header-from: the same path ------------------------------------------

@pytest.mark.parametrize("from_values", [
    ["a@reject.dmarc.test"], ["a@other.dmarc.test"], ["a@none.dmarc.test"],
    ["a@servfail.test"], [], ["a@reject.dmarc.test", "b@none.dmarc.test"], ["junk"],
])
def test_test_command_agrees_with_the_daemon(deferring, dns_server, tmp_path, from_values):
    cfg = tmp_path / "c.cfg"
    write_config(cfg, tmp_path, dns_server, policy="dmarc_defer = yes")
    args = [a for v in from_values for a in ("--header-from", v)]
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "test", "--ip",
                          "127.0.0.2", "--helo", "pass.spf.test", "--from", SENDER[1:-1],
                          *args, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    resp, qid = run(deferring, from_values)
    line = log_line(deferring, qid)
    assert f" action={data['action']} " in line
    assert data["deferred"] == ("deferred=dmarc" in line)
    assert f"dmarc={logvalue(data['dmarc'])}" in line
    if data["action"] == "reject":
        assert data["reply"].endswith(resp.text)
    text = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "test", "--ip",
                           "127.0.0.2", "--helo", "pass.spf.test", "--from", SENDER[1:-1],
                           *args], capture_output=True, text=True, timeout=60).stdout
    assert f"dmarc: {data['dmarc']}" in text


def test_check_config_names_a_bad_value(tmp_path):
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[policy]\n\ndmarc_defer = sometimes\n")
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"{cfg}:3:" in out.stderr and "dmarc_defer" in out.stderr


@pytest.mark.parametrize("on_error,expected", [
    ("tempfail", ("replycode", 451, "4.3.0")), ("reject", ("replycode", 550, "5.3.0")),
    ("accept", ("continue", None, None)),
])
def test_internal_error_at_end_of_headers_gives_on_error(dns_server, on_error, expected):
    with tempfile.TemporaryDirectory(prefix="spfd", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server, policy="dmarc_defer = yes")
        cfg.write_text(cfg.read_text().replace("timeout = 30",
                                               f"timeout = 30\non_error = {on_error}"))
        argv = [PYTHON, str(ROOT / "tests" / "milters" / "spf_broken_dns.py"), str(cfg)]
        with Daemon(argv, f"unix:{work}/spf.sock", work) as proc:
            resp, qid = run(proc, ["a@boom.dmarc.test"])
            stage = "eom" if on_error == "accept" else "eoh"
            assert (resp.stage, resp.action, resp.code, resp.xcode) == (stage, *expected)
            if on_error == "accept":  # accepted unchecked: the header still goes in
                assert spf_results(resp) == {"helo": "pass", "mailfrom": "fail"}
                assert 'action=accept reason="internal error"' in log_line(proc, qid)
        assert f"internal error in eoh, action={on_error}" in proc.stderr()
