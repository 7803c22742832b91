"""The policy: SPF results in, a verdict out.  Pure functions, no I/O.

Each checked identity gets the action its result maps to in ``[policy]``, or in
the most specific ``[domain:NAME]`` section covering the sender domain that
sets that action.  The most severe action wins (reject > tempfail > accept);
on a tie HELO drives the verdict, since it was checked first.  Identities that
could not be checked (``SpfResult.checked`` false) take no part.

Reply codes follow RFC 7372: ``550 5.7.23`` for a rejected fail (and any other
rejected result), ``550 5.7.24``/``451 4.7.24`` for SPF errors and ``451 4.7.1``
for a temporary refusal of a non-error result.

HELO hygiene findings (:mod:`spfmilter.helo`) get the action of their
``helo_<finding>`` option and compete on the same severity scale; a tie goes
to the SPF result.  Their replies are ``550 5.7.1``/``451 4.7.1`` (RFC 3463:
delivery not authorized; RFC 7372 has no code for HELO) with a fixed text
naming the finding, since reply_text's placeholders describe an SPF result.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from . import names, replies
from .config import PolicyConfig
from .results import SpfResult

_SEVERITY = {"accept": 0, "tempfail": 1, "reject": 2}
_ERRORS = ("permerror", "temperror")


@dataclass(frozen=True)
class Facts:
    """What is known about a message when the policy is asked."""

    ip: str
    helo: SpfResult | None = None
    mailfrom: SpfResult | None = None
    sender_domain: str = ""  # the domain MAIL FROM was checked as (HELO name for <>)
    skip: str | None = None  # why the client is not checked ("authenticated"...)
    helo_findings: tuple[str, ...] = ()  # from spfmilter.helo.classify
    helo_name: str = ""  # the HELO text as the client gave it (for hygiene replies)


@dataclass(frozen=True)
class Decision:
    """The verdict.  ``code``, ``xcode`` and ``reply_lines`` are set only when
    ``action`` is not accept; ``would_action`` is the verdict before test_only."""

    action: str  # "accept", "reject" or "tempfail"
    would_action: str
    code: int | None = None  # 550, 451
    xcode: str | None = None  # "5.7.23"
    reply_lines: tuple[str, ...] = ()
    reason: str = ""  # short text for the log
    identity: str | None = None  # the identity that drove the verdict


@functools.lru_cache(maxsize=512)  # sender domains repeat; ascii_domain is not free
def _domain_chain(domain: str) -> tuple[str, ...]:
    """``a.b.example`` -> ``("a.b.example", "b.example", "example")``, in A-labels
    (the form ``[domain:NAME]`` sections are stored in)."""
    try:
        domain = names.ascii_domain(domain)
    except ValueError:
        return ()
    labels = domain.split(".")
    return tuple(".".join(labels[i:]) for i in range(len(labels)) if labels[i])


def action_for(policy: PolicyConfig, identity: str, result: str, sender_domain: str = "") -> str:
    """The action ``policy`` gives ``result`` of ``identity`` for mail from ``sender_domain``."""
    option = f"{identity}_{result}"
    if not policy.domains:  # no [domain:NAME] sections: nothing to look up
        return str(getattr(policy, option))
    for domain in _domain_chain(sender_domain):
        actions = policy.domains.get(domain)
        if actions is not None and option in actions:
            return actions[option]
    return str(getattr(policy, option))


def _reply_codes(action: str, result: str) -> tuple[int, str]:
    if action == "reject":
        return 550, "5.7.24" if result in _ERRORS else "5.7.23"
    return 451, "4.7.24" if result in _ERRORS else "4.7.1"


def decide(facts: Facts, policy: PolicyConfig) -> Decision:
    """Decide what to do with the message described by ``facts``."""
    if facts.skip:
        return Decision("accept", "accept", reason=f"skipped: {facts.skip}")
    checked = [spf for spf in (facts.helo, facts.mailfrom) if spf is not None and spf.checked]
    verdict = "accept"
    driver: SpfResult | None = None
    for spf in checked:
        action = action_for(policy, spf.identity, spf.result, facts.sender_domain)
        if _SEVERITY[action] > _SEVERITY[verdict]:
            verdict, driver = action, spf
    hygiene = helo_decision(facts, policy)
    if hygiene is not None and _SEVERITY[hygiene.would_action] > _SEVERITY[verdict]:
        return hygiene
    if driver is None:
        return _ACCEPT_POLICY if checked else _ACCEPT_NO_RESULT
    reason = f"{driver.identity} {driver.result}"
    if policy.test_only:
        return Decision("accept", verdict, reason=reason, identity=driver.identity)
    code, xcode = _reply_codes(verdict, driver.result)
    lines = replies.render(
        policy.reply_text,
        identity=driver.identity,
        domain=driver.domain,
        ip=facts.ip,
        result=driver.result,
        explanation=driver.explanation if driver.result == "fail" else "",
    )
    return Decision(verdict, verdict, code, xcode, lines, reason, driver.identity)


# The common verdicts, made once (a Decision is immutable).
_ACCEPT_POLICY = Decision("accept", "accept", reason="policy")
_ACCEPT_NO_RESULT = Decision("accept", "accept", reason="no SPF result")


_HYGIENE_TEXT = {
    "literal_mismatch": "HELO {helo} is not the address of the client {ip}",
    "is_us": "HELO {helo} claims to be this host, but the client {ip} is not",
    "invalid": "HELO {helo} is neither a valid domain name nor an address literal",
}


def helo_decision(facts: Facts, policy: PolicyConfig) -> Decision | None:
    """The verdict the most severe HELO hygiene finding asks for (None if none).

    An accepted finding gives an accept Decision, so that its reason is known.
    """
    worst: tuple[str, str] | None = None
    for finding in facts.helo_findings:
        action = str(getattr(policy, f"helo_{finding}"))
        if worst is None or _SEVERITY[action] > _SEVERITY[worst[1]]:
            worst = finding, action
    if worst is None:
        return None
    finding, action = worst
    reason = f"helo {finding}"
    if action == "accept" or policy.test_only:
        return Decision("accept", action, reason=reason, identity="helo")
    code, xcode = (550, "5.7.1") if action == "reject" else (451, "4.7.1")
    helo = replies.clean(facts.helo_name)
    helo = helo if len(helo) <= 80 else helo[:77] + "..."
    text = _HYGIENE_TEXT[finding].format(helo=helo or "-", ip=replies.clean(facts.ip) or "-")
    return Decision(action, action, code, xcode, (text,), reason, "helo")


def dmarc_deferrable(decision: Decision, policy: PolicyConfig) -> bool:
    """True when ``dmarc_defer`` holds this decision until the From field's DMARC
    policy is known: a reject driven by MAIL FROM (HELO rejects are never held)."""
    return (policy.dmarc_defer and decision.action == "reject"
            and decision.identity == "mailfrom")


def after_dmarc(decision: Decision, dmarc_policy: str) -> Decision:
    """A held decision once the DMARC policy is known: dropped (accept, the
    DMARC verifier downstream decides) for p=quarantine or p=reject; for
    anything else -- none, no record, a bad From, a DNS error -- the SPF
    decision as it was (never fail open)."""
    if dmarc_policy not in ("quarantine", "reject"):
        return decision
    return replace(decision, action="accept", code=None, xcode=None, reply_lines=())


_ERROR_REPLIES = {
    "tempfail": (451, "4.3.0", "internal error while checking SPF, try again later"),
    "reject": (550, "5.3.0", "internal error while checking SPF"),
}


def error_decision(on_error: str) -> Decision:
    """The verdict when checking failed with an internal error (``[milter] on_error``)."""
    if on_error == "accept":
        return Decision("accept", "accept", reason="internal error")
    code, xcode, text = _ERROR_REPLIES[on_error]
    return Decision(on_error, on_error, code, xcode, (text,), "internal error")
