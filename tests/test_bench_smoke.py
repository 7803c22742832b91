"""The extension benchmark runs and prints its table (numbers are not judged here).

Speed is reported by ``bench/bench_extension.py``, never asserted in tests: this
only checks that a tiny run completes and prints a number in every column for
every implementation, and that the target verdicts are computed correctly.
pymilter is left out through the script's own ``--skip-pymilter`` flag to keep
the test fast and offline; a real run always includes it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bench import bench_extension as bench

SCRIPT = Path(bench.__file__)
MODES = ("session", "reuse")
CONNS = (1, 2)
IMPLS = (bench.C_LABEL, bench.EXT_LABEL, bench.EXT_NEG_LABEL)
ROW = re.compile(
    r"^(?P<impl>.+?)\s+(?P<mode>session|reuse)\s+(?P<conns>\d+)\s+(?P<rate>\d+)\s+"
    r"(?P<p50>[\d.]+)\s+(?P<p99>[\d.]+)\s+(?P<cpu>[\d.]+)\s+(?P<us>\d+)\s+"
    r"(?P<client>[\d.]+)\s+(?P<other>\d+)%\s+(?P<rss>[\d.]+)$"
)


def test_tiny_run_prints_a_row_per_implementation_mode_and_concurrency(tmp_path):
    out_json = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "50", "--warmup", "4", "--rounds", "1",
         "--concurrency", ",".join(map(str, CONNS)), "--skip-pymilter",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert bench.TABLE_HEAD in lines
    rows = {}
    for line in lines:
        match = ROW.match(line)
        if match:
            rows[(match["impl"], match["mode"], int(match["conns"]))] = match
    assert set(rows) == {(i, m, c) for i in IMPLS for m in MODES for c in CONNS}, result.stdout
    for match in rows.values():
        assert int(match["rate"]) > 0
        assert 0 < float(match["p50"]) <= float(match["p99"])
        assert float(match["rss"]) > 0
    assert any(line.startswith("ratios of libmilter_ext (ext):") for line in lines)
    assert sum(line.startswith("targets, ") for line in lines) == len(MODES)

    data = json.loads(out_json.read_text())
    assert len(data["cells"]) == len(rows)
    assert all(cell["messages"] == 50 for cell in data["cells"])


def _cell(impl: str, conns: int, rate: float) -> bench.Cell:
    return bench.Cell(impl=impl, mode="session", concurrency=conns, messages=100,
                      wall_s=100 / rate, msgs_per_s=rate, p50_ms=1.0, p99_ms=2.0,
                      milter_cpu_s=0.1, client_cpu_s=0.1, other_cpu_s=0.0, rss_mib=1.0)


def test_targets_met_and_missed():
    cells = [
        _cell(bench.C_LABEL, 1, 3000), _cell(bench.EXT_LABEL, 1, 2000),
        _cell(bench.PY_LABEL, 1, 1900),
        _cell(bench.C_LABEL, 32, 3000), _cell(bench.EXT_LABEL, 32, 2100),
        _cell(bench.PY_LABEL, 32, 2200),
    ]
    lines, verdicts = bench.ratio_report(cells, ["session"], [1, 32])
    session = verdicts["session"]
    assert session["ext_ge_pymilter"] is False
    assert session["slower_than_pymilter_at"] == [32]
    assert session["c_within_factor"] is True
    assert abs(session["c_over_ext_at_32"] - 3000 / 2100) < 1e-9
    assert any("MISSED at 32 connections" in line for line in lines)


def test_targets_not_measured_without_pymilter():
    cells = [_cell(bench.C_LABEL, 8, 3000), _cell(bench.EXT_LABEL, 8, 1000)]
    _, verdicts = bench.ratio_report(cells, ["session"], [8])
    assert verdicts["session"]["ext_ge_pymilter"] is None
    assert verdicts["session"]["c_within_factor"] is None


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([7.0], 99) == 7.0
