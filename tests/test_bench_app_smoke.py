"""Smoke test of bench/bench_spfmilter.py: tiny counts, spfmilter and the no-op floors.

It checks that the application benchmark runs and reports -- the table, the RSS
run, issue 12's targets, the Markdown table -- and that its judging of the
targets and of a no-op milter's answers is right; it measures nothing.
OpenDMARC and pyspf-milter are left out (no root, no network namespace).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from bench import app_table
from bench import bench_app_load as load
from bench import bench_spfmilter as bench
from tests.procs import ROOT

SCRIPT = ROOT / "bench" / "bench_spfmilter.py"
NUMBER = r"\d+(?:\.\d+)?"
MILTERS = (bench.SPF_LABEL, bench.C_NOOP_LABEL, bench.EXT_NOOP_LABEL)
ROW = re.compile(
    rf"^({'|'.join(MILTERS)})\s+(cold|warm)\s+(\d+)\s+(\d+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
    rf"\s+{NUMBER}\s+\d+\s+{NUMBER}\s+{NUMBER}\s+({NUMBER})\s+\d+%\s+{NUMBER}\s+{NUMBER}"
    rf"\s+(\d+)\s+(\d+)$",
    re.MULTILINE,
)
MD_ROW = re.compile(rf"^\| ({'|'.join(MILTERS)}) \| (cold|warm) \| (\d+) \|"
                    rf"(?: {NUMBER} \|){{6}} (\d+) \| (\d+) \|$", re.MULTILINE)
CELLS = sorted((m, cache, conns) for m in MILTERS for cache in ("cold", "warm")
               for conns in (1, 3))


def test_bench_spfmilter_prints_a_table_with_the_floors(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--skip-pyspf", "--floors", "--messages", "30",
         "--concurrency", "1,3", "--warm-names", "100", "--rounds", "1", "--rss-messages", "60",
         "--rss-samples", "2", "--json", str(tmp_path / "r.json"),
         "--markdown", str(tmp_path / "table.md")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "msgs/s" in out.stdout and "p99 ms" in out.stdout
    rows = ROW.findall(out.stdout)
    assert sorted((m, cache, int(conns)) for m, cache, conns, *_ in rows) == CELLS, out.stdout
    for milter, cache, _conns, msgs, queries, errors, unexpected in rows:
        assert (int(msgs), int(errors), int(unexpected)) == (30, 0, 0), out.stdout
        if milter != bench.SPF_LABEL:
            assert float(queries) == 0, out.stdout  # the floors never ask DNS
        elif cache == "cold":
            assert float(queries) >= 1, out.stdout  # every cold message's own names
    rss = re.search(rf"start ({NUMBER}) MiB, peak ({NUMBER}) MiB, end ({NUMBER}) MiB",
                    out.stdout)
    assert rss, out.stdout
    start, peak, end = map(float, rss.groups())
    assert 0 < start <= peak and end <= peak, out.stdout
    assert "RSS flat" in out.stdout

    targets = out.stdout[out.stdout.index("issue 12 targets"):].splitlines()[1:]
    assert len(targets) == 8 + 3, out.stdout  # and the CPU per DNS query at 1 and 3
    # without OpenDMARC, pyspf-milter or 32 connections only the RSS run can be judged
    assert sum(line.split()[0:2] == ["not", "measured"] for line in targets) == 6, out.stdout
    assert sum("RSS" in line and re.match(r"\s+(met|not met)\s", line) is not None
               for line in targets[:8]) == 2, out.stdout
    assert re.search(rf"^    3 connections: .* = {NUMBER} us per query$", out.stdout,
                     re.MULTILINE), out.stdout

    md = (tmp_path / "table.md").read_text()
    assert "| milter | cache | conns | msgs/s |" in md
    md_rows = MD_ROW.findall(md)
    assert sorted((m, cache, int(conns)) for m, cache, conns, *_ in md_rows) == CELLS, md
    assert all((errors, unexp) == ("0", "0") for *_, errors, unexp in md_rows), md
    assert md.count("- **") == 8, md

    data = json.loads((tmp_path / "r.json").read_text())
    assert {t["verdict"] for t in data["issue12_targets"]} <= {"met", "not met",
                                                               "not measured"}
    assert data["rss"]["peak_mib"] >= data["rss"]["after_mib"] > 0


def _cell(milter: str, cache: str, conns: int, rate: float, us: float,
          queries: int = 0) -> bench.Cell:
    return bench.Cell(milter=milter, cache=cache, conns=conns, round=1, messages=1000,
                      wall_s=1000 / rate, msgs_per_s=rate, p50_ms=1.0, p99_ms=2.0,
                      milter_cpu_s=us * 1000 / 1e6, client_cpu_s=0.5, dns_cpu_s=0.1,
                      other_cpu_s=0.0, rss_mib=30.0, errors=0, unexpected=0,
                      dns_queries=queries)


def _rss(before: float, peak: float, after: float, messages: int = 200_000) -> dict:
    limit = max(bench.RSS_FLAT_MIB, bench.RSS_FLAT_FRACTION * before)
    return {"messages": messages, "conns": 8, "before_mib": before, "peak_mib": peak,
            "after_mib": after, "msgs_per_s": 800.0, "flat_limit_mib": limit,
            "flat": after - before <= limit}


def _verdicts(cells: list[bench.Cell], rss: dict | None) -> list[str]:
    return [t.verdict for t in bench.issue12_targets(cells, rss)]


SPF, OD, PY = bench.SPF_LABEL, bench.OPENDMARC_LABEL, bench.PYSPF_LABEL


def test_issue12_targets_met_from_the_figures():
    cells = [
        _cell(SPF, "warm", 32, 2300, 420), _cell(OD, "warm", 32, 2260, 423),
        _cell(SPF, "warm", 1, 900, 400), _cell(SPF, "cold", 32, 1000, 1100),
        _cell(SPF, "cold", 1, 500, 1000), _cell(SPF, "cold", 8, 970, 900),
        _cell(PY, "cold", 8, 480, 3000), _cell(OD, "cold", 8, 1939, 480),
    ]
    assert _verdicts(cells, _rss(32.0, 34.0, 33.5)) == ["met"] * 8


def test_issue12_targets_missed_from_the_issue_s_own_figures():
    # the numbers issue 12 quotes: warm 32 1943 vs 2260 msgs/s at 599 vs 423 us,
    # 460 us at 1 connection; cold 8: 245 vs pyspf-milter 267 and OpenDMARC 1939
    cells = [
        _cell(SPF, "warm", 32, 1943, 599), _cell(OD, "warm", 32, 2260, 423),
        _cell(SPF, "warm", 1, 1000, 460), _cell(SPF, "cold", 32, 240, 5000),
        _cell(SPF, "cold", 1, 275, 3040), _cell(SPF, "cold", 8, 245, 4330),
        _cell(PY, "cold", 8, 267, 4000), _cell(OD, "cold", 8, 1939, 480),
    ]
    targets = bench.issue12_targets(cells, _rss(32.0, 41.0, 37.0))
    assert [t.verdict for t in targets] == ["not met"] * 8
    assert "1943 vs" in targets[0].figures and "0.86x" in targets[0].figures
    assert "1.30x" in targets[2].figures  # 599 / 460


def test_issue12_targets_not_measured_without_the_cells():
    cells = [_cell(SPF, "warm", 8, 800, 1200), _cell(bench.C_NOOP_LABEL, "warm", 32, 3000, 300)]
    verdicts = _verdicts(cells, None)
    assert verdicts == ["not measured"] * 8
    # a short RSS run is judged, and says it was short
    targets = bench.issue12_targets(cells, _rss(30.0, 30.5, 30.4, messages=2000))
    assert [t.verdict for t in targets[-2:]] == ["met", "met"]
    assert "fewer than issue 12's 200,000" in targets[-1].figures


def test_a_noop_milter_continuing_everywhere_is_expected_only_under_the_noop_check():
    msg = load.message(0, None, 10)
    through = load.Outcome("accept")  # continue at every stage, no header added
    assert not load.unexpected(msg, through, load.NOOP)
    assert load.unexpected(msg, through, load.ENFORCING)
    assert load.unexpected(msg, through, load.HEADERS_ONLY)
    assert load.unexpected(msg, load.Outcome("reject", 550, "5.7.1"), load.NOOP)
    assert load.unexpected(msg, load.Outcome("tempfail", 451, "4.7.1"), load.NOOP)


def test_cpu_per_dns_query_is_the_cold_cells_extra_cpu_over_its_extra_queries():
    cells = [_cell(SPF, "cold", 8, 245, 4330, queries=4000), _cell(SPF, "warm", 8, 800, 930),
             _cell(SPF, "cold", 1, 275, 3000, queries=2000),
             _cell(SPF, "warm", 1, 700, 1000, queries=2000)]
    costs = app_table.query_costs(cells)
    assert costs[0].startswith("1 connections:") and costs[0].endswith("no extra queries cold")
    assert costs[1].startswith("8 connections:") and costs[1].endswith("= 850 us per query")
