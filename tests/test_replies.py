"""Reply text: templates, sanitising of untrusted text, line splitting."""

from __future__ import annotations

import pytest

from spfmilter import replies
from spfmilter.replies import MAX_LINE, MAX_TEXT, check_template, clean, render

TEMPLATE = "SPF {result} for {identity} {domain} from {ip}: {explanation}"


def _render(template: str = TEMPLATE, **kw: str) -> tuple[str, ...]:
    args = {
        "identity": "mailfrom",
        "domain": "example.com",
        "ip": "192.0.2.1",
        "result": "fail",
        "explanation": "go away",
    }
    args.update(kw)
    return render(template, **args)


def _assert_safe(lines: tuple[str, ...]) -> None:
    assert lines, "expected at least one line"
    for line in lines:
        assert 0 < len(line) <= MAX_LINE
        assert line == line.strip()
        assert "  " not in line
        for char in line:
            assert 0x20 <= ord(char) < 0x7F, repr(line)


def test_plain_rendering() -> None:
    assert _render() == ("SPF fail for mailfrom example.com from 192.0.2.1: go away",)


def test_empty_explanation_gets_generic_text() -> None:
    (line,) = _render(explanation="", result="temperror")
    assert line.endswith(": " + replies.GENERIC_EXPLANATIONS["temperror"])


def test_blank_explanation_counts_as_empty() -> None:
    (line,) = _render(explanation=" \r\n\t ")
    assert line.endswith(replies.GENERIC_EXPLANATIONS["fail"])


@pytest.mark.parametrize(
    "payload",
    [
        "evil\r\n250 OK\r\n",
        "a\nb\rc\x00d\x1be\x7ff",
        "\u00e9t\u00e9 \u2028 \u202e rtl \ufeff",
        "bytes \udcff\udc80 from surrogateescape",
        "tabs\t\t\tand    spaces",
        "%s %d %% %",
        "{domain} {0} {ip.__class__}",
    ],
)
def test_nasty_explanations_are_sanitised(payload: str) -> None:
    lines = _render(explanation=payload, domain=payload)
    _assert_safe(lines)
    text = " ".join(lines)
    assert "\r" not in text and "\n" not in text


def test_percent_signs_survive_unchanged() -> None:
    (line,) = _render(explanation="100% sure %s %%")
    assert line.endswith("100% sure %s %%")


def test_braces_in_untrusted_text_are_not_expanded() -> None:
    (line,) = _render(explanation="{ip}{domain}")
    assert line.endswith(": {ip}{domain}")


def test_control_characters_become_spaces_and_collapse() -> None:
    assert clean("a\r\n\r\nb\tc\x00\x00d") == "a b c d"


def test_non_ascii_becomes_question_mark() -> None:
    assert clean("gr\u00fc\u00df \udcff") == "gr?? ?"


def test_long_text_is_split_at_word_boundaries() -> None:
    words = " ".join(f"word{i:03d}" for i in range(60))
    lines = _render("{explanation}", explanation=words)
    _assert_safe(lines)
    assert len(lines) > 1
    assert " ".join(lines) == words


def test_long_word_is_broken() -> None:
    lines = _render("{explanation}", explanation="x" * 450)
    _assert_safe(lines)
    assert [len(line) for line in lines] == [200, 200, 50]


def test_total_length_is_bounded() -> None:
    lines = _render(explanation="blah " * 5000, domain="d" * 5000)
    _assert_safe(lines)
    text = " ".join(lines)
    assert len(text) <= MAX_TEXT + len(lines)
    assert text.endswith("...")


def test_empty_rendering_gives_no_lines() -> None:
    assert _render("") == ()
    assert _render("  \n ") == ()


def test_template_whitespace_is_normalised() -> None:
    assert _render("a\n  b {result}") == ("a b fail",)


@pytest.mark.parametrize(
    "template",
    [TEMPLATE, "", "static text", "{domain!r} {ip:>3}", "{{literal}} {result}"],
)
def test_good_templates(template: str) -> None:
    check_template(template)
    assert isinstance(_render(template), tuple)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{sender}", "unknown placeholder {sender}"),
        ("{}", "unknown placeholder {}"),
        ("{0}", "unknown placeholder {0}"),
        ("{ip.__class__}", "unknown placeholder"),
        ("{domain[0]}", "unknown placeholder"),
        ("{domain", "bad reply template"),
        ("domain}", "bad reply template"),
        ("{ip:{result}}", "nested placeholder"),
        ("{ip:d}", "bad reply template"),
        ("{ip!x}", "bad reply template"),
    ],
)
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_template(template)
