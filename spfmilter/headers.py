"""Header fields: Authentication-Results (RFC 8601) and Received-SPF (RFC 7208 9.1).

Pure functions returning field *values* (no field name), folded.  HELO
names, sender addresses and comments come from the client or from DNS, so every
piece is made ASCII, stripped of control characters and quoted or escaped, and
bounded in length once escaped; a parser sees exactly the results we meant,
never one smuggled in.

Folding (RFC 5322 2.2.3): a line break goes in before a space outside any
quoted-string, so that lines stay within 78 octets where a break point exists
and never exceed 998 (2.1.1).  The break is a bare ``"\n"``, the form both
Sendmail (``put_vanilla_header``) and Postfix (``cleanup_out_header``) turn
into a CRLF-folded line when given to ``smfi_addheader``/``smfi_insheader``;
the space after it starts the continuation line.  Removing the ``"\n"``s gives
back the one-line value exactly (see :func:`unfold`).

Choices made here:

* An identity that could not be checked (``SpfResult.checked`` false, e.g. an
  address-literal HELO) is left out of Authentication-Results; when nothing is
  left the field says ``none`` with a comment.
* The domain's SPF explanation is not written into either field: it is text
  for the rejected sender's SMTP reply, and recipients gain nothing from it.
* A skipped session (``skip``) gives ``none (SPF not checked: REASON)``.
* A ``note`` about the session rather than one method (a HELO hygiene
  finding) is a comment after the authserv-id, which RFC 8601's grammar allows
  (``resinfo = [CFWS] ";" ...``): no method or ptype is invented, and parsers
  that drop comments see the same results as without it.
* With ``mailfrom = address`` a local part in RFC 5321 quoted form
  (``"a b"@example.test``) is written as it came: it already is an RFC 5322
  quoted-string, as RFC 8601's ``pvalue`` wants.
"""

from __future__ import annotations

import functools
import re
import string

import authres
from authres import core

from .results import SpfResult

__all__ = ["authentication_results", "received_spf", "is_own_authres", "fold", "unfold",
           "cached_authentication_results", "cached_received_spf"]

#: Longest comment text, counted after escaping (one untrusted piece of a line).
MAX_COMMENT = 150
#: Longest property value, counted after quoting; longer ones are left out with a comment.
MAX_VALUE = 320
#: Line length to fold at where a break point exists (RFC 5322 2.1.1 "SHOULD").
FOLD_WIDTH = 78
#: Hard line length limit, excluding CRLF (RFC 5322 2.1.1 "MUST").
MAX_LINE = 998
#: Distinct field values remembered by the cached_* builders.
HEADER_CACHE_SIZE = 512

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+\Z")  # RFC 2045 token
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")  # RFC 5322 dot-atom-text
_DOMAIN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`{|}~")
# RFC 5321 4.1.2 Quoted-string: qtextSMTP (%d32-33 / %d35-91 / %d93-126) or "\\" %d32-126.
# Not empty: authres reads ``""@example.test`` back as ``@example.test``.
_QUOTED_5321 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])+"\Z')


def _printable(text: str, limit: int | None = None) -> str:
    """One line of printable ASCII: controls to spaces, the rest to '?', collapsed."""
    text = _NON_ASCII.sub("?", _CONTROL.sub(" ", text))
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _comment(text: str, limit: int = MAX_COMMENT) -> str:
    """Text safe inside ``( )``: printable ASCII with ``\\``, ``(`` and ``)`` escaped.

    ``;`` becomes ``,`` too, for the benefit of consumers that split fields on
    ``;`` without honouring comments.  At most ``limit`` octets once escaped:
    a longer text is cut (never inside an escape pair) and ends in ``...``.
    """
    text = _printable(text).replace(";", ",")
    escaped = re.sub(r"([\\()])", r"\\\1", text)
    if len(escaped) <= limit:
        return escaped
    cut = escaped[: limit - 3]
    if (len(cut) - len(cut.rstrip("\\"))) % 2:  # would split a quoted-pair
        cut = cut[:-1]
    return cut.rstrip() + "..."


def _quoted(text: str) -> str:
    """An RFC 5322 quoted-string holding ``text`` made printable ASCII (``;`` as ``?``)."""
    text = _printable(text).replace(";", "?")
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def _value(text: str) -> str:
    """A token when ``text`` is one, else a quoted-string ("" when nothing is left)."""
    if _TOKEN.match(text):
        return text
    return _quoted(text) if _printable(text) else ""


def _address(address: str) -> str:
    """``local@domain`` as an RFC 8601 pvalue: the local part quoted if need be."""
    local, at, domain = address.rpartition("@")
    domain = domain[:-1] if domain.endswith(".") else domain
    if not at or not _DOMAIN.match(domain):
        return _value(address)
    if _DOT_ATOM.match(local) or _QUOTED_5321.match(local):
        return f"{local}@{domain}"
    if not _printable(local):
        return _value(address)
    return f"{_quoted(local)}@{domain}"


class _Verbatim(core.QuotableValue):
    """A property value we have already made safe: authres must not requote it."""

    def quote_if_needed(self) -> str:
        return str(self)


def _spf_resinfo(spf: SpfResult, mailfrom_format: str) -> core.SPFAuthenticationResult:
    if spf.identity == "helo":
        name, value = "helo", _value(spf.domain)
    elif mailfrom_format == "address" and spf.sender:
        name, value = "mailfrom", _address(spf.sender)
        if len(value) > MAX_VALUE:
            value = _value(spf.domain)
    else:
        name, value = "mailfrom", _value(spf.domain)
    comments = [_comment(spf.comment)] if _printable(spf.comment) else []
    properties = []
    if value and len(value) <= MAX_VALUE:
        prop = core.AuthenticationResultProperty("smtp", name)
        prop.value = _Verbatim(value)
        properties.append(prop)
    else:
        comments.append(f"smtp.{name} not shown: empty or too long")
    return core.SPFAuthenticationResult(
        result=spf.result,
        result_comment=", ".join(comments) or None,
        properties=properties,
    )


def authentication_results(
    authserv_id: str,
    helo: SpfResult | None,
    mailfrom: SpfResult | None,
    *,
    mailfrom_format: str = "domain",
    skip: str | None = None,
    note: str = "",
) -> str:
    """The value of an Authentication-Results field for this session's SPF results.

    One ``spf=`` resinfo per checked identity (``smtp.helo=``, then
    ``smtp.mailfrom=``), the latter the bare domain or, with
    ``mailfrom_format="address"``, the full address.
    """
    if not _DOT_ATOM.match(authserv_id):
        raise ValueError(f"unusable authserv-id {authserv_id!r}")
    if mailfrom_format not in ("domain", "address"):
        raise ValueError(f"unknown mailfrom_format {mailfrom_format!r}")
    results: list[core.BaseAuthenticationResult] = []
    if skip:
        results.append(core.NoneAuthenticationResult(_comment(f"SPF not checked: {skip}")))
    else:
        for spf in (helo, mailfrom):
            if spf is not None and spf.checked:
                results.append(_spf_resinfo(spf, mailfrom_format))
        if not results:
            results.append(core.NoneAuthenticationResult("no identity could be checked"))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    value = str(header.header_value())
    comment = _comment(note) if _printable(note) else ""
    if comment and value.startswith(authserv_id + ";"):
        value = f"{authserv_id} ({comment}){value[len(authserv_id):]}"
    return fold("Authentication-Results", value)


def _kv_value(text: str) -> str:
    """A Received-SPF key-value: dot-atom when possible, else quoted-string."""
    return text if _DOT_ATOM.match(text) else _quoted(text)


def received_spf(result: SpfResult, *, ip: str, helo: str, receiver: str) -> str:
    """The value of a Received-SPF field (RFC 7208 section 9.1) for ``result``."""
    parts = [result.result]
    comment = _comment(result.comment)
    if comment:
        parts.append(f"({comment})")
    pairs = [
        ("client-ip", ip),
        ("envelope-from", result.sender),
        ("helo", helo),
        ("receiver", receiver),
        ("identity", result.identity),
    ]
    rendered = [
        f"{key}={_kv_value(value)};"
        for key, value in pairs
        if _printable(value) and len(_kv_value(value)) <= MAX_VALUE
    ]
    return fold("Received-SPF", " ".join(parts + rendered))


# -- the same, remembered ----------------------------------------------------
# A busy MX sees the same few dozen results again and again.  Each cached
# builder keys on exactly the parts of its inputs the builder above reads and
# builds from the key alone (the SpfResult is made anew from it), so two inputs
# can share text only when the builder could not tell them apart.

_ResultKey = tuple  # (identity, result, domain, sender, comment), or None


def _ar_key(spf: SpfResult | None, mailfrom_format: str) -> _ResultKey | None:
    if spf is None or not spf.checked:  # left out of the field either way
        return None
    sender = spf.sender if spf.identity == "mailfrom" and mailfrom_format == "address" else ""
    return (spf.identity, spf.result, spf.domain, sender, spf.comment)


def _from_key(key: _ResultKey | None) -> SpfResult | None:
    if key is None:
        return None
    identity, result, domain, sender, comment = key
    return SpfResult(identity, result, domain=domain, sender=sender, comment=comment)


def cached_authentication_results(
    authserv_id: str,
    helo: SpfResult | None,
    mailfrom: SpfResult | None,
    *,
    mailfrom_format: str = "domain",
    skip: str | None = None,
    note: str = "",
) -> str:
    """:func:`authentication_results`, remembered (bounded LRU)."""
    return _authentication_results(authserv_id, _ar_key(helo, mailfrom_format),
                                   _ar_key(mailfrom, mailfrom_format), mailfrom_format,
                                   skip, note)


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
def _authentication_results(authserv_id: str, helo: _ResultKey | None,
                            mailfrom: _ResultKey | None, mailfrom_format: str,
                            skip: str | None, note: str) -> str:
    return authentication_results(authserv_id, _from_key(helo), _from_key(mailfrom),
                                  mailfrom_format=mailfrom_format, skip=skip, note=note)


def cached_received_spf(result: SpfResult, *, ip: str, helo: str, receiver: str) -> str:
    """:func:`received_spf`, remembered (bounded LRU)."""
    return _received_spf((result.identity, result.result, "", result.sender, result.comment),
                         ip, helo, receiver)


@functools.lru_cache(maxsize=HEADER_CACHE_SIZE)
def _received_spf(result: _ResultKey, ip: str, helo: str, receiver: str) -> str:
    spf = _from_key(result)
    assert spf is not None
    return received_spf(spf, ip=ip, helo=helo, receiver=receiver)


_SPECIAL = re.compile(r'[\\"() ]')  # the only characters that move _break_points' state


def _break_points(value: str) -> list[int]:
    """Indexes of the spaces in ``value`` outside quoted-strings (comments included)."""
    points: list[int] = []
    depth, quoted, skip = 0, False, 0
    for match in _SPECIAL.finditer(value):
        pos = match.start()
        if pos < skip:  # the character after a backslash: quoted-pair
            continue
        char = match.group()
        if char == "\\":
            if quoted or depth:
                skip = pos + 2
            continue
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == " ":
            points.append(pos)
    return points


def fold(name: str, value: str, width: int = FOLD_WIDTH) -> str:
    """``value`` of field ``name`` folded: ``"\n"`` before spaces, lines kept within width.

    A line is longer than ``width`` only when it holds a single unbreakable
    piece.  Raises ValueError if a line would still exceed :data:`MAX_LINE`
    (our own pieces are bounded well below that, so this is a bug trap).
    """
    if "\r" in value or "\n" in value:
        raise ValueError("value to fold already contains CR or LF")
    out: list[str] = []
    line_len = len(name) + 2  # "Name: "
    start = 0
    for end in [*_break_points(value), len(value)]:
        piece = value[start:end]
        if out and line_len + len(piece) > width:
            out.append("\n")
            line_len = 0
        out.append(piece)
        line_len += len(piece)
        start = end
        if line_len > MAX_LINE:
            raise ValueError(f"{name}: unbreakable piece of {len(piece)} octets")
    return "".join(out)


def unfold(value: str) -> str:
    """A folded value on one line again (RFC 5322 2.2.3: CRLF removed, WSP kept)."""
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def _skip_cfws(text: str, pos: int) -> int:
    """Index after folding whitespace and comments at ``pos``; -1 if a comment is open."""
    while pos < len(text):
        char = text[pos]
        if char in " \t\r\n":
            pos += 1
        elif char == "(":
            depth = 0
            while pos < len(text):
                char = text[pos]
                if char == "\\":
                    pos += 1
                elif char == "(":
                    depth += 1
                elif char == ")":
                    depth -= 1
                    if depth == 0:
                        break
                pos += 1
            if pos >= len(text):
                return -1
            pos += 1
        else:
            break
    return pos


def _leading_authserv_id(value: str) -> str | None:
    pos = _skip_cfws(value, 0)
    if pos < 0:
        return None
    if value.startswith('"', pos):
        chars = []
        pos += 1
        while pos < len(value) and value[pos] != '"':
            if value[pos] == "\\":
                pos += 1
            chars.append(value[pos : pos + 1])
            pos += 1
        if pos >= len(value):
            return None
        return "".join(chars).strip()
    end = pos
    while end < len(value) and value[end] in _TOKEN_CHARS:
        end += 1
    return value[pos:end]


def _normalize_id(authserv_id: str) -> str:
    authserv_id = authserv_id.lower()
    return authserv_id[:-1] if authserv_id.endswith(".") else authserv_id


def is_own_authres(value: str, authserv_id: str) -> bool:
    """True when Authentication-Results ``value`` claims ``authserv_id`` as its own.

    Case-insensitive, a trailing dot ignored, leading comments and whitespace
    skipped.  Only the start of the field is read, so a field that is garbage
    after a matching authserv-id still counts as ours.
    """
    found = _leading_authserv_id(value)
    return bool(found) and _normalize_id(found) == _normalize_id(authserv_id)
