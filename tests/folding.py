"""Checks of folded header fields (RFC 5322 2.1.1, 2.2.3), shared by unit, daemon and e2e tests.

Written apart from ``spfmilter.headers`` on purpose: the tests must not check
the folding with the code that does it.
"""

from __future__ import annotations

FOLD_WIDTH = 78
MAX_LINE = 998


def has_fold_point(text: str) -> bool:
    """True when text has a space outside quoted-strings (a place a fold may go)."""
    depth, quoted, pos = 0, False, 0
    while pos < len(text):
        char = text[pos]
        if char == "\\" and (quoted or depth):
            pos += 2
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
            return True
        pos += 1
    return False


def check_lines(name: str, lines: list[str]) -> None:
    """Physical lines of one field (the first starts ``name:``): within 998, 78 if breakable.

    Continuation lines start with a space or tab; none holds CR, LF or NUL;
    a line over 78 octets holds one piece without a fold point, which would
    not have fitted on the line before it either.
    """
    assert lines and lines[0].lower().startswith(name.lower() + ":"), lines
    for i, line in enumerate(lines):
        assert not set(line) & {"\r", "\n", "\0"}, line
        assert len(line.encode("utf-8", "surrogateescape")) <= MAX_LINE, len(line)
        if i:
            assert line[:1] in (" ", "\t"), lines
        if len(line) > FOLD_WIDTH:
            body = line[len(name) + 1 :].lstrip() if i == 0 else line[1:]
            assert not has_fold_point(body), (len(line), line)
            if i:
                assert len(lines[i - 1]) + len(line) > FOLD_WIDTH, lines[i - 1 : i + 1]
