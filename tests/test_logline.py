"""The decision log line: one line, greppable fields, nothing a client can fake."""

from __future__ import annotations

import pytest

from spfmilter.milter import logvalue


@pytest.mark.parametrize("value,expected", [
    ("mx.example.org", "mx.example.org"),
    ("<alice@example.org>", "<alice@example.org>"),
    (None, "-"),
    ("", "-"),
    ("mailfrom fail", '"mailfrom fail"'),
    ("evil\r\nqid=X action=accept", '"evil\\x0d\\x0aqid=X action=accept"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash=1", '"back\\\\slash=1"'),
    ("caf\xe9", '"caf\\xe9"'),
    ("\udcff\udc80", '"\\xff\\x80"'),
    ("\u2603", '"\\u2603"'),
])
def test_logvalue(value, expected):
    assert logvalue(value) == expected


def test_logvalue_is_one_token_or_one_quoted_string():
    for text in ("a b=c", "x\ty", "q\"", "\x00\x7f", "ü ß"):
        out = logvalue(text)
        assert out.isascii() and out.isprintable()
        assert out.startswith('"') and out.endswith('"')
        inner = out[1:-1].replace('\\\\', "").replace('\\"', "")
        assert '"' not in inner
