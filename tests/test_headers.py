"""Header values: round trips through authres, injection attempts, own-id detection."""

from __future__ import annotations

import re

import authres
import pytest

from spfmilter.headers import authentication_results, is_own_authres, received_spf
from spfmilter.results import SpfResult

AUTHSERV = "mx.example.net"
HELO = SpfResult(
    "helo",
    "pass",
    domain="mail.example.org",
    sender="postmaster@mail.example.org",
    comment="mx.example.net: mail.example.org designates 192.0.2.1 as permitted sender",
)
MAILFROM = SpfResult(
    "mailfrom",
    "fail",
    domain="example.com",
    sender="alice.b+tag@example.com",
    explanation="secret explanation text",
    comment="domain of example.com does not designate 192.0.2.1",
)

Parsed = list[tuple[str, str, list[tuple[str, str, str]]]]


def _parse(value: str) -> tuple[str, Parsed]:
    """Parse with authres (core and all features); both must agree."""
    seen = []
    for context in (authres.core_features(), authres.all_features()):
        header = context.parse("Authentication-Results: " + value)
        results = [
            (r.method, r.result, [(p.type, p.name, p.value) for p in r.properties])
            for r in header.results
        ]
        seen.append((header.authserv_id, results))
    assert seen[0] == seen[1]
    return seen[0]


def _spf(identity: str, result: str, value: str) -> tuple[str, str, list[tuple[str, str, str]]]:
    return ("spf", result, [("smtp", identity, value)])


def _comments(value: str) -> list[str]:
    """Top-level comment texts of a field value, unescaped (outside quoted strings)."""
    found, depth, current, quoted, pos = [], 0, [], False, 0
    while pos < len(value):
        char = value[pos]
        if char == "\\" and (depth or quoted):
            if depth:
                current.append(value[pos + 1])
            pos += 2
            continue
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            if depth:
                current.append(char)
            depth += 1
        elif char == ")":
            depth -= 1
            if depth:
                current.append(char)
            else:
                found.append("".join(current))
                current = []
        elif depth:
            current.append(char)
        pos += 1
    assert depth == 0 and not quoted
    return found


# --- Authentication-Results: the normal cases -------------------------------


def test_both_identities_domain_format() -> None:
    value = authentication_results(AUTHSERV, HELO, MAILFROM)
    assert value == (
        "mx.example.net;"
        " spf=pass (mx.example.net: mail.example.org designates 192.0.2.1 as permitted sender)"
        " smtp.helo=mail.example.org;"
        " spf=fail (domain of example.com does not designate 192.0.2.1)"
        " smtp.mailfrom=example.com"
    )
    assert _parse(value) == (
        AUTHSERV,
        [
            _spf("helo", "pass", "mail.example.org"),
            _spf("mailfrom", "fail", "example.com"),
        ],
    )


def test_explanation_is_not_in_the_header() -> None:
    value = authentication_results(AUTHSERV, HELO, MAILFROM)
    assert "secret" not in value


def test_address_format() -> None:
    value = authentication_results(AUTHSERV, None, MAILFROM, mailfrom_format="address")
    assert _parse(value) == (AUTHSERV, [_spf("mailfrom", "fail", "alice.b+tag@example.com")])


@pytest.mark.parametrize(
    "result", ["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
)
def test_every_result(result: str) -> None:
    spf = SpfResult("mailfrom", result, domain="example.com", sender="a@example.com")
    value = authentication_results(AUTHSERV, None, spf)
    assert value == f"mx.example.net; spf={result} smtp.mailfrom=example.com"
    assert _parse(value) == (AUTHSERV, [_spf("mailfrom", result, "example.com")])


def test_null_sender_reports_helo_domain() -> None:
    spf = SpfResult(
        "mailfrom", "pass", domain="mail.example.org", sender="postmaster@mail.example.org"
    )
    for fmt, expected in (
        ("domain", "mail.example.org"),
        ("address", "postmaster@mail.example.org"),
    ):
        value = authentication_results(AUTHSERV, None, spf, mailfrom_format=fmt)
        assert _parse(value)[1] == [_spf("mailfrom", "pass", expected)]


def test_unchecked_identities_are_left_out() -> None:
    helo = SpfResult("helo", "none", domain="[192.0.2.1]", checked=False)
    value = authentication_results(AUTHSERV, helo, MAILFROM)
    assert _parse(value)[1] == [_spf("mailfrom", "fail", "example.com")]
    assert "192.0.2.1]" not in value


@pytest.mark.parametrize(
    ("helo", "mailfrom"),
    [(None, None), (SpfResult("helo", "none", checked=False), None)],
)
def test_nothing_checked_gives_none(helo: SpfResult | None, mailfrom: SpfResult | None) -> None:
    value = authentication_results(AUTHSERV, helo, mailfrom)
    assert value == "mx.example.net; none (no identity could be checked)"
    assert _parse(value) == (AUTHSERV, [])


@pytest.mark.parametrize(
    ("skip", "comment"),
    [
        ("authenticated", "SPF not checked: authenticated"),
        ("internal host", "SPF not checked: internal host"),
        ("forwarder lists.example", "SPF not checked: forwarder lists.example"),
        ("x) ; spf=pass smtp.mailfrom=bank.example (", "SPF not checked: x) , spf=pass"),
    ],
)
def test_skipped_session(skip: str, comment: str) -> None:
    value = authentication_results(AUTHSERV, HELO, MAILFROM, skip=skip)
    assert _parse(value) == (AUTHSERV, [])
    (text,) = _comments(value)
    assert text.startswith(comment)


def test_authserv_id_is_validated() -> None:
    with pytest.raises(ValueError, match="authserv-id"):
        authentication_results("mx example; spf=pass", HELO, None)


def test_mailfrom_format_is_validated() -> None:
    with pytest.raises(ValueError, match="mailfrom_format"):
        authentication_results(AUTHSERV, None, MAILFROM, mailfrom_format="full")


# --- Authentication-Results: hostile input ----------------------------------

PAYLOADS = [
    "nope) ; dmarc=pass header.from=bank.example (x",
    "x\r\n; dkim=pass header.d=bank.example",
    "a\\) ; dkim=pass (b",
    "\\",
    "a\\",
    '"; spf=pass smtp.mailfrom=bank.example "',
    "(((",
    ")))",
    "((a) ; dkim=pass",
    "\u00fcml\u00e4ut \u202e; dkim=pass",
    "\udcff\udc80 8-bit; dkim=pass",
    "nul\x00byte\x1b[0m; dkim=pass",
    "x" * 5000,
]


def _sanitised(text: str) -> str:
    """What an untrusted string should look like once made printable ASCII."""
    text = "".join("?" if ord(c) > 0x7E else c for c in text)
    return " ".join(re.sub(r"[\x00-\x1f]", " ", text).split())


@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_comments(payload: str) -> None:
    helo = SpfResult("helo", "neutral", domain="mail.example.org", comment=payload)
    mailfrom = SpfResult("mailfrom", "fail", domain="example.com", comment=payload)
    value = authentication_results(AUTHSERV, helo, mailfrom)
    assert value.isascii() and value.isprintable()
    assert _parse(value) == (
        AUTHSERV,
        [_spf("helo", "neutral", "mail.example.org"), _spf("mailfrom", "fail", "example.com")],
    )
    comments = _comments(value)
    assert len(comments) == 2
    expected = _sanitised(payload).replace(";", ",")
    if len(expected) <= 150:
        assert comments == [expected, expected]
    else:
        assert all(len(c) <= 150 and c.endswith("...") for c in comments)


def _quoted_content(raw: str) -> str:
    """What authres reads from the quoted-string we should write for ``raw``."""
    return re.sub(r'(["\\])', r"\\\1", _sanitised(raw).replace(";", "?"))


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("fmt", ["domain", "address"])
def test_hostile_helo_and_domain(payload: str, fmt: str) -> None:
    helo = SpfResult("helo", "pass", domain=payload)
    mailfrom = SpfResult("mailfrom", "pass", domain=payload, sender=f"x@{payload}")
    value = authentication_results(AUTHSERV, helo, mailfrom, mailfrom_format=fmt)
    assert value.isascii() and value.isprintable()
    if len(payload) > 320:
        assert _parse(value) == (AUTHSERV, [("spf", "pass", []), ("spf", "pass", [])])
        assert _comments(value) == [
            "smtp.helo not shown: empty or too long",
            "smtp.mailfrom not shown: empty or too long",
        ]
        return
    mailfrom_raw = payload if fmt == "domain" else f"x@{payload}"
    assert _parse(value) == (
        AUTHSERV,
        [
            _spf("helo", "pass", _quoted_content(payload)),
            _spf("mailfrom", "pass", _quoted_content(mailfrom_raw)),
        ],
    )


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("a.b-c+d=e/f!#$%&'*?^_`{|}~@example.com", "a.b-c+d=e/f!#$%&'*?^_`{|}~@example.com"),
        ("Alice@Example.COM.", "Alice@Example.COM"),
        ("with space@example.com", '"with space"@example.com'),
        ('quo"te@example.com', '"quo\\"te"@example.com'),
        ("back\\slash@example.com", '"back\\\\slash"@example.com'),
        ("a..b@example.com", '"a..b"@example.com'),
        (".a@example.com", '".a"@example.com'),
        ("a@b@example.com", '"a@b"@example.com'),
        ("semi;colon@example.com", '"semi?colon"@example.com'),
        ("paren(x)@example.com", '"paren(x)"@example.com'),
        ("\u00fcser@example.com", '"?ser"@example.com'),
        ("cr\r\nlf@example.com", '"cr lf"@example.com'),
        ("@example.com", "@example.com"),
        ("x@bad domain", "x@bad domain"),
        ("x@[192.0.2.1]", "x@[192.0.2.1]"),
        ("noat", "noat"),
    ],
)
def test_address_quoting(sender: str, expected: str) -> None:
    spf = SpfResult("mailfrom", "pass", domain="example.com", sender=sender)
    value = authentication_results(AUTHSERV, None, spf, mailfrom_format="address")
    assert _parse(value) == (AUTHSERV, [_spf("mailfrom", "pass", expected)])


def test_too_long_address_falls_back_to_domain() -> None:
    spf = SpfResult("mailfrom", "pass", domain="example.com", sender="x" * 400 + "@example.com")
    value = authentication_results(AUTHSERV, None, spf, mailfrom_format="address")
    assert _parse(value)[1] == [_spf("mailfrom", "pass", "example.com")]


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("mail.example.org", "mail.example.org"),
        ("MAIL.Example.org.", "MAIL.Example.org."),
        ("two words", "two words"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ('a"b', 'a\\"b'),
        ("a\\b", "a\\\\b"),
        ("a;b", "a?b"),
        ("\u00fcml.example", "?ml.example"),
    ],
)
def test_helo_quoting(helo: str, expected: str) -> None:
    value = authentication_results(AUTHSERV, SpfResult("helo", "pass", domain=helo), None)
    assert _parse(value)[1] == [_spf("helo", "pass", expected)]


@pytest.mark.parametrize("helo", ["", " ", "\r\n", "\x00"])
def test_empty_helo_value_is_left_out_with_comment(helo: str) -> None:
    value = authentication_results(AUTHSERV, SpfResult("helo", "pass", domain=helo), None)
    assert _parse(value)[1] == [("spf", "pass", [])]
    assert _comments(value) == ["smtp.helo not shown: empty or too long"]


# --- Received-SPF -------------------------------------------------------------

_RS_TOKEN = re.compile(
    r'\s*(?P<key>[A-Za-z0-9_.-]+)\s*=\s*(?:"(?P<q>(?:[^"\\]|\\.)*)"|(?P<a>[^\s;"()]+))\s*;?'
)


def _parse_received_spf(value: str) -> tuple[str, list[str], dict[str, str]]:
    """A strict reader for RFC 7208 9.1 fields: result, comment, key=value pairs."""
    match = re.match(r"(pass|fail|softfail|neutral|none|permerror|temperror)(?=\s|$)", value)
    assert match, value
    result, rest = match.group(1), value[match.end() :]
    comments = _comments(rest)
    if rest.lstrip().startswith("("):
        depth, pos = 0, rest.index("(")
        while True:
            if rest[pos] == "\\":
                pos += 2
                continue
            depth += {"(": 1, ")": -1}.get(rest[pos], 0)
            pos += 1
            if depth == 0:
                break
        rest = rest[pos:]
    pairs: dict[str, str] = {}
    while rest.strip():
        match = _RS_TOKEN.match(rest)
        assert match, rest
        assert match.group("key") not in pairs, "duplicate key"
        quoted = match.group("q")
        pairs[match.group("key")] = (
            re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match.group("a")
        )
        rest = rest[match.end() :]
    return result, comments, pairs


def test_received_spf() -> None:
    value = received_spf(MAILFROM, ip="192.0.2.1", helo="mail.example.org", receiver=AUTHSERV)
    assert value == (
        "fail (domain of example.com does not designate 192.0.2.1)"
        ' client-ip=192.0.2.1; envelope-from="alice.b+tag@example.com";'
        " helo=mail.example.org; receiver=mx.example.net; identity=mailfrom;"
    )
    assert _parse_received_spf(value) == (
        "fail",
        ["domain of example.com does not designate 192.0.2.1"],
        {
            "client-ip": "192.0.2.1",
            "envelope-from": "alice.b+tag@example.com",
            "helo": "mail.example.org",
            "receiver": "mx.example.net",
            "identity": "mailfrom",
        },
    )
    assert "secret" not in value


def test_received_spf_ipv6_and_helo_identity() -> None:
    value = received_spf(HELO, ip="2001:db8::1", helo="mail.example.org", receiver=AUTHSERV)
    result, _comments_found, pairs = _parse_received_spf(value)
    assert result == "pass"
    assert pairs["client-ip"] == "2001:db8::1"
    assert pairs["identity"] == "helo"
    assert pairs["envelope-from"] == "postmaster@mail.example.org"


def test_received_spf_without_comment() -> None:
    spf = SpfResult("mailfrom", "none", domain="example.com", sender="a@example.com")
    value = received_spf(spf, ip="192.0.2.1", helo="h.example", receiver="r.example")
    assert value.startswith("none client-ip=192.0.2.1;")
    assert _parse_received_spf(value)[1] == []


@pytest.mark.parametrize("payload", PAYLOADS)
def test_received_spf_hostile(payload: str) -> None:
    spf = SpfResult("mailfrom", "softfail", domain=payload, sender=f"{payload}@x", comment=payload)
    value = received_spf(spf, ip="192.0.2.1", helo=payload, receiver=AUTHSERV)
    assert value.isascii() and value.isprintable()
    result, comments, pairs = _parse_received_spf(value)
    assert result == "softfail"
    assert len(comments) == 1
    assert pairs["client-ip"] == "192.0.2.1"
    assert pairs["receiver"] == AUTHSERV
    assert pairs["identity"] == "mailfrom"
    assert set(pairs) <= {"client-ip", "envelope-from", "helo", "receiver", "identity"}
    if len(payload) < 300:
        assert pairs["helo"] == _sanitised(payload).replace(";", "?")


# --- is_own_authres -------------------------------------------------------------

OWN = [
    "mx.example.net; spf=pass smtp.mailfrom=example.com",
    "MX.Example.NET; spf=pass",
    "mx.example.net.; none",
    "mx.example.net",
    "mx.example.net 1; none",
    "mx.example.net(comment); none",
    "  (leading comment) mx.example.net; none",
    "(nested (comment) \\) here)\r\n\t mx.example.net; none",
    "\r\n mx.example.net;",
    '"mx.example.net"; spf=pass',
    '"MX.example.net."; spf=pass',
    "mx.example.net; this is not ( parseable at all",
    "mx.example.net;;;; ===",
    "mx.example.net; spf=pass \udcff\udc80 8-bit junk",
    "mx.example.net\udcff; spf=pass",
    "mx.example.net/1; spf=pass",
    "mx.example.net\x00; spf=pass",
]

NOT_OWN = [
    "",
    "   ",
    "example.net; spf=pass",
    "mx.example.net.evil.example; spf=pass",
    "evil.mx.example.net; spf=pass",
    "mx.example.nett; spf=pass",
    "mx-example.net; spf=pass",
    "(mx.example.net) other.example; spf=pass",
    "(unterminated comment mx.example.net; spf=pass",
    '"unterminated mx.example.net; spf=pass',
    "; mx.example.net",
    "\udcff\udc80; spf=pass",
    "mx.example.net..; spf=pass",
]


@pytest.mark.parametrize("value", OWN)
def test_is_own(value: str) -> None:
    assert is_own_authres(value, "mx.example.net")
    assert is_own_authres(value, "MX.EXAMPLE.NET.")


@pytest.mark.parametrize("value", NOT_OWN)
def test_is_not_own(value: str) -> None:
    assert not is_own_authres(value, "mx.example.net")


def test_own_header_is_detected() -> None:
    value = authentication_results(AUTHSERV, HELO, MAILFROM)
    assert is_own_authres(value, AUTHSERV)
    assert not is_own_authres(value, "other.example.net")
