"""The per-message caches give exactly what the uncached functions give.

Header text, HELO findings and parsed client addresses are remembered in
bounded caches (issue 12).  Each property below feeds pairs of inputs that
differ in one field -- the inputs most likely to collide under a wrong key --
through the cached function one after the other, and compares every answer
with the uncached function's.  Bounded; SPFMILTER_PROPERTY_EXAMPLES=N for
longer runs by hand.
"""

from __future__ import annotations

import dataclasses
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spfmilter import headers, helo, names, policy, replies, transaction
from spfmilter.results import RESULTS, SpfResult

EXAMPLES = int(os.environ.get("SPFMILTER_PROPERTY_EXAMPLES", "0"))


def bounded(n: int) -> settings:
    return settings(max_examples=EXAMPLES or n, derandomize=not EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# Few distinct pieces, so that generated inputs often differ in one field only.
_text = st.one_of(
    st.sampled_from(["", "a matched", "ip4:192.0.2.0/24 matched", "x (y) \\ z;", "é\x01",
                     "example.test", "sub.example.test", "u@example.test",
                     "\"a b\"@example.test", "postmaster@mail.example.test"]),
    st.text(alphabet="ab.@ ()\\\";", max_size=12))


@st.composite
def spf_results(draw: st.DrawFn, identity: str | None = None) -> SpfResult:
    return SpfResult(
        identity=identity or draw(st.sampled_from(["helo", "mailfrom"])),
        result=draw(st.sampled_from(RESULTS)),
        domain=draw(_text), sender=draw(_text), explanation=draw(_text),
        comment=draw(_text), checked=draw(st.booleans()))


@st.composite
def varied(draw: st.DrawFn, base: SpfResult) -> SpfResult:
    """``base`` with one field changed (or none)."""
    name = draw(st.sampled_from(["", "result", "domain", "sender", "explanation",
                                 "comment", "checked", "identity"]))
    if not name:
        return base
    value: object
    if name == "result":
        value = draw(st.sampled_from(RESULTS))
    elif name == "checked":
        value = not base.checked
    elif name == "identity":
        value = "helo" if base.identity == "mailfrom" else "mailfrom"
    else:
        value = draw(_text)
    return dataclasses.replace(base, **{name: value})


ar_inputs = st.fixed_dictionaries({
    "authserv_id": st.sampled_from(["mx.example.test", "other.example.test"]),
    "helo": st.one_of(st.none(), spf_results("helo")),
    "mailfrom": st.one_of(st.none(), spf_results("mailfrom")),
    "mailfrom_format": st.sampled_from(["domain", "address"]),
    "skip": st.sampled_from([None, "", "internal host", "authenticated"]),
    "note": st.sampled_from(["", "HELO invalid: x y", "HELO is_us: (mx)"]),
})


@st.composite
def ar_pairs(draw: st.DrawFn) -> tuple[dict, dict]:
    first = draw(ar_inputs)
    second = dict(first)
    which = draw(st.sampled_from(list(first)))
    if which in ("helo", "mailfrom") and first[which] is not None:
        second[which] = draw(varied(first[which]))
    else:
        second[which] = draw(ar_inputs)[which]
    return first, second


def _ar(inputs: dict, builder) -> str:  # noqa: ANN001
    args = dict(inputs)
    return builder(args.pop("authserv_id"), args.pop("helo"), args.pop("mailfrom"), **args)


@given(pair=ar_pairs())
@bounded(400)
def test_cached_authentication_results_is_the_uncached(pair: tuple[dict, dict]) -> None:
    for inputs in (*pair, *pair):  # the second round answers from the cache
        assert _ar(inputs, headers.cached_authentication_results) == \
            _ar(inputs, headers.authentication_results)
    first, second = pair
    if _ar(first, headers.authentication_results) != _ar(second, headers.authentication_results):
        assert _ar(first, headers.cached_authentication_results) != \
            _ar(second, headers.cached_authentication_results)


@given(data=st.data(), base=spf_results(),
       ip=st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
       helo_name=_text, receiver=st.sampled_from(["mx.example.test", "mx2.example.test", ""]))
@bounded(300)
def test_cached_received_spf_is_the_uncached(data: st.DataObject, base: SpfResult, ip: str,
                                             helo_name: str, receiver: str) -> None:
    other = data.draw(varied(base))
    other_ip = data.draw(st.sampled_from([ip, "192.0.2.3"]))
    calls = [(base, ip), (other, other_ip)]
    texts = []
    for result, address in calls * 2:
        cached = headers.cached_received_spf(result, ip=address, helo=helo_name,
                                             receiver=receiver)
        assert cached == headers.received_spf(result, ip=address, helo=helo_name,
                                              receiver=receiver)
        texts.append(cached)
    assert texts[:2] == texts[2:]


def test_header_cache_is_bounded() -> None:
    for n in range(headers.HEADER_CACHE_SIZE + 10):
        spf = SpfResult("mailfrom", "pass", domain=f"d{n}.example.test")
        headers.cached_authentication_results("mx.example.test", None, spf)
    info = headers._authentication_results.cache_info()
    assert info.currsize == info.maxsize == headers.HEADER_CACHE_SIZE


def test_every_hot_path_cache_is_bounded() -> None:
    """A flood of distinct clients, HELOs and domains evicts; it never grows memory."""
    for cached in (headers._authentication_results, headers._received_spf, helo._classify,
                   helo._our_forms, names.client_address, names.client_ip, replies.render,
                   policy._domain_chain, transaction.local_addresses):
        assert 0 < cached.cache_info().maxsize <= 2048, cached


def _break_points_reference(value: str) -> list[int]:
    """The character-by-character scan _break_points replaced (kept as the oracle)."""
    points, depth, quoted, pos = [], 0, False, 0
    while pos < len(value):
        char = value[pos]
        if char == "\\" and (quoted or depth):
            pos += 2
            continue
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == " ":
            points.append(pos)
        pos += 1
    return points


@given(value=st.text(alphabet='ab ;=()"\\', max_size=60))
@bounded(1000)
def test_break_points_match_the_reference_scan(value: str) -> None:
    assert headers._break_points(value) == _break_points_reference(value)


_helos = st.one_of(
    st.sampled_from(["", "mx.example.test", "MX.Example.Test", "[192.0.2.1]", "[192.0.2.9]",
                     "[IPv6:2001:db8::1]", "[IPv6:::ffff:192.0.2.1]", "192.0.2.1", "bad_name",
                     "localhost", "mail.example.test.", "[010.0.2.1]"]),
    st.text(alphabet="ab.[]:0129-", max_size=14))
_ips = st.sampled_from([None, "", "192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "192.0.2.9"])
_ours = st.lists(st.sampled_from(["mx.example.test", "192.0.2.9", "[192.0.2.1]", "2001:db8::1",
                                  "not a name", "Mail.Example.Test."]), max_size=3)


@given(pairs=st.lists(st.tuples(_helos, _ips, _ours), min_size=1, max_size=4))
@bounded(400)
def test_cached_classify_is_the_uncached(pairs: list[tuple[str, str | None, list[str]]]) -> None:
    for name, ip, ours in pairs * 2:
        uncached = () if name == "" else helo._classify.__wrapped__(name, ip, tuple(ours))
        assert helo.classify(name, ip, ours) == uncached
        assert helo.our_forms(ours) == helo._our_forms.__wrapped__(tuple(ours))


@given(texts=st.lists(st.one_of(
    st.sampled_from(["192.0.2.1", " 192.0.2.1 ", "[192.0.2.1]", "::ffff:192.0.2.1",
                     "[IPv6:::ffff:192.0.2.1]", "IPv6:2001:db8::1", "fe80::1%eth0",
                     "2001:DB8::1", "0.0.0.0", "::", "x", ""]),
    st.ip_addresses().map(str), st.text(alphabet="0129.:afx[]% ", max_size=12)),
    min_size=1, max_size=5))
@bounded(400)
def test_cached_client_address_is_the_uncached(texts: list[str]) -> None:
    for text in texts * 2:
        parsed = names.client_address.__wrapped__(text)
        assert names.client_address(text) == parsed
        assert names.client_ip(text) == (None if parsed is None else str(parsed))


_reply_fields = st.fixed_dictionaries({
    "template": st.sampled_from(["SPF {result} for {domain} from {ip}: {explanation}",
                                 "{identity} {result:>12}", "", "{explanation}"]),
    "identity": st.sampled_from(["helo", "mailfrom"]),
    "domain": st.sampled_from(["example.test", "other.test", "x" * 300]),
    "ip": st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
    "result": st.sampled_from(RESULTS),
    "explanation": _text,
})


@given(calls=st.lists(_reply_fields, min_size=1, max_size=4))
@bounded(300)
def test_cached_reply_render_is_the_uncached(calls: list[dict]) -> None:
    for fields in calls * 2:
        assert replies.render(**fields) == replies.render.__wrapped__(**fields)
