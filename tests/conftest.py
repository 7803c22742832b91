"""Shared fixtures: the loopback DNS server (NSD) serving tests/data/zones."""

import pytest

from tests import rfc7208
from tests.dnsserver import dns_counts, dns_server  # noqa: F401  (session-scoped fixtures)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    line = rfc7208.summary(config)  # "RFC 7208 test suite: N of M passed", if cases ran
    if line:
        terminalreporter.write_sep("=", line)
