"""The man pages, the shipped configs and config.OPTIONS describe the same options."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spfmilter import config

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "etc" / "spfmilter.cfg"
LOCAL_CFG = ROOT / "etc" / "spfmilter-local.cfg"
CFG_MAN = ROOT / "man" / "spfmilter.cfg.5"
DAEMON_MAN = ROOT / "man" / "spfmilter.8"
MAN_PAGES = [DAEMON_MAN, CFG_MAN]

SCHEMA = {section: set(options) for section, options in config.OPTIONS.items()}
DOMAIN = config.DOMAIN_SECTION_PREFIX + "NAME"
RECIPIENT = config.RECIPIENT_SECTION_PREFIX + "NAME"

# etc/spfmilter.cfg: "[section]" or "#[section]", then "#option = default"
# (no space after '#'; prose comments are "# text").
_CFG_SECTION = re.compile(r"#?\[(?P<name>[^\]]+)\]\s*$")
_CFG_OPTION = re.compile(r"#?(?P<name>[a-z_]+) =(?: (?P<value>.*))?$")
# The man page: ".Ss [section]" (optionally with \& escapes), ".It Cm option".
_MAN_SECTION = re.compile(r"\.Ss (?:\\&)?\[(?P<name>[^\]\\]+)(?:\\&)?\]")
_MAN_OPTION = re.compile(r"\.It Cm (?P<name>[a-z_]+)\b")


def _section_key(name: str) -> str:
    if name.startswith(config.RECIPIENT_SECTION_PREFIX):
        return RECIPIENT
    return DOMAIN if name.startswith(config.DOMAIN_SECTION_PREFIX) else name


def cfg_options(path: Path) -> dict[str, dict[str, str]]:
    """{section: {option: value text}} of every option line, commented or not."""
    found: dict[str, dict[str, str]] = {}
    section = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if match := _CFG_SECTION.match(line):
            section = _section_key(match["name"])
            found.setdefault(section, {})
        elif match := _CFG_OPTION.match(line):
            assert section is not None, f"{path}:{number}: option before any section"
            assert match["name"] not in found[section], f"{path}:{number}: listed twice"
            found[section][match["name"]] = match["value"] or ""
    return found


def man_options(path: Path) -> dict[str, list[str]]:
    """{section: [option, ...]} of the .It Cm entries under each .Ss [section]."""
    found: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        if match := _MAN_SECTION.match(line):
            section = _section_key(match["name"])
            found.setdefault(section, [])
        elif (match := _MAN_OPTION.match(line)) and section is not None:
            found[section].append(match["name"])
    return found


def rendered(page: Path) -> str:
    """The page as plain text (mandoc -Tascii without overstrike)."""
    out = subprocess.run(["mandoc", "-Tascii", str(page)], check=True, capture_output=True,
                         text=True).stdout
    return re.sub(r".\x08", "", out)


def test_default_config_lists_every_option_and_nothing_else() -> None:
    listed = cfg_options(CFG)
    assert {s: set(o) for s, o in listed.items() if s not in (DOMAIN, RECIPIENT)} == SCHEMA
    assert DOMAIN in listed, "the [domain:example.com] example is missing"
    assert listed[DOMAIN], "the [domain:...] example sets no action"
    assert set(listed[DOMAIN]) <= set(config.DOMAIN_OPTIONS)
    assert listed.get(RECIPIENT), "the [recipient:...] example is missing"
    assert set(listed[RECIPIENT]) <= set(config.RECIPIENT_OPTIONS)


def test_default_config_shows_the_schema_defaults() -> None:
    listed = cfg_options(CFG)
    for section, name, default, _doc in config.iter_options():
        option = config.OPTIONS[section][name]
        shown = listed[section][name]
        assert option.parse(shown) == option.parse(default), f"[{section}] {name} = {shown}"


def test_default_config_loads_as_the_builtin_defaults() -> None:
    assert config.load(CFG) == config.loads("")


def test_default_config_uncommented_still_gives_the_defaults() -> None:
    # Remove the '#' of every option line outside the domain example: the
    # file then sets every option explicitly, to the value it documents.
    lines, section = [], None
    for line in CFG.read_text().splitlines():
        if match := _CFG_SECTION.match(line):
            section = _section_key(match["name"])
        if section not in (DOMAIN, RECIPIENT) and _CFG_OPTION.match(line) and \
                line.startswith("#"):
            line = line[1:]
        lines.append(line)
    text = "\n".join(lines) + "\n"
    assert text != CFG.read_text()
    assert config.loads(text, filename="uncommented") == config.loads("")


def test_default_config_domain_example_loads_when_uncommented() -> None:
    lines, section = [], None
    for line in CFG.read_text().splitlines():
        if match := _CFG_SECTION.match(line):
            section = _section_key(match["name"])
        if section == DOMAIN and line.startswith("#") and not line.startswith("# "):
            line = line[1:]
        lines.append(line)
    cfg = config.loads("\n".join(lines) + "\n", filename="domain example")
    assert cfg.policy.domains["example.com"]["mailfrom_softfail"] == "reject"


def test_default_config_recipient_example_loads_with_reject_at_rcpt() -> None:
    lines, section = [], None
    for line in CFG.read_text().splitlines():
        if match := _CFG_SECTION.match(line):
            section = _section_key(match["name"])
        if section == RECIPIENT and line.startswith("#") and not line.startswith("# "):
            line = line[1:]
        if line == "#reject_at = mail":
            line = "reject_at = rcpt"
        lines.append(line)
    cfg = config.loads("\n".join(lines) + "\n", filename="recipient example")
    assert cfg.policy.recipients["customer.example"]["mailfrom_fail"] == "accept"


def test_local_config_loads_for_the_quick_start() -> None:
    cfg = config.load(LOCAL_CFG)
    assert cfg.milter.socket.spec == "inet:8894@127.0.0.1"
    assert (cfg.milter.user, cfg.milter.group, cfg.milter.pidfile) == ("", "", "")
    assert cfg.milter.log_target == "stderr"
    assert cfg.spf == config.loads("").spf
    assert set(cfg_options(LOCAL_CFG)) == {"milter"}


def test_man_page_documents_every_option_once_and_nothing_else() -> None:
    documented = man_options(CFG_MAN)
    for section, names in documented.items():
        assert len(names) == len(set(names)), f"[{section}] documented twice"
    assert {s: set(o) for s, o in documented.items() if s not in (DOMAIN, RECIPIENT)} == SCHEMA
    assert DOMAIN in documented, "the [domain:NAME] sections are not described"
    assert set(documented[DOMAIN]) <= set(config.DOMAIN_OPTIONS)
    assert RECIPIENT in documented, "the [recipient:NAME] sections are not described"
    assert set(documented[RECIPIENT]) <= set(config.RECIPIENT_OPTIONS)


def test_man_page_gives_each_default() -> None:
    text = rendered(CFG_MAN)
    # Split the rendered OPTIONS part into one block per option entry.
    starts = {name: re.search(rf"^ {{5}}{name} = ", text, re.MULTILINE)
              for _s, name, _d, _doc in config.iter_options()}
    missing = sorted(name for name, match in starts.items() if match is None)
    assert not missing, f"no entry rendered for {missing}"
    order = sorted(starts, key=lambda name: starts[name].start())  # type: ignore[union-attr]
    for section, name, default, _doc in config.iter_options():
        begin = starts[name].start()  # type: ignore[union-attr]
        index = order.index(name)
        end = starts[order[index + 1]].start() if index + 1 < len(order) else len(text)  # type: ignore[union-attr]
        block = " ".join(text[begin:end].split())
        expected = f"Default: {default}" if default else "Default: empty"
        assert re.search(re.escape(expected) + r"(?:[.,(]|\s|$)", block), (
            f"[{section}] {name}: {expected!r} not in {block!r}")


def test_man_pages_agree_on_the_commands() -> None:
    from spfmilter import cli

    text = " ".join(rendered(DAEMON_MAN).split())
    for command in ("run", "check-config", "test"):
        assert f"spfmilter [-c file] {command}" in text
    for option in ("--daemon", "--stderr", "--ip", "--helo", "--from", "--auth", "--json",
                   "--version", "SIGHUP", "SIGTERM", "SIGINT", "SPFMILTER_CONFIG"):
        assert option in text
    exit_status = text[text.index("EXIT STATUS"):text.index("EXAMPLES")]
    for code in (cli.EXIT_OK, cli.EXIT_CONFIG, cli.EXIT_USAGE, cli.EXIT_STARTUP):
        assert re.search(rf" {code} [A-Z]", exit_status), code
    for field in ("qid=", "ip=", "helo=", "sender=", "helo_spf=", "mailfrom_spf=", "action=",
                  "reason="):
        assert field in text


@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_mandoc_lint_is_clean(page: Path) -> None:
    # -Wwarning: fail on warnings and errors, not on style hints such as
    # "referenced manual not found" (the pages are not installed here).
    proc = subprocess.run(["mandoc", "-Tlint", "-Wwarning", str(page)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_groff_has_no_warnings(page: Path) -> None:
    assert shutil.which("groff"), "groff is needed (scripts/setup installs it with mandoc)"
    proc = subprocess.run(["groff", "-ww", "-mandoc", "-z", str(page)], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
