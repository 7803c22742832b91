"""SPF evaluation (RFC 7208) with pyspf, over dnspython and a shared answer cache.

pyspf does the SPF work; this module feeds it DNS answers and turns its
outcome into :class:`~spfmilter.results.SpfResult`.  pyspf looks DNS up
through its module-level ``spf.DNSLookup``; we replace that once with a
dispatcher that serves the :class:`SpfChecker` active in the calling thread
(a context variable), so concurrent checks never share per-call state.
"""

from __future__ import annotations

import contextvars
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import spf

from . import names
from .dnscache import DnsCache
from .dnsclient import ATTEMPT_TIMEOUT, DnsClient, ServerFailure
from .dnscompat import system_servers
from .results import SpfResult

log = logging.getLogger(__name__)

#: Negative TTL of an NXDOMAIN/NODATA answer without an SOA: not cached (RFC 2308 5).
DEFAULT_NEGATIVE_TTL = 0

_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")
_PREFIXES = ("SPF Permanent Error: ", "SPF Temporary Error: ")


class LookupFailed(Exception):
    """A DNS lookup outside an SPF check failed (server failure, timeout)."""


class _Answer(NamedTuple):
    """One cached lookup, already in the shape pyspf wants.

    ``void``: the server answered NXDOMAIN or NODATA (RFC 7208 4.6.4); not so
    for a name that was never asked because DNS cannot carry it.
    """

    records: tuple[tuple[tuple[str, str], Any], ...]
    nxdomain: bool
    void: bool = False


class _Session:
    """Per-check state the DNS dispatcher needs: which checker, which deadline."""

    tracer: Any = None  # the spfmilter.trace.Tracer of a traced check

    def __init__(self, checker: SpfChecker, deadline: float) -> None:
        self.checker = checker
        self.deadline = deadline
        self.nxdomains: set[str] = set()
        self.expires = math.inf  # the result is good as long as every answer it used

    def lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        return self.checker._lookup(self, name, qtype)


_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "spfmilter_spf_session", default=None
)
_install_lock = threading.Lock()
#: The spfmilter.trace.Tracer of ``spfmilter test --trace``; None in the milter.
_tracer: contextvars.ContextVar[Any] = contextvars.ContextVar("spfmilter_spf_tracer",
                                                              default=None)


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


#: Per pyspf lookup: one flag per answer served, True when it was void.
_served: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "spfmilter_spf_served", default=None
)


def _note_served(answer: _Answer) -> None:
    """Tell the _Query.dns call in progress (if any) whether this answer was void."""
    served = _served.get()
    if served is not None:
        served.append(answer.void)


class _Query(spf.query):
    """pyspf query with our own void lookup limit instead of the module constant.

    A void lookup is one the server answered with NXDOMAIN or NODATA
    (RFC 7208 4.6.4).  An empty result for a name pyspf or we decline to ask
    (an empty or over-long label), or for a null MX's "." (RFC 7505), is not.
    """

    def __init__(self, *args: Any, void_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.void_limit = void_limit
        self.count_voids = True

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list:
        served: list[bool] = []
        token = _served.set(served)
        try:
            result = super().dns(name, qtype, cnames=cnames, ignore_void=True)
        finally:
            _served.reset(token)
        if not result and any(served) and not ignore_void and self.count_voids \
                and cnames is None:  # pyspf following a CNAME: its first call counts
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


#: The inputs of check_host() a cache key holds only when a macro read them;
#: the client address and the domain checked are in every key.
_OPTIONAL_INPUTS = ("local", "helo", "receiver")
#: Which optional input each macro letter reads (RFC 7208 7.2).  i, c and v
#: are the address; o is the domain; d is the domain or a name evaluation got
#: from DNS; p is DNS data on the address (its TTLs bound the entry).  A letter
#: not listed here -- t, the time -- makes the outcome uncachable.
_MACRO_INPUTS: dict[str, tuple[str, ...]] = {
    "s": ("local",), "l": ("local",), "h": ("helo",), "r": ("receiver",),
    "o": (), "d": (), "i": (), "c": (), "v": (), "p": (),
}
#: Every set of optional inputs a cached outcome can be keyed on.
_SHAPES = tuple(tuple(n for i, n in enumerate(_OPTIONAL_INPUTS) if mask >> i & 1)
                for mask in range(1 << len(_OPTIONAL_INPUTS)))


class _DeferredExplanation(str):
    """An exp= domain-spec not looked up yet, and the <domain> it came with."""

    domain: str


class _RecordingQuery(_Query):
    """A query that notes the macro letters it expands and fetches exp= last.

    ``letters`` gets every macro letter pyspf expands -- in the record, in
    included and redirected records, in exp= -- as it joins the strings, so the
    result cache keys an outcome on what evaluation read.  pyspf looks exp= up
    while parsing a record, before its mechanisms; RFC 7208 6.2 gives the
    explanation a part only in a fail, so it is looked up after evaluation
    and only then (:meth:`explanation`), and its errors just drop it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.letters: set[str] = set()
        self.explanation_failed = False

    def expand(self, s: str, stripdot: bool = True) -> str:
        if "%{" in s:  # most domain-specs have no macro: no second scan of them
            for macro in spf.RE_CHAR.finditer(s):
                if macro.group(0).startswith("%{"):
                    self.letters.add(macro.group(0)[2:3].lower())
        return super().expand(s, stripdot)

    def get_explanation(self, spec: str) -> str | None:
        deferred = _DeferredExplanation(spec)
        deferred.domain = self.d
        return deferred

    def explanation(self, text: str) -> str:
        """The fail text pyspf returned, with exp= looked up now ("" for the default)."""
        if not isinstance(text, _DeferredExplanation):
            return ""
        saved, self.d = self.d, text.domain  # %{d} of the record that had exp=
        try:
            found = super().get_explanation(str(text))
        except (spf.TempError, spf.PermError, spf.AmbiguityWarning):
            self.explanation_failed = True
            found = None
        finally:
            self.d = saved
        return "" if found is None or found == self.defexps["fail"] else found

    def inputs_read(self) -> tuple[str, ...] | None:
        """The optional inputs the outcome depends on; None when it must not be cached."""
        if self.explanation_failed or not self.letters <= _MACRO_INPUTS.keys():
            return None
        read = {name for letter in self.letters for name in _MACRO_INPUTS[letter]}
        return tuple(name for name in _OPTIONAL_INPUTS if name in read)


def _client_ip(ip: str) -> str | None:
    """The client address in canonical text form (IPv4-mapped as IPv4), or None."""
    return names.client_ip(ip)


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


def _negative_ttl(response: dns.message.Message,
                  chain: dns.message.ChainingResult | None = None) -> float:
    """How long an NXDOMAIN/NODATA *response* may be cached (RFC 2308 5).

    The TTL of the SOA in the authority section or its minimum field,
    whichever is less (and no longer than a CNAME on the way); an answer
    without an SOA is not cached at all.  *chain*: the response's
    resolve_chaining(), if the caller has it already.
    """
    if chain is None:
        chain = response.resolve_chaining()
    if not any(rrset.rdtype == dns.rdatatype.SOA and chain.canonical_name.is_subdomain(rrset.name)
               for rrset in response.authority):
        return DEFAULT_NEGATIVE_TTL
    return chain.minimum_ttl  # dnspython: min(CNAME TTLs, SOA TTL, SOA minimum)


#: A name dns.name.from_text would read label by label, with no escape or IDNA.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\Z")


def _qname(name: str) -> dns.name.Name:
    """dns.name.from_text(*name*) (a test checks), a third of its CPU for a plain name.

    Raises what from_text raises.
    """
    if _PLAIN_NAME.match(name):  # ASCII labels as they are; Name checks the lengths
        return dns.name.Name([*name.encode("ascii").split(b"."), b""])
    return dns.name.from_text(name)


def _exchange(name: dns.name.Name) -> str:
    """An MX target for pyspf: "" for a null MX's "." (RFC 7505), which it never asks."""
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


def _records(name: str, qtype: str, answer: dns.rrset.RRset) -> tuple:
    """Turn a dnspython answer into pyspf's ((name, type), value) pairs."""
    key = (name, qtype)
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append((key, rdata.address))
        elif qtype == "MX":
            out.append((key, (rdata.preference, _exchange(rdata.exchange))))
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
        # The shapes (of _SHAPES, in its order) ever put in self.results: only they
        # can hit, so a miss probes these, not all eight (each probe takes the lock).
        self._shapes_kept: tuple[tuple[str, ...], ...] = ()
        self._shapes_lock = threading.Lock()
        if nameservers:
            self._client = DnsClient(nameservers)
        else:
            servers, attempt, rotate = system_servers()
            self._client = DnsClient(servers, attempt_timeout=attempt or ATTEMPT_TIMEOUT,
                                     rotate=rotate)
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

    def check_helo(self, ip: str, helo: str, receiver: str = "") -> SpfResult:
        """Check the HELO identity (RFC 7208 2.3) of a client at *ip*.

        Only a multi-label domain name is checked; for an address literal or
        anything else the result is none with ``checked=False``.  *receiver*
        is the receiving host for ``%{r}`` (pyspf says "unknown" when empty).
        """
        client = _client_ip(ip)
        if client is None:
            return SpfResult("helo", "none", checked=False,
                             comment=f"no usable client address {ip!r}")
        domain = normalize_domain(helo)
        if domain is None:
            return SpfResult("helo", "none", checked=False,
                             comment=f"HELO name {helo!r} is not a domain name")
        return self._check_host("helo", client, "postmaster", domain, helo, receiver)

    def check_mailfrom(self, ip: str, sender: str, helo: str, receiver: str = "") -> SpfResult:
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
        return self._check_host("mailfrom", client, local, domain, helo, receiver)

    # -- check_host() through pyspf ----------------------------------------

    def _check_host(self, identity: str, ip: str, local: str, domain: str,
                    helo: str, receiver: str) -> SpfResult:
        sender = f"{local}@{domain}"
        inputs = {"local": local, "helo": helo, "receiver": receiver}
        tracer = _tracer.get()
        for shape in self._shapes_kept if tracer is None else ():  # a trace shows the evaluation
            cached = self.results.get((ip, domain, tuple((n, inputs[n]) for n in shape)))
            if cached is not None:
                result, explanation, comment = cached
                return SpfResult(identity, result, domain=domain, sender=sender,
                                 explanation=explanation, comment=comment)
        session = _Session(self, time.monotonic() + self.lookup_timeout)
        token = _session.set(session)
        query = None
        make = _RecordingQuery
        if tracer is not None:
            session.tracer, make = tracer, tracer.query
            tracer.begin(identity, ip, sender, domain, helo, receiver)
        try:
            query = make(ip, sender, helo, receiver=receiver or None,
                         timeout=self.lookup_timeout, void_limit=self.void_lookup_limit)
            query.l, query.o, query.d = local, domain, domain
            result, explanation, comment = self._evaluate(query, domain, session)
        except Exception as exc:  # a pyspf bug must not take the connection down
            log.warning("SPF %s check of %s for %s failed: %r", identity, sender, ip, exc,
                        exc_info=True)
            result, explanation = "temperror", ""
            comment = f"internal error in SPF evaluation: {type(exc).__name__}"
            query = None
        finally:
            _session.reset(token)
        shape = None if query is None or result == "temperror" else query.inputs_read()
        if shape is not None:
            ttl = session.expires - time.monotonic()
            self.results.put((ip, domain, tuple((n, inputs[n]) for n in shape)),
                             (result, explanation, comment), ttl)
            if shape not in self._shapes_kept:
                with self._shapes_lock:
                    kept = {shape, *self._shapes_kept}
                    self._shapes_kept = tuple(s for s in _SHAPES if s in kept)
        if tracer is not None:
            tracer.end(query, result, explanation, comment)
        return SpfResult(identity, result, domain=domain, sender=sender,
                         explanation=explanation, comment=comment)

    def _evaluate(self, query: _RecordingQuery, domain: str,
                  session: _Session) -> tuple[str, str, str]:
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
        explanation = query.explanation(text) if result == "fail" else ""
        if query.mechanism:
            comment = f"{query.mechanism} matched"
        else:
            comment = f"no mechanism matched, default {result}"
        return result, explanation, comment

    # -- DNS ------------------------------------------------------------------

    def lookup_txt(self, name: str) -> list[bytes]:
        """The TXT records at *name*, each one's strings joined, through the same
        cache and resolver as SPF checks; [] when there are none.  Raises
        :class:`LookupFailed` on a DNS error or timeout."""
        session = _Session(self, time.monotonic() + self.lookup_timeout)
        try:
            return [b"".join(strings) for _key, strings in self._lookup(session, name, "TXT")]
        except spf.TempError as exc:
            raise LookupFailed(str(exc)) from None

    def _lookup(self, session: _Session, name: str, qtype: str) -> list:
        """Answer one pyspf lookup from the cache or DNS; raise spf.TempError."""
        key = (name.lower().rstrip("."), qtype)
        entry = self.cache.get_entry(key)
        if entry is None:
            try:
                cached, expires = self._resolve(session, key[0], qtype)
            except spf.TempError as exc:
                if session.tracer is not None:
                    session.tracer.lookup_failed(key, exc)
                raise
        else:
            expires, cached = entry
        if session.tracer is not None:
            session.tracer.lookup(key, cached, expires, entry is not None)
        session.expires = min(session.expires, expires)
        if cached.nxdomain:
            session.nxdomains.add(key[0])
        _note_served(cached)
        return list(cached.records)

    def _resolve(self, session: _Session, name: str, qtype: str) -> tuple[_Answer, float]:
        """The answer and when it expires (now when it must not be cached)."""
        try:
            qname = _qname(name)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return _Answer((), False), math.inf  # not a name DNS can carry: no data
        remaining = session.deadline - time.monotonic()
        if remaining <= 0:
            raise spf.TempError(f"DNS time limit of {self.lookup_timeout:g}s exceeded")
        try:
            reply = self._client.query(qname, dns.rdatatype.from_text(qtype), session.deadline)
        except dns.exception.Timeout:
            raise spf.TempError(f"DNS timeout for {name} {qtype}") from None
        except ServerFailure as exc:
            if exc.chain_too_long:  # no data, as pyspf treats a loop; not a void lookup
                return _Answer((), False), self.cache.expiry(0)
            raise spf.TempError(f"DNS server failure for {name} {qtype}") from None
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS error for {name} {qtype}: {exc}") from None
        if reply.nxdomain:
            result = _Answer((), True, void=True)
            ttl = _negative_ttl(reply.response, reply.chain)
            self.cache.put((name, qtype), result, ttl, negative=True)
            return result, self.cache.expiry(ttl, negative=True)
        records = () if reply.rrset is None else _records(name, qtype, reply.rrset)
        result = _Answer(records, False, void=not records)
        if records:
            ttl = reply.ttl
        else:  # NODATA
            ttl = _negative_ttl(reply.response, reply.chain)
        self.cache.put((name, qtype), result, ttl, negative=not records)
        return result, self.cache.expiry(ttl, negative=not records)
