"""DMARC policy discovery (RFC 7489): the RFC 5322.From domain and its policy.

Only what ``[policy] dmarc_defer`` needs: which domain the From field names,
whether that domain publishes ``p=quarantine`` or ``p=reject``.  The DMARC
verdict itself is left to the verifier downstream.  The organizational domain
comes from the Public Suffix List shipped in the ``publicsuffixlist`` package
(nothing is downloaded at run time).
"""

from __future__ import annotations

import email.headerregistry
import email.policy
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .spfcheck import normalize_domain

#: Outcomes of :func:`discover` that are no DMARC record (the SPF verdict stands).
NO_RECORD = "no record"
BAD_RECORD = "no usable record"  # several DMARC records, or one without a policy
NO_FROM = "no From"
BAD_FROM = "unparseable From"
SEVERAL_FROM = "several From domains"
DNS_ERROR = "temperror"

_POLICIES = ("none", "quarantine", "reject")
_VERSION = re.compile(r"v[ \t]*=[ \t]*DMARC1[ \t]*(;|\Z)")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")  # RFC 7489 6.4 tag-name
_DMARC_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^!\s,;]+(![0-9]+[kmgtKMGT]?)?")


class DmarcLookupError(Exception):
    """The DMARC record could not be fetched (DNS error or timeout)."""


@dataclass(frozen=True)
class Record:
    """The parts of a DMARC record that discovery needs."""

    p: str  # "none", "quarantine" or "reject"
    sp: str  # the subdomain policy (p when not given)


@dataclass(frozen=True)
class Discovery:
    """What policy discovery found for one message.

    ``policy`` is the policy that applies to the From domain ("none",
    "quarantine", "reject") or one of the ``NO_*``/``BAD_*``/
    ``SEVERAL_FROM``/``DNS_ERROR`` strings; ``domain`` is the From domain
    (A-labels) and ``record_domain`` where the record was found.
    """

    policy: str
    domain: str = ""
    record_domain: str = ""

    @property
    def enforcing(self) -> bool:
        """True for p=quarantine or p=reject: DMARC will act on this mail."""
        return self.policy in ("quarantine", "reject")


# -- records (RFC 7489 6.3, 6.4) ------------------------------------------------

def _has_valid_uri(value: str) -> bool:
    """True if the ``rua=`` list *value* holds at least one syntactically valid
    DMARC URI (6.4: a URI with a scheme, optionally ``!size``)."""
    return any(_DMARC_URI.fullmatch(part.strip(" \t")) for part in value.split(","))


def parse_record(text: str) -> Record | None:
    """Parse one DMARC TXT record; None when it gives no policy to apply.

    ``v=DMARC1`` must be the first tag (6.4); a part without ``=`` or with a
    bad tag name makes the record unusable; unknown tags are ignored (6.3).
    A missing or invalid ``p=``, or an invalid ``sp=``, is read as ``p=none``
    when ``rua=`` holds a valid URI, else the record gives no policy (6.6.3).
    """
    tags: dict[str, str] = {}
    for index, part in enumerate(text.split(";")):
        part = part.strip(" \t\r\n")
        if not part:
            if index == 0:
                return None
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not sep or not _TAG.match(name):
            return None
        if index == 0:
            if name != "v" or value != "DMARC1":
                return None
            continue
        tags.setdefault(name.lower(), value)
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in _POLICIES or sp not in _POLICIES:
        if not _has_valid_uri(tags.get("rua", "")):
            return None
        return Record(p="none", sp="none")
    return Record(p=p, sp=sp)


def select_record(txts: Iterable[bytes | str]) -> tuple[bool, Record | None]:
    """``(any, record)`` for the TXT records at a ``_dmarc`` name (RFC 7489 6.6.3).

    ``any`` is False when none of them is a DMARC record (discovery goes on at
    the organizational domain); otherwise discovery ends here, with the
    policy ``record``, or None when there are several DMARC records or the
    one there gives no policy.
    """
    found: list[Record | None] = []
    for txt in txts:
        text = txt.decode("utf-8", "replace") if isinstance(txt, bytes) else txt
        if _VERSION.match(text):  # others are discarded (6.6.3 step 3)
            found.append(parse_record(text))
    return bool(found), found[0] if len(found) == 1 else None


# -- organizational domain ---------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _psl() -> Any:
    # Imported here: only dmarc_defer needs it, and Debian 12 does not package it.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def preload() -> None:
    """Parse the Public Suffix List now (about a second) rather than on the first message."""
    _psl()


def organizational_domain(domain: str) -> str:
    """The organizational domain of *domain* (RFC 7489 3.2): its public suffix
    plus one label; *domain* itself when it is a public suffix or shorter."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


# -- the From field ------------------------------------------------------------------

_FROM_POLICY = email.policy.default
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def from_domain(values: Sequence[str]) -> tuple[str, str]:
    """``(domain, "")`` for the one domain the From field(s) name, in A-labels, or
    ``("", reason)`` with NO_FROM, BAD_FROM or SEVERAL_FROM (RFC 7489 6.6.1)."""
    if not values:
        return "", NO_FROM
    domains: set[str] = set()
    for value in values:
        value = _FOLD.sub("", value)
        if _has_bad_chars(value):
            return "", BAD_FROM
        try:
            header = _FROM_POLICY.header_factory("from", value)
            assert isinstance(header, email.headerregistry.AddressHeader)
            addresses = header.addresses
        except Exception:  # the email package raises many kinds on garbage
            return "", BAD_FROM
        if header.defects or not addresses:
            return "", BAD_FROM
        for address in addresses:
            domain = normalize_domain(address.domain)
            if not address.username or domain is None:
                return "", BAD_FROM
            domains.add(domain.lower())
    if len(domains) != 1:
        return "", SEVERAL_FROM
    return domains.pop(), ""


def _has_bad_chars(value: str) -> bool:
    """Undecodable bytes (surrogate escapes) or controls other than a tab."""
    return any(ord(c) < 0x20 and c != "\t" or c == "\x7f"
               or 0xD800 <= ord(c) <= 0xDFFF for c in value)


# -- discovery (RFC 7489 6.6.3) ------------------------------------------------------

def discover(from_values: Sequence[str],
             lookup_txt: Callable[[str], Sequence[bytes | str]]) -> Discovery:
    """The DMARC policy for a message with these From field values.

    *lookup_txt* returns the TXT strings at a name ([] for none) and raises
    :class:`DmarcLookupError` on a DNS failure (given as DNS_ERROR).
    """
    domain, problem = from_domain(from_values)
    if problem:
        return Discovery(problem)
    org = organizational_domain(domain)
    names = [domain] if org == domain else [domain, org]
    try:
        for name in names:
            found, record = select_record(lookup_txt(f"_dmarc.{name}"))
            if found:
                if record is None:
                    return Discovery(BAD_RECORD, domain, name)
                return Discovery(record.p if name == domain else record.sp, domain, name)
    except DmarcLookupError:
        return Discovery(DNS_ERROR, domain)
    return Discovery(NO_RECORD, domain)
