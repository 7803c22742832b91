"""Header values: round trips through authres, injection attempts, own-id detection."""

from __future__ import annotations

import os
import re

import authres
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spfmilter.headers import authentication_results, is_own_authres, received_spf, unfold
from spfmilter.results import RESULTS, SpfResult
from tests.folding import check_lines

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


def _check_folded(name: str, value: str) -> list[str]:
    """The physical lines of field ``name: value``; LF only as a fold, lines checked."""
    assert "\r" not in value
    lines = f"{name}: {value}".split("\n")
    for line in lines:
        assert line.isascii() and line.isprintable(), line
    check_lines(name, lines)
    return lines


def _ar(*args: object, **kwargs: object) -> str:
    """authentication_results(), its folding checked, unfolded for the table tests."""
    value = authentication_results(*args, **kwargs)  # type: ignore[arg-type]
    _check_folded("Authentication-Results", value)
    assert _parse(value) == _parse(unfold(value))
    return unfold(value)


def _rs(*args: object, **kwargs: object) -> str:
    """received_spf(), its folding checked, unfolded for the table tests."""
    value = received_spf(*args, **kwargs)  # type: ignore[arg-type]
    _check_folded("Received-SPF", value)
    return unfold(value)


# --- Authentication-Results: the normal cases -------------------------------


def test_both_identities_domain_format() -> None:
    folded = authentication_results(AUTHSERV, HELO, MAILFROM)
    assert folded.split("\n") == [
        "mx.example.net; spf=pass (mx.example.net:",
        " mail.example.org designates 192.0.2.1 as permitted sender)",
        " smtp.helo=mail.example.org; spf=fail (domain of example.com does not",
        " designate 192.0.2.1) smtp.mailfrom=example.com",
    ]
    value = _ar(AUTHSERV, HELO, MAILFROM)
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
    value = _ar(AUTHSERV, HELO, MAILFROM)
    assert "secret" not in value


def test_address_format() -> None:
    value = _ar(AUTHSERV, None, MAILFROM, mailfrom_format="address")
    assert _parse(value) == (AUTHSERV, [_spf("mailfrom", "fail", "alice.b+tag@example.com")])


@pytest.mark.parametrize(
    "result", ["pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"]
)
def test_every_result(result: str) -> None:
    spf = SpfResult("mailfrom", result, domain="example.com", sender="a@example.com")
    value = _ar(AUTHSERV, None, spf)
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
        value = _ar(AUTHSERV, None, spf, mailfrom_format=fmt)
        assert _parse(value)[1] == [_spf("mailfrom", "pass", expected)]


def test_unchecked_identities_are_left_out() -> None:
    helo = SpfResult("helo", "none", domain="[192.0.2.1]", checked=False)
    value = _ar(AUTHSERV, helo, MAILFROM)
    assert _parse(value)[1] == [_spf("mailfrom", "fail", "example.com")]
    assert "192.0.2.1]" not in value


@pytest.mark.parametrize(
    ("helo", "mailfrom"),
    [(None, None), (SpfResult("helo", "none", checked=False), None)],
)
def test_nothing_checked_gives_none(helo: SpfResult | None, mailfrom: SpfResult | None) -> None:
    value = _ar(AUTHSERV, helo, mailfrom)
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
    value = _ar(AUTHSERV, HELO, MAILFROM, skip=skip)
    assert _parse(value) == (AUTHSERV, [])
    (text,) = _comments(value)
    assert text.startswith(comment)


def test_authserv_id_is_validated() -> None:
    with pytest.raises(ValueError, match="authserv-id"):
        _ar("mx example; spf=pass", HELO, None)


def test_mailfrom_format_is_validated() -> None:
    with pytest.raises(ValueError, match="mailfrom_format"):
        _ar(AUTHSERV, None, MAILFROM, mailfrom_format="full")


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
    text = "".join("?" if ord(c) > 0x7F else c for c in text)
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_comments(payload: str) -> None:
    helo = SpfResult("helo", "neutral", domain="mail.example.org", comment=payload)
    mailfrom = SpfResult("mailfrom", "fail", domain="example.com", comment=payload)
    value = _ar(AUTHSERV, helo, mailfrom)
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
    value = _ar(AUTHSERV, helo, mailfrom, mailfrom_format=fmt)
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
        # RFC 5321 quoted local parts are kept as they came (issue 8 item 8).
        ('"a b"@example.test', '"a b"@example.test'),
        ('"a\\"b"@example.test', '"a\\"b"@example.test'),
        ('"a\\\\b"@example.test', '"a\\\\b"@example.test'),
        ('"a;b(c)"@example.test', '"a;b(c)"@example.test'),
        ('"a@b"@example.test', '"a@b"@example.test'),
        ('""@example.test', '"\\"\\""@example.test'),  # authres misreads an empty one
        ('"\\ "@example.test', '"\\ "@example.test'),
        # ... but not what only looks like one.
        ('"open@example.test', '"\\"open"@example.test'),
        ('"a"b"@example.test', '"\\"a\\"b\\""@example.test'),
        ('"a\\"@example.test', '"\\"a\\\\\\""@example.test'),
        ('"tab\tx"@example.test', '"\\"tab x\\""@example.test'),
        ('"\u00fc"@example.test', '"\\"?\\""@example.test'),
    ],
)
def test_address_quoting(sender: str, expected: str) -> None:
    spf = SpfResult("mailfrom", "pass", domain="example.com", sender=sender)
    value = _ar(AUTHSERV, None, spf, mailfrom_format="address")
    assert _parse(value) == (AUTHSERV, [_spf("mailfrom", "pass", expected)])


def test_too_long_address_falls_back_to_domain() -> None:
    spf = SpfResult("mailfrom", "pass", domain="example.com", sender="x" * 400 + "@example.com")
    value = _ar(AUTHSERV, None, spf, mailfrom_format="address")
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
    value = _ar(AUTHSERV, SpfResult("helo", "pass", domain=helo), None)
    assert _parse(value)[1] == [_spf("helo", "pass", expected)]


@pytest.mark.parametrize("helo", ["", " ", "\r\n", "\x00"])
def test_empty_helo_value_is_left_out_with_comment(helo: str) -> None:
    value = _ar(AUTHSERV, SpfResult("helo", "pass", domain=helo), None)
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
    value = _rs(MAILFROM, ip="192.0.2.1", helo="mail.example.org", receiver=AUTHSERV)
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
    value = _rs(HELO, ip="2001:db8::1", helo="mail.example.org", receiver=AUTHSERV)
    result, _comments_found, pairs = _parse_received_spf(value)
    assert result == "pass"
    assert pairs["client-ip"] == "2001:db8::1"
    assert pairs["identity"] == "helo"
    assert pairs["envelope-from"] == "postmaster@mail.example.org"


def test_received_spf_without_comment() -> None:
    spf = SpfResult("mailfrom", "none", domain="example.com", sender="a@example.com")
    value = _rs(spf, ip="192.0.2.1", helo="h.example", receiver="r.example")
    assert value.startswith("none client-ip=192.0.2.1;")
    assert _parse_received_spf(value)[1] == []


@pytest.mark.parametrize("payload", PAYLOADS)
def test_received_spf_hostile(payload: str) -> None:
    spf = SpfResult("mailfrom", "softfail", domain=payload, sender=f"{payload}@x", comment=payload)
    value = _rs(spf, ip="192.0.2.1", helo=payload, receiver=AUTHSERV)
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
    value = _ar(AUTHSERV, HELO, MAILFROM)
    assert is_own_authres(value, AUTHSERV)
    assert not is_own_authres(value, "other.example.net")


# --- Property tests: folding, bounds and round trips (issue 8 items 4 and 8) ----
#
# SPFMILTER_PROPERTY_EXAMPLES=20000 for a long run by hand.

PROPERTY = settings(
    max_examples=int(os.environ.get("SPFMILTER_PROPERTY_EXAMPLES", "150")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+\Z")
MARKER = "Zq7EXPL"

_special = st.sampled_from(
    [";", "(", ")", '"', "\\", " ", "@", ".", "%", "\r", "\n", "\t", "\x00", "\x1b", "\x7f",
     "\u00e9", "\u202e", "\udcff", "\udc80", " spf=pass ", "x" * 120, "\\(", ")\\"]
)
_char = st.characters(exclude_categories=())  # surrogates (undecodable bytes) too
_short = st.lists(st.one_of(_special, _char), max_size=30).map("".join)
_huge = st.builds(lambda piece, n: piece * n, _special, st.integers(1, 1200))
hostile = st.one_of(_short, _huge).filter(lambda t: MARKER not in t)


def _expected_value(raw: str) -> str | None:
    """What authres should read as a HELO/domain property value (None: not shown)."""
    if _TOKEN_RE.match(raw):
        return raw if len(raw) <= 320 else None
    if not _sanitised(raw):
        return None
    inner = _quoted_content(raw)
    return inner if len(inner) + 2 <= 320 else None


def _expected_comment(raw: str, shown: bool, name: str) -> str | None:
    """The one comment of a resinfo (None: none), tolerating the ``...`` cut."""
    parts = [_sanitised(raw).replace(";", ",")] if _sanitised(raw) else []
    if not shown:
        parts.append(f"smtp.{name} not shown: empty or too long")
    return ", ".join(parts) or None


def _comment_matches(found: str, raw: str, shown: bool, name: str) -> bool:
    expected = _expected_comment(raw, shown, name)
    if expected is None:
        return False
    if found == expected:
        return True
    note = f", smtp.{name} not shown: empty or too long"
    if not shown:
        if not found.endswith(note):
            return False
        found = found[: -len(note)]
    text = _sanitised(raw).replace(";", ",")
    return found.endswith("...") and text.startswith(found[:-3]) and len(found) <= 150


@PROPERTY
@given(helo=hostile, domain=hostile, local=hostile, helo_comment=hostile,
       mailfrom_comment=hostile, explanation=hostile,
       results=st.tuples(st.sampled_from(RESULTS), st.sampled_from(RESULTS)),
       fmt=st.sampled_from(["domain", "address"]))
def test_property_authentication_results(helo: str, domain: str, local: str,
                                         helo_comment: str, mailfrom_comment: str,
                                         explanation: str, results: tuple[str, str],
                                         fmt: str) -> None:
    helo_spf = SpfResult("helo", results[0], domain=helo, comment=helo_comment,
                         explanation=MARKER + explanation)
    mailfrom_spf = SpfResult("mailfrom", results[1], domain=domain, sender=f"{local}@{domain}",
                             comment=mailfrom_comment, explanation=MARKER + explanation)
    folded = authentication_results(AUTHSERV, helo_spf, mailfrom_spf, mailfrom_format=fmt)
    _check_folded("Authentication-Results", folded)
    value = unfold(folded)
    assert MARKER not in value
    assert _parse(folded) == _parse(value)
    authserv, parsed = _parse(folded)
    assert authserv == AUTHSERV
    # Exactly the two resinfos meant, nothing smuggled in.
    assert [(m, r) for m, r, _p in parsed] == [("spf", results[0]), ("spf", results[1])]
    helo_props, mailfrom_props = parsed[0][2], parsed[1][2]
    expected_helo = _expected_value(helo)
    assert helo_props == ([("smtp", "helo", expected_helo)] if expected_helo is not None else [])
    assert [(t, n) for t, n, _v in mailfrom_props] in ([], [("smtp", "mailfrom")])
    if fmt == "domain":
        expected = _expected_value(domain)
        assert mailfrom_props == ([("smtp", "mailfrom", expected)] if expected is not None
                                  else [])
    comments = _comments(value)
    assert len(comments) == sum(
        _expected_comment(raw, bool(props), name) is not None
        for raw, props, name in ((helo_comment, helo_props, "helo"),
                                 (mailfrom_comment, mailfrom_props, "mailfrom")))
    if comments and _expected_comment(helo_comment, bool(helo_props), "helo") is not None:
        assert _comment_matches(comments[0], helo_comment, bool(helo_props), "helo")
    if comments and _expected_comment(mailfrom_comment, bool(mailfrom_props),
                                      "mailfrom") is not None:
        assert _comment_matches(comments[-1], mailfrom_comment, bool(mailfrom_props),
                                "mailfrom")


# RFC 5321 4.1.2 Mailbox: Dot-string or Quoted-string "@" Domain.
_atext = st.sampled_from(list("abcXYZ019!#$%&'*+-/=?^_`{|}~"))
_atom = st.lists(_atext, min_size=1, max_size=20).map("".join)
_dot_string = st.lists(_atom, min_size=1, max_size=4).map(".".join)
_qcontent = st.one_of(
    st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c not in '"\\'),
    st.characters(min_codepoint=32, max_codepoint=126).map(lambda c: "\\" + c),
)
_quoted_string = st.lists(_qcontent, min_size=1, max_size=40).map(lambda p: f'"{"".join(p)}"')
_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=5).map(".".join)
mailbox = st.tuples(st.one_of(_dot_string, _quoted_string), _domain)


@PROPERTY
@given(mailbox=mailbox, result=st.sampled_from(RESULTS))
def test_property_smtp_mailfrom_address_round_trips(mailbox: tuple[str, str],
                                                    result: str) -> None:
    local, domain = mailbox
    address = f"{local}@{domain}"
    spf = SpfResult("mailfrom", result, domain=domain, sender=address,
                    comment=f"domain of {address} is checked")
    folded = authentication_results(AUTHSERV, None, spf, mailfrom_format="address")
    _check_folded("Authentication-Results", folded)
    expected = address if len(address) <= 320 else domain
    assert _parse(folded) == (AUTHSERV, [_spf("mailfrom", result, expected)])


@PROPERTY
@given(helo=hostile, domain=hostile, local=hostile, comment=hostile, explanation=hostile,
       result=st.sampled_from(RESULTS), identity=st.sampled_from(["helo", "mailfrom"]),
       ip=st.sampled_from(["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"]))
def test_property_received_spf(helo: str, domain: str, local: str, comment: str,
                               explanation: str, result: str, identity: str, ip: str) -> None:
    spf = SpfResult(identity, result, domain=domain, sender=f"{local}@{domain}",
                    comment=comment, explanation=MARKER + explanation)
    folded = received_spf(spf, ip=ip, helo=helo, receiver=AUTHSERV)
    _check_folded("Received-SPF", folded)
    value = unfold(folded)
    assert MARKER not in value
    got, comments, pairs = _parse_received_spf(value)
    assert got == result
    assert len(comments) == (1 if _sanitised(comment) else 0)
    if comments:
        text = _sanitised(comment).replace(";", ",")
        assert comments[0] == text or (comments[0].endswith("...")
                                       and text.startswith(comments[0][:-3]))
    assert {k: pairs[k] for k in ("client-ip", "receiver", "identity")} == {
        "client-ip": ip, "receiver": AUTHSERV, "identity": identity}
    for key, raw in (("helo", helo), ("envelope-from", f"{local}@{domain}")):
        if key in pairs:
            assert pairs[key] == raw if _DOT_ATOM_RE.match(raw) else \
                pairs[key] == _sanitised(raw).replace(";", "?")
        else:
            assert not _sanitised(raw) or len(raw) > 150


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")


def test_long_helo_and_domain_with_long_comments_stay_within_998() -> None:
    """The reproduced case: 1150 octets on one line before; folded now."""
    long_name = ".".join(["a" * 63] * 3) + "." + "b" * 60
    comment = "((" * 200
    helo = SpfResult("helo", "fail", domain=long_name, comment=comment)
    mailfrom = SpfResult("mailfrom", "fail", domain=long_name, sender=f"u@{long_name}",
                         comment=comment)
    for fmt in ("domain", "address"):
        folded = authentication_results(AUTHSERV, helo, mailfrom, mailfrom_format=fmt)
        lines = _check_folded("Authentication-Results", folded)
        assert len(lines) > 3 and max(len(line) for line in lines) <= 998
        # Each comment is bounded once escaped (150 octets), not before.
        found = re.findall(r"\(((?:\\.|[^\\()])*)\)", unfold(folded))
        assert len(found) == 2 and all(len(c) <= 150 for c in found), found
        assert [r for _m, r, _p in _parse(folded)[1]] == ["fail", "fail"]
    folded = received_spf(mailfrom, ip="192.0.2.1", helo=long_name, receiver=AUTHSERV)
    _check_folded("Received-SPF", folded)
