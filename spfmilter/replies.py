"""SMTP reply text: fill the configured template with sanitised, bounded text.

SMTP replies are ASCII, one line each, and the domain's SPF explanation, the
HELO name and the sender domain are chosen by the client side.  Everything that
goes into a reply passes through :func:`clean` first.  ``%`` is left alone: the
extension's ``setreply`` does libmilter's own escaping.
"""

from __future__ import annotations

import functools
import re
import string
import textwrap

#: The placeholders a reply template may use.
FIELDS = ("identity", "domain", "ip", "result", "explanation")

#: Upper bound on the text of one reply, before it is split into lines.
MAX_TEXT = 1000
#: Upper bound on one reply line (the SMTP limit is 512 octets with the code).
MAX_LINE = 200

#: Used for ``{explanation}`` when the domain gave none (its exp= is only for fail).
GENERIC_EXPLANATIONS = {
    "pass": "the sender is authorized",
    "fail": "the sender is not authorized to use this domain",
    "softfail": "the sender is probably not authorized to use this domain",
    "neutral": "the domain makes no statement about the sender",
    "none": "the domain publishes no SPF policy",
    "permerror": "the domain's SPF record is invalid",
    "temperror": "a temporary DNS error occurred, try again later",
}

_DIGITS = re.compile(r"[0-9]+")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_SPACES = re.compile(r" {2,}")


def clean(text: str) -> str:
    """Return ``text`` as one printable ASCII line with whitespace collapsed."""
    text = _UNSAFE.sub(" ", text)
    text = _NON_ASCII.sub("?", text)
    return _SPACES.sub(" ", text).strip()


def check_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` is a usable reply template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad reply template: {exc}") from None
    for _literal, field, spec, _conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS:
            known = ", ".join("{" + name + "}" for name in FIELDS)
            shown = "{" + field + "}"
            raise ValueError(f"unknown placeholder {shown} in reply template (known: {known})")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"nested placeholder in format of {{{field}}} in reply template")
        for number in _DIGITS.findall(spec or ""):  # width, precision (a fill is one char)
            number = number.lstrip("0") or "0"
            if len(number) > len(str(MAX_TEXT)) or int(number) > MAX_TEXT:
                shown = number if len(number) <= 20 else number[:20] + "..."
                raise ValueError(f"width or precision {shown} in format of {{{field}}}"
                                 f" in reply template is larger than a reply ({MAX_TEXT})")
    try:
        template.format(**{name: "x" for name in FIELDS})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad reply template: {exc}") from None


def _bound(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 3].rstrip() + "..."


@functools.lru_cache(maxsize=256)  # pure; a reject's text repeats for its domain and client
def render(
    template: str, *, identity: str, domain: str, ip: str, result: str, explanation: str
) -> tuple[str, ...]:
    """Fill ``template`` and return the reply as lines of safe ASCII text.

    An empty ``explanation`` is replaced by a generic one for ``result``.  An
    empty rendering gives ``()``, meaning "let the MTA choose the text".
    """
    explanation = clean(explanation) or GENERIC_EXPLANATIONS.get(result, "")
    values = {
        "identity": clean(identity),
        "domain": _bound(clean(domain), 255),
        "ip": clean(ip),
        "result": clean(result),
        "explanation": _bound(explanation, MAX_TEXT),
    }
    text = _bound(clean(template.format(**values)), MAX_TEXT)
    if not text:
        return ()
    lines = textwrap.wrap(text, width=MAX_LINE, break_long_words=True, break_on_hyphens=False)
    return tuple(lines)
