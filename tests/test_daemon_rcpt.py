"""reject_at = rcpt through the real daemon, NSD and the milter protocol."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from libmilter_ext import protocol as P
from libmilter_ext.testing import MilterClient, Response
from tests.procs import PYTHON, ROOT, Daemon
from tests.test_daemon import AR, FAIL, TEMPERROR, _wait_for, ar_of, spf_results, write_config

RCPT_POLICY = """\
reject_at = rcpt
exempt_recipients = postmaster, abuse@watch.example
"""
RCPT_SECTIONS = """
[recipient:optout.example]
mailfrom_fail = accept
helo_fail = accept

[recipient:watch.example]
test_only = yes

[recipient:boss@watch.example]
test_only = no

[recipient:strict.example]
mailfrom_softfail = reject
"""


@pytest.fixture(scope="module")
def rcpt_daemon(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfr", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "spfmilter.cfg"
        write_config(cfg, work, dns_server, policy=RCPT_POLICY, extra=RCPT_SECTIONS)
        proc = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                      f"unix:{work}/spf.sock", work)
        proc.cfg, proc.work = cfg, work
        with proc:
            yield proc


def transaction(daemon, sender: str, rcpts: list[str], qid: str, helo: str = "pass.spf.test",
                ) -> tuple[dict[str, Response], Response | None, int]:
    """One SMTP transaction with several RCPTs, going on past refused ones as an MTA
    does; returns the RCPT responses, the eom response (None when no RCPT was
    accepted: the MTA aborts) and the negotiated protocol flags."""
    with MilterClient(daemon.spec) as client:
        client.connect("[127.0.0.2]", "127.0.0.2", 0, "4")
        client.helo(helo)
        mail = client.mail(sender, macros={"i": qid})
        assert mail.action == "continue", mail
        answers = {r: client.rcpt(r) for r in rcpts}
        eom = None
        if any(a.continues for a in answers.values()):
            client.data()
            eom = client.message([("Subject", "rcpt test")], b"hello\r\n")
        else:
            client.abort()
        return answers, eom, client.protocol


def log_lines(daemon, qid: str) -> list[str]:
    return [line for line in daemon.stderr().splitlines() if f"qid={qid} " in line]


def test_exempt_and_opted_out_recipients_get_the_mail_the_others_are_refused(rcpt_daemon):
    rcpts = ["<bob@example.org>", "<Postmaster@example.org>", "<dave@mx.optout.example>",
             "<carol@watch.example>", "<boss@watch.example>"]
    answers, eom, protocol = transaction(rcpt_daemon, "<u@fail.spf.test>", rcpts, "QR1")
    assert not protocol & P.SMFIP_NORCPT  # envrcpt negotiated, with a reply
    assert not protocol & P.SMFIP_NR_RCPT
    refused = {r: (a.code, a.xcode) for r, a in answers.items() if not a.continues}
    assert refused == {"<bob@example.org>": FAIL, "<boss@watch.example>": FAIL}
    assert "is not allowed to send mail for fail.spf.test" in answers["<bob@example.org>"].text
    assert eom is not None and eom.action == "continue"
    assert [name for name, _ in eom.added_headers()].count(AR) == 1  # one for the message
    assert spf_results(eom)["mailfrom"] == "fail"
    _wait_for(lambda: log_lines(rcpt_daemon, "QR1"))
    (line,) = log_lines(rcpt_daemon, "QR1")
    assert ('mailfrom_spf=fail action=accept would=reject reason="mailfrom fail" '
            "exempt=postmaster rcpts=bob@example.org:reject,Postmaster@example.org:accept,"
            "dave@mx.optout.example:accept,carol@watch.example:accept,"
            "boss@watch.example:reject") in line
    assert "outcome=" not in line


def test_every_recipient_refused_is_logged_once_at_abort(rcpt_daemon):
    answers, eom, _ = transaction(rcpt_daemon, "<u@fail.spf.test>",
                                  ["<a@example.org>", "<b@example.org>"], "QR2")
    assert eom is None
    assert [(a.code, a.xcode) for a in answers.values()] == [FAIL, FAIL]
    _wait_for(lambda: log_lines(rcpt_daemon, "QR2"))
    # the next transaction's line shows the abort was handled before it
    transaction(rcpt_daemon, "<u@pass.spf.test>", ["<a@example.org>"], "QR2b")
    _wait_for(lambda: log_lines(rcpt_daemon, "QR2b"))
    (line,) = log_lines(rcpt_daemon, "QR2")
    assert 'action=reject reason="mailfrom fail" rcpts=a@example.org:reject,' \
           "b@example.org:reject" in line
    assert "outcome=" not in line and "would=" not in line


def test_recipient_section_can_be_stricter_and_helo_is_overridden_too(rcpt_daemon):
    answers, eom, _ = transaction(rcpt_daemon, "<u@softfail.spf.test>",
                                  ["<x@strict.example>", "<x@example.org>"], "QR3")
    assert (answers["<x@strict.example>"].code, answers["<x@strict.example>"].xcode) == FAIL
    assert answers["<x@example.org>"].continues and spf_results(eom)["mailfrom"] == "softfail"
    answers, eom, _ = transaction(rcpt_daemon, "<u@pass.spf.test>",
                                  ["<x@optout.example>", "<x@example.org>", "<abuse@x.example>"],
                                  "QR4", helo="helo-fail.spf.test")
    assert answers["<x@optout.example>"].continues
    assert answers["<abuse@x.example>"].code == 550  # abuse is exempt only at watch.example
    assert (answers["<x@example.org>"].code, answers["<x@example.org>"].xcode) == FAIL
    assert "helo" in answers["<x@example.org>"].text.lower()
    assert spf_results(eom)["helo"] == "fail"


def test_temperror_is_a_per_recipient_tempfail(rcpt_daemon):
    answers, eom, _ = transaction(rcpt_daemon, "<u@servfail.test>",
                                  ["<a@example.org>", "<postmaster@example.org>"], "QR5")
    a = answers["<a@example.org>"]
    assert (a.code, a.xcode) == TEMPERROR
    assert answers["<postmaster@example.org>"].continues
    assert len([v for n, v in eom.added_headers() if n == AR]) == 1
    assert ar_of(eom).results[-1].result == "temperror"
    _wait_for(lambda: log_lines(rcpt_daemon, "QR5"))
    assert "action=accept would=tempfail" in log_lines(rcpt_daemon, "QR5")[0]


def test_reject_at_mail_negotiates_envrcpt_away_after_reload(rcpt_daemon, dns_server):
    work = rcpt_daemon.work
    write_config(rcpt_daemon.cfg, work, dns_server)  # reject_at = mail, no sections
    n = rcpt_daemon.stderr().count("configuration reloaded")
    rcpt_daemon.proc.send_signal(signal.SIGHUP)
    try:
        _wait_for(lambda: rcpt_daemon.stderr().count("configuration reloaded") > n)
        with MilterClient(rcpt_daemon.spec) as client:
            assert client.protocol & P.SMFIP_NORCPT
            client.connect("[127.0.0.2]", "127.0.0.2", 0, "4")
            client.helo("pass.spf.test")
            mail = client.mail("<u@fail.spf.test>")
            assert (mail.code, mail.xcode) == FAIL  # refused at MAIL FROM, as before
    finally:
        write_config(rcpt_daemon.cfg, work, dns_server, policy=RCPT_POLICY, extra=RCPT_SECTIONS)
        n = rcpt_daemon.stderr().count("configuration reloaded")
        rcpt_daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: rcpt_daemon.stderr().count("configuration reloaded") > n)


def test_spfmilter_test_rcpt_shows_what_the_daemon_answers(rcpt_daemon):
    rcpts = ["<bob@example.org>", "<postmaster@example.org>", "<carol@watch.example>",
             "<x@optout.example>"]
    answers, _eom, _ = transaction(rcpt_daemon, "<u@fail.spf.test>", rcpts, "QR6")
    argv = [PYTHON, "-m", "spfmilter", "-c", str(rcpt_daemon.cfg), "test", "--ip", "127.0.0.2",
            "--helo", "pass.spf.test", "--from", "u@fail.spf.test"]
    for r in rcpts:
        argv += ["--rcpt", r]
    out = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True,
                                    check=True, timeout=60, cwd=ROOT).stdout)
    got = {f"<{r['recipient']}>": (r["action"], r["would_action"], r["exempt"])
           for r in out["recipients"]}
    assert got == {"<bob@example.org>": ("reject", "reject", None),
                   "<postmaster@example.org>": ("accept", "reject", "postmaster"),
                   "<carol@watch.example>": ("accept", "reject", None),
                   "<x@optout.example>": ("accept", "accept", None)}
    for r in out["recipients"]:
        answer = answers[f"<{r['recipient']}>"]
        assert (r["action"] == "accept") == answer.continues
        if r["reply"]:
            assert r["reply"] == f"{answer.code} {answer.xcode} {answer.text}"
    text = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60,
                          cwd=ROOT).stdout
    assert "rcpt postmaster@example.org: accept (would reject) exempt=postmaster\n" in text
    assert "rcpt bob@example.org: reject: 550 5.7.23 SPF fail for mailfrom" in text


def test_check_config_names_file_and_line_of_a_recipient_section_without_rcpt(tmp_path):
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[spf]\nauthserv_id = mx.example\n\n[policy]\nmailfrom_fail = reject\n\n"
                   "[recipient:customer.example]\nmailfrom_fail = accept\n")
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    assert out.stderr == (f"spfmilter: {cfg}:7: [recipient:customer.example]: needs [policy] "
                          "reject_at = rcpt (no recipient is known at MAIL FROM)\n")
    cfg.write_text(cfg.read_text().replace("[policy]\n", "[policy]\nreject_at = rcpt\n"))
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "reject_at = rcpt\n" in out.stdout
    assert "[recipient:customer.example]\nmailfrom_fail = accept\n" in out.stdout


def test_reload_between_negotiation_and_first_stage_keeps_the_negotiated_class(
        rcpt_daemon, dns_server):
    """The handler is made lazily, at MAIL FROM: a connection negotiated under
    reject_at = mail is still served by SpfMilter after a reload to rcpt, while
    the next one gets RcptSpfMilter with envrcpt negotiated."""
    work = rcpt_daemon.work

    def reload(**kwargs) -> None:
        write_config(rcpt_daemon.cfg, work, dns_server, **kwargs)
        n = rcpt_daemon.stderr().count("configuration reloaded")
        rcpt_daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: rcpt_daemon.stderr().count("configuration reloaded") > n)

    try:
        reload()  # reject_at = mail
        with MilterClient(rcpt_daemon.spec) as old:
            assert old.protocol & P.SMFIP_NORCPT
            old.connect("[127.0.0.2]", "127.0.0.2", 0, "4")  # deferred: no handler yet
            reload(policy=RCPT_POLICY, extra=RCPT_SECTIONS)
            with MilterClient(rcpt_daemon.spec) as new:
                assert not new.protocol & P.SMFIP_NORCPT
                new.connect("[127.0.0.2]", "127.0.0.2", 0, "4")
                new.helo("pass.spf.test")
                assert new.mail("<u@fail.spf.test>").action == "continue"
                rcpt = new.rcpt("<bob@example.org>")
                assert (rcpt.code, rcpt.xcode) == FAIL  # refused per recipient
            old.helo("pass.spf.test")
            mail = old.mail("<u@fail.spf.test>")
            assert (mail.code, mail.xcode) == FAIL  # refused at MAIL FROM: SpfMilter
    finally:
        reload(policy=RCPT_POLICY, extra=RCPT_SECTIONS)
    assert "Traceback" not in rcpt_daemon.stderr()
