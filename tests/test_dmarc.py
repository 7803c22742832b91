"""DMARC policy discovery for dmarc_defer: record parsing, organizational domain,
From parsing (pure tables), and the policy decision after discovery."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spfmilter import dmarc, policy
from spfmilter.config import PolicyConfig
from spfmilter.results import SpfResult

# -- records: RFC 7489 6.3, 6.4, 6.6.3 ------------------------------------------------

RECORDS = [
    ("v=DMARC1; p=reject", ("reject", "reject")),
    ("v=DMARC1;p=quarantine", ("quarantine", "quarantine")),
    ("v=DMARC1; p=none; sp=reject", ("none", "reject")),
    ("v=DMARC1; p=reject; sp=none; pct=50", ("reject", "none")),
    ("v = DMARC1 ; p = Reject ;", ("reject", "reject")),  # WSP around '=', ';' at the end
    ("v=DMARC1; p=reject; foo=bar; x1=", ("reject", "reject")),  # unknown tags ignored
    ("v=DMARC1; P=reject", ("reject", "reject")),  # tag names compared without case
    ("v=DMARC1; p=reject; p=none", ("reject", "reject")),  # the first of a repeated tag
    # a missing or bad p=, or a bad sp=: p=none with a valid rua=, else no policy
    ("v=DMARC1; p=bogus; rua=mailto:a@example.com", ("none", "none")),
    ("v=DMARC1; rua=mailto:a@example.com", ("none", "none")),
    ("v=DMARC1; p=reject; sp=bogus; rua=mailto:a@example.com!10m", ("none", "none")),
    ("v=DMARC1; p=bogus; rua=junk, mailto:a@example.com", ("none", "none")),
    ("v=DMARC1; p=bogus", None),
    ("v=DMARC1; p=bogus; rua=junk", None),
    ("v=DMARC1; p=reject; sp=bogus", None),
    ("v=DMARC1", None),
    ("v=DMARC1; p=", None),
    # v=DMARC1 first, exactly
    ("p=reject; v=DMARC1", None),
    ("v=DMARC2; p=reject", None),
    ("v=dmarc1; p=reject", None),
    ("v=DMARC1x; p=reject", None),
    ("; v=DMARC1; p=reject", None),
    ("", None),
    # a part that is no tag makes the record unusable
    ("v=DMARC1; p=reject; junk", None),
    ("v=DMARC1; p=reject; 1x=y", None),
]


@pytest.mark.parametrize("text,expected", RECORDS)
def test_parse_record(text, expected):
    record = dmarc.parse_record(text)
    assert (None if record is None else (record.p, record.sp)) == expected


SETS = [
    ([], (False, None)),
    ([b"some text", b"v=spf1 -all"], (False, None)),  # not DMARC: discarded
    ([b"p=reject; v=DMARC1"], (False, None)),
    ([b"v=DMARC1; p=reject"], (True, ("reject", "reject"))),
    ([b"hello", b"v=DMARC1; p=reject"], (True, ("reject", "reject"))),
    ([b"v=DMARC1; p=reject", b"v=DMARC1; p=none"], (True, None)),  # several: no policy
    ([b"v=DMARC1; p=reject", b"v=DMARC1; junk"], (True, None)),
    ([b"v=DMARC1; p=bogus"], (True, None)),  # one record, no policy: discovery ends
    ([b"v=DMARC1; p=reject\xff"], (True, None)),  # the bad byte spoils the p= value
]


@pytest.mark.parametrize("txts,expected", SETS)
def test_select_record(txts, expected):
    found, record = dmarc.select_record(txts)
    assert (found, None if record is None else (record.p, record.sp)) == expected


# -- organizational domain (RFC 7489 3.2) --------------------------------------------

ORG_DOMAINS = [
    ("example.com", "example.com"),
    ("mail.example.com", "example.com"),
    ("a.b.c.example.com", "example.com"),
    ("Mail.Example.COM.", "example.com"),
    ("example.co.uk", "example.co.uk"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),  # a public suffix is its own
    ("com", "com"),
    ("x.dmarc.test", "dmarc.test"),  # an unlisted TLD: the default "*" rule
    ("user.github.io", "user.github.io"),  # the list's private section counts
    ("a.user.github.io", "user.github.io"),
    ("www.city.kawasaki.jp", "city.kawasaki.jp"),  # an exception rule (!city.kawasaki.jp)
    ("a.b.kawasaki.jp", "a.b.kawasaki.jp"),  # the wildcard *.kawasaki.jp
    ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
]


@pytest.mark.parametrize("domain,org", ORG_DOMAINS)
def test_organizational_domain(domain, org):
    assert dmarc.organizational_domain(domain) == org


# -- the From field (RFC 7489 6.6.1) --------------------------------------------------

FROMS = [
    (["user@example.com"], "example.com"),
    (["Some One <user@Example.COM>"], "example.com"),
    (['"Doe, J" <j@example.com> (work)'], "example.com"),
    (["a@example.com, b@EXAMPLE.com"], "example.com"),  # several addresses, one domain
    (["a@example.com", "b@example.com"], "example.com"),  # several fields, one domain
    (['"A" <a@example.com>,\r\n\t<b@example.com>'], "example.com"),  # folded
    (["a@b\u00fccher.example"], "xn--bcher-kva.example"),
    ([], dmarc.NO_FROM),
    (["a@example.com, b@example.org"], dmarc.SEVERAL_FROM),
    (["a@example.com", "b@sub.example.com"], dmarc.SEVERAL_FROM),
    ([""], dmarc.BAD_FROM),
    (["garbage"], dmarc.BAD_FROM),
    (["undisclosed-recipients:;"], dmarc.BAD_FROM),
    (["a@example.com, garbage"], dmarc.BAD_FROM),
    (["<>"], dmarc.BAD_FROM),
    (["a@com"], dmarc.BAD_FROM),  # no multi-label domain
    (["a@[192.0.2.1]"], dmarc.BAD_FROM),
    (["a@b..example"], dmarc.BAD_FROM),
    (["a@example.com\r\nBcc: x@example.org"], dmarc.BAD_FROM),  # a bare line break
    (["a@exa\x00mple.com"], dmarc.BAD_FROM),
    (["a\udcff@example.com"], dmarc.BAD_FROM),  # a non-UTF-8 byte
]


@pytest.mark.parametrize("values,expected", FROMS)
def test_from_domain(values, expected):
    domain, problem = dmarc.from_domain(values)
    assert (problem or domain) == expected
    assert bool(domain) != bool(problem)


# -- discovery (RFC 7489 6.6.3) over a table of TXT records ----------------------------

ZONE = {
    "_dmarc.example.com": [b"v=DMARC1; p=none; sp=quarantine"],
    "_dmarc.reject.example.com": [b"v=DMARC1; p=reject"],
    "_dmarc.two.example.com": [b"v=DMARC1; p=reject", b"v=DMARC1; p=reject"],
    "_dmarc.other.example.com": [b"unrelated"],
    "_dmarc.example.co.uk": [b"v=DMARC1; p=reject; sp=none"],
}


def _lookup(asked: list[str]):
    def lookup(name: str) -> list[bytes]:
        asked.append(name)
        if name.endswith("broken.example"):
            raise dmarc.DmarcLookupError("SERVFAIL")
        return ZONE.get(name, [])
    return lookup


DISCOVERIES = [
    ("a@reject.example.com", "reject", "reject.example.com", ["_dmarc.reject.example.com"]),
    ("a@example.com", "none", "example.com", ["_dmarc.example.com"]),
    ("a@sub.example.com", "quarantine", "example.com",  # the org's sp=
     ["_dmarc.sub.example.com", "_dmarc.example.com"]),
    ("a@x.y.example.com", "quarantine", "example.com",
     ["_dmarc.x.y.example.com", "_dmarc.example.com"]),  # never the names between
    ("a@other.example.com", "quarantine", "example.com",
     ["_dmarc.other.example.com", "_dmarc.example.com"]),
    ("a@two.example.com", dmarc.BAD_RECORD, "two.example.com",
     ["_dmarc.two.example.com"]),  # several records: discovery ends, no org lookup
    ("a@www.example.co.uk", "none", "example.co.uk",
     ["_dmarc.www.example.co.uk", "_dmarc.example.co.uk"]),
    ("a@nothing.example", dmarc.NO_RECORD, "", ["_dmarc.nothing.example"]),
    ("a@x.nothing.example", dmarc.NO_RECORD, "",
     ["_dmarc.x.nothing.example", "_dmarc.nothing.example"]),
    ("a@broken.example", dmarc.DNS_ERROR, "", ["_dmarc.broken.example"]),
    ("a@sub.broken.example", dmarc.DNS_ERROR, "", ["_dmarc.sub.broken.example"]),
    ("garbage", dmarc.BAD_FROM, "", []),
]


@pytest.mark.parametrize("value,expected,where,queries", DISCOVERIES)
def test_discover(value, expected, where, queries):
    asked: list[str] = []
    found = dmarc.discover([value], _lookup(asked))
    assert (found.policy, found.record_domain) == (expected, where)
    assert asked == queries
    assert found.enforcing == (expected in ("quarantine", "reject"))


# -- the decision: only an enforcing policy drops a held MAIL FROM reject ---------------

def _held(identity: str = "mailfrom", **cfg) -> tuple[policy.Decision, PolicyConfig]:
    pol = PolicyConfig(dmarc_defer=True, **cfg)
    helo = SpfResult("helo", "pass" if identity == "mailfrom" else "fail", domain="h.example")
    mailfrom = SpfResult("mailfrom", "fail", domain="example.com", sender="a@example.com")
    facts = policy.Facts(ip="192.0.2.1", helo=helo, mailfrom=mailfrom,
                         sender_domain="example.com")
    return policy.decide(facts, pol), pol


def test_deferrable_only_for_a_mailfrom_reject():
    decision, pol = _held()
    assert policy.dmarc_deferrable(decision, pol)
    assert not policy.dmarc_deferrable(decision, PolicyConfig())  # dmarc_defer = no
    helo_decision, pol = _held("helo")
    assert helo_decision.identity == "helo"
    assert not policy.dmarc_deferrable(helo_decision, pol)  # HELO rejects: never
    tempfail, pol = _held(mailfrom_fail="tempfail")
    assert tempfail.action == "tempfail" and not policy.dmarc_deferrable(tempfail, pol)
    test_only, pol = _held(test_only=True)
    assert not policy.dmarc_deferrable(test_only, pol)  # nothing is rejected anyway


@pytest.mark.parametrize("found", ["quarantine", "reject"])
def test_enforcing_policy_drops_the_reject(found):
    decision, _ = _held()
    after = policy.after_dmarc(decision, found)
    assert (after.action, after.would_action, after.code, after.reply_lines) == \
        ("accept", "reject", None, ())
    assert after.reason == decision.reason == "mailfrom fail"


@pytest.mark.parametrize("found", ["none", dmarc.NO_RECORD, dmarc.BAD_RECORD, dmarc.NO_FROM,
                                   dmarc.BAD_FROM, dmarc.SEVERAL_FROM, dmarc.DNS_ERROR])
def test_anything_else_keeps_the_spf_verdict(found):
    decision, _ = _held()
    assert policy.after_dmarc(decision, found) == decision
    assert (decision.code, decision.xcode) == (550, "5.7.23")


# -- property: any From value gives a deferral or the SPF verdict ----------------------

_EXAMPLES = int(os.environ.get("SPFMILTER_DMARC_EXAMPLES", "300"))
_ADDRESS = st.builds(lambda local, dom: f"{local}@{dom}",
                     st.sampled_from(["a", "b.c", '"q u"', "a", ""]),
                     st.sampled_from(["reject.example.com", "example.com", "sub.example.com",
                                      "example.org", "nothing.example", "broken.example",
                                      "two.example.com", "com", "[192.0.2.1]", ""]))
_PIECE = st.one_of(
    _ADDRESS,
    _ADDRESS.map(lambda a: f"Name <{a}>"),
    st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from([",", ";", ":", "<", ">", "\r\n\t", "\r\n", "(", ")", '"', "\\", " "]),
)
_VALUE = st.one_of(
    st.lists(st.one_of(_ADDRESS, _ADDRESS.map(lambda a: f"Name <{a}>")),
             min_size=1, max_size=3).map(", ".join),  # well-formed lists
    st.lists(_PIECE, max_size=6).map("".join),  # and anything
)


@settings(max_examples=_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_VALUE, max_size=3))
def test_any_from_gives_deferral_or_spf_verdict(values):
    decision, _ = _held()
    asked: list[str] = []
    found = dmarc.discover(values, _lookup(asked))
    after = policy.after_dmarc(decision, found.policy)
    if after.action == "accept":  # deferred: only for a real record with p=quarantine/reject
        assert found.enforcing and found.record_domain
        assert f"_dmarc.{found.record_domain}" in asked
        found_any, record = dmarc.select_record(ZONE[f"_dmarc.{found.record_domain}"])
        assert record is not None and found.policy in (record.p, record.sp)
    else:
        assert after == decision


def test_check_config_warns_when_deferred_mail_would_carry_no_result():
    from spfmilter import config

    base = "[policy]\ndmarc_defer = yes\n"
    assert not [w for w in config.warnings(config.loads(base)) if "dmarc_defer" in w]
    cfg = config.loads(base + "[headers]\nauthentication_results = no\n")
    assert [w for w in config.warnings(cfg) if "dmarc_defer" in w]
