"""Per-recipient policy (reject_at = rcpt): tables, config errors, a property test."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spfmilter import config, policy, recipients
from spfmilter.results import RESULTS, SpfResult

EXAMPLES = int(os.environ.get("SPFMILTER_PROPERTY_EXAMPLES", "0"))
IP = "192.0.2.7"
SENDER_DOMAIN = "mail.example.com"
REJECT_FAIL = (550, "5.7.23")

BASE = f"""\
[spf]
authserv_id = mx.example
[policy]
reject_at = rcpt
exempt_recipients = postmaster, abuse@example.net
[domain:{SENDER_DOMAIN}]
mailfrom_softfail = reject
[recipient:example.net]
mailfrom_fail = accept
[recipient:strict.example.net]
mailfrom_fail = reject
mailfrom_neutral = tempfail
[recipient:bob@strict.example.net]
test_only = yes
[recipient:carol@example.org]
mailfrom_softfail = accept
"""


def _facts(mailfrom: str, helo: str | None = None) -> policy.Facts:
    return policy.Facts(
        IP, helo=None if helo is None else SpfResult("helo", helo, domain="mx.example.com"),
        mailfrom=SpfResult("mailfrom", mailfrom, domain=SENDER_DOMAIN),
        sender_domain=SENDER_DOMAIN)


@pytest.mark.parametrize("mailfrom,helo,rcpt,action,would,exempt", [
    # no section: the message's verdict
    ("fail", None, "<dave@example.org>", "reject", "reject", None),
    ("pass", None, "<dave@example.org>", "accept", "accept", None),
    # [recipient:example.net] opts out of fail rejection, for subdomains too
    ("fail", None, "<dave@example.net>", "accept", "accept", None),
    ("fail", None, "<dave@x.y.example.net>", "accept", "accept", None),
    # a more specific domain section wins, option by option
    ("fail", None, "<dave@strict.example.net>", "reject", "reject", None),
    ("neutral", None, "<dave@strict.example.net>", "tempfail", "tempfail", None),
    # the address section adds test_only; actions come from its domain sections
    ("fail", None, "<Bob@STRICT.example.net>", "accept", "reject", None),
    # a recipient section beats the sender's [domain:] section
    ("softfail", None, "<carol@example.org>", "accept", "accept", None),
    ("softfail", None, "<dave@example.org>", "reject", "reject", None),
    # HELO actions are overridden the same way (helo fail is not touched by sections)
    ("pass", "fail", "<dave@example.net>", "reject", "reject", None),
    # exempt: a local part in any domain, or a whole address
    ("fail", None, "<Postmaster@example.org>", "accept", "reject", "postmaster"),
    ("fail", None, "<abuse@example.net>", "accept", "accept", None),  # section accepts
    ("fail", None, "<abuse@strict.example.net>", "reject", "reject", None),
    ("fail", "fail", "<abuse@example.net>", "accept", "reject", "abuse@example.net"),
    ("pass", None, "<postmaster@example.org>", "accept", "accept", None),
    # no domain: only local-part exemptions apply
    ("fail", None, "<postmaster>", "accept", "reject", "postmaster"),
    ("fail", None, "<bob>", "reject", "reject", None),
])
def test_recipient_decisions(mailfrom, helo, rcpt, action, would, exempt):
    cfg = config.loads(BASE).policy
    got = recipients.decide(_facts(mailfrom, helo), cfg, rcpt)
    assert (got.action, got.decision.would_action, got.exempt) == (action, would, exempt)
    assert got.recipient == rcpt.strip("<>")
    if action == "reject" and mailfrom == "fail":
        assert (got.decision.code, got.decision.xcode) == REJECT_FAIL
    if action == "accept":
        assert got.decision.code is None


def test_message_decision_is_reused_when_no_section_applies():
    cfg = config.loads(BASE).policy
    facts = _facts("fail")
    message = policy.decide(facts, cfg)
    assert recipients.decide(facts, cfg, "<x@example.org>", message).decision is message


def test_summary_picks_the_recipient_that_stands_for_the_message():
    cfg = config.loads(BASE).policy
    facts = _facts("fail")
    rejected = recipients.decide(facts, cfg, "<dave@example.org>")
    exempted = recipients.decide(facts, cfg, "<postmaster@example.org>")
    opted_out = recipients.decide(facts, cfg, "<dave@example.net>")
    assert recipients.summary([rejected, opted_out, exempted]) is exempted
    assert recipients.summary([rejected]) is rejected
    assert recipients.summary([]) is None


@pytest.mark.parametrize("text,line,message", [
    ("[policy]\n[recipient:example.net]\nmailfrom_fail = accept\n", 2,
     "[recipient:example.net]: needs [policy] reject_at = rcpt"),
    ("[policy]\nreject_at = mail\nexempt_recipients = postmaster\n", 3,
     "[policy] exempt_recipients: needs reject_at = rcpt"),
    ("[policy]\nreject_at = smtp\n", 2, "[policy] reject_at: 'smtp' is not one of: mail, rcpt"),
    ("[policy]\nreject_at = rcpt\nexempt_recipients = post master@, x\n", 3,
     "[policy] exempt_recipients:"),
    ("[policy]\nreject_at = rcpt\n[recipient:bad..name]\n", 3, "[recipient:bad..name]:"),
    ("[policy]\nreject_at = rcpt\n[recipient:a@example.net]\nreply_text = x\n", 4,
     "only helo_*, mailfrom_* and test_only can be set per recipient"),
    ("[policy]\nreject_at = rcpt\n[recipient:example.net]\nmailfrom_fail = maybe\n", 4,
     "[recipient:example.net] mailfrom_fail:"),
    ("[policy]\nreject_at = rcpt\n[recipient:Example.NET]\n[recipient:example.net]\n", 4,
     "same recipient as [recipient:Example.NET]"),
])
def test_config_errors_name_file_and_line(text, line, message):
    with pytest.raises(config.ConfigError) as err:
        config.loads("[spf]\nauthserv_id = mx.example\n" + text, filename="f.cfg")
    assert str(err.value).startswith(f"f.cfg:{line + 2}: ")
    assert message in str(err.value)


def test_dump_round_trips():
    cfg = config.loads(BASE)
    assert config.loads(config.dump(cfg)) == cfg
    assert cfg.policy.recipients["bob@strict.example.net"] == {"test_only": True}
    assert cfg.policy.exempt_recipients == ("postmaster", "abuse@example.net")


# -- property: most specific section wins, exempt is never rejected -------------------

LOCALS = ("bob", "postmaster", "Alice")
DOMAINS = ("example.net", "sub.example.net", "a.sub.example.net", "example.org")
OPTIONS = ("mailfrom_fail", "mailfrom_softfail", "helo_fail", "test_only")
ACTIONS = ("accept", "reject", "tempfail")


def _value(option: str) -> st.SearchStrategy[str]:
    return st.sampled_from(("yes", "no")) if option == "test_only" else st.sampled_from(ACTIONS)


KEYS = st.sampled_from([*DOMAINS, *(f"{lp}@{d}" for lp in LOCALS for d in DOMAINS)])
SECTION = st.dictionaries(st.sampled_from(OPTIONS), st.sampled_from(ACTIONS), max_size=3)


@st.composite
def configs(draw: st.DrawFn) -> str:
    sections = draw(st.dictionaries(KEYS, SECTION, max_size=5))
    exempt = draw(st.lists(st.sampled_from(["postmaster", "alice", "bob@example.org",
                                            "bob@sub.example.net"]), max_size=2, unique=True))
    text = ["[spf]", "authserv_id = mx.example", "[policy]", "reject_at = rcpt",
            f"exempt_recipients = {', '.join(exempt)}",
            f"test_only = {draw(st.sampled_from(('yes', 'no')))}",
            f"[domain:{SENDER_DOMAIN}]", f"mailfrom_fail = {draw(st.sampled_from(ACTIONS))}"]
    for key, opts in sections.items():
        text.append(f"[recipient:{key}]")
        for name, value in opts.items():
            if name == "test_only":
                value = "yes" if value == "reject" else "no"
            text.append(f"{name} = {value}")
    return "\n".join(text) + "\n"


def _oracle(cfg: config.PolicyConfig, rcpt: str) -> policy.PolicyConfig:
    """The policy for rcpt, resolved here without recipients.py: for each option, the
    first matching section that sets it, in the order address, domain, parents."""
    local, domain = rcpt.lower().split("@")
    labels = domain.split(".")
    matching = [f"{local}@{domain}"] + [".".join(labels[i:]) for i in range(len(labels))]
    values = {}
    for option in (*config.DOMAIN_OPTIONS, "test_only"):
        values[option] = getattr(cfg, option)
        if option in cfg.domains.get(SENDER_DOMAIN, {}):
            values[option] = cfg.domains[SENDER_DOMAIN][option]
        for key in reversed(matching):  # least specific first: the most specific writes last
            if option in cfg.recipients.get(key, {}):
                values[option] = cfg.recipients[key][option]
    return config.PolicyConfig(**values)  # type: ignore[arg-type]


@settings(max_examples=EXAMPLES or 300, derandomize=not EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(text=configs(),
       rcpts=st.lists(st.tuples(st.sampled_from(LOCALS), st.sampled_from(DOMAINS)),
                      min_size=1, max_size=4),
       helo=st.sampled_from(RESULTS), mailfrom=st.sampled_from(RESULTS))
def test_most_specific_section_wins_and_exempt_is_never_rejected(text, rcpts, helo, mailfrom):
    cfg = config.loads(text).policy
    facts = _facts(mailfrom, helo)
    message = policy.decide(facts, cfg)
    for local, domain in rcpts:
        rcpt = f"{local}@{domain}"
        got = recipients.decide(facts, cfg, f"<{rcpt}>", message)
        expected = policy.decide(facts, _oracle(cfg, rcpt))
        exempt = local.lower() in cfg.exempt_recipients or rcpt.lower() in cfg.exempt_recipients
        assert got.decision.would_action == expected.would_action
        if exempt:
            assert got.action == "accept"
            assert got.exempt == (rcpt.lower() if rcpt.lower() in cfg.exempt_recipients
                                  else local.lower()) or expected.action == "accept"
        else:
            assert got.decision == expected and got.exempt is None


def test_log_list_names_twenty_recipients_then_counts():
    cfg = config.loads(BASE).policy
    facts = _facts("pass")
    many = [recipients.decide(facts, cfg, f"<u{i}@example.org>") for i in range(23)]
    text = recipients.log_list(many)
    assert text.startswith("u0@example.org:accept,u1@example.org:accept,")
    assert text.endswith(",u19@example.org:accept,+3")
    assert recipients.log_list(many[:2]) == "u0@example.org:accept,u1@example.org:accept"


def test_empty_recipient_section_is_warned_about():
    cfg = config.loads(BASE + "[recipient:empty.example]\n")
    assert "[recipient:empty.example]: sets nothing, it has no effect" in config.warnings(cfg)


@settings(max_examples=EXAMPLES or 300, derandomize=not EXAMPLES, deadline=None)
@given(rcpt=st.one_of(st.text(max_size=80),
                      st.builds(lambda lp, d: f"<{lp}@{d}>", st.text(max_size=20),
                                st.text(max_size=40))))
def test_any_rcpt_text_gets_a_decision_never_an_exception(rcpt):
    cfg = config.loads(BASE).policy
    facts = _facts("fail")
    got = recipients.decide(facts, cfg, rcpt, policy.decide(facts, cfg))
    assert got.action in ("accept", "reject", "tempfail")
    if got.exempt is not None:
        assert got.action == "accept" and got.decision.would_action != "accept"
