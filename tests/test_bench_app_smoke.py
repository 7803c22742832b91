"""Smoke test of bench/bench_spfmilter.py: tiny counts, spfmilter only, a table comes out.

It checks that the application benchmark runs and reports; it measures nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.procs import ROOT

SCRIPT = ROOT / "bench" / "bench_spfmilter.py"
NUMBER = r"\d+(?:\.\d+)?"
ROW = re.compile(
    rf"^spfmilter\s+(cold|warm)\s+(\d+)\s+(\d+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
    rf"\s+\d+\s+{NUMBER}\s+{NUMBER}\s+\d+%\s+{NUMBER}\s+{NUMBER}\s+(\d+)\s+(\d+)$",
    re.MULTILINE,
)


def test_bench_spfmilter_prints_a_table_of_numbers(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--skip-pyspf", "--messages", "30",
         "--concurrency", "1,3", "--warm-names", "20", "--rounds", "1", "--rss-messages", "60",
         "--rss-samples", "2", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "msgs/s" in out.stdout and "p99 ms" in out.stdout
    rows = ROW.findall(out.stdout)
    assert sorted((cache, int(conns)) for cache, conns, *_ in rows) == [
        ("cold", 1), ("cold", 3), ("warm", 1), ("warm", 3)], out.stdout
    for _cache, _conns, msgs, errors, unexpected in rows:
        assert (int(msgs), int(errors), int(unexpected)) == (30, 0, 0), out.stdout
    assert re.search(rf"before {NUMBER} MiB, after {NUMBER} MiB", out.stdout), out.stdout
    assert "RSS flat" in out.stdout
    assert (tmp_path / "r.json").stat().st_size > 0
