"""Properties that catch whole classes of edge cases (hypothesis, bounded in the suite).

- an IPv4-mapped client gets the skip, trust and SPF verdict of its IPv4 address;
- the [domain:] section applied is the one of the domain MAIL FROM was checked as;
- any value ``check-config`` accepts reaches its consumer at start without an error.

Set SPFMILTER_PROPERTY_EXAMPLES to run more examples by hand (e.g. 5000).
"""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libmilter_ext as lm
from spfmilter import config, names, policy, replies, transaction
from spfmilter.daemon import StartupError, _ids, make_checker
from spfmilter.results import SpfResult

EXAMPLES = int(os.environ.get("SPFMILTER_PROPERTY_EXAMPLES", "0"))


def bounded(n: int) -> settings:
    return settings(max_examples=EXAMPLES or n, derandomize=not EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# -- IPv4-mapped clients -----------------------------------------------------------

# Addresses the test zones give different answers for, and any other IPv4 address.
ipv4 = st.one_of(
    st.sampled_from(["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.7",
                     "127.0.0.9", "192.0.2.10", "10.1.2.3"]).map(ipaddress.IPv4Address),
    st.ip_addresses(v=4),
)


@st.composite
def cidr_text(draw: st.DrawFn) -> str:
    """An IPv4 network as config text: plain or in its ::ffff:0:0/96 form."""
    address = draw(ipv4)
    prefix = draw(st.integers(0, 32))
    net = ipaddress.IPv4Network((address, prefix), strict=False)
    if draw(st.booleans()):
        return f"::ffff:{net.network_address}/{96 + prefix}"
    return str(net)


SENDERS = ["<u@pass.spf.test>", "<u@fail.spf.test>", "<u@v4only.edges.test>",
           "<u@byip.edges.test>", "<u@mi.spf.test>", "<u@include.spf.test>", "<>",
           "<u@sender.example>"]
HELOS = ["pass.spf.test", "fwd.example", "lenient.edges.test", "[127.0.0.2]"]


def _config_text(dns_server, internal, trusted, forwarders) -> str:
    return (f"[spf]\nauthserv_id = mx.test.example\nnameservers = {dns_server.nameservers[0]}\n"
            "lookup_timeout = 5\ncache_size = 0\n"
            f"[policy]\ninternal_hosts = {', '.join(internal)}\n"
            f"trusted_relays = {', '.join(trusted)}\nforwarders = {forwarders}\n"
            "[headers]\nreceived_spf = yes\n")


def _judged(cfg, checker, ip: str, helo: str, sender: str):
    """What the milter decides for a client that entered as ``ip`` (connect's path)."""
    ip = transaction.client_ip(ip)
    skip = transaction.client_skip(cfg, ip)
    if skip is None:
        skip = transaction.forwarder_skip(cfg, checker, ip, helo)
    verdict = transaction.judge(cfg, checker, ip=ip, helo=helo, sender=sender, skip=skip,
                                receiver="mx.test.example")
    return transaction.is_trusted_relay(cfg, ip), verdict


@bounded(60)
@given(address=ipv4, internal=st.lists(cidr_text(), max_size=3),
       trusted=st.lists(cidr_text(), max_size=3),
       forwarders=st.sampled_from(["", "fwd.example"]),
       helo=st.sampled_from(HELOS), sender=st.sampled_from(SENDERS))
def test_mapped_client_is_judged_as_its_ipv4_address(dns_server, address, internal, trusted,
                                                     forwarders, helo, sender):
    cfg = config.loads(_config_text(dns_server, internal, trusted, forwarders))
    checker = make_checker(cfg)  # both caches off: every check really runs
    plain = str(address)
    mapped = f"::ffff:{address}"
    assert _judged(cfg, checker, mapped, helo, sender) == \
        _judged(cfg, checker, plain, helo, sender)
    # without normalizing first: the lists and the checker's own API agree too
    assert transaction.client_skip(cfg, mapped) == transaction.client_skip(cfg, plain)
    assert transaction.is_trusted_relay(cfg, mapped) == transaction.is_trusted_relay(cfg, plain)
    assert checker.check_mailfrom(mapped, sender, helo) == \
        checker.check_mailfrom(plain, sender, helo)


# -- the override domain -------------------------------------------------------------

DOMAINS = ["v4only.edges.test", "b\u00fccher.edges.test", "fail.spf.test", "softfail.spf.test",
           "nosuch.edges.test", "sub.lenient.edges.test"]


@st.composite
def sender_for(draw: st.DrawFn, domain: str) -> str:
    """MAIL FROM text whose checked domain is ``domain``, in one of its spellings."""
    spelled = draw(st.sampled_from([domain, domain.upper(), domain + ".",
                                    domain.title()]))
    local = draw(st.sampled_from(["u", "a.b", "\"x y\""]))
    return draw(st.sampled_from([f"<{local}@{spelled}>", f"<{spelled}>", spelled,
                                 f"<@relay.example:{local}@{spelled}>", f"{local}@{spelled}"]))


@bounded(80)
@given(data=st.data(), domain=st.sampled_from(DOMAINS),
       helo=st.sampled_from(["lenient.edges.test", "pass.spf.test", "sub.lenient.edges.test"]),
       ip=st.sampled_from(["127.0.0.2", "127.0.0.4", "::ffff:127.0.0.4"]))
def test_override_section_is_the_checked_domains(dns_server, data, domain, helo, ip):
    sender = data.draw(sender_for(domain))
    every = "".join(f"mailfrom_{r} = tempfail\n" for r in
                    ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"))
    lenient = "".join(line.replace("tempfail", "accept") for line in every.splitlines(True))
    # the section names the domain as an admin would write it (U-labels allowed)
    text = (f"[spf]\nauthserv_id = mx.test.example\nnameservers = {dns_server.nameservers[0]}\n"
            f"check_helo = no\n[policy]\ninternal_hosts =\n[domain:{domain}]\n{every}")
    if names.ascii_domain(helo) != names.ascii_domain(domain):
        text += f"[domain:{helo}]\n{lenient}"
    cfg = config.loads(text)
    checker = make_checker(cfg)
    verdict = transaction.judge(cfg, checker, ip=transaction.client_ip(ip), helo=helo,
                                sender=sender)
    assert verdict.mailfrom is not None and verdict.mailfrom.checked, verdict.mailfrom
    assert names.ascii_domain(verdict.mailfrom.domain) == names.ascii_domain(domain)
    assert verdict.decision.action == "tempfail", (sender, helo, verdict)


# -- what check-config accepts, the daemon's start-up accepts ------------------------

def _value_strategy(section: str, option: str) -> st.SearchStrategy[str]:
    default = config.OPTIONS[section][option].default
    numbers = st.one_of(
        st.integers(-2**70, 2**70).map(str),
        st.sampled_from(["0", "1", "-1", "2147483647", "2147483648", "3000000000",
                         "4294967296", "9" * 40, "1e3", "1_000", " 7 "]),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    )
    text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40)
    spec = st.text(alphabet="0123456789<>^=.+- _,#xsrz!", max_size=16)
    template = st.builds(lambda field, s, tail: "{" + field + (":" + s if s else "") + "}" + tail,
                         st.sampled_from(replies.FIELDS), spec, st.sampled_from(["", " x"]))
    return st.one_of(st.just(default), numbers, text, template,
                     st.sampled_from(["/", "/run/x\x00", "unix:/tmp/\x01s", "inet:99999",
                                      "inet6:25@::1", "::ffff:10.0.0.0/104", "yes", "nobody",
                                      "mail", "debug", "accept", "{ip:99999999999}"]))


OPTION_NAMES = [(s, o) for s, opts in config.OPTIONS.items() for o in opts]


def _start_up(cfg: config.Config, test_nameservers: tuple[tuple[str, int], ...]) -> None:
    """Hand every value to the consumer the daemon hands it to at start."""
    lm.settimeout(cfg.milter.timeout)
    old = os.umask(cfg.milter.umask)
    os.umask(old)
    logging.getLevelName(cfg.milter.log_level.upper()).__index__()
    logging.handlers.SysLogHandler.facility_names[cfg.milter.log_facility]
    for path in (cfg.milter.pidfile, config_socket_path(cfg)):
        if path:
            try:
                os.lstat(path)
            except OSError:
                pass
    try:
        _ids(cfg)
    except StartupError:
        pass  # a clean refusal to start, named in the log
    checker = make_checker(cfg)
    if cfg.spf.nameservers == test_nameservers:  # not the system resolver: not here
        result = checker.check_mailfrom("127.0.0.2", "u@fail.spf.test", "mail.spf.test")
        assert result.result in ("fail", "temperror") and "internal" not in result.comment, \
            result
    else:
        result = SpfResult("mailfrom", "fail", domain="fail.spf.test")
    for spf in (result, SpfResult("helo", "temperror", domain="x.example")):
        facts = policy.Facts(ip="192.0.2.1", mailfrom=spf)
        policy.decide(facts, cfg.policy)
    replies.render(cfg.policy.reply_text, identity="mailfrom", domain="d" * 300,
                   ip="2001:db8::1", result="fail", explanation="e" * 2000)
    transaction.client_skip(cfg, "::ffff:192.0.2.1")


def config_socket_path(cfg: config.Config) -> str:
    return cfg.milter.socket.path if cfg.milter.socket.family == "unix" else ""


#: Values at and beyond the edges, tried for every option besides the random ones.
HOSTILE = ["", "0", "-1", "1", "2147483647", "2147483648", "3000000000", "9" * 40, "1e300",
           "inf", "nan", "3600", "3600.5", "/", "/run/x\x00y", "unix:/tmp/\x01s",
           "local:/tmp/a b", "inet:99999", "inet6:25@::1", "::ffff:10.0.0.0/104", "yes",
           "nobody", "mail", "debug", "accept", "{ip:99999999999}", "{ip:1000}",
           "{domain:.99999999999}", "{ip:\x00>1000}", "b\u00fccher.example"]


@pytest.mark.parametrize("section,option", OPTION_NAMES, ids=[f"{s}.{o}" for s, o in OPTION_NAMES])
def test_accepted_values_reach_their_consumer(dns_server, section, option):
    base = {"spf": {"authserv_id": "mx.test.example",
                    "nameservers": dns_server.nameservers[0], "lookup_timeout": "5"}}

    def check(value: str) -> None:
        sections = {name: dict(opts) for name, opts in base.items()}
        sections.setdefault(section, {})[option] = value
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items())
                       for name, opts in sections.items())
        try:
            cfg = config.loads(text, filename="prop.cfg")
        except config.ConfigError as exc:
            assert str(exc).startswith("prop.cfg:"), exc
            return
        if section == "spf" and option == "authserv_id" and not value.strip():
            return  # resolved from this host's name, not from the value
        _start_up(cfg, tuple(dns_server.addresses))

    for value in HOSTILE:
        check(value)
    given(value=_value_strategy(section, option))(bounded(12)(check))()
