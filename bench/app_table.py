"""The application benchmark's table: its rows, issue 12's targets judged from it, Markdown.

bench_spfmilter.py measures the cells; this module only reads them.  A cell is
anything with the attributes of the Row protocol (bench_spfmilter.Cell), the
RSS run a mapping as bench_spfmilter.rss_run returns it.  Judging a target
never fails the benchmark: the exit status does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SPF_LABEL = "spfmilter"
OPENDMARC_LABEL = "OpenDMARC"
PYSPF_LABEL = "pyspf-milter"
C_NOOP_LABEL = "C no-op"
EXT_NOOP_LABEL = "ext no-op"
FLOOR_LABELS = (C_NOOP_LABEL, EXT_NOOP_LABEL)

#: Issue 12: warm cache at this many connections, spfmilter vs OpenDMARC.
WARM_CONNS = 32
#: Issue 12: CPU per message at WARM_CONNS within this factor of that at 1 connection.
SCALING_FACTOR = 1.15
#: Issue 12: the cold cache compared at this many connections (as the issue measured it) ...
COLD_CONNS = 8
#: ... at least this many times pyspf-milter's msgs/s ...
COLD_VS_PYSPF = 2.0
#: ... and at least this fraction of OpenDMARC's.
COLD_VS_OPENDMARC = 0.5
#: Issue 12: the RSS run's peak stays under this, over this many messages.
RSS_LIMIT_MIB = 40.0
RSS_MESSAGES = 200_000


class Row(Protocol):
    milter: str
    cache: str
    conns: int
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    rss_mib: float
    errors: int
    unexpected: int

    @property
    def us_per_msg(self) -> float: ...

    @property
    def queries_per_msg(self) -> float: ...


@dataclass(frozen=True)
class Target:
    """One of issue 12's targets: what it asks, whether it is met (None: not measured)."""

    asks: str
    met: bool | None
    figures: str

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else "met" if self.met else "not met"


Key = tuple[str, str, int]  # (milter, cache, conns)


def _ratio(by: Mapping[Key, Row], asks: str, a: Key, b: Key, metric: str, limit: float,
           at_least: bool) -> Target:
    """Cell a's metric over cell b's against limit (>= when at_least, else <=)."""
    missing = [f"{m} {cache} {conns}-connection cell" for m, cache, conns in (a, b)
               if (m, cache, conns) not in by]
    if missing:
        return Target(asks, None, "no " + " and no ".join(missing))
    x, y = getattr(by[a], metric), getattr(by[b], metric)
    unit = "msgs/s" if metric == "msgs_per_s" else "us/msg"
    if not y or x != x or y != y:  # no CPU tick measured, or nan
        return Target(asks, None, f"{x:.0f} vs {y:.0f} {unit}: no ratio")
    ratio = x / y
    met = ratio >= limit if at_least else ratio <= limit
    return Target(asks, met, f"{_where(a)} {x:.0f} vs {_where(b)} {y:.0f} {unit} = "
                             f"{ratio:.2f}x (target {'>=' if at_least else '<='} {limit:g}x)")


def _where(key: Key) -> str:
    return f"{key[0]} {key[1]} {key[2]}c"


def issue12_targets(cells: Sequence[Row], rss: Mapping[str, Any] | None) -> list[Target]:
    """Issue 12's targets judged from the table's cells and the RSS run."""
    by = {(c.milter, c.cache, c.conns): c for c in cells}
    warm_ours, warm_od = (SPF_LABEL, "warm", WARM_CONNS), (OPENDMARC_LABEL, "warm", WARM_CONNS)
    cold_ours = (SPF_LABEL, "cold", COLD_CONNS)
    targets = [
        _ratio(by, f"warm, {WARM_CONNS} connections: {SPF_LABEL} msgs/s >= "
               f"{OPENDMARC_LABEL}'s", warm_ours, warm_od, "msgs_per_s", 1.0, True),
        _ratio(by, f"warm, {WARM_CONNS} connections: {SPF_LABEL} CPU/msg <= "
               f"{OPENDMARC_LABEL}'s", warm_ours, warm_od, "us_per_msg", 1.0, False),
    ]
    for cache in ("warm", "cold"):
        targets.append(_ratio(
            by, f"scaling, {cache}: {SPF_LABEL} CPU/msg at {WARM_CONNS} connections within "
            f"{SCALING_FACTOR:g}x of 1 connection", (SPF_LABEL, cache, WARM_CONNS),
            (SPF_LABEL, cache, 1), "us_per_msg", SCALING_FACTOR, False))
    targets += [
        _ratio(by, f"cold, {COLD_CONNS} connections: {SPF_LABEL} msgs/s >= "
               f"{COLD_VS_PYSPF:g}x {PYSPF_LABEL}'s", cold_ours,
               (PYSPF_LABEL, "cold", COLD_CONNS), "msgs_per_s", COLD_VS_PYSPF, True),
        _ratio(by, f"cold, {COLD_CONNS} connections: {SPF_LABEL} msgs/s >= "
               f"{COLD_VS_OPENDMARC:g}x {OPENDMARC_LABEL}'s", cold_ours,
               (OPENDMARC_LABEL, "cold", COLD_CONNS), "msgs_per_s", COLD_VS_OPENDMARC, True),
    ]
    return targets + rss_targets(rss)


def rss_targets(rss: Mapping[str, Any] | None) -> list[Target]:
    """RSS flat and under RSS_LIMIT_MIB over the RSS run (issue 12: 200,000 messages)."""
    flat = f"RSS flat over the RSS run (issue 12: {RSS_MESSAGES:,} messages)"
    limit = f"RSS under {RSS_LIMIT_MIB:g} MiB over the RSS run"
    if rss is None:
        return [Target(flat, None, "no RSS run"), Target(limit, None, "no RSS run")]
    short = (f" (fewer than issue 12's {RSS_MESSAGES:,})" if rss["messages"] < RSS_MESSAGES
             else "")
    figures = (f"start {rss['before_mib']:.1f}, peak {rss['peak_mib']:.1f}, end "
               f"{rss['after_mib']:.1f} MiB over {rss['messages']:,} messages{short}")
    return [Target(flat, bool(rss["flat"]),
                   f"{figures}; growth {rss['after_mib'] - rss['before_mib']:+.1f} MiB "
                   f"(flat: <= {rss['flat_limit_mib']:.1f})"),
            Target(limit, rss["peak_mib"] < RSS_LIMIT_MIB, figures)]


def query_costs(cells: Sequence[Row]) -> list[str]:
    """spfmilter's CPU per uncached DNS query at each concurrency measured cold and warm.

    The cold cell's extra CPU per message over the warm cell's, divided by its
    extra queries per message (as NSD counted them): the cost of a cache miss,
    with pyspf's and the cache's work on the answer.
    """
    by = {(c.milter, c.cache, c.conns): c for c in cells}
    lines = []
    for conns in sorted({c.conns for c in cells if c.milter == SPF_LABEL}):
        cold, warm = by.get((SPF_LABEL, "cold", conns)), by.get((SPF_LABEL, "warm", conns))
        if cold is None or warm is None:
            continue
        extra = cold.queries_per_msg - warm.queries_per_msg
        figures = (f"({cold.us_per_msg:.0f} - {warm.us_per_msg:.0f} us/msg) / "
                   f"({cold.queries_per_msg:.2f} - {warm.queries_per_msg:.2f} queries/msg)")
        cost = (f"{(cold.us_per_msg - warm.us_per_msg) / extra:.0f} us per query"
                if extra > 0.1 else "no extra queries cold")
        lines.append(f"{conns} connections: {figures} = {cost}")
    return lines


def target_lines(targets: Sequence[Target], cells: Sequence[Row] = ()) -> list[str]:
    """The targets as text, one line each: verdict, what is asked, the figures."""
    lines = ["", "issue 12 targets (from the table above; the exit status does not depend "
                 "on them):"]
    for t in targets:
        lines.append(f"  {t.verdict:<12} {t.asks}: {t.figures}")
    costs = query_costs(cells)
    if costs:
        lines.append(f"  CPU per uncached DNS query ({SPF_LABEL}, cold minus warm):")
        lines += [f"    {line}" for line in costs]
    return lines


MD_HEAD = ("| milter | cache | conns | msgs/s | p50 ms | p99 ms | CPU µs/msg | DNS q/msg "
           "| RSS MiB | errors | unexp |")
MD_RULE = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"


def markdown(cells: Sequence[Row], rss: Mapping[str, Any] | None,
             targets: Sequence[Target], preface: Sequence[str] = ()) -> str:
    """The table (rows milter x cache x conns), the RSS run and the targets, as Markdown;
    preface: lines on the machine and the load, written as a list before the table."""
    first: dict[str, int] = {}
    for cell in cells:
        first.setdefault(cell.milter, len(first))
    rows = sorted(cells, key=lambda c: (first[c.milter], c.cache != "cold", c.conns))
    out = [f"- {line}" for line in preface]
    out += ["", MD_HEAD, MD_RULE] if out else [MD_HEAD, MD_RULE]
    for c in rows:
        out.append(f"| {c.milter} | {c.cache} | {c.conns} | {c.msgs_per_s:.0f} | "
                   f"{c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.us_per_msg:.0f} | "
                   f"{c.queries_per_msg:.2f} | {c.rss_mib:.1f} | {c.errors} | {c.unexpected} |")
    if any(c.milter in FLOOR_LABELS for c in rows):
        out += ["", f"{C_NOOP_LABEL} (bench/noop_milter.c on libmilter) and {EXT_NOOP_LABEL} "
                    "(bench/noop_libmilter_ext.py) are the floor: every callback answers "
                    "continue, no DNS, so their cold and warm cells are the same work."]
    if rss is not None:
        out += ["", f"RSS run ({SPF_LABEL}, {rss['messages']:,} warm messages at "
                    f"{rss['conns']} connections, {rss['msgs_per_s']:.0f} msgs/s): start "
                    f"{rss['before_mib']:.1f} MiB, peak {rss['peak_mib']:.1f} MiB, end "
                    f"{rss['after_mib']:.1f} MiB."]
    out += ["", "Issue 12 targets:", ""]
    out += [f"- **{t.verdict}**: {t.asks}: {t.figures}" for t in targets]
    costs = query_costs(cells)
    if costs:
        out += ["", f"CPU per uncached DNS query ({SPF_LABEL}, cold minus warm CPU per message "
                    "over cold minus warm queries per message):", ""]
        out += [f"- {line}" for line in costs]
    return "\n".join(out) + "\n"
