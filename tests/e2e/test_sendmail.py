"""spfmilter behind a real Sendmail (Debian's sendmail-bin) set up with etc/sendmail.mc.snippet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.e2e.dmarc_scenarios import DmarcScenarios
from tests.e2e.mta import SaslUser, Sendmail, SpfMilter, filter_line, make_sasldb, sendmail_snippet
from tests.e2e.scenarios import MtaScenarios

SNIPPET_SOCKET = "/run/spfmilter/spfmilter.sock"


@pytest.fixture(scope="module")
def workdir(e2e_dir: Path) -> Path:
    path = e2e_dir / "sendmail"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture(scope="module")
def sasl_user(workdir: Path) -> SaslUser:
    return make_sasldb(workdir / "sasldb2", "sasha", "s3cret-e2e")


@pytest.fixture(scope="module")
def milter(workdir: Path, dns_server: DnsServer) -> Iterator[SpfMilter]:
    name, _ = sendmail_snippet(SNIPPET_SOCKET)
    server = SpfMilter(workdir / "milter", nameservers=dns_server.nameservers, name=name)
    server.start()
    yield server
    if server.running:
        assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mta(workdir: Path, milter: SpfMilter, sasl_user: SaslUser) -> Iterator[Sendmail]:
    server = Sendmail(workdir / "mta", milter.socket_path, sasl_user)
    server.start()
    yield server
    server.stop()


class TestSendmail(MtaScenarios, DmarcScenarios):
    # F=T in the snippet: Sendmail tempfails while it cannot reach the milter.
    MILTER_DOWN = (451, "4.3.2")

    def test_cf_uses_the_snippet_users_paste(self, mta: Sendmail, milter: SpfMilter) -> None:
        line = filter_line(mta.mc_text)
        assert line == filter_line(sendmail_snippet(milter.socket_path)[1])
        assert f"S=local:{milter.socket_path}," in line
        cf = mta.cf.read_text()
        assert f"Xspfmilter, S=local:{milter.socket_path}, F=T" in cf
        assert "O InputMailFilters=spfmilter" in cf
