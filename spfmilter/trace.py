"""``spfmilter test --trace``: the SPF evaluation as a tree, from pyspf's own steps.

:class:`Tracer` is set for the calling thread with :func:`tracing`; while it
is, :class:`~spfmilter.spfcheck.SpfChecker` skips its result cache, evaluates
with :class:`TracingQuery` and tells the tracer about every DNS lookup.
:class:`TracingQuery` is the milter's own query class with hooks around
pyspf's steps -- record fetch (``dns_spf``), record evaluation (``check0``),
term parsing (``validate_mechanism``, ``expand_domain``), the lookup counter
(``check_lookups``), DNS (``dns``), macros (``expand``) and the deferred
explanation -- that only observe: every value comes from pyspf or from the
checker's DNS layer, and nothing is evaluated twice.

pyspf evaluates a record's mechanisms in one loop inside ``check0``.  To see
which mechanism it is on, each parsed mechanism is handed back as a tuple
whose unpacking (the loop's first step for that mechanism) notes that the
mechanism begins; its qualifier result is a string of our own type, so the
record's result *is* that object exactly when the loop broke on that
mechanism (a match), and is another string when no mechanism matched.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import spf

from . import spfcheck

#: Terms that count against the 10-lookup limit (RFC 7208 4.6.4).
DNS_TERMS = ("a", "mx", "ptr", "exists", "include", "redirect")


# -- tree nodes -------------------------------------------------------------------

@dataclass
class Node:
    """A step of the evaluation; children are the steps it made, in order."""

    children: list[Node] = field(default_factory=list, kw_only=True)

    kind = "node"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            if f.name != "children":
                out[f.name] = getattr(self, f.name)
        out["children"] = [child.as_json() for child in self.children]
        return out

    def line(self) -> str:
        raise NotImplementedError

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Check(Node):
    """One check_host() (RFC 7208 4): its inputs, its outcome and the counters."""

    identity: str
    ip: str
    sender: str
    domain: str
    helo: str
    receiver: str
    result: str | None = None
    explanation: str = ""
    comment: str = ""
    lookups: int = 0
    lookup_limit: int = spf.MAX_LOOKUP
    void_lookups: int = 0
    void_limit: int = 0

    kind = "check"

    def line(self) -> str:
        return (f"{self.identity} check_host(ip={self.ip}, domain={self.domain}, "
                f"sender={self.sender}, helo={self.helo}"
                + (f", receiver={self.receiver}" if self.receiver else "") + ")")

    def summary(self) -> str:
        why = f" ({self.comment})" if self.comment else ""
        return (f"result: {self.result}{why}; DNS lookups {self.lookups} (limit "
                f"{self.lookup_limit}), void lookups {self.void_lookups} (limit {self.void_limit})")


@dataclass
class Fetch(Node):
    """Looking up the SPF record of a domain (RFC 7208 4.4)."""

    domain: str
    record: str | None = None
    error: str | None = None

    kind = "fetch"

    def line(self) -> str:
        if self.error is not None:
            return f"fetch SPF record of {self.domain}: error: {self.error}"
        if self.record is None:
            return f"fetch SPF record of {self.domain}: none"
        return f"fetch SPF record of {self.domain}: found"


@dataclass
class Record(Node):
    """One record evaluated (the checked domain's, an include's, a redirect's)."""

    domain: str
    text: str | None
    result: str | None = None
    error: str | None = None

    kind = "record"

    def line(self) -> str:
        if self.text is None:
            head = f"record of {self.domain}: none"
        else:
            head = f"record of {self.domain}: {self.text}"
        return head

    def tail(self) -> str:
        if self.error is not None:
            return f"=> error: {self.error}"
        return f"=> {self.result}"


@dataclass
class Term(Node):
    """A mechanism or modifier (exp=, redirect=) of a record."""

    term: str
    name: str = ""
    target: str | None = None  # domain-spec after macro expansion, or the address
    cidr: int | None = None
    qualifier: str | None = None  # the result the term gives when it matches
    modifier: bool = False
    lookup: int | None = None  # the lookup counter after this term counted
    matched: bool | None = None
    followed: bool | None = None  # redirect=: whether evaluation went there
    error: str | None = None

    kind = "term"
    qualifier_tag: ClassVar[Any] = None  # per instance: what pyspf returns on a match

    def line(self) -> str:
        bits = [self.term]
        if self.target and self.name in DNS_TERMS and self.target not in self.term:
            bits.append(f"({self.target})")
        if self.lookup is not None:
            bits.append(f"[lookup {self.lookup}]")
        if self.error is not None:
            bits.append(f"error: {self.error}")
        elif self.modifier:
            if self.name == "exp":
                bits.append("explanation looked up after evaluation, on fail only")
            elif self.name == "redirect":
                bits.append("followed: no mechanism matched" if self.followed
                            else "not followed")
        elif self.matched:
            bits.append(f"match => {self.qualifier}")
        elif self.matched is False:
            bits.append("no match")
        return "  ".join(bits)


@dataclass
class Query(Node):
    """One DNS lookup pyspf made, as the checker's cache and resolver answered it."""

    name: str
    type: str
    answer: list[Any] = field(default_factory=list)
    cache: str = "none"  # hit, miss, or "query" when pyspf had it from this check
    ttl: int | None = None  # seconds the answer stays cached (remaining on a hit)
    rcode: str | None = None  # NXDOMAIN, NODATA, or None with data
    void: bool = False  # counted as a void lookup (RFC 7208 4.6.4)
    void_lookups: int = 0
    error: str | None = None

    kind = "query"

    def line(self) -> str:
        bits = [f"DNS {self.type} {self.name}"]
        if self.cache == "query":
            bits.append("(asked before in this check)")
        else:
            bits.append(f"cache {self.cache}" + (f", ttl {self.ttl}" if self.ttl is not None
                                                 else ""))
        if self.error is not None:
            bits.append(f"error: {self.error}")
        elif self.answer:
            bits.append("-> " + ", ".join(_answer_text(a) for a in self.answer))
        else:
            bits.append(f"-> {self.rcode or 'no data'}")
        if self.void:
            bits.append(f"void lookup {self.void_lookups}")
        return "  ".join(bits)


@dataclass
class Expansion(Node):
    """A macro-string and what it expanded to (RFC 7208 7)."""

    macro: str
    value: str

    kind = "expansion"

    def line(self) -> str:
        return f"macro {self.macro!r} -> {self.value!r}"


@dataclass
class Explanation(Node):
    """The exp= lookup after a fail (RFC 7208 6.2)."""

    spec: str
    domain: str
    text: str = ""
    failed: bool = False

    kind = "explanation"

    def line(self) -> str:
        if self.failed:
            return f"explanation from {self.spec}: lookup failed, none given"
        if not self.text:
            return f"explanation from {self.spec}: none usable (default text)"
        return f"explanation from {self.spec}: {self.text!r}"


def _answer_text(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return f"{value[0]} {value[1] or '.'}"  # MX
    if isinstance(value, (list, tuple)):  # TXT character-strings
        return " ".join(json.dumps(_text(s)) for s in value)
    return str(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _json_answer(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return [value[0], value[1]]
    if isinstance(value, (list, tuple)):
        return [_text(s) for s in value]
    return _text(value)


# -- the tracer -----------------------------------------------------------------

class _Qualifier(str):
    """A mechanism's result string, told apart by identity (see the module doc)."""


class _Mechanism(tuple):  # type: ignore[type-arg]
    """pyspf's parsed mechanism; unpacking it tells the tracer it is evaluated."""

    node: Term
    tracer: Tracer

    def __iter__(self) -> Iterator[Any]:
        self.tracer._begin_mechanism(self.node)
        return super().__iter__()


class Tracer:
    """Collects one :class:`Check` tree per check_host() made while it is active."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self._stack: list[Node] = []

    # -- what spfcheck calls ----------------------------------------------------

    def begin(self, identity: str, ip: str, sender: str, domain: str, helo: str,
              receiver: str) -> None:
        check = Check(identity, ip, sender, domain, helo, receiver)
        self.checks.append(check)
        self._stack = [check]

    def query(self, *args: Any, **kwargs: Any) -> TracingQuery:
        """A query for the check begun last, reporting to this tracer."""
        query = TracingQuery(*args, **kwargs)
        query.tracer = self
        return query

    def end(self, query: spfcheck._RecordingQuery | None, result: str, explanation: str,
            comment: str) -> None:
        check = self.checks[-1]
        check.result, check.explanation, check.comment = result, explanation, comment
        if query is not None:
            check.lookups, check.void_lookups = query.lookups, query.void_lookups
            check.void_limit = query.void_limit
        self._stack = []

    def lookup(self, key: tuple[str, str], answer: Any, expires: float, hit: bool) -> None:
        """The checker's DNS layer answered *key* (from its cache when *hit*)."""
        node = self._query_for(key)
        node.cache = "hit" if hit else "miss"
        remaining = expires - time.monotonic()
        node.ttl = None if math.isinf(remaining) else max(0, round(remaining))
        node.rcode = "NXDOMAIN" if answer.nxdomain else "NODATA" if answer.void else None

    def lookup_failed(self, key: tuple[str, str], exc: BaseException) -> None:
        node = self._query_for(key)
        node.cache = "miss"
        node.error = str(exc)

    # -- the tree ---------------------------------------------------------------

    def as_json(self) -> list[dict[str, Any]]:
        return [check.as_json() for check in self.checks]

    def text(self) -> str:
        lines: list[str] = []
        for check in self.checks:
            _render(check, 0, lines)
        return "\n".join(lines or ["no SPF check made"]) + "\n"

    # -- internals: where a step goes ----------------------------------------------

    @property
    def _top(self) -> Node:
        return self._stack[-1]

    def _attach(self, node: Node) -> Node:
        self._top.children.append(node)
        return node

    def _push(self, node: Node) -> None:
        self._stack.append(node)

    def _pop_to(self, node: Node) -> None:
        while self._stack and self._stack.pop() is not node:
            pass

    def _record(self) -> Record | None:
        for node in reversed(self._stack):
            if isinstance(node, Record):
                return node
        return None

    def _query_for(self, key: tuple[str, str]) -> Query:
        top = self._top if self._stack else None
        if isinstance(top, Query) and top.cache in ("none", "query"):
            return top
        node = Query(key[0], key[1])  # a lookup pyspf did not ask for itself
        if self._stack:
            self._attach(node)
        return node

    def _begin_mechanism(self, node: Term) -> None:
        record = self._record()
        if record is None:
            return
        self._pop_to_record(record)
        record.children.append(node)
        node.matched = False
        self._push(node)

    def _pop_to_record(self, record: Record) -> None:
        while self._stack and self._stack[-1] is not record:
            self._stack.pop()


def _render(node: Node, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    lines.append(pad + node.line())
    for child in node.children:
        _render(child, depth + 1, lines)
    if isinstance(node, Record) and node.text is not None:
        lines.append(pad + "  " + node.tail())
    if isinstance(node, Check):
        lines.append(pad + "  " + node.summary())


# -- the query --------------------------------------------------------------------

class TracingQuery(spfcheck._RecordingQuery):
    """The checker's query, telling :attr:`tracer` about each of pyspf's steps."""

    tracer: Tracer

    def dns_spf(self, domain: str) -> str | None:
        t = self.tracer
        top = t._top
        record = t._record()
        if isinstance(top, Term) and top.name == "include" and not any(
                isinstance(c, Fetch) for c in top.children):
            parent: Node = top  # include: fetches its domain's record
        elif record is not None:  # after the loop: redirect= is followed
            parent = next((c for c in record.children if isinstance(c, Term)
                           and c.name == "redirect"), record)
            t._pop_to_record(record)
            if parent is not record:
                assert isinstance(parent, Term)
                parent.followed = True
                t._push(parent)
        else:
            parent = top  # the checked domain's own record
        node = Fetch(domain)
        parent.children.append(node)
        t._push(node)
        try:
            found = super().dns_spf(domain)
        except Exception as exc:
            node.error = str(exc)
            raise
        finally:
            t._pop_to(node)
        node.record = found
        return found

    def check0(self, spf: Any, recursion: int) -> Any:
        t = self.tracer
        node = Record(self.d, spf)
        t._attach(node)
        t._push(node)
        try:
            outcome = super().check0(spf, recursion)
        except Exception as exc:
            top = t._top
            if isinstance(top, Term) and top.error is None:
                top.error = str(exc)
            node.error = str(exc)
            t._pop_to(node)
            raise
        t._pop_to(node)
        result = outcome[0]
        for child in node.children:
            if isinstance(child, Term) and not child.modifier:
                child.matched = result is child.qualifier_tag
        if type(result) is not str and isinstance(result, str):
            outcome = (str(result), *outcome[1:])
        node.result = outcome[0]
        return outcome

    def validate_mechanism(self, mech: str) -> Any:
        t = self.tracer
        node = Term(mech)
        t._push(node)
        try:
            parsed = super().validate_mechanism(mech)
        except Exception as exc:
            node.error = str(exc)
            t._pop_to(node)
            t._attach(node)  # the term that made the record a permerror
            raise
        t._pop_to(node)
        mech, m, arg, cidr, result = parsed
        node.name, node.target, node.cidr = m, arg, cidr
        if isinstance(result, str):
            node.qualifier = result
            result = _Qualifier(result)
        node.qualifier_tag = result
        traced = _Mechanism((mech, m, arg, cidr, result))
        traced.node, traced.tracer = node, t
        return traced

    def check_lookups(self) -> None:
        t = self.tracer
        top = t._top
        if isinstance(top, Record):  # while parsing: only redirect= counts
            top = Term("redirect=", name="redirect", modifier=True, followed=False)
            t._attach(top)
            t._push(top)
        try:
            super().check_lookups()
        finally:
            if isinstance(top, Term):
                top.lookup = self.lookups

    def expand_domain(self, arg: str) -> str:
        t = self.tracer
        top = t._top
        if isinstance(top, Term) and top.name == "redirect" and top.target is None:
            top.term = f"redirect={arg}"
            node = top
        elif isinstance(top, Record):  # while parsing: exp= (redirect= counts first)
            node = Term(f"exp={arg}", name="exp", modifier=True)
            t._attach(node)
            t._push(node)
        else:
            return super().expand_domain(arg)
        try:
            node.target = super().expand_domain(arg)
        except Exception as exc:
            node.error = str(exc)
            raise
        finally:
            t._pop_to(node)
        return node.target

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list:
        t = self.tracer
        node = Query(str(name).lower().rstrip("."), qtype)
        if (node.name, qtype) in self.cache:
            node.cache = "query"
        t._attach(node)
        t._push(node)
        before = self.void_lookups
        try:  # a DNS error is the lookup's (Tracer.lookup_failed), a limit the term's
            answer = super().dns(name, qtype, cnames=cnames, ignore_void=ignore_void)
        finally:
            node.void = self.void_lookups > before
            node.void_lookups = self.void_lookups
            t._pop_to(node)
        node.answer = [_json_answer(a) for a in answer]
        return answer

    def expand(self, s: str, stripdot: bool = True) -> str:
        value = super().expand(s, stripdot)
        if "%" in s:
            self.tracer._attach(Expansion(s, value))
        return value

    def explanation(self, text: str) -> str:
        if not isinstance(text, spfcheck._DeferredExplanation):
            return super().explanation(text)
        t = self.tracer
        node = Explanation(str(text), text.domain)
        t._attach(node)
        t._push(node)
        try:
            node.text = super().explanation(text)
        finally:
            t._pop_to(node)
        node.failed = self.explanation_failed
        return node.text


@contextlib.contextmanager
def tracing() -> Iterator[Tracer]:
    """Trace every SPF check made in this context (this thread or task)."""
    tracer = Tracer()
    token = spfcheck._tracer.set(tracer)
    try:
        yield tracer
    finally:
        spfcheck._tracer.reset(token)


def start() -> Tracer:
    """Trace every SPF check from now on in this context (for a one-shot command)."""
    tracer = Tracer()
    spfcheck._tracer.set(tracer)
    return tracer
