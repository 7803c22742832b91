"""Shared fixtures: the loopback DNS server (NSD) serving tests/data/zones, a short
directory for a test module's unix sockets."""

import tempfile
from pathlib import Path

import pytest

from tests import rfc7208
from tests.dnsserver import dns_counts, dns_server  # noqa: F401  (session-scoped fixtures)


@pytest.fixture(scope="module")
def shortdir():
    """A new directory under /tmp per test module: unix socket paths stay short."""
    with tempfile.TemporaryDirectory(prefix="lm", dir="/tmp") as d:
        yield Path(d)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    line = rfc7208.summary(config)  # "RFC 7208 test suite: N of M passed", if cases ran
    if line:
        terminalreporter.write_sep("=", line)
