"""``[policy] dmarc_defer = yes`` through a real MTA (mixed into TestSendmail/TestPostfix).

The running spfmilter is reloaded (SIGHUP) with the option on for one test and
back off after it.  The envelope sender fails SPF (fail.spf.test from
127.0.0.3); the From field names a domain of tests/data/zones/dmarc.test.zone.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.e2e.mta import Mta, SpfMilter, message
from tests.e2e.scenarios import (
    ACCEPTED,
    PASS_HELO,
    SPF_FAIL,
    assert_not_delivered,
    assert_reply,
    ours,
    spf,
    token,
)

SOURCE = "127.0.0.3"


def _reload(milter: SpfMilter, text: str) -> None:
    before = milter.log().count("configuration reloaded")
    milter.config_path.write_text(text)
    assert milter.daemon.proc is not None
    milter.daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while milter.log().count("configuration reloaded") <= before:
        assert time.monotonic() < deadline, milter.log()
        time.sleep(0.02)


def _decision(milter: SpfMilter, sender: str) -> str:
    """spfmilter's log line for the transaction from *sender*."""
    deadline = time.monotonic() + 15
    while True:
        lines = [x for x in milter.log().splitlines()
                 if f" sender=<{sender}> " in x and " action=" in x]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, milter.log()
        time.sleep(0.02)


class DmarcScenarios:
    @pytest.fixture
    def deferring(self, milter: SpfMilter) -> Iterator[SpfMilter]:
        original = milter.config_path.read_text()
        assert "\n[policy]\n" in original
        _reload(milter, original.replace("\n[policy]\n", "\n[policy]\ndmarc_defer = yes\n", 1))
        try:
            yield milter
        finally:
            _reload(milter, original)

    def test_dmarc_defer_delivers_a_fail_whose_from_domain_has_a_policy(
            self, mta: Mta, deferring: SpfMilter) -> None:
        tok = token("dmarc-deferred")
        sender = f"{tok}@fail.spf.test"
        with mta.connect(SOURCE, PASS_HELO) as client:
            assert client.mail(sender).code == ACCEPTED  # no reject at MAIL FROM
            assert client.rcpt().code == ACCEPTED
            reply = client.data(message(tok, sender="news@reject.dmarc.test"))
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        assert spf(ours(msg))["mailfrom"] == ("fail", "fail.spf.test")
        assert msg["Received-SPF"].startswith("fail ")
        line = _decision(deferring, sender)
        assert "action=accept would=reject" in line and "dmarc=reject deferred=dmarc" in line

    @pytest.mark.parametrize("from_domain,why", [
        ("none.dmarc.test", "dmarc=none"),
        ("pass.spf.test", 'dmarc="no record"'),
        ("servfail.test", "dmarc=temperror"),
    ])
    def test_dmarc_defer_rejects_at_end_of_data_without_a_policy(
            self, mta: Mta, deferring: SpfMilter, from_domain: str, why: str) -> None:
        tok = token("dmarc-kept")
        sender = f"{tok}@fail.spf.test"
        with mta.connect(SOURCE, PASS_HELO) as client:
            assert client.mail(sender).code == ACCEPTED
            assert client.rcpt().code == ACCEPTED
            reply = client.data(message(tok, sender=f"news@{from_domain}"))
        assert_reply(reply, SPF_FAIL)  # after the message, with the MAIL FROM reply's text
        assert "is not allowed to send mail for fail.spf.test" in reply.text
        assert_not_delivered(mta.mailbox, tok)
        line = _decision(deferring, sender)
        assert "action=reject" in line and why in line and "deferred" not in line

    def test_dmarc_defer_never_holds_a_helo_reject(self, mta: Mta,
                                                    deferring: SpfMilter) -> None:
        tok = token("dmarc-helo")
        sender = f"{tok}@fail.spf.test"
        with mta.connect(SOURCE, "helo-fail.spf.test") as client:
            reply = client.mail(sender)
        assert_reply(reply, SPF_FAIL)
        assert "helo-fail.spf.test" in reply.text
        assert "dmarc=" not in _decision(deferring, sender)
