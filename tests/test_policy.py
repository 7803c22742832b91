"""Policy: the result x action matrix, per-domain overrides, replies, test_only."""

from __future__ import annotations

import dataclasses
import itertools
from types import MappingProxyType

import pytest

from spfmilter.config import PolicyConfig
from spfmilter.policy import Decision, Facts, action_for, decide, error_decision
from spfmilter.results import IDENTITIES, RESULTS, SpfResult

SENDER_DOMAIN = "mail.example.com"
IP = "192.0.2.7"

# Expected replies, named once (RFC 7372).
REJECT_FAIL = (550, "5.7.23")
REJECT_ERROR = (550, "5.7.24")
TEMPFAIL_ERROR = (451, "4.7.24")
TEMPFAIL_OTHER = (451, "4.7.1")
EXPECTED_CODES = {
    ("reject", "pass"): REJECT_FAIL,
    ("reject", "fail"): REJECT_FAIL,
    ("reject", "softfail"): REJECT_FAIL,
    ("reject", "neutral"): REJECT_FAIL,
    ("reject", "none"): REJECT_FAIL,
    ("reject", "permerror"): REJECT_ERROR,
    ("reject", "temperror"): REJECT_ERROR,
    ("tempfail", "pass"): TEMPFAIL_OTHER,
    ("tempfail", "fail"): TEMPFAIL_OTHER,
    ("tempfail", "softfail"): TEMPFAIL_OTHER,
    ("tempfail", "neutral"): TEMPFAIL_OTHER,
    ("tempfail", "none"): TEMPFAIL_OTHER,
    ("tempfail", "permerror"): TEMPFAIL_ERROR,
    ("tempfail", "temperror"): TEMPFAIL_ERROR,
}

DEFAULT_ACTIONS = {
    ("helo", "fail"): "reject",
    ("mailfrom", "fail"): "reject",
    ("mailfrom", "temperror"): "tempfail",
}


def _policy(domains: dict[str, dict[str, str]] | None = None, **options: object) -> PolicyConfig:
    proxy = MappingProxyType({k: MappingProxyType(v) for k, v in (domains or {}).items()})
    return PolicyConfig(domains=proxy, **options)  # type: ignore[arg-type]


def _result(identity: str, result: str, **kw: object) -> SpfResult:
    domain = "mx.example.com" if identity == "helo" else SENDER_DOMAIN
    return SpfResult(identity, result, domain=domain, **kw)  # type: ignore[arg-type]


def _facts(*results: SpfResult, sender_domain: str = SENDER_DOMAIN, **kw: object) -> Facts:
    by_identity = {spf.identity: spf for spf in results}
    return Facts(
        IP,
        helo=by_identity.get("helo"),
        mailfrom=by_identity.get("mailfrom"),
        sender_domain=sender_domain,
        **kw,  # type: ignore[arg-type]
    )


# Where an override section sits relative to the sender domain, and whether it applies.
SCENARIOS = {
    "default": (None, False),
    "domain": ("mail.example.com", True),
    "parent": ("example.com", True),
    "top": ("com", True),
    "unrelated": ("example.org", False),
    "suffix-not-label": ("ail.example.com", False),
    "subdomain-of-sender": ("x.mail.example.com", False),
}


def _matrix() -> list[tuple[str, str, str, str, bool]]:
    cases = []
    for identity, result, scenario, test_only in itertools.product(
        IDENTITIES, RESULTS, SCENARIOS, (False, True)
    ):
        for override in ("accept", "tempfail", "reject") if scenario != "default" else ("",):
            cases.append((identity, result, scenario, override, test_only))
    return cases


@pytest.mark.parametrize(("identity", "result", "scenario", "override", "test_only"), _matrix())
def test_matrix(identity: str, result: str, scenario: str, override: str, test_only: bool) -> None:
    section, applies = SCENARIOS[scenario]
    domains = {section: {f"{identity}_{result}": override}} if section else {}
    policy = _policy(domains, test_only=test_only)
    spf = _result(identity, result, explanation="see http://example.com/why")
    decision = decide(_facts(spf), policy)

    expected = override if applies else DEFAULT_ACTIONS.get((identity, result), "accept")
    assert decision.would_action == expected
    if expected == "accept":
        assert decision == Decision("accept", "accept", reason="policy")
        return
    assert decision.reason == f"{identity} {result}"
    assert decision.identity == identity
    if test_only:
        assert decision.action == "accept"
        assert (decision.code, decision.xcode, decision.reply_lines) == (None, None, ())
        return
    assert decision.action == expected
    assert (decision.code, decision.xcode) == EXPECTED_CODES[(expected, result)]
    text = " ".join(decision.reply_lines)
    assert text.startswith(f"SPF {result} for {identity} {spf.domain} from {IP}: ")
    if result == "fail":
        assert text.endswith(": see http://example.com/why")
    else:
        assert "example.com/why" not in text


def test_most_specific_section_wins() -> None:
    policy = _policy(
        {
            "example.com": {"mailfrom_softfail": "reject"},
            "mail.example.com": {"mailfrom_softfail": "accept"},
        }
    )
    softfail = _result("mailfrom", "softfail")
    assert decide(_facts(softfail), policy).action == "accept"
    assert decide(_facts(softfail, sender_domain="other.example.com"), policy).action == "reject"
    assert decide(_facts(softfail, sender_domain="example.com"), policy).action == "reject"


def test_sections_override_option_by_option() -> None:
    policy = _policy(
        {
            "example.com": {"mailfrom_neutral": "tempfail"},
            "mail.example.com": {"helo_neutral": "reject"},
        }
    )
    assert action_for(policy, "helo", "neutral", SENDER_DOMAIN) == "reject"
    assert action_for(policy, "mailfrom", "neutral", SENDER_DOMAIN) == "tempfail"
    assert action_for(policy, "mailfrom", "fail", SENDER_DOMAIN) == "reject"
    assert action_for(policy, "mailfrom", "neutral", "example.net") == "accept"


@pytest.mark.parametrize("domain", ["MAIL.Example.COM", "mail.example.com.", " mail.example.com"])
def test_sender_domain_is_normalised(domain: str) -> None:
    policy = _policy({"mail.example.com": {"mailfrom_none": "reject"}})
    assert action_for(policy, "mailfrom", "none", domain) == "reject"


@pytest.mark.parametrize("domain", ["", ".", ".."])
def test_empty_sender_domain_uses_global_policy(domain: str) -> None:
    policy = _policy({"com": {"mailfrom_none": "reject"}}, mailfrom_none="tempfail")
    assert action_for(policy, "mailfrom", "none", domain) == "tempfail"


# (helo action, mailfrom action) -> (verdict, driving identity)
COMBINED = {
    ("accept", "accept"): ("accept", None),
    ("accept", "tempfail"): ("tempfail", "mailfrom"),
    ("accept", "reject"): ("reject", "mailfrom"),
    ("tempfail", "accept"): ("tempfail", "helo"),
    ("tempfail", "tempfail"): ("tempfail", "helo"),
    ("tempfail", "reject"): ("reject", "mailfrom"),
    ("reject", "accept"): ("reject", "helo"),
    ("reject", "tempfail"): ("reject", "helo"),
    ("reject", "reject"): ("reject", "helo"),
}


@pytest.mark.parametrize(("actions", "expected"), COMBINED.items())
def test_most_severe_wins_and_helo_breaks_ties(
    actions: tuple[str, str], expected: tuple[str, str | None]
) -> None:
    policy = _policy(helo_neutral=actions[0], mailfrom_softfail=actions[1])
    facts = _facts(_result("helo", "neutral"), _result("mailfrom", "softfail"))
    decision = decide(facts, policy)
    assert (decision.action, decision.identity) == expected
    if expected[1] is not None:
        result = "neutral" if expected[1] == "helo" else "softfail"
        assert decision.reason == f"{expected[1]} {result}"
        assert (decision.code, decision.xcode) == EXPECTED_CODES[(expected[0], result)]


def test_unchecked_identity_takes_no_part() -> None:
    policy = _policy(helo_none="reject", mailfrom_none="reject")
    helo = SpfResult("helo", "none", checked=False)
    decision = decide(_facts(helo), policy)
    assert decision == Decision("accept", "accept", reason="no SPF result")
    mailfrom = _result("mailfrom", "none")
    assert decide(_facts(helo, mailfrom), policy).identity == "mailfrom"


def test_no_results() -> None:
    assert decide(Facts(IP), PolicyConfig()) == Decision("accept", "accept", reason="no SPF result")


@pytest.mark.parametrize(
    "skip", ["internal host", "authenticated", "trusted relay", "forwarder lists.example"]
)
@pytest.mark.parametrize("test_only", [False, True])
def test_skip_accepts_and_says_why(skip: str, test_only: bool) -> None:
    facts = _facts(_result("helo", "fail"), _result("mailfrom", "fail"), skip=skip)
    decision = decide(facts, _policy(test_only=test_only))
    assert decision == Decision("accept", "accept", reason=f"skipped: {skip}")


def test_reply_is_sanitised() -> None:
    spf = SpfResult(
        "mailfrom",
        "fail",
        domain="evil.example\r\n250 ok",
        explanation="nope\r\n550 \u00e9vil %s " + "x" * 3000,
    )
    decision = decide(_facts(spf), PolicyConfig())
    assert decision.action == "reject"
    assert 1 < len(decision.reply_lines) <= 6
    for line in decision.reply_lines:
        assert line.isascii() and line.isprintable() and len(line) <= 200
    text = " ".join(decision.reply_lines)
    assert "evil.example 250 ok" in text and "nope 550 ?vil %s x" in text
    assert text.endswith("...")


def test_custom_reply_text() -> None:
    policy = _policy(reply_text="Go away, {ip}. ({result}, {explanation})")
    decision = decide(_facts(_result("mailfrom", "temperror")), policy)
    assert decision.reply_lines == (
        f"Go away, {IP}. (temperror, a temporary DNS error occurred, try again later)",
    )
    assert (decision.code, decision.xcode) == TEMPFAIL_ERROR


def test_empty_reply_text_gives_no_lines() -> None:
    decision = decide(_facts(_result("mailfrom", "fail")), _policy(reply_text=""))
    assert (decision.action, decision.code, decision.reply_lines) == ("reject", 550, ())


@pytest.mark.parametrize(
    ("on_error", "expected"),
    [
        ("accept", ("accept", None, None)),
        ("tempfail", ("tempfail", 451, "4.3.0")),
        ("reject", ("reject", 550, "5.3.0")),
    ],
)
def test_error_decision(on_error: str, expected: tuple[str, int | None, str | None]) -> None:
    decision = error_decision(on_error)
    assert (decision.action, decision.code, decision.xcode) == expected
    assert decision.would_action == decision.action
    assert decision.reason == "internal error"
    assert decision.identity is None
    if expected[1] is None:
        assert decision.reply_lines == ()
    else:
        assert decision.reply_lines[0].startswith("internal error while checking SPF")


def test_error_decision_rejects_unknown_action() -> None:
    with pytest.raises(KeyError):
        error_decision("discard")


def test_values_are_frozen() -> None:
    decision = error_decision("tempfail")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.action = "accept"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Facts(IP).ip = "x"  # type: ignore[misc]


# -- the override domain: the checked one, in A-labels ----------------------------

@pytest.mark.parametrize("domain", [
    "b\u00fccher.example", "B\u00dcCHER.example", "b\u00fccher.example.",
    "xn--bcher-kva.example", "XN--BCHER-KVA.EXAMPLE", "mail.b\u00fccher.example",
])
def test_u_labels_match_the_a_label_section(domain: str) -> None:
    policy = _policy({"xn--bcher-kva.example": {"mailfrom_softfail": "reject"}})
    assert action_for(policy, "mailfrom", "softfail", domain) == "reject"


def test_u_label_section_is_the_a_label_section() -> None:
    from spfmilter import config

    cfg = config.loads("[spf]\nauthserv_id = mx.example\n"
                       "[domain:B\u00fccher.example.]\nmailfrom_softfail = reject\n")
    assert dict(cfg.policy.domains) == {"xn--bcher-kva.example": {"mailfrom_softfail": "reject"}}
    with pytest.raises(config.ConfigError, match="same domain as"):
        config.loads("[spf]\nauthserv_id = mx.example\n"
                     "[domain:b\u00fccher.example]\nmailfrom_fail = reject\n"
                     "[domain:xn--bcher-kva.example]\nmailfrom_fail = accept\n")


@pytest.mark.parametrize("checked,expected", [
    (SpfResult("mailfrom", "fail", domain="fail.example"), "fail.example"),
    (SpfResult("mailfrom", "fail", domain="Fail.Example."), "fail.example"),
    (SpfResult("mailfrom", "softfail", domain="b\u00fccher.example"), "xn--bcher-kva.example"),
    (SpfResult("mailfrom", "none", checked=False, comment="not a domain name"), ""),
    (SpfResult("mailfrom", "none", domain="a..b\u00fc.example"), ""),
    (None, ""),
])
def test_override_domain_is_the_domain_mail_from_was_checked_as(
    checked: SpfResult | None, expected: str
) -> None:
    from spfmilter.transaction import override_domain

    assert override_domain(checked) == expected
