"""Smoke test of bench/soak.py: a few hundred messages, normal and hostile, through the daemon.

The figures must meet the soak's goals: daemon alive, no protocol errors or
timeouts besides the deliberate drops, no bad header field, no wrong
verdict, flat RSS.  Long runs: ``.venv/bin/python bench/soak.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import ROOT

SCRIPT = ROOT / "bench" / "soak.py"


def test_soak_small(tmp_path):
    report = tmp_path / "soak.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "320", "--timeout-every", "80",
         "--lookup-timeout", "1", "--warmup", "100", "--json", str(report)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(report.read_text())
    assert figures["alive"] is True
    assert (figures["errors"], figures["header_problems"], figures["wrong_verdicts"],
            figures["daemon_tracebacks"]) == (0, 0, 0, 0), out.stdout
    assert figures["rss_flat"] is True, out.stdout
    counts = figures["messages"]
    assert sum(counts.values()) == 320
    # Every part of the mix was played, the DNS timeouts included.
    assert set(counts) == {"normal", "dns", "hostile", "drop"}, counts
    assert counts["hostile"] >= 40 and counts["drop"] >= 5 and counts["dns"] >= 4, counts
    assert "daemon alive: yes" in out.stdout
