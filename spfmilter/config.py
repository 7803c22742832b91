"""Configuration: an INI file turned into frozen, typed dataclasses.

:data:`OPTIONS` is the one schema: every section, option, default and one-line
description.  Parsing, :func:`dump`, the man page and ``etc/spfmilter.cfg``
all follow it (the last two are checked against :func:`iter_options` by tests).

Sections ``[domain:NAME]`` (any number) override policy actions for the
sender domain NAME and its subdomains; see :data:`DOMAIN_OPTIONS`.
"""

from __future__ import annotations

import configparser
import difflib
import importlib.util
import io
import ipaddress
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from logging.handlers import SysLogHandler
from types import MappingProxyType
from typing import Any, Callable, Union

from . import names, replies
from .results import IDENTITIES, RESULTS

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Nameserver = tuple[str, int]

#: What the policy may do with a message.
ACTIONS = ("accept", "reject", "tempfail")
#: Section name prefix of per-domain policy sections.
DOMAIN_SECTION_PREFIX = "domain:"
#: Section name prefix of per-recipient policy sections (``reject_at = rcpt``).
RECIPIENT_SECTION_PREFIX = "recipient:"


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` names where and why."""

    def __init__(
        self,
        message: str,
        *,
        filename: str = "<string>",
        line: int | None = None,
        section: str | None = None,
        option: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.line = line
        self.section = section
        self.option = option

    def __str__(self) -> str:
        parts = [self.filename if self.line is None else f"{self.filename}:{self.line}"]
        if self.section is not None:
            parts.append(f"[{self.section}]" + (f" {self.option}" if self.option else ""))
        parts.append(self.message)
        return ": ".join(parts)


# ---------------------------------------------------------------------------
# Value types


@dataclass(frozen=True)
class SocketSpec:
    """Where the milter listens, as libmilter's ``smfi_setconn`` understands it."""

    family: str  # "unix", "inet" or "inet6"
    path: str = ""  # unix only
    port: int = 0  # inet/inet6 only
    host: str = ""  # inet/inet6 only; "" = all addresses

    @property
    def spec(self) -> str:
        """The canonical connection spec (``unix:/path``, ``inet:PORT@HOST``...)."""
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}" + (f"@{self.host}" if self.host else "")

    def __str__(self) -> str:
        return self.spec


# ---------------------------------------------------------------------------
# Value parsers: text -> value, raising ValueError with a message for the user

_BOOLEANS = {
    "yes": True, "true": True, "on": True, "1": True,
    "no": False, "false": False, "off": False, "0": False,
}  # fmt: skip
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?\Z")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")
_LIST_SPLIT = re.compile(r"[\s,]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _split_list(text: str) -> list[str]:
    return [item for item in _LIST_SPLIT.split(text) if item]


def parse_bool(text: str) -> bool:
    """yes/no, true/false, on/off, 1/0 (any case)."""
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a boolean (use yes or no)") from None


def _format_bool(value: bool) -> str:
    return "yes" if value else "no"


#: Largest C int: what libmilter's smfi_settimeout() takes.
C_INT_MAX = 2**31 - 1


def _int_parser(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        text = text.strip()
        try:
            value = int(text, 10)
        except ValueError:  # also a number with more digits than int() takes
            raise ValueError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise ValueError(f"{value} is too small (minimum {minimum})")
        if maximum is not None and value > maximum:
            raise ValueError(f"{value} is too large (maximum {maximum})")
        return value

    return parse


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} must be a number of seconds greater than 0")
    return value


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_umask(text: str) -> int:
    """An octal file mode creation mask, 000 to 777."""
    text = text.strip()
    if not re.fullmatch(r"[0-7]{1,4}", text) or int(text, 8) > 0o777:
        raise ValueError(f"{text!r} is not an octal umask between 000 and 777")
    return int(text, 8)


def _format_umask(value: int) -> str:
    return f"{value:03o}"


def _choice_parser(words: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in words:
            raise ValueError(f"{text!r} is not one of: {', '.join(words)}")
        return word

    return parse


parse_action = _choice_parser(ACTIONS)


def normalize_domain(text: str) -> str:
    """``text`` in A-labels, lower case, no trailing dot; ValueError unless a domain name.

    The same form :func:`spfmilter.names.ascii_domain` gives the domain checked.
    """
    domain = names.ascii_domain(text)
    if not domain or len(domain) > 253:
        raise ValueError(f"{text!r} is not a domain name")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{text!r} is not a domain name (bad label {label!r})")
    return domain


def parse_domains(text: str) -> tuple[str, ...]:
    """A list of domain names."""
    return tuple(normalize_domain(item) for item in _split_list(text))


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """A list of IP networks in CIDR notation (a bare address is a /32 or /128)."""
    networks = []
    for item in _split_list(text):
        try:
            networks.append(names.canonical_network(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            if "host bits set" in str(exc):
                wider = ipaddress.ip_network(item, strict=False)
                raise ValueError(f"{item!r} has host bits set (did you mean {wider}?)") from None
            raise ValueError(f"{item!r} is not an IP network in CIDR notation") from None
    return tuple(networks)


def normalize_recipient(text: str) -> str:
    """A ``[recipient:X]`` key: ``domain`` or ``local@domain``.

    Local parts are compared without regard to case (RFC 5321 4.5.1 for postmaster),
    domains in A-labels: the form :mod:`spfmilter.recipients` matches against.
    """
    text = text.strip()
    local, at, domain = text.rpartition("@")
    if not at:
        return normalize_domain(text)
    if not local or _CONTROL.search(local) or any(c.isspace() for c in local):
        raise ValueError(f"{text!r} is not a mail address")
    return f"{local.lower()}@{normalize_domain(domain)}"


def parse_recipients(text: str) -> tuple[str, ...]:
    """A list of local parts (``postmaster``) and whole addresses (``abuse@example.com``)."""
    out = []
    for item in _split_list(text):
        if "@" in item:
            out.append(normalize_recipient(item))
        elif _DOT_ATOM.match(item):
            out.append(item.lower())
        else:
            raise ValueError(f"{item!r} is neither a local part nor an address")
    return tuple(out)


def _format_list(values: tuple[Any, ...]) -> str:
    return ", ".join(str(value) for value in values)


def _parse_port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_nameservers(text: str) -> tuple[Nameserver, ...]:
    """A list of ``ip``, ``ip:port``, ``[ipv6]:port`` or ``ipv6``: (ip, port) pairs."""
    servers = []
    for item in _split_list(text):
        port = 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"nameserver {item!r}: expected [address]:port")
                port = _parse_port(rest[1:], f"nameserver {item!r}")
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
            port = _parse_port(port_text, f"nameserver {item!r}")
        else:
            host = item
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"nameserver {item!r} is not an IP address") from None
        if item.startswith("[") and address.version != 6:
            raise ValueError(f"nameserver {item!r}: brackets are for IPv6 addresses")
        servers.append((str(address), port))
    return tuple(servers)


def _format_nameservers(servers: tuple[Nameserver, ...]) -> str:
    items = []
    for host, port in servers:
        if ":" in host:
            items.append(host if port == 53 else f"[{host}]:{port}")
        else:
            items.append(host if port == 53 else f"{host}:{port}")
    return ", ".join(items)


_SOCKET_FORMS = "unix:/path, local:/path, inet:PORT@HOST or inet6:PORT@HOST"


def _socket_host(host: str, family: str, text: str) -> str:
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        try:
            return normalize_domain(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a host name or address") from None
    wanted = 4 if family == "inet" else 6
    if address.version != wanted:
        raise ValueError(f"{text!r}: {family} needs an IPv{wanted} address")
    return str(address)


def parse_socket(text: str) -> SocketSpec:
    """A libmilter connection spec: unix:/path, local:/path, inet:PORT@HOST, inet6:PORT@HOST."""
    text = text.strip()
    proto, colon, rest = text.partition(":")
    proto = proto.lower()
    if not colon or proto not in ("unix", "local", "inet", "inet6"):
        raise ValueError(f"{text!r} is not a socket spec ({_SOCKET_FORMS})")
    if proto in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"{text!r}: the socket path must be absolute")
        if _CONTROL.search(rest):
            raise ValueError(f"{text!r}: a path cannot hold control characters")
        if len(os.fsencode(rest)) > 107:
            raise ValueError(f"{text!r}: the socket path is longer than 107 bytes")
        return SocketSpec("unix", path=rest)
    port_text, at, host = rest.partition("@")
    port = _parse_port(port_text, repr(text))
    if at and not host:
        raise ValueError(f"{text!r}: missing host after '@'")
    return SocketSpec(proto, port=port, host=_socket_host(host, proto, text) if host else "")


def parse_name(text: str) -> str:
    """A user, group or milter name: no spaces or punctuation beyond ``._-``."""
    text = text.strip()
    if text and not _NAME.match(text):
        raise ValueError(f"{text!r} is not a valid name")
    return text


def _parse_milter_name(text: str) -> str:
    name = parse_name(text)
    if not name:
        raise ValueError("the milter name must not be empty")
    return name


def parse_authserv_id(text: str) -> str:
    """Empty (this host's name) or an RFC 5322 dot-atom such as a host name."""
    text = text.strip()
    if text and not _DOT_ATOM.match(text):
        raise ValueError(f"{text!r} is not usable as an authserv-id (use a host name)")
    return text


def parse_path(text: str) -> str:
    """Empty or an absolute path."""
    text = text.strip()
    if text and not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    if _CONTROL.search(text):
        raise ValueError(f"{text!r}: a path cannot hold control characters")
    return text


def parse_template(text: str) -> str:
    """A reply template; placeholders: {identity} {domain} {ip} {result} {explanation}."""
    text = " ".join(text.split())
    replies.check_template(text)
    return text


#: HELO hygiene findings (spfmilter.helo) and what their action option is for.
HELO_FINDING_DOCS = {
    "literal_mismatch": "a HELO address literal that is not the client's address",
    "is_us": "a HELO claiming one of our_names or our address",
    "invalid": "a HELO neither a domain name nor an address literal",
}


def parse_our_names(text: str) -> tuple[str, ...]:
    """A list of domain names and IP addresses (bare or as ``[literal]``)."""
    out = []
    for item in _split_list(text):
        address = names.client_ip(item)
        out.append(address if address is not None else normalize_domain(item))
    return tuple(out)


def _parse_facility(text: str) -> str:
    return _choice_parser(tuple(sorted(SysLogHandler.facility_names)))(text)


@dataclass(frozen=True)
class ListenAddress:
    """An HTTP listening address: an IP address and a TCP port."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress | None:
    """Empty (off), ``ADDRESS:PORT`` or ``[IPV6]:PORT``."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"{text!r}: expected [IPv6 address]:port")
        port_text = port_text[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"{text!r}: expected address:port (IPv6 as [address]:port)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if text.startswith("[") and address.version != 6:
        raise ValueError(f"{text!r}: brackets are for IPv6 addresses")
    return ListenAddress(str(address), _parse_port(port_text, repr(text)))


def _format_listen(value: ListenAddress | None) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class Option:
    """One option of the schema: its parser, default (as INI text) and description."""

    parse: Callable[[str], Any]
    default: str
    doc: str
    format: Callable[[Any], str] = str
    restart: bool = False  # read only at start: a reload cannot apply a change


def _action_options(identity: str, defaults: Mapping[str, str]) -> dict[str, Option]:
    label = "HELO" if identity == "helo" else "MAIL FROM"
    return {
        f"{identity}_{result}": Option(
            parse_action,
            defaults.get(result, "accept"),
            f"action for a {label} result of {result}: accept, reject or tempfail",
        )
        for result in RESULTS
    }


DEFAULT_REPLY_TEXT = "SPF {result} for {identity} {domain} from {ip}: {explanation}"

OPTIONS: Mapping[str, Mapping[str, Option]] = {
    "milter": {
        "socket": Option(
            parse_socket,
            "unix:/run/spfmilter/spfmilter.sock",
            f"where to listen: {_SOCKET_FORMS}",
            restart=True,
        ),
        "name": Option(
            _parse_milter_name, "spfmilter", "milter name, as in the MTA's config", restart=True
        ),
        "user": Option(
            parse_name,
            "spfmilter",
            "user to run as when started as root; empty = stay",
            restart=True,
        ),
        "group": Option(
            parse_name,
            "spfmilter",
            "group for process and socket; empty = user's group",
            restart=True,
        ),
        "umask": Option(
            parse_umask,
            "007",
            "octal umask, applies to the unix socket",
            _format_umask,
            restart=True,
        ),
        "pidfile": Option(
            parse_path, "/run/spfmilter/spfmilter.pid", "PID file; empty = none", restart=True
        ),
        "timeout": Option(
            _int_parser(1, C_INT_MAX),
            "600",
            "seconds to wait for the MTA (smfi_settimeout)",
            restart=True,
        ),
        "on_error": Option(
            parse_action, "tempfail", "action on an internal error: accept, tempfail or reject"
        ),
        "log_target": Option(_choice_parser(("syslog", "stderr")), "syslog", "syslog or stderr"),
        "log_level": Option(
            _choice_parser(("debug", "info", "warning", "error")),
            "info",
            "debug, info, warning or error",
        ),
        "log_facility": Option(_parse_facility, "mail", "syslog facility"),
    },
    "spf": {
        "authserv_id": Option(
            parse_authserv_id, "", "authserv-id in Authentication-Results; empty = host's FQDN"
        ),
        "check_helo": Option(parse_bool, "yes", "check the HELO identity too", _format_bool),
        "nameservers": Option(
            parse_nameservers,
            "",
            "DNS servers: ip, ip:port, [ipv6]:port; empty = system resolver",
            _format_nameservers,
        ),
        "lookup_timeout": Option(
            parse_seconds, "20", "seconds allowed for DNS per identity", _format_seconds
        ),
        "void_lookup_limit": Option(_int_parser(0), "2", "DNS lookups without an answer allowed"),
        "cache_size": Option(_int_parser(0), "10000", "DNS answers to cache; 0 = no cache"),
    },
    "policy": {
        **_action_options("helo", {"fail": "reject"}),
        **_action_options("mailfrom", {"fail": "reject", "temperror": "tempfail"}),
        "test_only": Option(
            parse_bool, "no", "log what would be done but accept everything", _format_bool
        ),
        "reply_text": Option(parse_template, DEFAULT_REPLY_TEXT, "SMTP reply text template"),
        "internal_hosts": Option(
            parse_networks, "127.0.0.0/8, ::1/128", "client networks not checked", _format_list
        ),
        "trusted_relays": Option(
            parse_networks, "", "relay networks not checked (secondary MX...)", _format_list
        ),
        "skip_authenticated": Option(
            parse_bool, "yes", "do not check SMTP-authenticated clients", _format_bool
        ),
        "forwarders": Option(
            parse_domains, "", "client domains (by HELO) not checked", _format_list
        ),
        "reject_at": Option(
            _choice_parser(("mail", "rcpt")), "mail", "give rejections at MAIL FROM or per RCPT TO"
        ),
        "exempt_recipients": Option(
            parse_recipients,
            "",
            "local parts or addresses never rejected (needs reject_at = rcpt)",
            _format_list,
        ),
        **{
            f"helo_{finding}": Option(parse_action, "accept", f"action for {doc}")
            for finding, doc in HELO_FINDING_DOCS.items()
        },
        "our_names": Option(
            parse_our_names, "", "our names and addresses (HELO is_us); empty = authserv-id, j",
            _format_list
        ),
        "dmarc_defer": Option(
            parse_bool, "no", "leave a MAIL FROM reject to a DMARC p=quarantine/reject",
            _format_bool,
        ),
    },
    "headers": {
        "authentication_results": Option(
            parse_bool, "yes", "add an Authentication-Results header", _format_bool
        ),
        "received_spf": Option(parse_bool, "no", "add a Received-SPF header", _format_bool),
        "mailfrom": Option(
            _choice_parser(("domain", "address")),
            "domain",
            "smtp.mailfrom= as the bare domain or the full address",
        ),
        "remove_forged": Option(
            parse_bool, "yes", "remove Authentication-Results claiming our id", _format_bool
        ),
    },
    "metrics": {
        "listen": Option(
            parse_listen,
            "",
            "Prometheus endpoint: address:port or [ipv6]:port; empty = off",
            _format_listen,
            restart=True,
        ),
        "allow_remote": Option(
            parse_bool,
            "no",
            "allow a listen address other than loopback (no authentication)",
            _format_bool,
            restart=True,
        ),
    },
}

#: Options a ``[domain:NAME]`` section may set.
DOMAIN_OPTIONS: tuple[str, ...] = tuple(
    f"{identity}_{result}" for identity in IDENTITIES for result in RESULTS
)
#: Options a ``[recipient:DOMAIN]`` or ``[recipient:ADDRESS]`` section may set.
RECIPIENT_OPTIONS: tuple[str, ...] = (*DOMAIN_OPTIONS, "test_only")


def restart_options() -> Iterator[tuple[str, str]]:
    """(section, option) of every option a reload cannot apply."""
    for section, options in OPTIONS.items():
        for name, option in options.items():
            if option.restart:
                yield section, name


def iter_options() -> Iterator[tuple[str, str, str, str]]:
    """Yield (section, option, default text, description) for every fixed option."""
    for section, options in OPTIONS.items():
        for name, option in options.items():
            yield section, name, option.default, option.doc


def _default(section: str, option: str) -> Any:
    return OPTIONS[section][option].parse(OPTIONS[section][option].default)


# ---------------------------------------------------------------------------
# The typed configuration


@dataclass(frozen=True)
class MilterConfig:
    """[milter]: how the milter runs."""

    socket: SocketSpec = _default("milter", "socket")
    name: str = _default("milter", "name")
    user: str = _default("milter", "user")
    group: str = _default("milter", "group")
    umask: int = _default("milter", "umask")
    pidfile: str = _default("milter", "pidfile")
    timeout: int = _default("milter", "timeout")
    on_error: str = _default("milter", "on_error")
    log_target: str = _default("milter", "log_target")
    log_level: str = _default("milter", "log_level")
    log_facility: str = _default("milter", "log_facility")


@dataclass(frozen=True)
class SpfConfig:
    """[spf]: how SPF is checked."""

    authserv_id: str = _default("spf", "authserv_id")  # resolved by load()/loads()
    check_helo: bool = _default("spf", "check_helo")
    nameservers: tuple[Nameserver, ...] = _default("spf", "nameservers")
    lookup_timeout: float = _default("spf", "lookup_timeout")
    void_lookup_limit: int = _default("spf", "void_lookup_limit")
    cache_size: int = _default("spf", "cache_size")


@dataclass(frozen=True)
class PolicyConfig:
    """[policy] and [domain:NAME]: what to do with each result.

    ``domains`` maps a domain name to the actions its section sets, e.g.
    ``{"example.com": {"mailfrom_softfail": "reject"}}``.
    """

    helo_pass: str = _default("policy", "helo_pass")
    helo_fail: str = _default("policy", "helo_fail")
    helo_softfail: str = _default("policy", "helo_softfail")
    helo_neutral: str = _default("policy", "helo_neutral")
    helo_none: str = _default("policy", "helo_none")
    helo_permerror: str = _default("policy", "helo_permerror")
    helo_temperror: str = _default("policy", "helo_temperror")
    mailfrom_pass: str = _default("policy", "mailfrom_pass")
    mailfrom_fail: str = _default("policy", "mailfrom_fail")
    mailfrom_softfail: str = _default("policy", "mailfrom_softfail")
    mailfrom_neutral: str = _default("policy", "mailfrom_neutral")
    mailfrom_none: str = _default("policy", "mailfrom_none")
    mailfrom_permerror: str = _default("policy", "mailfrom_permerror")
    mailfrom_temperror: str = _default("policy", "mailfrom_temperror")
    test_only: bool = _default("policy", "test_only")
    reply_text: str = _default("policy", "reply_text")
    internal_hosts: tuple[IPNetwork, ...] = _default("policy", "internal_hosts")
    trusted_relays: tuple[IPNetwork, ...] = _default("policy", "trusted_relays")
    skip_authenticated: bool = _default("policy", "skip_authenticated")
    forwarders: tuple[str, ...] = _default("policy", "forwarders")
    reject_at: str = _default("policy", "reject_at")
    exempt_recipients: tuple[str, ...] = _default("policy", "exempt_recipients")
    helo_literal_mismatch: str = _default("policy", "helo_literal_mismatch")
    helo_is_us: str = _default("policy", "helo_is_us")
    helo_invalid: str = _default("policy", "helo_invalid")
    our_names: tuple[str, ...] = _default("policy", "our_names")
    dmarc_defer: bool = _default("policy", "dmarc_defer")
    domains: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    #: ``[recipient:X]`` sections: ``{"example.net": {"test_only": True}, "bob@example.net": ...}``
    recipients: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class HeadersConfig:
    """[headers]: which header fields to add and remove."""

    authentication_results: bool = _default("headers", "authentication_results")
    received_spf: bool = _default("headers", "received_spf")
    mailfrom: str = _default("headers", "mailfrom")
    remove_forged: bool = _default("headers", "remove_forged")


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint."""

    listen: ListenAddress | None = _default("metrics", "listen")
    allow_remote: bool = _default("metrics", "allow_remote")


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` names the file it came from."""

    milter: MilterConfig = field(default_factory=MilterConfig)
    spf: SpfConfig = field(default_factory=SpfConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = field(default="<defaults>", compare=False)


SECTION_TYPES: Mapping[str, type] = {
    "milter": MilterConfig,
    "spf": SpfConfig,
    "policy": PolicyConfig,
    "headers": HeadersConfig,
    "metrics": MetricsConfig,
}


# ---------------------------------------------------------------------------
# Loading

# The same patterns configparser uses, to find the line of a section or option.
_SECTION_LINE = re.compile(r"\[(?P<header>.+)\]")
_OPTION_LINE = re.compile(r"(?P<option>.*?)\s*=\s*(?P<value>.*)$")
_COMMENT_PREFIXES = ("#", ";")


class _Lines:
    """Line numbers of section headers and option lines, found by scanning the text."""

    def __init__(self, text: str) -> None:
        self.sections: dict[str, int] = {}
        self.options: dict[tuple[str, str], int] = {}
        section = None
        in_value = False
        indent_level = 0
        for number, line in enumerate(io.StringIO(text), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith(_COMMENT_PREFIXES):
                in_value = False  # empty_lines_in_values=False: a value ends here
                continue
            indent = len(line) - len(line.lstrip())
            if section is not None and in_value and indent > indent_level:
                continue  # continuation line
            indent_level = indent
            match = _SECTION_LINE.match(stripped)
            if match:
                section = match.group("header")
                self.sections.setdefault(section, number)
                in_value = False
                continue
            match = _OPTION_LINE.match(stripped)
            if section is not None and match:
                key = (section, match.group("option").rstrip().lower())
                self.options.setdefault(key, number)
                in_value = True


def _make_parser() -> configparser.RawConfigParser:
    return configparser.RawConfigParser(
        delimiters=("=",),
        comment_prefixes=_COMMENT_PREFIXES,
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        default_section="\0no default section",
        interpolation=None,
    )


def _hint(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def loads(text: str, filename: str = "<string>") -> Config:
    """Parse configuration ``text``; ``filename`` is used in error messages."""
    parser = _make_parser()
    try:
        parser.read_string(text, source=filename)
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(
            "duplicate section", filename=filename, line=exc.lineno, section=exc.section
        ) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            "option set twice in this section",
            filename=filename,
            line=exc.lineno,
            section=exc.section,
            option=exc.option,
        ) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            "option outside of any section (add a [section] line first)",
            filename=filename,
            line=exc.lineno,
        ) from None
    except configparser.ParsingError as exc:
        number = exc.errors[0][0]
        line = text.split("\n")[number - 1].strip()
        raise ConfigError(
            f"cannot parse {line!r} (expected option = value)",
            filename=filename,
            line=number,
        ) from None

    lines = _Lines(text)

    def error(message: str, section: str, option: str | None = None) -> ConfigError:
        if option is None:
            line = lines.sections.get(section)
        else:
            line = lines.options.get((section, option), lines.sections.get(section))
        return ConfigError(message, filename=filename, line=line, section=section, option=option)

    values: dict[str, dict[str, Any]] = {name: {} for name in OPTIONS}
    domains: dict[str, dict[str, str]] = {}
    domain_sections: dict[str, str] = {}
    recipients: dict[str, dict[str, Any]] = {}
    recipient_sections: dict[str, str] = {}
    for section in parser.sections():
        if section in OPTIONS:
            schema: Mapping[str, Option] = OPTIONS[section]
            target = values[section]
        elif section.startswith(DOMAIN_SECTION_PREFIX):
            try:
                domain = normalize_domain(section[len(DOMAIN_SECTION_PREFIX) :])
            except ValueError as exc:
                raise error(str(exc), section) from None
            if domain in domain_sections:
                raise error(f"same domain as [{domain_sections[domain]}]", section)
            domain_sections[domain] = section
            schema = {name: OPTIONS["policy"][name] for name in DOMAIN_OPTIONS}
            target = domains[domain] = {}
        elif section.startswith(RECIPIENT_SECTION_PREFIX):
            try:
                key = normalize_recipient(section[len(RECIPIENT_SECTION_PREFIX) :])
            except ValueError as exc:
                raise error(str(exc), section) from None
            if key in recipient_sections:
                raise error(f"same recipient as [{recipient_sections[key]}]", section)
            recipient_sections[key] = section
            schema = {name: OPTIONS["policy"][name] for name in RECIPIENT_OPTIONS}
            target = recipients[key] = {}
        else:
            known = [*OPTIONS, DOMAIN_SECTION_PREFIX + "NAME", RECIPIENT_SECTION_PREFIX + "NAME"]
            raise error(f"unknown section{_hint(section, known)}", section)
        for option, raw in parser.items(section):
            if option not in schema:
                if option in OPTIONS["policy"] and section.startswith(RECIPIENT_SECTION_PREFIX):
                    message = "only helo_*, mailfrom_* and test_only can be set per recipient"
                elif option in OPTIONS["policy"]:
                    message = "only helo_* and mailfrom_* actions can be set per domain"
                else:
                    message = f"unknown option{_hint(option, schema)}"
                raise error(message, section, option)
            try:
                target[option] = schema[option].parse(raw)
            except ValueError as exc:
                raise error(str(exc), section, option) from None

    if not values["spf"].get("authserv_id"):
        fqdn = socket.getfqdn()
        try:
            values["spf"]["authserv_id"] = parse_authserv_id(fqdn)
        except ValueError:
            raise ConfigError(
                f"this host's name {fqdn!r} cannot be used, set authserv_id",
                filename=filename,
                section="spf",
                option="authserv_id",
            ) from None
    if values["policy"].get("reject_at", "mail") == "mail":
        if recipient_sections:
            first = min(recipient_sections.values(), key=lambda name: lines.sections[name])
            raise error("needs [policy] reject_at = rcpt (no recipient is known at MAIL FROM)",
                        first)
        if values["policy"].get("exempt_recipients"):
            raise error("needs reject_at = rcpt (no recipient is known at MAIL FROM)",
                        "policy", "exempt_recipients")
    if values["policy"].get("dmarc_defer") and importlib.util.find_spec("publicsuffixlist") is None:
        raise error("needs the Python package publicsuffixlist (pip install publicsuffixlist)",
                    "policy", "dmarc_defer")
    if values["policy"].get("reject_at", "mail") == "rcpt" and values["policy"].get("dmarc_defer"):
        raise error("cannot be used with reject_at = rcpt (a refusal held for the From field"
                    " comes after the RCPTs it would have to refuse)", "policy", "dmarc_defer")
    values["policy"]["recipients"] = MappingProxyType(
        {key: MappingProxyType(opts) for key, opts in sorted(recipients.items())})
    values["policy"]["domains"] = MappingProxyType(
        {name: MappingProxyType(actions) for name, actions in sorted(domains.items())}
    )
    return Config(
        milter=MilterConfig(**values["milter"]),
        spf=SpfConfig(**values["spf"]),
        policy=PolicyConfig(**values["policy"]),
        headers=HeadersConfig(**values["headers"]),
        metrics=_metrics_config(values["metrics"], error),
        source=filename,
    )


def _metrics_config(values: dict[str, Any],
                    error: Callable[..., ConfigError]) -> MetricsConfig:
    metrics = MetricsConfig(**values)
    if metrics.listen is not None and not metrics.listen.loopback and not metrics.allow_remote:
        raise error(f"{metrics.listen} is not a loopback address and the endpoint has no"
                    " authentication: set allow_remote = yes to serve it there", "metrics",
                    "listen")
    return metrics


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse the configuration file at ``path``."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", filename=filename) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("not valid UTF-8", filename=filename, line=line) from None
    return loads(text.replace("\r\n", "\n"), filename=filename)


# ---------------------------------------------------------------------------
# Reporting


def dump(config: Config) -> str:
    """The effective configuration as INI text: every option, then domain sections."""
    out = []
    for section, options in OPTIONS.items():
        values = getattr(config, section)
        out.append(f"[{section}]")
        for name, option in options.items():
            out.append(f"{name} = {option.format(getattr(values, name))}".rstrip())
        out.append("")
    for domain, actions in config.policy.domains.items():
        out.append(f"[{DOMAIN_SECTION_PREFIX}{domain}]")
        out.extend(f"{name} = {actions[name]}" for name in DOMAIN_OPTIONS if name in actions)
        out.append("")
    for key, opts in config.policy.recipients.items():
        out.append(f"[{RECIPIENT_SECTION_PREFIX}{key}]")
        out.extend(f"{name} = {OPTIONS['policy'][name].format(opts[name])}"
                   for name in RECIPIENT_OPTIONS if name in opts)
        out.append("")
    return "\n".join(out)


def warnings(config: Config) -> list[str]:
    """Settings that load but are probably not what the administrator wants."""
    found = []
    timeout = config.spf.lookup_timeout
    if timeout >= 30:
        found.append(
            f"[spf] lookup_timeout = {_format_seconds(timeout)}: a check may outlast"
            " Postfix's default milter_command_timeout of 30 s"
        )
    elif timeout < 20:
        found.append(
            f"[spf] lookup_timeout = {_format_seconds(timeout)}: RFC 7208 4.6.4 asks for"
            " at least 20 s; slow DNS will give temperror"
        )
    if "." not in config.spf.authserv_id:
        found.append(
            f"[spf] authserv_id = {config.spf.authserv_id}: not a fully qualified name,"
            " set authserv_id explicitly"
        )
    if config.headers.authentication_results and not config.headers.remove_forged:
        found.append(
            "[headers] remove_forged = no: forged Authentication-Results fields claiming"
            " our authserv-id will reach recipients (RFC 8601 section 5)"
        )
    policy = config.policy
    sections = [("policy", {name: getattr(policy, name) for name in DOMAIN_OPTIONS})]
    sections += [(DOMAIN_SECTION_PREFIX + name, acts) for name, acts in policy.domains.items()]
    for section, actions in sections:
        for identity in IDENTITIES:
            if actions.get(f"{identity}_pass", "accept") != "accept":
                found.append(
                    f"[{section}] {identity}_pass = {actions[identity + '_pass']}:"
                    " mail that passes SPF is refused"
                )
        if not actions:
            found.append(f"[{section}]: sets no action, it has no effect")
    for key, opts in policy.recipients.items():
        if not opts:
            found.append(f"[{RECIPIENT_SECTION_PREFIX}{key}]: sets nothing, it has no effect")
    if config.milter.socket.family == "unix" and config.milter.umask & 0o007 != 0o007:
        found.append(
            f"[milter] umask = {_format_umask(config.milter.umask)}: the socket will be"
            " usable by every local user"
        )
    if config.policy.test_only:
        found.append("[policy] test_only = yes: nothing will be rejected")
    sock = config.milter.socket
    if sock.family in ("inet", "inet6") and not _is_loopback(sock.host):
        where = "every address" if sock.host in ("", "0.0.0.0", "::") else sock.host
        found.append(
            f"[milter] socket = {sock.spec}: listens on {where}, not only loopback, and the"
            " milter protocol has no authentication: whoever reaches the port can query"
            " SPF through the milter or load it; bind 127.0.0.1 or ::1, firewall the port"
            " or use a unix socket (see spfmilter(8))"
        )
    if config.policy.dmarc_defer and not config.headers.authentication_results:
        found.append("[policy] dmarc_defer = yes with [headers] authentication_results = no:"
                     " mail accepted for DMARC carries no spf=fail result for the verifier")
    return found


def _is_loopback(host: str) -> bool:
    """True for a loopback address or localhost name; "" (every address) is not."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
