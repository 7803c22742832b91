"""The SPF milter: one SpfMilter per SMTP connection, on libmilter_ext."""

from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import libmilter_ext as lm

from . import dmarc, headers, logwriter, policy, recipients, transaction
from .config import Config
from .results import SpfResult
from .spfcheck import SpfChecker

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

_VERDICTS = {"accept": lm.CONTINUE, "reject": lm.REJECT, "tempfail": lm.TEMPFAIL}
_UNSAFE = re.compile(r"[^\x21-\x7e]")
_UNSAFE_IN_QUOTES = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')  # also '"' and '\\'



@dataclass(frozen=True)
class Runtime:
    """Everything a connection needs; replaced as a whole on reload."""

    config: Config
    checker: SpfChecker
    metrics: Metrics | None = None  # the daemon's, kept across reloads; None: off


class RuntimeHolder:
    """The current Runtime; new connections take whatever is current."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime


def logvalue(value: object) -> str:
    """A log field value that cannot break the line or fake another field."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if _UNSAFE.search(text) or '"' in text or "=" in text:
        text = '"' + _UNSAFE_IN_QUOTES.sub(_escape_char, text) + '"'
    return text


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in '"\\':
        return "\\" + char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte carried as a surrogate escape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class SpfMilter(lm.Milter):
    """Checks HELO at HELO, MAIL FROM at MAIL FROM; headers go in at eom."""

    header_names = frozenset({"authentication-results"})
    macros = {
        "connect": "j {daemon_name} {daemon_addr} {if_addr}",
        "envfrom": "i {auth_authen} {auth_type}",
        "eom": "i",
    }

    def __init__(self, runtime: Runtime) -> None:
        self.cfg = runtime.config
        self.checker = runtime.checker
        self.metrics = runtime.metrics
        self.failsafe = _VERDICTS[self.cfg.milter.on_error]
        self.ip: str | None = None
        self.client_skip: str | None = None
        self.trusted = False
        self.helo_name = ""
        self.helo_result: SpfResult | None = None
        self.forwarder: str | None = None
        self.forwarder_checked = False
        self.receiver = ""
        self.our_addresses: tuple[str, ...] = ()
        self._reset()

    def _reset(self) -> None:
        self.sender = ""
        self.verdict: transaction.Verdict | None = None
        self.queue_id: str | None = None
        self.forged: list[int] = []
        self.ar_seen = 0
        self.rcpts: list[recipients.RecipientDecision] = []  # reject_at = rcpt
        self._judging: int | None = None  # the AR field being judged, for on_exception

    # -- stages --------------------------------------------------------------
    @lm.deferred  # always CONTINUE: runs at envfrom, without a GIL hand-off of its own
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.ip = transaction.client_ip(hostaddr[0])  # ::ffff:a.b.c.d is a.b.c.d
        self.client_skip = transaction.client_skip(self.cfg, self.ip)
        self.trusted = transaction.is_trusted_relay(self.cfg, self.ip)
        self.receiver = self.getsymval("j") or ""
        self.our_addresses = transaction.local_addresses(
            self.getsymval("{daemon_addr}"), self.getsymval("{if_addr}"))
        return lm.CONTINUE

    @lm.deferred  # always CONTINUE: the result waits for envfrom anyway
    def helo(self, name: str) -> int:
        self.helo_name = name
        self.helo_result = None
        if self.cfg.spf.check_helo and self.client_skip is None and self.ip is not None:
            start = time.perf_counter() if self.metrics is not None else 0.0
            self.helo_result = self.checker.check_helo(
                self.ip, name, receiver=self.receiver or self.cfg.spf.authserv_id)
            if self.metrics is not None and self.helo_result.checked:
                self.metrics.evaluation("helo", time.perf_counter() - start)
        return lm.CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        self._log_pending("aborted")
        self._reset()
        self.sender = sender
        self.queue_id = self.getsymval("i")
        start = time.perf_counter() if self.metrics is not None else 0.0
        authenticated = bool(self.getsymval("{auth_authen}"))
        skip = self.client_skip
        if skip is None and not (authenticated and self.cfg.policy.skip_authenticated):
            skip = self._forwarder_skip()
        verdict = transaction.judge(
            self.cfg, self.checker, ip=self.ip, helo=self.helo_name, sender=sender,
            helo_result=self.helo_result, authenticated=authenticated, skip=skip,
            receiver=self.receiver, our_addresses=self.our_addresses)
        if self.metrics is not None:
            self.metrics.evaluation("mailfrom", time.perf_counter() - start)
        self.verdict = verdict
        action = verdict.decision.action
        if action == "accept" or self.cfg.policy.reject_at == "rcpt" or self._hold(verdict):
            return lm.CONTINUE
        self._reply(verdict.decision)
        self._log(verdict, action)
        self.verdict = None
        return _VERDICTS[action]

    @lm.deferred  # only judged at eom: runs there, without a GIL hand-off of its own
    def header(self, name: str, value: str) -> int:
        if name.lower() == "authentication-results":
            self.ar_seen += 1
            if self.cfg.headers.remove_forged and not self.trusted:
                self._judging = self.ar_seen
                if headers.is_own_authres(value, self.cfg.spf.authserv_id):
                    self.forged.append(self.ar_seen)
                self._judging = None
        return lm.CONTINUE

    def eom(self) -> int:
        verdict = self.verdict
        if verdict is None:  # no MAIL FROM seen (cannot happen with a sane MTA)
            return lm.CONTINUE
        self.queue_id = self.getsymval("i") or self.queue_id
        for index in sorted(self.forged, reverse=True):
            self.chgheader("Authentication-Results", index, None)
        for name, value in reversed(verdict.header_fields):
            self.addheader(name, value, 0)
        self._log(verdict, verdict.decision.action)
        self.verdict = None
        return lm.CONTINUE

    def abort(self) -> None:
        self._log_pending("aborted")
        self._reset()

    @lm.deferred  # runs after the connection is gone, at the next GIL hold
    def close(self) -> None:
        self._log_pending("aborted")

    def on_exception(self, stage: str, exc: BaseException) -> int:
        if self.metrics is not None:
            self.metrics.internal_error(stage)
        log.error("qid=%s ip=%s helo=%s sender=%s: internal error in %s, action=%s: %s",
                  logvalue(self.queue_id), logvalue(self.ip), logvalue(self.helo_name),
                  logvalue(self.sender), stage, self.cfg.milter.on_error, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        decision = policy.error_decision(self.cfg.milter.on_error)
        accept = decision.action == "accept"
        if not accept and stage not in ("abort", "close"):
            try:
                self._reply(decision)  # a no-reply stage's verdict waits for eom
            except lm.MilterError:
                pass
        if stage == "envrcpt":  # that recipient got the fail-safe; the message goes on
            pass
        elif not accept or stage in ("eom", "abort", "close"):
            self.verdict = None
        elif stage == "envfrom":  # accepted unchecked: eom still removes forged headers
            self.verdict = transaction.Verdict(None, None, decision, None, ())
        elif stage == "header" and self._judging is not None:
            self.forged.append(self._judging)  # a field we could not judge is not trusted
        return self.failsafe

    # -- helpers -------------------------------------------------------------
    def _forwarder_skip(self) -> str | None:
        if not self.cfg.policy.forwarders or self.ip is None:
            return None
        if not self.forwarder_checked:
            self.forwarder = transaction.forwarder_skip(self.cfg, self.checker, self.ip,
                                                        self.helo_name, self.receiver)
            self.forwarder_checked = True
        return self.forwarder

    def _hold(self, verdict: transaction.Verdict) -> bool:
        """True to hold a reject until a later stage (DmarcSpfMilter)."""
        return False

    def _reply(self, decision: policy.Decision) -> None:
        if decision.code is not None:
            self.setreply(str(decision.code), decision.xcode, *decision.reply_lines)

    def _log_pending(self, outcome: str) -> None:
        if self.verdict is not None:
            if self.rcpts and all(r.action != "accept" for r in self.rcpts):
                outcome = ""  # every RCPT refused: the transaction ended as decided
            self._log(self.verdict, self.verdict.decision.action, outcome)
            self.verdict = None

    def _log(self, verdict: transaction.Verdict, action: str, outcome: str = "") -> None:
        if self.metrics is not None:
            self.metrics.transaction(verdict, action)
        if not log.isEnabledFor(logging.INFO):
            return
        d = verdict.decision
        rcpt_fields = ""
        chosen = recipients.summary(self.rcpts)
        if chosen is not None:  # reject_at = rcpt: the recipient that stands for the message
            d, action = chosen.decision, chosen.action
            rcpt_fields = "".join((
                f" exempt={logvalue(chosen.exempt)}" if chosen.exempt else "",
                " rcpts=" + logvalue(recipients.log_list(self.rcpts))))
        logwriter.info(log, _LOG_LINE % (
            logvalue(self.queue_id), logvalue(self.ip), logvalue(self.helo_name),
            logvalue(self.sender),
            verdict.helo.result if verdict.helo else "-",
            verdict.mailfrom.result if verdict.mailfrom else "-",
            f" helo_finding={','.join(verdict.helo_findings)}" if verdict.helo_findings else "",
            action, f" would={d.would_action}" if d.would_action != action else "",
            logvalue(d.reason), rcpt_fields, _dmarc_fields(verdict),
            f" outcome={outcome}" if outcome else ""))


_LOG_LINE = ("qid=%s ip=%s helo=%s sender=%s helo_spf=%s mailfrom_spf=%s%s action=%s%s "
             "reason=%s%s%s%s")


class RcptSpfMilter(SpfMilter):
    """``reject_at = rcpt``: the verdict judged at MAIL FROM is given per RCPT TO.

    A class of its own so that with ``reject_at = mail`` the envrcpt stage stays
    negotiated away (libmilter_ext skips stages a class does not override).
    """

    def envrcpt(self, recipient: str, *params: str) -> int:
        verdict = self.verdict
        if verdict is None:  # MAIL FROM already answered (fail-safe)
            return lm.CONTINUE
        if verdict.facts is None:  # accepted unchecked after an internal error
            decided = recipients.RecipientDecision(recipients.bare(recipient), verdict.decision)
        else:
            decided = recipients.decide(verdict.facts, self.cfg.policy, recipient,
                                        verdict.decision)
        self.rcpts.append(decided)
        if decided.action == "accept":
            return lm.CONTINUE
        self._reply(decided.decision)
        return _VERDICTS[decided.action]


def _dmarc_fields(verdict: transaction.Verdict) -> str:
    if verdict.dmarc is None:
        return ""
    deferred = " deferred=dmarc" if verdict.deferred else ""
    return (f" dmarc={logvalue(verdict.dmarc.policy)}{deferred}"
            f" header_from={logvalue(verdict.dmarc.domain)}")


class DmarcSpfMilter(SpfMilter):
    """SpfMilter with ``dmarc_defer``: a MAIL FROM reject waits for the From field.

    A class of its own so that the default configuration neither receives From
    fields nor negotiates the end-of-headers stage.
    """

    header_names = SpfMilter.header_names | {"from"}
    macros = {**SpfMilter.macros, "eoh": "i"}

    def _reset(self) -> None:
        super()._reset()
        self.held = False
        self.from_values: list[str] = []

    def _hold(self, verdict: transaction.Verdict) -> bool:
        self.held = transaction.held(self.cfg, verdict)
        return self.held

    @lm.deferred  # the From values wait for eoh, which runs it first
    def header(self, name: str, value: str) -> int:
        if self.held and name.lower() == "from":
            self.from_values.append(value)
            return lm.CONTINUE
        return super().header(name, value)

    def eoh(self) -> int:
        if not self.held or self.verdict is None:
            return lm.CONTINUE
        self.held = False
        self.queue_id = self.getsymval("i") or self.queue_id
        verdict = self.verdict = transaction.review_dmarc(self.checker, self.verdict,
                                                          self.from_values)
        action = verdict.decision.action
        if action == "accept":
            return lm.CONTINUE
        self._reply(verdict.decision)
        self._log(verdict, action)
        self.verdict = None
        return _VERDICTS[action]

    def on_exception(self, stage: str, exc: BaseException) -> int:
        if stage == "eoh" and self.verdict is not None:  # the held reject gives way
            decision = policy.error_decision(self.cfg.milter.on_error)
            self.verdict = transaction.Verdict(self.verdict.helo, self.verdict.mailfrom,
                                               decision, None, self.verdict.header_fields)
        return super().on_exception(stage, exc)


def milter_class(cfg: Config) -> type[SpfMilter]:
    """The handler class a configuration calls for (its negotiation differs)."""
    if cfg.policy.reject_at == "rcpt":  # never with dmarc_defer (config)
        return RcptSpfMilter
    return DmarcSpfMilter if cfg.policy.dmarc_defer else SpfMilter


def factory(runtime: Runtime) -> tuple[Callable[[], SpfMilter], type[SpfMilter]]:
    """A milter factory for the connections negotiated under runtime, and its class.

    Handed to libmilter_ext.register/set_factory (again at each reload): a
    connection's handler is made lazily, by the factory it negotiated with,
    so a reload between its negotiation and its handler changes neither.
    """
    cls = milter_class(runtime.config)
    if cls is DmarcSpfMilter:
        dmarc.preload()  # else the first message waits for it (or after a reload)

    def make() -> SpfMilter:
        return cls(runtime)

    return make, cls
