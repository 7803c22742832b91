"""What every MTA must show with spfmilter in front of it: SMTP sessions, mail delivered.

:class:`MtaScenarios` holds the tests; ``test_sendmail.py`` and
``test_postfix.py`` subclass it with module fixtures ``mta`` (a started
:class:`~tests.e2e.mta.Mta`), ``milter`` (the running
:class:`~tests.e2e.mta.SpfMilter`) and ``sasl_user``, and say how their MTA
answers when the milter is down.

Clients: 127.0.0.1 is the only internal host; 127.0.0.2 ... 127.0.0.9 and ::1
are outside clients (see data/spfmilter.cfg.in).  Expected SPF results come
from tests/data/zones/README.  The policy is spfmilter's default.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import signal
import stat
import time
from email.message import Message
from pathlib import Path

import authres
import pytest

from tests.e2e.mta import (
    AUTHSERV_ID,
    DELIVERY_TIMEOUT,
    MAIL_DOMAIN,
    RECIPIENT,
    Mailbox,
    Mta,
    Reply,
    SaslUser,
    SpfMilter,
    message,
)
from tests.folding import check_lines
from tests.test_daemon import _wait_for

#: RFC 7372 replies of the default policy.
SPF_FAIL = (550, "5.7.23")
#: A HELO hygiene reject (RFC 3463 5.7.1).
HELO_REJECT = (550, "5.7.1")
SPF_TEMPERROR = (451, "4.7.24")
ACCEPTED = 250
DATA_GO_AHEAD = 354

PASS_HELO = "pass.spf.test"
_tokens = itertools.count(1)


def token(label: str) -> str:
    """A string unique to one test message (its Subject, Message-ID and body carry it)."""
    return f"{label}-{next(_tokens)}"


def unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value).strip()


def auth_results(msg: Message) -> list[authres.AuthenticationResultsHeader]:
    """The message's Authentication-Results fields, parsed, top first."""
    return [authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {unfold(v)}")
            for v in msg.get_all("Authentication-Results", [])]


def ours(msg: Message) -> authres.AuthenticationResultsHeader:
    """The one Authentication-Results field with our authserv-id."""
    mine = [h for h in auth_results(msg) if h.authserv_id.lower() == AUTHSERV_ID]
    assert len(mine) == 1, f"expected one AR field for {AUTHSERV_ID}: {msg.items()}"
    return mine[0]


def our_field(msg: Message) -> str:
    """The text of our Authentication-Results field (unfolded)."""
    ours(msg)
    return next(unfold(v) for v in msg.get_all("Authentication-Results")
                if unfold(v).lower().startswith(AUTHSERV_ID))


def spf(header: authres.AuthenticationResultsHeader) -> dict[str, tuple[str, str]]:
    """{'helo'|'mailfrom': (result, value)} of the header's spf= results."""
    found = {}
    for result in header.results:
        if result.method == "spf":
            for prop in result.properties:
                if prop.type == "smtp":
                    found[prop.name] = (result.result, prop.value)
    return found


def assert_reply(reply: Reply, expected: tuple[int, str]) -> None:
    assert (reply.code, reply.enhanced) == expected, reply


def send(mta: Mta, *, source: str, helo: str, sender: str, label: str,
         extra_headers: tuple[str, ...] = ()) -> tuple[str, Reply]:
    """One message in one session; (token, reply to MAIL FROM or to the end of DATA)."""
    tok = token(label)
    with mta.connect(source, helo) as client:
        reply = client.mail(sender)
        if reply.code != ACCEPTED:
            return tok, reply
        assert client.rcpt().code == ACCEPTED
        return tok, client.data(message(tok, sender=sender, extra_headers=extra_headers))


def header_lines(raw: bytes, name: str) -> list[list[bytes]]:
    """The physical lines (CRLF or LF removed) of each field ``name`` in a raw message."""
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    fields: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        current = [line] if line.lower().startswith(name.lower().encode() + b":") else None
        if current is not None:
            fields.append(current)
    return fields


def log_lines(milter: SpfMilter, text: str) -> list[str]:
    """The milter's log lines containing text, waiting for the first (logging is queued)."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        found = [line for line in milter.log().splitlines() if text in line]
        if found or time.monotonic() > deadline:
            assert found, f"no log line with {text!r}:\n{milter.log()[-3000:]}"
            return found
        time.sleep(0.05)


def assert_not_delivered(mailbox: Mailbox, tok: str) -> None:
    assert mailbox.find(tok) == [], f"{tok} was delivered"


class MtaScenarios:
    """The end-to-end behaviour, the same through every MTA."""

    #: (code, enhanced code) the MTA gives at MAIL FROM while spfmilter is down,
    #: whether it went away before or during the SMTP session.
    MILTER_DOWN: tuple[int, str]

    # -- verdicts ------------------------------------------------------------

    @pytest.mark.parametrize("source", ["127.0.0.2", "::1"])
    def test_pass_is_delivered_with_our_header_on_top(self, mta: Mta, source: str) -> None:
        tok, reply = send(mta, source=source, helo=PASS_HELO, sender="alice@pass.spf.test",
                          label="pass")
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        names = [name.lower() for name in msg.keys()]
        top = names.index("authentication-results")
        # Above the MTA's own Received: field and everything the client sent.
        assert top < names.index("received") < names.index("from"), names
        assert spf(ours(msg)) == {"helo": ("pass", PASS_HELO),
                                  "mailfrom": ("pass", "pass.spf.test")}
        assert msg["Received-SPF"].startswith("pass ")

    def test_ipv6_client_checked_against_ip6_mechanism(self, mta: Mta) -> None:
        tok, reply = send(mta, source="::1", helo=PASS_HELO, sender="alice@ip6.spf.test",
                          label="ip6")
        assert reply.code == ACCEPTED, reply
        assert spf(ours(mta.mailbox.wait_for(tok)))["mailfrom"] == ("pass", "ip6.spf.test")

    @pytest.mark.parametrize("source", ["127.0.0.3", "::1"])
    def test_fail_is_rejected_and_nothing_delivered(self, mta: Mta, source: str) -> None:
        tok = token("fail")
        with mta.connect(source, PASS_HELO) as client:
            reply = client.mail("bob@fail.spf.test")
            assert_reply(reply, SPF_FAIL)
            assert "SPF fail" in reply.text
            assert "is not allowed to send mail for fail.spf.test" in reply.text
            # The client cannot push the message through anyway.
            assert client.rcpt().code >= 500
            assert client.data(message(tok, sender="bob@fail.spf.test")).code >= 500
            assert client.rset().code == ACCEPTED
        assert_not_delivered(mta.mailbox, tok)

    @pytest.mark.parametrize(("sender", "result"), [
        ("carol@softfail.spf.test", "softfail"),
        ("dan@neutral.spf.test", "neutral"),
        ("erin@none.spf.test", "none"),
        ("frank@nosuch.invalid", "none"),
        ("grace@permerror.spf.test", "permerror"),
    ])
    def test_default_policy_accepts_and_labels(self, mta: Mta, sender: str,
                                               result: str) -> None:
        tok, reply = send(mta, source="127.0.0.4", helo=PASS_HELO, sender=sender,
                          label=result)
        assert reply.code == ACCEPTED, reply
        domain = sender.split("@")[1]
        assert spf(ours(mta.mailbox.wait_for(tok)))["mailfrom"] == (result, domain)

    @pytest.mark.parametrize("sender", ["heidi@servfail.test", "ivan@inc-servfail.spf.test"])
    def test_temperror_is_tempfailed(self, mta: Mta, sender: str) -> None:
        tok, reply = send(mta, source="127.0.0.4", helo=PASS_HELO, sender=sender,
                          label="temperror")
        assert_reply(reply, SPF_TEMPERROR)
        assert "SPF temperror" in reply.text
        assert_not_delivered(mta.mailbox, tok)

    # -- identities ----------------------------------------------------------

    def test_null_sender_is_judged_on_helo(self, mta: Mta) -> None:
        # <> is checked as postmaster@HELO: softfail.spf.test gives softfail...
        tok, reply = send(mta, source="127.0.0.5", helo="softfail.spf.test", sender="",
                          label="bounce")
        assert reply.code == ACCEPTED, reply
        results = spf(ours(mta.mailbox.wait_for(tok)))
        assert results["mailfrom"][0] == "softfail"
        assert results["helo"] == ("softfail", "softfail.spf.test")
        # ... and a failing HELO name has the bounce rejected.
        tok, reply = send(mta, source="127.0.0.5", helo="helo-fail.spf.test", sender="",
                          label="bounce-fail")
        assert_reply(reply, SPF_FAIL)
        assert "helo-fail.spf.test" in reply.text
        assert_not_delivered(mta.mailbox, tok)

    # -- clients that are not checked ----------------------------------------

    def test_internal_client_is_not_checked(self, mta: Mta) -> None:
        tok, reply = send(mta, source="127.0.0.1", helo=PASS_HELO, sender="bob@fail.spf.test",
                          label="internal")
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        assert spf(ours(msg)) == {}
        assert "SPF not checked: internal host" in our_field(msg)

    def test_authenticated_client_is_not_checked(self, mta: Mta, sasl_user: SaslUser) -> None:
        tok = token("auth")
        with mta.connect("127.0.0.6", PASS_HELO) as client:
            # The same sender is refused before the client logs in ...
            assert_reply(client.mail("bob@fail.spf.test"), SPF_FAIL)
            assert client.rset().code == ACCEPTED
            login = client.auth_plain(sasl_user.name, sasl_user.password)
            assert login.code == 235, login
            # ... and accepted after.
            assert client.mail("bob@fail.spf.test").code == ACCEPTED
            assert client.rcpt().code == ACCEPTED
            reply = client.data(message(tok, sender="bob@fail.spf.test"))
            assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        assert spf(ours(msg)) == {}
        assert "SPF not checked: authenticated" in our_field(msg)

    def test_wrong_password_does_not_skip_the_check(self, mta: Mta,
                                                    sasl_user: SaslUser) -> None:
        with mta.connect("127.0.0.6", PASS_HELO) as client:
            assert client.auth_plain(sasl_user.name, "wrong").code == 535
            assert_reply(client.mail("bob@fail.spf.test"), SPF_FAIL)

    # -- headers -------------------------------------------------------------

    def test_forged_results_removed_others_kept(self, mta: Mta) -> None:
        forged = (
            f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=bank.example",
            "Authentication-Results: other.example; dkim=pass header.d=pass.spf.test",
            f"Authentication-Results: {AUTHSERV_ID};\r\n\tdmarc=pass header.from=bank.example",
        )
        tok, reply = send(mta, source="127.0.0.2", helo=PASS_HELO, sender="alice@pass.spf.test",
                          label="forged", extra_headers=forged)
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        headers = auth_results(msg)
        assert [h.authserv_id for h in headers] == [AUTHSERV_ID, "other.example"]
        assert spf(headers[0])["mailfrom"] == ("pass", "pass.spf.test")
        assert [(r.method, r.result) for r in headers[1].results] == [("dkim", "pass")]
        assert "bank.example" not in "".join(msg.get_all("Authentication-Results"))

    def test_long_identities_are_folded_within_998(self, mta: Mta) -> None:
        # Issue 8 item 4: long HELO and MAIL FROM domain with long comments
        # gave one 1150-octet line.  Folded by spfmilter ("\n" + space), the
        # MTA writes CRLF-folded lines that unfold to exactly the results meant.
        helo = ".".join(["h" * 63] * 3) + "." + "x" * 61
        domain = ".".join(["d" * 60] * 3) + ".none.spf.test"
        sender = f'"a b(c)"@{domain}'
        tok, reply = send(mta, source="127.0.0.4", helo=helo, sender=sender, label="long")
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        raw = mta.mailbox.raw(tok)
        (ar_lines,) = [f for f in header_lines(raw, "Authentication-Results")
                       if AUTHSERV_ID.encode() in f[0]]
        (rspf_lines,) = header_lines(raw, "Received-SPF")
        for name, lines in (("Authentication-Results", ar_lines),
                            ("Received-SPF", rspf_lines)):
            assert len(lines) > 2, lines
            check_lines(name, [line.decode("ascii") for line in lines])
        assert spf(ours(msg)) == {"helo": ("none", helo), "mailfrom": ("none", domain)}
        rspf = unfold(msg["Received-SPF"])
        assert rspf.startswith("none ")
        assert '"\\"a b(c)\\"@' + domain + '";' in rspf
        assert f"helo={helo};" in rspf

    # -- HELO hygiene ----------------------------------------------------------

    def test_helo_literal_mismatch_is_noted_by_default(self, mta: Mta,
                                                       milter: SpfMilter) -> None:
        tok, reply = send(mta, source="127.0.0.4", helo="[192.0.2.99]",
                          sender="alice@pass.spf.test", label="literal")
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        assert our_field(msg).startswith(
            f"{AUTHSERV_ID} (HELO literal_mismatch: [192.0.2.99]);")
        assert spf(ours(msg)) == {"mailfrom": ("pass", "pass.spf.test")}
        _wait_for(lambda: "ip=127.0.0.4 helo=[192.0.2.99] sender=<alice@pass.spf.test> "
                  "helo_spf=none mailfrom_spf=pass helo_finding=literal_mismatch "
                  "action=accept" in milter.log())
        # a literal of the MTA's address ({daemon_addr}) claims to be us as well
        tok, reply = send(mta, source="127.0.0.4", helo="[127.0.0.1]",
                          sender="alice@pass.spf.test", label="literal-us")
        assert reply.code == ACCEPTED, reply
        assert our_field(mta.mailbox.wait_for(tok)).startswith(
            f"{AUTHSERV_ID} (HELO literal_mismatch, is_us: [127.0.0.1]);")
        # the client's own address, spelt as IPv6, is no finding
        tok, reply = send(mta, source="127.0.0.4", helo="[IPv6:::ffff:127.0.0.4]",
                          sender="alice@pass.spf.test", label="literal-ok")
        assert reply.code == ACCEPTED, reply
        assert "HELO" not in our_field(mta.mailbox.wait_for(tok))

    def test_helo_actions_reject_through_the_mta(self, mta: Mta, milter: SpfMilter) -> None:
        text = milter.config_path.read_text()

        def reload(config: str) -> None:
            before = milter.log().count("configuration reloaded")
            milter.config_path.write_text(config)
            assert milter.daemon.proc is not None
            milter.daemon.proc.send_signal(signal.SIGHUP)
            _wait_for(lambda: milter.log().count("configuration reloaded") > before)

        reload(text.replace("[policy]\n", "[policy]\nhelo_literal_mismatch = reject\n"
                            "helo_is_us = reject\n", 1))
        try:
            tok = token("helo-reject")
            with mta.connect("127.0.0.4", "[192.0.2.99]") as client:
                reply = client.mail("alice@pass.spf.test")
                assert_reply(reply, HELO_REJECT)
                assert "HELO [192.0.2.99] is not the address of the client 127.0.0.4" in \
                    reply.text
                assert client.rcpt().code >= 500
            assert_not_delivered(mta.mailbox, tok)
            # the MTA's own name (its j macro, here also the authserv-id)
            with mta.connect("127.0.0.4", AUTHSERV_ID) as client:
                reply = client.mail("alice@pass.spf.test")
                assert_reply(reply, HELO_REJECT)
                assert f"HELO {AUTHSERV_ID} claims to be this host" in reply.text
            # the internal host is exempt
            tok, reply = send(mta, source="127.0.0.1", helo="[192.0.2.99]",
                              sender="alice@pass.spf.test", label="helo-internal")
            assert reply.code == ACCEPTED, reply
            assert "HELO" not in our_field(mta.mailbox.wait_for(tok))
        finally:
            reload(text)

    # -- sessions ------------------------------------------------------------

    def test_each_message_of_a_session_judged_on_its_own(self, mta: Mta) -> None:
        first, second, third = token("multi"), token("multi"), token("multi")
        with mta.connect("127.0.0.5", PASS_HELO) as client:
            assert_reply(client.mail("bob@fail.spf.test"), SPF_FAIL)
            assert client.mail("alice@pass.spf.test").code == ACCEPTED
            assert client.rcpt().code == ACCEPTED
            assert client.data(message(first, sender="alice@pass.spf.test")).code == ACCEPTED
            # Next transaction right after DATA, without RSET.
            assert client.mail("carol@softfail.spf.test").code == ACCEPTED
            assert client.rcpt().code == ACCEPTED
            assert client.data(message(second, sender="carol@softfail.spf.test")).code == \
                ACCEPTED
            assert_reply(client.mail("heidi@servfail.test"), SPF_TEMPERROR)
            # A transaction abandoned with RSET leaves nothing behind.
            assert client.mail("dan@neutral.spf.test").code == ACCEPTED
            assert client.rset().code == ACCEPTED
            assert client.mail("judy@include.spf.test").code == ACCEPTED
            assert client.rcpt().code == ACCEPTED
            assert client.data(message(third, sender="judy@include.spf.test")).code == ACCEPTED
        expected = {first: ("pass", "pass.spf.test"),
                    second: ("softfail", "softfail.spf.test"),
                    third: ("pass", "include.spf.test")}
        for tok, result in expected.items():
            msg = mta.mailbox.wait_for(tok)
            assert len(msg.get_all("Authentication-Results")) == 1
            assert spf(ours(msg))["mailfrom"] == result

    # -- reject_at = rcpt (issue 10 part 1) ----------------------------------

    def test_reject_at_rcpt_refuses_one_recipient_delivers_to_the_exempt(
            self, mta: Mta, milter: SpfMilter) -> None:
        postmaster = f"postmaster@{MAIL_DOMAIN}"
        tok = token("rcpt")
        with milter.reconfigured("reject_at = rcpt\nexempt_recipients = postmaster"):
            with mta.connect("127.0.0.3", PASS_HELO) as client:
                assert client.mail("bob@fail.spf.test").code == ACCEPTED
                reply = client.rcpt(RECIPIENT)
                assert_reply(reply, SPF_FAIL)
                assert "is not allowed to send mail for fail.spf.test" in reply.text
                assert client.rcpt(postmaster).code == ACCEPTED
                reply = client.data(message(tok, sender="bob@fail.spf.test"))
                assert reply.code == ACCEPTED, reply
            msg = mta.mailbox.wait_for(tok)  # one copy: the refused recipient got none
            assert len(msg.get_all("Authentication-Results")) == 1
            assert spf(ours(msg)) == {"helo": ("pass", PASS_HELO),
                                      "mailfrom": ("fail", "fail.spf.test")}
            if msg["Delivered-To"] is not None:
                assert msg.get_all("Delivered-To") == [postmaster]
            line = (f"action=accept would=reject reason=\"mailfrom fail\" exempt=postmaster "
                    f"rcpts={RECIPIENT}:reject,{postmaster}:accept")
            assert len(log_lines(milter, line)) == 1

    def test_reject_at_rcpt_all_refused_nothing_delivered_logged_once(
            self, mta: Mta, milter: SpfMilter) -> None:
        tok = token("rcpt-none")
        other = f"other@{MAIL_DOMAIN}"
        extra = f"\n[recipient:{RECIPIENT}]\ntest_only = yes\n"
        with milter.reconfigured("reject_at = rcpt", extra):
            with mta.connect("127.0.0.3", PASS_HELO) as client:
                assert client.mail("carl@fail.spf.test").code == ACCEPTED
                assert_reply(client.rcpt(other), SPF_FAIL)
                assert_reply(client.rcpt(f"more@{MAIL_DOMAIN}"), SPF_FAIL)
                assert client.data(message(tok, sender="carl@fail.spf.test")).code >= 500
                assert client.rset().code == ACCEPTED
                # the same sender to the test_only recipient: delivered, tagged
                assert client.mail("carl@fail.spf.test").code == ACCEPTED
                assert client.rcpt(RECIPIENT).code == ACCEPTED
                assert client.data(message(tok, sender="carl@fail.spf.test")).code == ACCEPTED
            msg = mta.mailbox.wait_for(tok)
            assert spf(ours(msg))["mailfrom"] == ("fail", "fail.spf.test")
            refused = f"action=reject reason=\"mailfrom fail\" rcpts={other}:reject,"
            test_only = f"action=accept would=reject reason=\"mailfrom fail\" rcpts={RECIPIENT}"
            assert len(log_lines(milter, refused)) == 1
            assert len(log_lines(milter, test_only)) == 1

    # -- the milter process --------------------------------------------------

    def test_milter_runs_unprivileged_behind_a_closed_socket(self, mta: Mta,
                                                             milter: SpfMilter) -> None:
        assert milter.daemon.proc is not None
        status = Path(f"/proc/{milter.daemon.proc.pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines()
                    if line.startswith("Uid:"))
        assert set(uids) == {str(pwd.getpwnam("nobody").pw_uid)}
        assert stat.S_IMODE(os.stat(milter.socket_path).st_mode) & 0o007 == 0

    # -- the milter going away -----------------------------------------------

    def test_milter_stopped_mid_session(self, mta: Mta, milter: SpfMilter) -> None:
        before, after = token("mid"), token("mid")
        try:
            with mta.connect("127.0.0.7", PASS_HELO) as client:
                assert client.mail("alice@pass.spf.test").code == ACCEPTED
                assert client.rcpt().code == ACCEPTED
                assert client.data(message(before, sender="alice@pass.spf.test")).code == \
                    ACCEPTED
                code = milter.stop()
                assert code == 0, f"spfmilter exited with {code}"
                assert_reply(client.mail("alice@pass.spf.test"), self.MILTER_DOWN)
        finally:
            if not milter.running:
                milter.start()
        assert spf(ours(mta.mailbox.wait_for(before)))["mailfrom"] == ("pass", "pass.spf.test")
        assert_not_delivered(mta.mailbox, after)

    def test_milter_down_tempfails_then_restart_recovers(self, mta: Mta,
                                                         milter: SpfMilter) -> None:
        code = milter.stop()
        assert code == 0, f"spfmilter exited with {code}"
        try:
            tok = token("down")
            with mta.connect("127.0.0.2", PASS_HELO) as client:
                reply = client.mail("alice@pass.spf.test")
                assert_reply(reply, self.MILTER_DOWN)
                assert client.rcpt().code >= 500  # no sender, no recipient
            assert_not_delivered(mta.mailbox, tok)
        finally:
            milter.start()
        tok, reply = send(mta, source="127.0.0.2", helo=PASS_HELO,
                          sender="alice@pass.spf.test", label="restarted")
        assert reply.code == ACCEPTED, reply
        assert spf(ours(mta.mailbox.wait_for(tok)))["mailfrom"] == ("pass", "pass.spf.test")
