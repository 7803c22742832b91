"""bench_scaling runs and prints a row per milter, variant and concurrency (numbers not judged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_scaling.py"
ROW = re.compile(r"^(?P<label>.+?)\s+(?P<conns>\d+)\s+(?P<us>\d+)\s+\d+\s+\d+\s+"
                 r"(?:(?:nan|[\d.]+)\s+){6}(?P<threads>\d+)\s+\d+$")


def test_tiny_run_prints_every_cell(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "40", "--warm-names", "100",
         "--rounds", "1", "--concurrency", "1,2", "--no-perf",
         "--variant", "si=import sys; sys.setswitchinterval(0.01)"],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    rows = {(m["label"], int(m["conns"])): m for m in map(ROW.match, result.stdout.splitlines())
            if m}
    labels = ("C no-op", "ext no-op", "spfmilter", "spfmilter si")
    assert set(rows) == {(label, conns) for label in labels for conns in (1, 2)}, result.stdout
    for m in rows.values():
        assert int(m["us"]) > 0 and int(m["threads"]) >= 2
