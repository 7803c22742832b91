"""The other documented Sendmail routes, each once through the real Sendmail.

* the quick test straight in sendmail.cf (``O InputMailFilters`` + ``X`` lines,
  taken from the README, which spfmilter(8) must repeat);
* SMTP over IPv6 to an inet6 listener;
* a dual-stack inet6 listener on the wildcard (in a network namespace of its
  own) with an IPv4 client: what address spfmilter sees;
* spfmilter on an ``inet6:PORT@::1`` socket.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.e2e.mta import (
    HarnessError,
    SaslUser,
    Sendmail,
    SpfMilter,
    free_port,
    ipv6_loopback,
    make_sasldb,
    sendmail_snippet,
)
from tests.e2e.scenarios import ACCEPTED, PASS_HELO, ours, send, spf
from tests.procs import ROOT
from tests.test_docs_options import rendered

README = ROOT / "README"
MAN = ROOT / "man" / "spfmilter.8"
DOC_SOCKET = "/run/spfmilter/spfmilter.sock"
_CF_LINE = re.compile(r"^\s*(O InputMailFilters=spfmilter|Xspfmilter, S=local:\S+, .*?)\s*$",
                      re.M)

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no ::1 on this host")


def documented_cf_lines(text: str) -> list[str]:
    """The sendmail.cf lines of the quick test, as a document gives them."""
    return _CF_LINE.findall(text)


def documented_daemon_v6(text: str) -> str:
    lines = re.findall(r"DAEMON_OPTIONS\(`Name=MTA-v6, Family=inet6[^']*'\)", text)
    assert len(set(lines)) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def workdir(e2e_dir: Path) -> Path:
    path = e2e_dir / "routes"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture(scope="module")
def sasl_user(workdir: Path) -> SaslUser:
    return make_sasldb(workdir / "sasldb2", "sasha", "s3cret-e2e")


@pytest.fixture(scope="module")
def milter(workdir: Path, dns_server: DnsServer) -> Iterator[SpfMilter]:
    server = SpfMilter(workdir / "milter", nameservers=dns_server.nameservers,
                       name=sendmail_snippet(DOC_SOCKET)[0]).start()
    yield server
    assert server.stop() == 0, server.log()


def _started(server: Sendmail) -> Sendmail:
    try:
        return server.start()
    except HarnessError:
        server.stop()
        raise


def client_ip(received_spf: str) -> str:
    """client-ip= of a Received-SPF field (quoted when it holds colons)."""
    return re.search(r'client-ip="?([^";]+)"?;', received_spf).group(1)


def _milter_saw(milter: SpfMilter, token_sender: str) -> str:
    """The ip= of spfmilter's decision line for a sender."""
    line = next(x for x in reversed(milter.log().splitlines())
                if f"sender=<{token_sender}>" in x)
    return re.search(r" ip=(\S+) ", line).group(1)


def test_docs_give_the_same_sendmail_cf_lines() -> None:
    readme = documented_cf_lines(README.read_text())
    assert [line.split(",")[0] for line in readme] == ["O InputMailFilters=spfmilter",
                                                        "Xspfmilter"]
    assert documented_cf_lines(rendered(MAN)) == readme
    # The same filter as the .mc snippet, in the form m4 writes it into the .cf.
    assert f"S=local:{DOC_SOCKET}, F=T, T=C:5m;S:20s;R:5m;E:5m" in readme[1]
    assert documented_daemon_v6(rendered(MAN)) == documented_daemon_v6(README.read_text())


def test_sendmail_cf_route(workdir: Path, milter: SpfMilter, sasl_user: SaslUser) -> None:
    lines = [line.replace(DOC_SOCKET, milter.socket_path)
             for line in documented_cf_lines(README.read_text())]
    mta = Sendmail(workdir / "cf", milter.socket_path, sasl_user, snippet="", cf_lines=lines,
                   hosts=("127.0.0.1",))
    cf = mta.cf.read_text()
    live = [line for line in cf.splitlines() if re.match(r"O InputMailFilters|X", line)]
    assert live == lines  # the .mc had no filter: the two lines are all there is
    _started(mta)
    try:
        tok, reply = send(mta, source="127.0.0.2", helo=PASS_HELO,
                          sender="alice@pass.spf.test", label="cf")
        assert reply.code == ACCEPTED, reply
        assert spf(ours(mta.mailbox.wait_for(tok))) == {
            "helo": ("pass", PASS_HELO), "mailfrom": ("pass", "pass.spf.test")}
        _, reply = send(mta, source="127.0.0.2", helo=PASS_HELO,
                        sender="bob@fail.spf.test", label="cf-fail")
        assert (reply.code, reply.enhanced) == (550, "5.7.23"), reply
    finally:
        mta.stop()


@needs_ipv6
def test_smtp_over_ipv6_to_an_inet6_listener(workdir: Path, milter: SpfMilter,
                                             sasl_user: SaslUser) -> None:
    documented = documented_daemon_v6(README.read_text())
    mta = Sendmail(workdir / "v6", milter.socket_path, sasl_user, hosts=("::1",),
                   daemons=lambda port: documented.replace(
                       "Port=smtp", f"Port={port}, Addr=::1") + "dnl")
    assert "Family=inet," not in mta.mc_text  # IPv6 only
    _started(mta)
    try:
        tok, reply = send(mta, source="::1", helo=PASS_HELO, sender="v6@ip6.spf.test",
                          label="v6")
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        assert spf(ours(msg))["mailfrom"] == ("pass", "ip6.spf.test")
        assert client_ip(msg["Received-SPF"]) == "::1"
    finally:
        mta.stop()
    assert _milter_saw(milter, "v6@ip6.spf.test") == "::1"


@needs_ipv6
def test_dual_stack_listener_hands_the_milter_plain_ipv4(workdir: Path, milter: SpfMilter,
                                                         sasl_user: SaslUser) -> None:
    # The documented line as it is: the wildcard, in a network of Sendmail's own.
    documented = documented_daemon_v6(README.read_text())
    mta = Sendmail(workdir / "dual", milter.socket_path, sasl_user, network=True,
                   hosts=("127.0.0.1", "::1"),
                   daemons=lambda port: documented.replace("Port=smtp", f"Port={port}") + "dnl")
    assert "Addr=" not in mta.mc_text
    _started(mta)
    try:
        with mta.namespace():  # one listener, an inet6 one, takes both families
            listeners = {family: subprocess.run(["ss", "-Hltn", "-f", family], check=True,
                                                capture_output=True, text=True).stdout
                         for family in ("inet", "inet6")}
        assert listeners["inet"] == "" and f":{mta.port} " in listeners["inet6"], listeners
        tok, reply = send(mta, source="127.0.0.2", helo=PASS_HELO,
                          sender="dual4@pass.spf.test", label="dual4")
        assert reply.code == ACCEPTED, reply
        msg = mta.mailbox.wait_for(tok)
        assert client_ip(msg["Received-SPF"]) == "127.0.0.2"
        assert spf(ours(msg))["mailfrom"] == ("pass", "pass.spf.test")
        tok6, reply = send(mta, source="::1", helo=PASS_HELO, sender="dual6@ip6.spf.test",
                           label="dual6")
        assert reply.code == ACCEPTED, reply
        assert client_ip(mta.mailbox.wait_for(tok6)["Received-SPF"]) == "::1"
    finally:
        mta.stop()
    # The kernel gave Sendmail ::ffff:127.0.0.2; Sendmail logs and tells the milter 127.0.0.2.
    assert "connect from [127.0.0.2]" in mta.log() and "ffff" not in mta.log().lower()
    assert _milter_saw(milter, "dual4@pass.spf.test") == "127.0.0.2"
    assert _milter_saw(milter, "dual6@ip6.spf.test") == "::1"


@needs_ipv6
def test_milter_on_an_inet6_socket(workdir: Path, dns_server: DnsServer,
                                   sasl_user: SaslUser) -> None:
    port = free_port(["::1"])
    spec = f"inet6:{port}@::1"
    milter6 = SpfMilter(workdir / "milter6", nameservers=dns_server.nameservers,
                        socket=spec).start()
    try:
        snippet = sendmail_snippet(DOC_SOCKET)[1].replace(f"S=local:{DOC_SOCKET}",
                                                         f"S={spec}")
        mta = Sendmail(workdir / "m6", DOC_SOCKET, sasl_user, snippet=snippet,
                       hosts=("127.0.0.1",))
        assert f"Xspfmilter, S={spec}, F=T" in mta.cf.read_text()
        _started(mta)
        try:
            tok, reply = send(mta, source="127.0.0.2", helo=PASS_HELO,
                              sender="m6@pass.spf.test", label="m6")
            assert reply.code == ACCEPTED, reply
            assert spf(ours(mta.mailbox.wait_for(tok)))["mailfrom"] == ("pass",
                                                                        "pass.spf.test")
            _, reply = send(mta, source="127.0.0.2", helo=PASS_HELO,
                            sender="m6@fail.spf.test", label="m6-fail")
            assert (reply.code, reply.enhanced) == (550, "5.7.23"), reply
        finally:
            mta.stop()
    finally:
        assert milter6.stop() == 0, milter6.log()
    assert f"spfmilter starting on {spec}" in milter6.log()
    assert "not only loopback" not in milter6.log()  # ::1 is not warned about


@needs_ipv6
def test_dual_stack_and_inet_wildcards_on_one_port_collide(workdir: Path, milter: SpfMilter,
                                                           sasl_user: SaslUser) -> None:
    """What README and spfmilter(8) warn about: the inet6 listener cannot bind."""
    documented = documented_daemon_v6(README.read_text())
    mta = Sendmail(workdir / "both", milter.socket_path, sasl_user, network=True,
                   hosts=("127.0.0.1",),
                   daemons=lambda port: f"DAEMON_OPTIONS(`Name=MTA-v4, Family=inet, "
                   f"Port={port}')dnl\n" + documented.replace("Port=smtp", f"Port={port}")
                   + "dnl")
    mta.start(wait=False)  # it never greets: the failing listener holds up the other
    try:
        deadline = time.monotonic() + 30
        while "daemon MTA-v6: cannot bind: Address already in use" not in mta.log():
            assert time.monotonic() < deadline, mta.log()
            time.sleep(0.1)
    finally:
        if mta.proc is not None:
            mta.proc.kill()  # SIGTERM waits out its retry loop
        mta.stop()
