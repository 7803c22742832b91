"""SPF evaluation (RFC 7208) with pyspf, over dnspython and a shared answer cache.

pyspf does the SPF work; this module feeds it DNS answers and turns its
outcome into :class:`~spfmilter.results.SpfResult`.  pyspf looks DNS up
through its module-level ``spf.DNSLookup``; we replace that once with a
dispatcher that serves the :class:`SpfChecker` active in the calling thread
(a context variable), so concurrent checks never share per-call state.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import dns.exception
import dns.name
import dns.resolver
import spf

from .dnscache import DnsCache
from .dnscompat import make_resolver
from .results import SpfResult

log = logging.getLogger(__name__)

#: Negative TTL when an answer carries no SOA (RFC 2308 has nothing to go by).
DEFAULT_NEGATIVE_TTL = 60
#: UDP payload size we advertise with EDNS (the DNS flag day 2020 value).
EDNS_PAYLOAD = 1232

_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")
_PREFIXES = ("SPF Permanent Error: ", "SPF Temporary Error: ")
# Macros that expand the sender's local part (RFC 7208 7.3: %{l}, %{s}, any case)
_LOCAL_MACRO = re.compile(r"%\{[lsLS]")


class _Answer(NamedTuple):
    """One cached lookup, already in the shape pyspf wants."""

    records: tuple[tuple[tuple[str, str], Any], ...]
    nxdomain: bool


class _Session:
    """Per-check state the DNS dispatcher needs: which checker, which deadline."""

    def __init__(self, checker: SpfChecker, deadline: float) -> None:
        self.checker = checker
        self.deadline = deadline
        self.nxdomains: set[str] = set()
        self.expires = math.inf  # the result is good as long as every answer it used
        self.uses_local = False  # a record expanded %{l} or %{s}: the local part matters

    def lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        return self.checker._lookup(self, name, qtype)


_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "spfmilter_spf_session", default=None
)
_install_lock = threading.Lock()


def _install_dispatcher() -> None:
    """Route pyspf's DNS lookups to the active session (once per process)."""
    with _install_lock:
        if getattr(spf.DNSLookup, "_spfmilter", False):
            return
        fallback = spf.DNSLookup

        def dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list:
            session = _session.get()
            if session is None:  # pyspf used by someone else in this process
                return fallback(name, qtype, strict, timeout)
            return session.lookup(name, qtype)

        dispatch._spfmilter = True  # type: ignore[attr-defined]
        spf.DNSLookup = dispatch


class _Query(spf.query):
    """pyspf query with our own void lookup limit instead of the module constant."""

    def __init__(self, *args: Any, void_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.void_limit = void_limit
        self.count_voids = True

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list:
        result = super().dns(name, qtype, cnames=cnames, ignore_void=True)
        if not result and not ignore_void and self.count_voids:
            self.void_lookups += 1
            if self.void_lookups > self.void_limit:
                raise spf.PermError(f"Void lookup limit of {self.void_limit} exceeded")
        return result


def normalize_domain(text: str) -> str | None:
    """*text* as an ASCII multi-label domain name, or None if it is not one.

    One final dot is dropped; U-labels become A-labels.  Address literals,
    single labels, all-numeric top labels (so dotted quads), empty or
    over-long labels, and anything with spaces or control characters give None.
    """
    if text.endswith("."):
        text = text[:-1]
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 2 or labels[-1].isdigit():
        return None
    if not all(_LABEL.match(label) for label in labels):
        return None
    return text


def _client_ip(ip: str) -> str | None:
    """The client address in canonical text form, or None when unusable."""
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


def split_sender(sender: str) -> tuple[str, str] | None:
    """(local-part, domain) of a MAIL FROM address; None for the null sender.

    Angle brackets and a source route are removed.  The domain is what
    follows the last ``@``; no ``@`` means the whole text is the domain and an
    empty local-part becomes ``postmaster`` (RFC 7208 4.3).
    """
    text = sender
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith("@") and ":" in text:  # <@relay,@relay:user@domain>
        text = text.split(":", 1)[1]
    if not text:
        return None
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = "", text
    return (local or "postmaster", domain)


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    for response in exc.responses().values():
        try:
            return response.resolve_chaining().minimum_ttl
        except Exception:  # a response we cannot chain: fall back below
            pass
    return DEFAULT_NEGATIVE_TTL


def _records(name: str, qtype: str, answer: dns.resolver.Answer) -> tuple:
    """Turn a dnspython answer into pyspf's ((name, type), value) pairs."""
    key = (name, qtype)
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append((key, rdata.address))
        elif qtype == "MX":
            out.append((key, (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))))
        elif qtype == "PTR":
            out.append((key, rdata.target.to_text(omit_final_dot=True)))
        elif qtype in ("TXT", "SPF"):
            out.append((key, tuple(rdata.strings)))
    return tuple(out)


class SpfChecker:
    """Checks HELO and MAIL FROM identities; one instance serves all threads.

    ``nameservers`` are (address, port) pairs; empty means the system
    resolver configuration (/etc/resolv.conf).  All lookups of one check
    must finish within ``lookup_timeout`` seconds, else temperror.  More than
    ``void_lookup_limit`` lookups without an answer give permerror.  Answers
    are cached for their TTL in an LRU of ``cache_size`` entries (0: off).
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[tuple[str, int]] = (),
        lookup_timeout: float = 20.0,
        void_lookup_limit: int = 2,
        cache_size: int = 10000,
    ) -> None:
        if not lookup_timeout > 0:
            raise ValueError(f"lookup_timeout must be positive, got {lookup_timeout}")
        if void_lookup_limit < 0:
            raise ValueError(f"void_lookup_limit must not be negative, got {void_lookup_limit}")
        self.lookup_timeout = float(lookup_timeout)
        self.void_lookup_limit = void_lookup_limit
        self.cache: DnsCache[_Answer] = DnsCache(cache_size)
        # Whole check_host() outcomes, living as long as the shortest TTL they used.
        self.results: DnsCache[tuple[str, str, str]] = DnsCache(cache_size)
        self._resolver = make_resolver(nameservers)
        self._resolver.use_edns(0, 0, EDNS_PAYLOAD)
        _install_dispatcher()

    @property
    def cache_hits(self) -> int:
        return self.cache.hits

    @property
    def cache_misses(self) -> int:
        return self.cache.misses

    def stats(self) -> dict[str, int]:
        """DNS cache counters: hits, misses, evictions, size, maxsize."""
        return self.cache.stats()

    # -- the two identities ----------------------------------------------

    def check_helo(self, ip: str, helo: str) -> SpfResult:
        """Check the HELO identity (RFC 7208 2.3) of a client at *ip*.

        Only a multi-label domain name is checked; for an address literal or
        anything else the result is none with ``checked=False``.
        """
        client = _client_ip(ip)
        if client is None:
            return SpfResult("helo", "none", checked=False,
                             comment=f"no usable client address {ip!r}")
        domain = normalize_domain(helo)
        if domain is None:
            return SpfResult("helo", "none", checked=False,
                             comment=f"HELO name {helo!r} is not a domain name")
        return self._check_host("helo", client, "postmaster", domain, helo)

    def check_mailfrom(self, ip: str, sender: str, helo: str) -> SpfResult:
        """Check the MAIL FROM identity (RFC 7208 2.4); never raises.

        The null sender (``""`` or ``<>``) is checked as ``postmaster@<helo>``.
        A malformed domain gives none with ``checked=False`` (RFC 7208 4.3).
        """
        client = _client_ip(ip)
        parts = split_sender(sender)
        if parts is None:
            local, raw_domain = "postmaster", helo
            what = f"null sender and HELO name {helo!r} is not a domain name"
        else:
            local, raw_domain = parts
            what = f"domain {raw_domain!r} of the sender is not a domain name"
        address = sender[1:-1] if sender.startswith("<") and sender.endswith(">") else sender
        if client is None:
            return SpfResult("mailfrom", "none", sender=address, checked=False,
                             comment=f"no usable client address {ip!r}")
        domain = normalize_domain(raw_domain)
        if domain is None:
            return SpfResult("mailfrom", "none", sender=address or f"postmaster@{helo}",
                             checked=False, comment=what)
        return self._check_host("mailfrom", client, local, domain, helo)

    # -- check_host() through pyspf ----------------------------------------

    def _check_host(self, identity: str, ip: str, local: str, domain: str,
                    helo: str) -> SpfResult:
        sender = f"{local}@{domain}"
        key = (identity, ip, domain.lower(), helo.lower())
        cached = self.results.get(key + (None,)) or self.results.get(key + (local,))
        if cached is not None:
            result, explanation, comment = cached
            return SpfResult(identity, result, domain=domain, sender=sender,
                             explanation=explanation, comment=comment)
        session = _Session(self, time.monotonic() + self.lookup_timeout)
        token = _session.set(session)
        try:
            query = _Query(ip, sender, helo, timeout=self.lookup_timeout,
                           void_limit=self.void_lookup_limit)
            query.l, query.o, query.d = local, domain, domain
            result, explanation, comment = self._evaluate(query, domain, session)
        except Exception as exc:  # a pyspf bug must not take the connection down
            log.warning("SPF %s check of %s for %s failed: %r", identity, sender, ip, exc,
                        exc_info=True)
            result, explanation = "temperror", ""
            comment = f"internal error in SPF evaluation: {type(exc).__name__}"
        finally:
            _session.reset(token)
        if result != "temperror":
            ttl = session.expires - time.monotonic()
            self.results.put(key + (local if session.uses_local else None,),
                             (result, explanation, comment), ttl)
        return SpfResult(identity, result, domain=domain, sender=sender,
                         explanation=explanation, comment=comment)

    def _evaluate(self, query: _Query, domain: str, session: _Session) -> tuple[str, str, str]:
        """(result, explanation, comment) of check_host() for *domain*."""
        # The initial record lookup is not a mechanism's lookup: not a void one.
        query.count_voids = False
        try:
            record = query.dns_spf(domain)
        except spf.TempError as exc:
            return "temperror", "", str(exc)
        except spf.PermError as exc:
            return "permerror", "", str(exc)
        finally:
            query.count_voids = True
        if record is None:
            if domain.lower() in session.nxdomains:
                return "none", "", f"domain {domain} does not exist"
            return "none", "", f"no SPF record for {domain}"
        result, _code, text = query.check(spf=record)
        if result in ("temperror", "permerror"):
            for prefix in _PREFIXES:
                if text.startswith(prefix):
                    text = text[len(prefix):]
            return result, "", text
        if result not in ("pass", "fail", "softfail", "neutral", "none"):
            raise RuntimeError(f"pyspf gave unexpected result {result!r}")
        explanation = text if result == "fail" and text != query.defexps["fail"] else ""
        if query.mechanism:
            comment = f"{query.mechanism} matched"
        else:
            comment = f"no mechanism matched, default {result}"
        return result, explanation, comment

    # -- DNS ------------------------------------------------------------------

    def _lookup(self, session: _Session, name: str, qtype: str) -> list:
        """Answer one pyspf lookup from the cache or DNS; raise spf.TempError."""
        key = (name.lower().rstrip("."), qtype)
        entry = self.cache.get_entry(key)
        if entry is None:
            cached, expires = self._resolve(session, key[0], qtype)
        else:
            expires, cached = entry
        session.expires = min(session.expires, expires)
        if cached.nxdomain:
            session.nxdomains.add(key[0])
        if qtype == "TXT" and not session.uses_local:
            session.uses_local = any(_LOCAL_MACRO.search(str(data))
                                     for _, data in cached.records)
        return list(cached.records)

    def _resolve(self, session: _Session, name: str, qtype: str) -> tuple[_Answer, float]:
        """The answer and when it expires (now when it must not be cached)."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return _Answer((), False), math.inf  # not a name DNS can carry: no data
        remaining = session.deadline - time.monotonic()
        if remaining <= 0:
            raise spf.TempError(f"DNS time limit of {self.lookup_timeout:g}s exceeded")
        try:
            answer = self._resolver.resolve(qname, qtype, lifetime=remaining, search=False,
                                            raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            result = _Answer((), True)
            ttl = _negative_ttl(exc)
            self.cache.put((name, qtype), result, ttl, negative=True)
            return result, self.cache.expiry(ttl, negative=True)
        except dns.exception.Timeout:
            raise spf.TempError(f"DNS timeout for {name} {qtype}") from None
        except dns.resolver.NoNameservers:
            raise spf.TempError(f"DNS server failure for {name} {qtype}") from None
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS error for {name} {qtype}: {exc}") from None
        result = _Answer(_records(name, qtype, answer), False)
        ttl = answer.chaining_result.minimum_ttl
        self.cache.put((name, qtype), result, ttl, negative=not result.records)
        return result, self.cache.expiry(ttl, negative=not result.records)
