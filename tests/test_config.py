"""Configuration: schema, parsing, errors with file:line, dump, warnings."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path

import pytest

from spfmilter import config as cfg
from spfmilter.config import ConfigError, SocketSpec, dump, load, loads

DATA = Path(__file__).parent / "data" / "config"
FQDN = "mx.example.net"


@pytest.fixture(autouse=True)
def _fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *args: FQDN)


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, filename="t.cfg")
    return str(info.value)


# --- schema ---------------------------------------------------------------


def test_dataclass_fields_match_schema() -> None:
    for section, options in cfg.OPTIONS.items():
        names = [f.name for f in dataclasses.fields(cfg.SECTION_TYPES[section])]
        extra = ["domains", "recipients"] if section == "policy" else []
        assert names == [*options, *extra]
    assert [f.name for f in dataclasses.fields(cfg.Config)] == [*cfg.OPTIONS, "source"]


def test_dataclass_defaults_match_schema_defaults() -> None:
    config = cfg.Config()
    for section, option, default, _doc in cfg.iter_options():
        parsed = cfg.OPTIONS[section][option].parse(default)
        assert getattr(getattr(config, section), option) == parsed, (section, option)


def test_iter_options_is_complete_and_documented() -> None:
    rows = list(cfg.iter_options())
    assert len(rows) == sum(len(options) for options in cfg.OPTIONS.values())
    assert {row[0] for row in rows} == {"milter", "spf", "policy", "headers", "metrics"}
    for section, option, default, doc in rows:
        assert isinstance(default, str)
        assert doc and "\n" not in doc and len(doc) < 80, (section, option)
    assert ("policy", "mailfrom_temperror", "tempfail") in [row[:3] for row in rows]


def test_domain_options_are_the_action_options() -> None:
    assert len(cfg.DOMAIN_OPTIONS) == 14
    for name in cfg.DOMAIN_OPTIONS:
        assert cfg.OPTIONS["policy"][name].parse is cfg.parse_action


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("helo_fail", "reject"),
        ("helo_temperror", "accept"),
        ("helo_none", "accept"),
        ("mailfrom_fail", "reject"),
        ("mailfrom_temperror", "tempfail"),
        ("mailfrom_permerror", "accept"),
        ("mailfrom_softfail", "accept"),
    ],
)
def test_default_actions(option: str, expected: str) -> None:
    assert getattr(loads("").policy, option) == expected


# --- loading --------------------------------------------------------------


def test_empty_config_gives_defaults_with_resolved_authserv_id() -> None:
    config = loads("")
    assert config.spf.authserv_id == FQDN
    assert config == dataclasses.replace(
        cfg.Config(), spf=dataclasses.replace(cfg.SpfConfig(), authserv_id=FQDN)
    )
    assert config.milter.socket == SocketSpec("unix", path="/run/spfmilter/spfmilter.sock")
    assert config.policy.internal_hosts == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.milter.umask == 0o007
    assert config.spf.nameservers == ()
    assert dict(config.policy.domains) == {}


def test_unqualified_fqdn_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda *args: "bad name")
    assert "this host's name 'bad name' cannot be used" in _error("")
    assert loads("[spf]\nauthserv_id = ok.example\n").spf.authserv_id == "ok.example"


def test_full_config() -> None:
    config = load(DATA / "full.cfg")
    assert config.source == str(DATA / "full.cfg")
    milter = config.milter
    assert milter.socket == SocketSpec("inet6", port=8894, host="::1")
    assert milter.socket.spec == "inet6:8894@::1"
    assert (milter.name, milter.user, milter.group) == ("spf-check", "mail", "postfix")
    assert (milter.umask, milter.pidfile, milter.timeout) == (0o077, "", 120)
    assert (milter.on_error, milter.log_target) == ("reject", "stderr")
    assert (milter.log_level, milter.log_facility) == ("debug", "local3")
    spf = config.spf
    assert spf.authserv_id == "mx.example.net"
    assert spf.check_helo is False
    assert spf.nameservers == (
        ("192.0.2.53", 53),
        ("192.0.2.54", 5353),
        ("2001:db8::53", 53000),
        ("2001:db8::54", 53),
    )
    assert (spf.lookup_timeout, spf.void_lookup_limit, spf.cache_size) == (25.5, 0, 0)
    policy = config.policy
    assert policy.helo_fail == "tempfail" and policy.mailfrom_temperror == "accept"
    assert policy.test_only is True
    assert policy.reply_text == "550 means no: {domain} ({result}) for {ip} -- 100% sure"
    assert [str(net) for net in policy.internal_hosts] == [
        "10.0.0.0/8",
        "192.168.0.0/16",
        "fd00::/8",
    ]
    assert [str(net) for net in policy.trusted_relays] == ["198.51.100.7/32"]
    assert policy.skip_authenticated is False
    assert policy.forwarders == ("lists.example.org", "forward.example")
    assert {k: dict(v) for k, v in policy.domains.items()} == {
        "example.com": {"mailfrom_softfail": "reject", "helo_fail": "accept"},
        "sub.example.com": {"mailfrom_softfail": "accept"},
    }
    headers = config.headers
    assert headers.authentication_results is False and headers.received_spf is True
    assert headers.mailfrom == "address" and headers.remove_forged is False


def test_minimal_config() -> None:
    config = load(DATA / "minimal.cfg")
    assert config.milter.socket == SocketSpec("inet", port=8894, host="127.0.0.1")
    assert config.spf.authserv_id == "mx.example.net"
    assert config.policy == cfg.PolicyConfig()


def test_config_is_frozen() -> None:
    config = loads("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.milter.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.policy.domains["x"] = {}  # type: ignore[index]


@pytest.mark.parametrize("name", ["full.cfg", "minimal.cfg"])
def test_dump_round_trips(name: str) -> None:
    config = load(DATA / name)
    text = dump(config)
    assert loads(text) == config
    assert dump(loads(text)) == text


def test_dump_lists_every_option_once() -> None:
    text = dump(load(DATA / "full.cfg"))
    lines = [line.split(" =")[0] for line in text.splitlines() if " =" in line]
    expected = [option for _section, option, _default, _doc in cfg.iter_options()]
    assert lines[: len(expected)] == expected
    assert "[domain:example.com]" in text and "[domain:sub.example.com]" in text
    assert "authserv_id = mx.example.net" in text


def test_dump_shows_resolved_authserv_id() -> None:
    assert f"authserv_id = {FQDN}\n" in dump(loads(""))


# --- value syntax ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("yes", "YES", "true", "On", "1")]
    + [(t, False) for t in ("no", "False", "off", "0")],
)
def test_booleans(text: str, value: bool) -> None:
    assert loads(f"[spf]\ncheck_helo = {text}\n").spf.check_helo is value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/x.sock", SocketSpec("unix", path="/run/x.sock")),
        ("local:/run/x.sock", SocketSpec("unix", path="/run/x.sock")),
        ("inet:8894@127.0.0.1", SocketSpec("inet", port=8894, host="127.0.0.1")),
        ("inet:8894@[127.0.0.1]", SocketSpec("inet", port=8894, host="127.0.0.1")),
        ("inet:8894", SocketSpec("inet", port=8894)),
        ("INET:1@LocalHost", SocketSpec("inet", port=1, host="localhost")),
        ("inet6:8894@::1", SocketSpec("inet6", port=8894, host="::1")),
        ("inet6:65535@[2001:db8::1]", SocketSpec("inet6", port=65535, host="2001:db8::1")),
        ("inet6:8894@mx.example.net", SocketSpec("inet6", port=8894, host="mx.example.net")),
    ],
)
def test_sockets(text: str, expected: SocketSpec) -> None:
    socket_spec = loads(f"[milter]\nsocket = {text}\n").milter.socket
    assert socket_spec == expected
    assert cfg.parse_socket(socket_spec.spec) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("192.0.2.1", (("192.0.2.1", 53),)),
        ("192.0.2.1:5353", (("192.0.2.1", 5353),)),
        ("2001:db8::1", (("2001:db8::1", 53),)),
        ("[2001:db8::1]", (("2001:db8::1", 53),)),
        ("[2001:DB8::1]:5300", (("2001:db8::1", 5300),)),
        ("192.0.2.1,192.0.2.2", (("192.0.2.1", 53), ("192.0.2.2", 53))),
        ("192.0.2.1 ,\n  ::1", (("192.0.2.1", 53), ("::1", 53))),
    ],
)
def test_nameservers(text: str, expected: tuple[tuple[str, int], ...]) -> None:
    assert loads(f"[spf]\nnameservers = {text}\n").spf.nameservers == expected


@pytest.mark.parametrize("separator", [",", " ", ", ", " , ", "\n  ", ",\n\t"])
def test_list_separators(separator: str) -> None:
    text = f"[policy]\nforwarders = a.example{separator}b.example{separator}\n"
    assert loads(text).policy.forwarders == ("a.example", "b.example")


def test_percent_is_literal() -> None:
    assert loads("[policy]\nreply_text = 100%% {ip} %(x)s\n").policy.reply_text == (
        "100%% {ip} %(x)s"
    )


def test_umask_is_octal() -> None:
    assert loads("[milter]\numask = 0027\n").milter.umask == 0o027
    assert loads("[milter]\numask = 0\n").milter.umask == 0


def test_domain_section_names_are_normalised() -> None:
    config = loads("[domain:Mail.Example.COM.]\nhelo_fail = tempfail\n")
    assert dict(config.policy.domains["mail.example.com"]) == {"helo_fail": "tempfail"}


def test_crlf_file(tmp_path: Path) -> None:
    path = tmp_path / "crlf.cfg"
    path.write_bytes(b"[milter]\r\nname = crlf\r\n\r\n[spf]\r\ncheck_helo = nah\r\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}:5: [spf] check_helo: 'nah' is not a boolean (use yes or no)"


# --- errors ---------------------------------------------------------------

ERRORS = [
    # (config text, expected message after "t.cfg:")
    ("[milter]\n[mliter]\n", "2: [mliter]: unknown section (did you mean milter?)"),
    ("[DEFAULT]\nname = x\n", "1: [DEFAULT]: unknown section"),
    ("[milter]\nnmae = x\n", "2: [milter] nmae: unknown option (did you mean name?)"),
    ("[spf]\n\n# c\nbogus = 1\n", "4: [spf] bogus: unknown option"),
    (
        "[spf]\ncheck_helo = maybe\n",
        "2: [spf] check_helo: 'maybe' is not a boolean (use yes or no)",
    ),
    ("[milter]\ntimeout = 10s\n", "2: [milter] timeout: '10s' is not an integer"),
    ("[milter]\ntimeout = 0\n", "2: [milter] timeout: 0 is too small (minimum 1)"),
    ("[spf]\ncache_size = -1\n", "2: [spf] cache_size: -1 is too small (minimum 0)"),
    (
        "[spf]\nlookup_timeout = 0\n",
        "2: [spf] lookup_timeout: '0' must be a number of seconds greater than 0",
    ),
    (
        "[spf]\nlookup_timeout = nan\n",
        "2: [spf] lookup_timeout: 'nan' must be a number of seconds greater than 0",
    ),
    (
        "[spf]\nlookup_timeout = soon\n",
        "2: [spf] lookup_timeout: 'soon' is not a number of seconds",
    ),
    (
        "[milter]\numask = 008\n",
        "2: [milter] umask: '008' is not an octal umask between 000 and 777",
    ),
    (
        "[milter]\numask = 1777\n",
        "2: [milter] umask: '1777' is not an octal umask between 000 and 777",
    ),
    (
        "[milter]\non_error = discard\n",
        "2: [milter] on_error: 'discard' is not one of: accept, reject, tempfail",
    ),
    (
        "[policy]\nmailfrom_fail = bounce\n",
        "2: [policy] mailfrom_fail: 'bounce' is not one of: accept, reject, tempfail",
    ),
    (
        "[milter]\nlog_level = loud\n",
        "2: [milter] log_level: 'loud' is not one of: debug, info, warning, error",
    ),
    (
        "[milter]\nlog_target = file\n",
        "2: [milter] log_target: 'file' is not one of: syslog, stderr",
    ),
    ("[milter]\nlog_facility = mial\n", "2: [milter] log_facility: 'mial' is not one of: "),
    ("[milter]\nuser = mail user\n", "2: [milter] user: 'mail user' is not a valid name"),
    ("[milter]\nname =\n", "2: [milter] name: the milter name must not be empty"),
    ("[milter]\npidfile = run/x.pid\n", "2: [milter] pidfile: 'run/x.pid' is not an absolute path"),
    (
        "[policy]\ninternal_hosts = 10.0.0.1/8\n",
        "2: [policy] internal_hosts: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
    ),
    (
        "[policy]\ntrusted_relays = ::1/64\n",
        "2: [policy] trusted_relays: '::1/64' has host bits set (did you mean ::/64?)",
    ),
    (
        "[policy]\ntrusted_relays = 10.0.0.0/33\n",
        "2: [policy] trusted_relays: '10.0.0.0/33' is not an IP network in CIDR notation",
    ),
    (
        "[policy]\ntrusted_relays = relay.example\n",
        "2: [policy] trusted_relays: 'relay.example' is not an IP network in CIDR notation",
    ),
    (
        "[policy]\nforwarders = a.example, -bad-.example\n",
        "2: [policy] forwarders: '-bad-.example' is not a domain name (bad label '-bad-')",
    ),
    (
        "[policy]\nforwarders = a..example\n",
        "2: [policy] forwarders: 'a..example' is not a domain name (bad label '')",
    ),
    (
        "[policy]\nforwarders = " + "\u00fc" * 64 + ".example\n",
        "2: [policy] forwarders: '" + "\u00fc" * 64 + ".example' is not a domain name"
        " (bad international label)",
    ),
    (
        "[policy]\nreply_text = {sender} rejected\n",
        "2: [policy] reply_text: unknown placeholder {sender} in reply template",
    ),
    ("[policy]\nreply_text = {domain\n", "2: [policy] reply_text: bad reply template"),
    (
        "[spf]\nnameservers = dns.example\n",
        "2: [spf] nameservers: nameserver 'dns.example' is not an IP address",
    ),
    (
        "[spf]\nnameservers = 192.0.2.1:0\n",
        "2: [spf] nameservers: nameserver '192.0.2.1:0': '0' is not a port number (1-65535)",
    ),
    (
        "[spf]\nnameservers = [192.0.2.1]:53\n",
        "2: [spf] nameservers: nameserver '[192.0.2.1]:53': brackets are for IPv6 addresses",
    ),
    (
        "[spf]\nnameservers = [::1]53\n",
        "2: [spf] nameservers: nameserver '[::1]53': expected [address]:port",
    ),
    (
        "[spf]\nauthserv_id = mx example\n",
        "2: [spf] authserv_id: 'mx example' is not usable as an authserv-id (use a host name)",
    ),
    (
        "[milter]\nsocket = /run/x.sock\n",
        "2: [milter] socket: '/run/x.sock' is not a socket spec (unix:/path, local:/path,",
    ),
    (
        "[milter]\nsocket = tcp:25@localhost\n",
        "2: [milter] socket: 'tcp:25@localhost' is not a socket spec",
    ),
    (
        "[milter]\nsocket = unix:run/x.sock\n",
        "2: [milter] socket: 'unix:run/x.sock': the socket path must be absolute",
    ),
    ("[milter]\nsocket = unix:/" + "x" * 110 + "\n", "2: [milter] socket: 'unix:/xxx"),
    (
        "[milter]\nsocket = inet:99999@127.0.0.1\n",
        "2: [milter] socket: 'inet:99999@127.0.0.1': '99999' is not a port number (1-65535)",
    ),
    (
        "[milter]\nsocket = inet:port@127.0.0.1\n",
        "2: [milter] socket: 'inet:port@127.0.0.1': 'port' is not a port number",
    ),
    ("[milter]\nsocket = inet:25@\n", "2: [milter] socket: 'inet:25@': missing host after '@'"),
    (
        "[milter]\nsocket = inet:25@::1\n",
        "2: [milter] socket: 'inet:25@::1': inet needs an IPv4 address",
    ),
    (
        "[milter]\nsocket = inet6:25@127.0.0.1\n",
        "2: [milter] socket: 'inet6:25@127.0.0.1': inet6 needs an IPv6 address",
    ),
    (
        "[milter]\nsocket = inet:25@bad host\n",
        "2: [milter] socket: 'inet:25@bad host': 'bad host' is not a host name or address",
    ),
    (
        "[milter]\nsocket = inet:25@[nope]\n",
        "2: [milter] socket: 'inet:25@[nope]': 'nope' is not an IP address",
    ),
    ("[milter]\nname = a\nname = b\n", "3: [milter] name: option set twice in this section"),
    ("[milter]\nNAME = a\nname = b\n", "3: [milter] name: option set twice in this section"),
    ("[milter]\n[spf]\n[milter]\n", "3: [milter]: duplicate section"),
    ("name = x\n", "1: option outside of any section (add a [section] line first)"),
    ("[milter]\nname x\n", "2: cannot parse 'name x' (expected option = value)"),
    ("[milter]\nname: x\n", "2: cannot parse 'name: x' (expected option = value)"),
    (
        "[domain:bad_domain..x]\nhelo_fail = accept\n",
        "1: [domain:bad_domain..x]: 'bad_domain..x' is not a domain name (bad label '')",
    ),
    ("[domain:]\n", "1: [domain:]: '' is not a domain name"),
    (
        "[domain:a.example]\n[domain:A.example.]\n",
        "2: [domain:A.example.]: same domain as [domain:a.example]",
    ),
    (
        "[domain:a.example]\ntest_only = yes\n",
        "2: [domain:a.example] test_only: only helo_* and mailfrom_* actions can be set per domain",
    ),
    (
        "[domain:a.example]\nhelo_fial = reject\n",
        "2: [domain:a.example] helo_fial: unknown option (did you mean helo_fail?)",
    ),
    (
        "[domain:a.example]\nhelo_fail = nope\n",
        "2: [domain:a.example] helo_fail: 'nope' is not one of: accept, reject, tempfail",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors(text: str, expected: str) -> None:
    assert _error(text).startswith("t.cfg:" + expected)


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        loads("[spf]\ncheck_helo = maybe\n", filename="x.cfg")
    error = info.value
    assert (error.filename, error.line, error.section, error.option) == (
        "x.cfg",
        2,
        "spf",
        "check_helo",
    )
    assert error.message == "'maybe' is not a boolean (use yes or no)"


LINES_TEXT = """\
# comment line 1
; comment line 2

[policy]
reply_text = rejected
    internal_hosts = 10.0.0.1/8
internal_hosts = 10.0.0.1/8
forwarders = a.example
  also.example

  trusted_relays = 10.0.0.1/8
[spf]
check_helo = yes
nameservers = 192.0.2.1,
  192.0.2.2
  dns.example
"""


def test_line_numbers_skip_continuation_lines() -> None:
    # Line 6 continues reply_text: the option is on line 7.
    assert _error(LINES_TEXT).startswith("t.cfg:7: [policy] internal_hosts: '10.0.0.1/8'")
    text = LINES_TEXT.replace("internal_hosts = 10.0.0.1/8\nf", "internal_hosts =\nf")
    # trusted_relays is indented but follows an empty line: an option, line 11.
    assert _error(text).startswith("t.cfg:11: [policy] trusted_relays: '10.0.0.1/8'")
    text = text.replace("10.0.0.1/8", "10.0.0.0/8")
    # A bad value on a continuation line is reported at its option's line.
    assert _error(text).startswith("t.cfg:14: [spf] nameservers: nameserver 'dns.example'")
    policy = loads(text.replace("dns.example", "::1")).policy
    assert policy.reply_text == "rejected internal_hosts = 10.0.0.0/8"
    assert policy.internal_hosts == ()
    assert policy.forwarders == ("a.example", "also.example")
    assert [str(net) for net in policy.trusted_relays] == ["10.0.0.0/8"]


def test_continuation_that_looks_like_option() -> None:
    text = "[milter]\nname = a\n  b = c\n"
    assert _error(text) == "t.cfg:2: [milter] name: 'a\\nb = c' is not a valid name"


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.cfg"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.cfg"
    path.write_bytes(b"[milter]\nname = spf\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}:3: not valid UTF-8"


# --- warnings -------------------------------------------------------------

WARNINGS = [
    ("[spf]\nlookup_timeout = 30\n", "lookup_timeout = 30: a check may outlast Postfix's"),
    ("[spf]\nlookup_timeout = 5.5\n", "lookup_timeout = 5.5: RFC 7208 4.6.4"),
    ("[spf]\nauthserv_id = localhost\n", "authserv_id = localhost: not a fully qualified name"),
    ("[headers]\nremove_forged = no\n", "remove_forged = no: forged Authentication-Results"),
    ("[policy]\nmailfrom_pass = reject\n", "[policy] mailfrom_pass = reject: mail that passes"),
    ("[domain:x.example]\nhelo_pass = tempfail\n", "[domain:x.example] helo_pass = tempfail"),
    ("[domain:x.example]\n", "[domain:x.example]: sets no action"),
    ("[milter]\numask = 002\n", "umask = 002: the socket will be usable by every local user"),
    ("[policy]\ntest_only = yes\n", "test_only = yes: nothing will be rejected"),
]


@pytest.mark.parametrize(("text", "expected"), WARNINGS)
def test_warnings(text: str, expected: str) -> None:
    found = cfg.warnings(loads(text))
    assert len(found) == 1, found
    assert expected in found[0]


def test_no_warnings_for_defaults() -> None:
    assert cfg.warnings(loads("")) == []
    assert cfg.warnings(load(DATA / "minimal.cfg")) == []


def test_no_forged_warning_without_authentication_results() -> None:
    text = "[headers]\nremove_forged = no\nauthentication_results = no\n"
    assert cfg.warnings(loads(text)) == []


def test_umask_warning_only_for_unix_sockets() -> None:
    text = "[milter]\numask = 022\nsocket = inet:1@127.0.0.1\n"
    assert cfg.warnings(loads(text)) == []


def test_dmarc_defer_and_reject_at_rcpt_exclude_each_other():
    with pytest.raises(ConfigError) as info:
        loads("[policy]\nreject_at = rcpt\ndmarc_defer = yes\n", filename="x.cfg")
    assert str(info.value).startswith("x.cfg:3: [policy] dmarc_defer: cannot be used with")


def test_dmarc_defer_without_publicsuffixlist_names_the_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "publicsuffixlist", None)  # not installed
    with pytest.raises(ConfigError) as info:
        loads("[policy]\n\ndmarc_defer = yes\n", filename="x.cfg")
    assert str(info.value) == ("x.cfg:3: [policy] dmarc_defer: needs the Python package"
                               " publicsuffixlist (pip install publicsuffixlist)")
