"""bench_scaling runs and prints a row per milter, variant, cache and concurrency (numbers not
judged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_scaling.py"
ROW = re.compile(r"^(?P<label>.+?)\s+(?P<cache>warm|cold)\s+(?P<conns>\d+)\s+(?P<us>\d+)\s+"
                 r"\d+\s+\d+\s+(?:(?:nan|[\d.]+)\s+){6}(?P<dns>[\d.]+)\s+(?P<threads>\d+)\s+\d+$")


def test_tiny_run_prints_every_cell(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "100", "--warm-names", "100",
         "--rounds", "1", "--concurrency", "1,2", "--no-perf", "--cache", "warm,cold",
         "--variant", "si=import sys; sys.setswitchinterval(0.01)"],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    rows = {(m["label"], m["cache"], int(m["conns"])): m
            for m in map(ROW.match, result.stdout.splitlines()) if m}
    labels = ("C no-op", "ext no-op", "spfmilter", "spfmilter si")
    assert set(rows) == {(label, cache, conns) for label in labels for cache in ("warm", "cold")
                         for conns in (1, 2)}, result.stdout
    for (label, cache, _conns), m in rows.items():
        assert int(m["threads"]) >= 2
        if label.startswith("spfmilter"):  # (100 no-op messages can take under a 10 ms tick)
            assert int(m["us"]) > 0, m.group(0)
            # cold: every message's names new, so looked up
            assert (float(m["dns"]) > 1) == (cache == "cold"), m.group(0)
