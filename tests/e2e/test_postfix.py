"""spfmilter behind a real Postfix (Debian's postfix) set up with etc/postfix-main.cf.snippet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.e2e.dmarc_scenarios import DmarcScenarios
from tests.e2e.mta import (
    Postfix,
    SaslUser,
    SpfMilter,
    make_sasldb,
    postfix_binary,
    postfix_snippet,
    settings,
)
from tests.e2e.scenarios import MtaScenarios


@pytest.fixture(scope="module")
def workdir(e2e_dir: Path) -> Path:
    path = e2e_dir / "postfix"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture(scope="module")
def postfix_ready() -> None:
    """Postfix installed (and so its user and group exist) before anything uses them."""
    postfix_binary()


@pytest.fixture(scope="module")
def sasl_user(workdir: Path, postfix_ready: None) -> SaslUser:
    return make_sasldb(workdir / "sasldb2", "sasha", "s3cret-e2e", group="postfix")


@pytest.fixture(scope="module")
def milter(workdir: Path, dns_server: DnsServer, postfix_ready: None) -> Iterator[SpfMilter]:
    # Group postfix may open the socket, as the snippet's usermod step arranges.
    server = SpfMilter(workdir / "milter", nameservers=dns_server.nameservers, group="postfix")
    server.start()
    yield server
    if server.running:
        assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mta(workdir: Path, milter: SpfMilter, sasl_user: SaslUser) -> Iterator[Postfix]:
    server = Postfix(workdir / "mta", milter.socket_path, sasl_user)
    server.start()
    yield server
    server.stop()


class TestPostfix(MtaScenarios, DmarcScenarios):
    # milter_default_action = tempfail in the snippet.
    MILTER_DOWN = (451, "4.7.1")

    def test_main_cf_uses_the_snippet_users_paste(self, mta: Postfix,
                                                  milter: SpfMilter) -> None:
        snippet = settings(postfix_snippet(milter.socket_path))
        assert snippet["smtpd_milters"] == f"unix:{milter.socket_path}"
        effective = mta.postfix_config()
        for name, value in snippet.items():
            assert effective[name] == value, name
        assert effective["milter_default_action"] == "tempfail"

    def test_smtpd_is_not_chrooted(self, mta: Postfix) -> None:
        # A chrooted smtpd would resolve the socket path inside the queue directory.
        master = (mta.config_dir / "master.cf").read_text().splitlines()
        smtpd = [line.split() for line in master if line.split()[-1:] == ["smtpd"]]
        assert smtpd and all(fields[4] == "n" for fields in smtpd)
