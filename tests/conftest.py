"""Shared fixtures: the loopback DNS server (NSD) serving tests/data/zones."""

from tests.dnsserver import dns_counts, dns_server  # noqa: F401  (session-scoped fixtures)
