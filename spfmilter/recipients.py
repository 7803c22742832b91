"""Per-recipient policy (``reject_at = rcpt``): pure functions, no I/O.

The message is judged once at MAIL FROM (:func:`spfmilter.policy.decide`); each
RCPT TO then gets its own decision.  A ``[recipient:ADDRESS]`` or
``[recipient:DOMAIN]`` section overrides the ``helo_*``/``mailfrom_*`` actions
and ``test_only``, option by option, the most specific section that sets the
option winning: the address, then the domain, then its parent domains.  An
option a recipient section sets also beats any ``[domain:NAME]`` (sender)
section.  A recipient in ``exempt_recipients`` (its local part or its whole
address) is never refused; its decision keeps the verdict it escaped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from . import names, policy
from .config import PolicyConfig

_SEVERITY = {"accept": 0, "tempfail": 1, "reject": 2}


@dataclass(frozen=True)
class RecipientDecision:
    """What one RCPT TO gets; ``exempt`` is the exempt_recipients entry that saved it."""

    recipient: str  # as given, without angle brackets
    decision: policy.Decision
    exempt: str | None = None

    @property
    def action(self) -> str:
        return self.decision.action


def bare(recipient: str) -> str:
    """The RCPT TO argument without its angle brackets."""
    address = recipient.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def split_address(recipient: str) -> tuple[str, str]:
    """``<Bob@Example.NET>`` -> ``("bob", "example.net")``; domain "" if none or invalid."""
    address = bare(recipient)
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower(), ""
    if local.startswith("@") and ":" in local:  # a source route: @a,@b:user
        local = local.split(":", 1)[1]
    try:
        domain = names.ascii_domain(domain)
    except ValueError:
        domain = ""
    return local.lower(), domain


def section_chain(recipient: str) -> list[str]:
    """Keys of the ``[recipient:X]`` sections that may cover ``recipient``, most specific first."""
    local, domain = split_address(recipient)
    if not domain:
        return []
    labels = domain.split(".")
    return [f"{local}@{domain}", *(".".join(labels[i:]) for i in range(len(labels)))]


def overrides(cfg: PolicyConfig, recipient: str) -> dict[str, Any]:
    """The options the recipient's sections set: for each, the most specific section's value."""
    found: dict[str, Any] = {}
    for key in section_chain(recipient):
        for name, value in cfg.recipients.get(key, {}).items():
            found.setdefault(name, value)
    return found


def exemption(cfg: PolicyConfig, recipient: str) -> str | None:
    """The exempt_recipients entry matching ``recipient`` (whole address first), or None."""
    if not cfg.exempt_recipients:
        return None
    local, domain = split_address(recipient)
    if domain and f"{local}@{domain}" in cfg.exempt_recipients:
        return f"{local}@{domain}"
    return local if local in cfg.exempt_recipients else None


def effective_policy(cfg: PolicyConfig, recipient: str) -> PolicyConfig:
    """``cfg`` as it applies to mail for ``recipient``."""
    found = overrides(cfg, recipient)
    if not found:
        return cfg
    domains: Mapping[str, Mapping[str, str]] = MappingProxyType({
        name: MappingProxyType({k: v for k, v in acts.items() if k not in found})
        for name, acts in cfg.domains.items()})
    return dataclasses.replace(cfg, domains=domains, **found)


def decide(facts: policy.Facts, cfg: PolicyConfig, recipient: str,
           message: policy.Decision | None = None) -> RecipientDecision:
    """The decision for one recipient; ``message`` is decide(facts, cfg) when known."""
    effective = effective_policy(cfg, recipient)
    if effective is not cfg or message is None:
        message = policy.decide(facts, effective)
    exempt = exemption(cfg, recipient) if message.action != "accept" else None
    if exempt is not None:
        message = policy.Decision("accept", message.would_action, reason=message.reason,
                                  identity=message.identity)
    return RecipientDecision(bare(recipient), message, exempt)


def summary(decisions: list[RecipientDecision]) -> RecipientDecision | None:
    """The recipient whose decision stands for the message in its log line.

    Delivered to anyone: the accepted recipient with the most severe escaped
    verdict (an exempt one shows ``would=reject``); else the most severe refusal.
    """
    if not decisions:
        return None
    accepted = [d for d in decisions if d.action == "accept"]
    pool = accepted or decisions
    key = "would_action" if accepted else "action"
    return max(pool, key=lambda d: _SEVERITY[getattr(d.decision, key)])


#: Recipients named in a log line; the rest are counted (a line stays readable).
LOG_RECIPIENTS = 20


def log_list(decisions: list[RecipientDecision]) -> str:
    """``a@x:reject,b@x:accept`` for the log, at most LOG_RECIPIENTS named, then ``+N``."""
    shown = [f"{d.recipient}:{d.action}" for d in decisions[:LOG_RECIPIENTS]]
    if len(decisions) > LOG_RECIPIENTS:
        shown.append(f"+{len(decisions) - LOG_RECIPIENTS}")
    return ",".join(shown)
