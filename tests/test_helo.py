"""HELO hygiene, pure: the classifier, the policy's actions, the header comment.

Set SPFMILTER_PROPERTY_EXAMPLES to run more examples by hand (e.g. 5000).
"""

from __future__ import annotations

import ipaddress
import os

import authres
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfmilter import config, helo, policy, transaction
from spfmilter.headers import unfold
from spfmilter.milter import logvalue

EXAMPLES = int(os.environ.get("SPFMILTER_PROPERTY_EXAMPLES", "0"))
BOUNDED = settings(max_examples=EXAMPLES or 300, derandomize=not EXAMPLES, deadline=None)

CLIENT = "192.0.2.1"
OURS = ("mx.example.org", "192.0.2.25")


@pytest.mark.parametrize("text,client,expected", [
    # address literals: compared as addresses
    ("[192.0.2.1]", CLIENT, ()),
    ("[192.000.002.001]", CLIENT, ()),  # Snum allows leading zeros
    ("[IPv6:::ffff:192.0.2.1]", CLIENT, ()),  # mapped literal of an IPv4 client
    ("[ipv6:::FFFF:C000:0201]", CLIENT, ()),  # tag and hex in any case
    ("[192.0.2.1]", "::ffff:192.0.2.1", ()),  # mapped client
    ("[IPv6:2001:db8::1]", "2001:DB8:0::1", ()),
    ("[IPv6:2001:db8:0:0:0:0:0:1]", "2001:db8::1", ()),
    ("[192.0.2.9]", CLIENT, ("literal_mismatch",)),
    ("[IPv6:2001:db8::1]", CLIENT, ("literal_mismatch",)),
    ("[192.0.2.1]", "2001:db8::1", ("literal_mismatch",)),
    ("[192.0.2.25]", CLIENT, ("literal_mismatch", "is_us")),
    ("[IPv6:::ffff:192.0.2.25]", CLIENT, ("literal_mismatch", "is_us")),
    ("[192.0.2.9]", None, ()),  # local client: nothing to compare with
    # not address literals
    ("[256.0.0.1]", CLIENT, ("invalid",)),
    ("[192.0.2]", CLIENT, ("invalid",)),
    ("[1922.0.2.1]", CLIENT, ("invalid",)),
    ("[IPv6:fe80::1%eth0]", CLIENT, ("invalid",)),  # zone index: not RFC 5321
    ("[IPv6:192.0.2.1]", CLIENT, ("invalid",)),
    ("[2001:db8::1]", CLIENT, ("invalid",)),  # IPv6 needs its tag
    ("[x-tag:anything]", CLIENT, ("invalid",)),  # no General-address-literal is registered
    ("[]", CLIENT, ("invalid",)),
    ("[192.0.2.1", CLIENT, ("invalid",)),
    ("192.0.2.1", CLIENT, ("invalid",)),  # an address without brackets
    # domain names
    ("mail.example.com", CLIENT, ()),
    ("localhost", CLIENT, ()),  # a single label is valid syntax
    ("a-b.x1.example", CLIENT, ()),
    ("1mail.example", CLIENT, ()),
    ("bücher.example", CLIENT, ()),  # converts to an A-label
    ("xn--bcher-kva.example", CLIENT, ()),
    ("a" * 63 + ".example", CLIENT, ()),
    ("a" * 64 + ".example", CLIENT, ("invalid",)),
    (".".join(["a" * 63] * 4)[:253], CLIENT, ()),  # 253 octets: the most DNS can hold
    (".".join(["a" * 63] * 4)[:254], CLIENT, ("invalid",)),
    ("-mail.example", CLIENT, ("invalid",)),
    ("mail-.example", CLIENT, ("invalid",)),
    ("mail..example", CLIENT, ("invalid",)),
    ("mail.example.", CLIENT, ("invalid",)),
    ("_mail.example", CLIENT, ("invalid",)),
    ("mail example", CLIENT, ("invalid",)),
    (" mail.example", CLIENT, ("invalid",)),
    ("mail.example\r\n", CLIENT, ("invalid",)),
    ("mail.example\x00", CLIENT, ("invalid",)),
    ("mail.\udcff.example", CLIENT, ("invalid",)),  # an undecodable byte
    ("example.123", CLIENT, ("invalid",)),  # numeric top-level label
    # our names, in any case
    ("mx.example.org", CLIENT, ("is_us",)),
    ("MX.Example.ORG", CLIENT, ("is_us",)),
    ("mx.example.org", "192.0.2.25", ()),  # the client is at our address: it is us
    ("other.example.org", CLIENT, ()),
    # no HELO at all
    ("", CLIENT, ()),
])
def test_classify(text, client, expected):
    assert helo.classify(text, client, OURS) == expected


def test_our_forms_reads_names_addresses_and_literals():
    domains, addresses = helo.our_forms(
        ["MX.example.org", "mx2.example.org.", "[192.0.2.25]", "::ffff:192.0.2.26",
         "[IPv6:2001:DB8::1]", "", "not a name"])
    assert domains == {"mx.example.org", "mx2.example.org"}
    assert addresses == {"192.0.2.25", "192.0.2.26", "2001:db8::1"}


def test_local_addresses_drop_unset_unspecified_and_junk():
    assert transaction.local_addresses("0.0.0.0", "192.0.2.25") == ("192.0.2.25",)
    assert transaction.local_addresses("::", None, "", "junk", "[IPv6:::ffff:10.0.0.1]",
                                       "10.0.0.1") == ("10.0.0.1",)


# -- properties --------------------------------------------------------------------

_LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_label = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(_LDH), st.text(_LDH + "-", max_size=20), st.sampled_from(_LDH))
_top = _label.filter(lambda label: not label.isdigit())
domains = st.builds(lambda labels, top: ".".join([*labels, top]),
                    st.lists(_label, max_size=5), _top).filter(lambda d: len(d) <= 253)


@BOUNDED
@given(domains, st.sampled_from([CLIENT, "2001:db8::1", None]))
def test_any_valid_domain_is_not_invalid(name, client):
    assert "invalid" not in helo.classify(name, client, OURS)
    assert helo.domain(name) == name.lower()


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


def _spellings(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[str]:
    if address.version == 4:
        return [f"[{address}]", f"[IPv6:::ffff:{address}]",
                "[" + ".".join(p.zfill(3) for p in str(address).split(".")) + "]"]
    return [f"[IPv6:{address}]", f"[IPv6:{address.exploded}]", f"[ipv6:{str(address).upper()}]"]


@BOUNDED
@given(st.one_of(ipv4, ipv6), st.data())
def test_a_literal_of_the_client_address_is_no_mismatch(address, data):
    text = data.draw(st.sampled_from(_spellings(address)))
    for client in {str(address), address.exploded,
                   *([f"::ffff:{address}"] if address.version == 4 else [])}:
        assert helo.classify(text, client, OURS) == (), (text, client)


@BOUNDED
@given(st.one_of(ipv4, ipv6), st.one_of(ipv4, ipv6))
def test_a_literal_of_another_address_is_a_mismatch(address, client):
    mapped = client.version == 6 and client.ipv4_mapped
    if address == client or (mapped and mapped == address) or \
            (address.version == 6 and address.ipv4_mapped in (client, mapped)):
        return
    text = _spellings(address)[0]
    assert helo.classify(text, str(client), ())[:1] == ("literal_mismatch",)


_nasty = st.text(st.sampled_from("\r\n\x00\t ()\\;\"=[]:.aZ9-_ü\udcff"), max_size=60)


@BOUNDED
@given(st.one_of(_nasty, st.builds(lambda d, s: d + s, domains, _nasty),
                 st.builds(lambda s: f"[{s}]", _nasty)))
def test_no_cr_lf_or_nul_reaches_header_reply_or_log(text):
    cfg = config.Config(policy=config.PolicyConfig(
        helo_invalid="reject", helo_literal_mismatch="tempfail", helo_is_us="reject"))
    findings = helo.classify(text, CLIENT, OURS)
    facts = policy.Facts(ip=CLIENT, helo_findings=findings, helo_name=text)
    decision = policy.decide(facts, cfg.policy)
    assert decision.action == ("accept" if not findings else decision.action)
    for line in decision.reply_lines:
        assert line.isascii() and line.isprintable(), line
    fields = transaction.build_headers(
        config.Config(spf=config.SpfConfig(authserv_id="mx.example.org")), facts, helo=text)
    (name, value), = fields
    assert not set(value) & {"\r", "\x00"} and value.isascii()
    one_line = unfold(value)
    assert "\n" not in one_line
    parsed = authres.AuthenticationResultsHeader.parse(f"{name}: {one_line}")
    assert parsed.authserv_id == "mx.example.org"
    assert [r.method for r in parsed.results] == []  # the comment adds no result
    if findings:
        assert f"(HELO {', '.join(findings)}:" in one_line
    logged = logvalue(text)
    assert logged.isascii() and logged.isprintable()
    assert " " not in logged or (logged.startswith('"') and logged.endswith('"'))


# -- policy ------------------------------------------------------------------------

def _policy(**actions: str) -> config.PolicyConfig:
    return config.PolicyConfig(**actions)


@pytest.mark.parametrize("findings,actions,expected", [
    ((), {"helo_invalid": "reject"}, ("accept", "accept", None, None, "no SPF result")),
    (("invalid",), {}, ("accept", "accept", None, None, "no SPF result")),
    (("invalid",), {"helo_invalid": "reject"},
     ("reject", "reject", 550, "5.7.1", "helo invalid")),
    (("invalid",), {"helo_invalid": "tempfail"},
     ("tempfail", "tempfail", 451, "4.7.1", "helo invalid")),
    (("literal_mismatch",), {"helo_literal_mismatch": "reject"},
     ("reject", "reject", 550, "5.7.1", "helo literal_mismatch")),
    (("literal_mismatch", "is_us"), {"helo_literal_mismatch": "tempfail",
                                     "helo_is_us": "reject"},
     ("reject", "reject", 550, "5.7.1", "helo is_us")),
    (("literal_mismatch", "is_us"), {"helo_literal_mismatch": "reject",
                                     "helo_is_us": "reject"},
     ("reject", "reject", 550, "5.7.1", "helo literal_mismatch")),  # first on a tie
    (("is_us",), {"helo_is_us": "reject", "test_only": True},
     ("accept", "reject", None, None, "helo is_us")),
])
def test_hygiene_actions(findings, actions, expected):
    facts = policy.Facts(ip=CLIENT, helo_findings=findings, helo_name="[192.0.2.9]")
    d = policy.decide(facts, _policy(**actions))
    assert (d.action, d.would_action, d.code, d.xcode, d.reason) == expected
    if d.code is not None:
        assert d.identity == "helo" and len(d.reply_lines) == 1
        assert d.reply_lines[0].startswith("HELO [192.0.2.9] ")


def test_reply_texts_name_the_finding():
    pol = _policy(helo_literal_mismatch="reject", helo_is_us="reject", helo_invalid="reject")
    texts = {f: policy.decide(policy.Facts(ip=CLIENT, helo_findings=(f,), helo_name="h\r\nX"),
                              pol).reply_lines[0] for f in helo.FINDINGS}
    assert texts == {
        "literal_mismatch": "HELO h X is not the address of the client 192.0.2.1",
        "is_us": "HELO h X claims to be this host, but the client 192.0.2.1 is not",
        "invalid": "HELO h X is neither a valid domain name nor an address literal",
    }


def _spf(identity: str, result: str):
    from spfmilter.results import SpfResult
    return SpfResult(identity, result, domain="d.example", sender="u@d.example")


@pytest.mark.parametrize("spf,hygiene,expected", [
    ("fail", "reject", (550, "5.7.23", "mailfrom fail")),  # a tie goes to SPF
    ("temperror", "reject", (550, "5.7.1", "helo invalid")),  # stricter than tempfail
    ("fail", "tempfail", (550, "5.7.23", "mailfrom fail")),
    ("pass", "tempfail", (451, "4.7.1", "helo invalid")),
])
def test_hygiene_competes_with_spf_on_severity(spf, hygiene, expected):
    facts = policy.Facts(ip=CLIENT, mailfrom=_spf("mailfrom", spf),
                         helo_findings=("invalid",), helo_name="bad_name")
    d = policy.decide(facts, _policy(helo_invalid=hygiene))
    assert (d.code, d.xcode, d.reason) == expected


def test_skipped_clients_get_no_hygiene_verdict():
    facts = policy.Facts(ip=CLIENT, skip="authenticated", helo_findings=("invalid",))
    assert policy.decide(facts, _policy(helo_invalid="reject")).action == "accept"


# -- config ------------------------------------------------------------------------

@pytest.mark.parametrize("text,error", [
    ("[policy]\nhelo_invalid = drop\n",
     "<string>:2: [policy] helo_invalid: 'drop' is not one of: accept, reject, tempfail"),
    ("[policy]\n\nour_names = mx.example.org, bad..name\n",
     "<string>:3: [policy] our_names: 'bad..name' is not a domain name (bad label '')"),
    ("[domain:example.com]\nhelo_is_us = reject\n",
     "<string>:2: [domain:example.com] helo_is_us: "),  # not a per-domain action
])
def test_config_errors_name_file_and_line(text, error):
    with pytest.raises(config.ConfigError) as info:
        config.loads(text)
    assert str(info.value).startswith(error), str(info.value)


def test_our_names_parse_to_canonical_forms():
    cfg = config.loads("[policy]\nour_names = MX.Example.ORG [192.0.2.25], ::ffff:10.0.0.1"
                       " [IPv6:2001:DB8::1]\n")
    assert cfg.policy.our_names == ("mx.example.org", "192.0.2.25", "10.0.0.1", "2001:db8::1")
    assert "our_names = mx.example.org, 192.0.2.25, 10.0.0.1, 2001:db8::1" in config.dump(cfg)
