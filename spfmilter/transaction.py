"""One SMTP transaction judged end to end: skips, SPF checks, policy, headers.

Shared by the milter and by ``spfmilter test`` so both give the same answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from . import config, dmarc, headers, names, policy
from . import helo as helomod
from .config import Config
from .results import SpfResult
from .spfcheck import LookupFailed, SpfChecker


@dataclass(frozen=True)
class Verdict:
    """What spfmilter concluded for one transaction."""

    helo: SpfResult | None
    mailfrom: SpfResult | None
    decision: policy.Decision
    skip: str | None
    header_fields: tuple[tuple[str, str], ...]  # (name, value), top first
    facts: policy.Facts | None = None  # what the decision was made from (per-recipient policy)
    helo_findings: tuple[str, ...] = ()  # HELO hygiene (spfmilter.helo), () when skipped
    dmarc: dmarc.Discovery | None = None  # set when dmarc_defer held the decision

    @property
    def deferred(self) -> bool:
        """True when the SPF reject was dropped for the From domain's DMARC policy."""
        return self.dmarc is not None and self.dmarc.enforcing


def client_ip(ip: str) -> str:
    """The client address as it enters spfmilter: canonical, IPv4-mapped as IPv4.

    The milter's connect and ``spfmilter test --ip`` pass every address through
    this once; text that is no address is kept as it is (the check says none).
    """
    return names.client_ip(ip) or ip


@functools.lru_cache(maxsize=256)  # a few listening addresses, asked at every connect
def local_addresses(*macros: str | None) -> tuple[str, ...]:
    """Our side of the connection from the MTA's ``{daemon_addr}`` (Sendmail: the
    listening address; Postfix >= 3.2: the server address) and ``{if_addr}``
    (Sendmail: the interface) macros; unset, unspecified and non-address values
    are dropped."""
    found: list[str] = []
    for value in macros:
        parsed = names.client_address(value) if value else None
        if parsed is not None and not parsed.is_unspecified:
            address = str(parsed)
            if address not in found:
                found.append(address)
    return tuple(found)


def _in(networks: tuple[config.IPNetwork, ...], ip: str | None) -> bool:
    if not networks or ip is None:
        return False
    addr = names.client_address(ip)  # parsed once per address, not per list
    return addr is not None and any(addr in net for net in networks)


def client_skip(cfg: Config, ip: str | None) -> str | None:
    """Why a client is not checked at all, from its address alone (or None)."""
    if ip is None:
        return "local client"
    if _in(cfg.policy.internal_hosts, ip):
        return "internal host"
    if _in(cfg.policy.trusted_relays, ip):
        return "trusted relay"
    return None


def is_trusted_relay(cfg: Config, ip: str | None) -> bool:
    """True when ip is in trusted_relays (its AR headers are kept)."""
    return _in(cfg.policy.trusted_relays, ip)


def forwarder_skip(cfg: Config, checker: SpfChecker, ip: str, helo: str,
                   receiver: str = "") -> str | None:
    """The forwarder domain whose SPF the client passes, as a skip reason (or None)."""
    receiver = receiver or cfg.spf.authserv_id
    for domain in cfg.policy.forwarders:
        if checker.check_mailfrom(ip, f"postmaster@{domain}", helo,
                                  receiver=receiver).result == "pass":
            return f"forwarder {domain}"
    return None


def override_domain(mailfrom: SpfResult | None) -> str:
    """The domain ``[domain:NAME]`` overrides are chosen by: the one MAIL FROM was
    checked as (the HELO name for the null sender), in A-label form; "" if none."""
    if mailfrom is None or not mailfrom.domain:
        return ""
    try:
        return names.ascii_domain(mailfrom.domain)
    except ValueError:
        return ""


def judge(cfg: Config, checker: SpfChecker, *, ip: str | None, helo: str, sender: str,
          helo_result: SpfResult | None = None, authenticated: bool = False,
          skip: str | None = None, receiver: str = "",
          our_addresses: tuple[str, ...] = ()) -> Verdict:
    """Judge one transaction; helo_result may come from an earlier HELO check.

    *receiver* is the receiving host (the MTA's ``j`` macro) for ``%{r}`` and
    Received-SPF; the authserv-id stands in when it is empty.  For HELO
    hygiene both are our names unless ``[policy] our_names`` is set, and
    *our_addresses* (the MTA's side of the connection) are always ours.
    """
    ours = cfg.policy.our_names or (cfg.spf.authserv_id, receiver)
    receiver = receiver or cfg.spf.authserv_id
    skip = skip or client_skip(cfg, ip)
    if skip is None and authenticated and cfg.policy.skip_authenticated:
        skip = "authenticated"
    mailfrom_result = None
    if skip is None:
        assert ip is not None
        if helo_result is None and cfg.spf.check_helo:
            helo_result = checker.check_helo(ip, helo, receiver=receiver)
        mailfrom_result = checker.check_mailfrom(ip, sender, helo, receiver=receiver)
    findings = helomod.classify(helo, ip, (*ours, *our_addresses)) if skip is None else ()
    facts = policy.Facts(ip=ip or "", helo=helo_result if skip is None else None,
                         mailfrom=mailfrom_result, sender_domain=override_domain(mailfrom_result),
                         skip=skip, helo_findings=findings, helo_name=helo)
    decision = policy.decide(facts, cfg.policy)
    return Verdict(helo=facts.helo, mailfrom=mailfrom_result, decision=decision, skip=skip,
                   header_fields=build_headers(cfg, facts, helo=helo, receiver=receiver),
                   facts=facts,
                   helo_findings=findings)


def held(cfg: Config, verdict: Verdict) -> bool:
    """True when ``dmarc_defer`` holds this verdict until the end of headers."""
    return policy.dmarc_deferrable(verdict.decision, cfg.policy)


def review_dmarc(checker: SpfChecker, verdict: Verdict, from_values: list[str]) -> Verdict:
    """A held verdict decided by the DMARC policy of the From field(s) *from_values*."""
    def lookup_txt(name: str) -> list[bytes]:
        try:
            return checker.lookup_txt(name)
        except LookupFailed as exc:
            raise dmarc.DmarcLookupError(str(exc)) from None

    found = dmarc.discover(from_values, lookup_txt)
    return replace(verdict, decision=policy.after_dmarc(verdict.decision, found.policy),
                   dmarc=found)


def build_headers(cfg: Config, facts: policy.Facts, *, helo: str = "",
                  receiver: str = "") -> tuple[tuple[str, str], ...]:
    """The header fields to insert, top first (their text remembered: headers.cached_*)."""
    fields: list[tuple[str, str]] = []
    if cfg.headers.authentication_results:
        fields.append(("Authentication-Results", headers.cached_authentication_results(
            cfg.spf.authserv_id, facts.helo, facts.mailfrom,
            mailfrom_format=cfg.headers.mailfrom, skip=facts.skip,
            note=helomod.note(facts.helo_findings, helo))))
    if cfg.headers.received_spf and facts.skip is None:
        main = facts.mailfrom if facts.mailfrom is not None else facts.helo
        if main is not None:
            fields.append(("Received-SPF", headers.cached_received_spf(
                main, ip=facts.ip, helo=helo,
                receiver=receiver or cfg.spf.authserv_id)))
    return tuple(fields)
