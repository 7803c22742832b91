"""Smoke test of bench/bench_dns_query.py: a tiny run prints a row per path and kind.

It checks that the DNS query benchmark runs and reports; it measures nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.procs import ROOT

SCRIPT = ROOT / "bench" / "bench_dns_query.py"
ROW = re.compile(r"^(resolver|client|socketmod|lookup|bare)\s+(txt|nxdomain)\s+(\d+)"
                 r"\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", re.MULTILINE)


def test_bench_dns_query_prints_cpu_per_query_for_every_path():
    out = subprocess.run([sys.executable, str(SCRIPT), "--queries", "20", "--rounds", "2",
                          "--threads", "1,2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = ROW.findall(out.stdout)
    assert sorted((path, kind, int(threads)) for path, kind, threads, *_ in rows) == sorted(
        (path, kind, threads) for path in ("resolver", "client", "socketmod", "lookup", "bare")
        for kind in ("txt", "nxdomain") for threads in (1, 2)), out.stdout
    for *_names, _threads, queries, median, low, high in rows:
        assert int(queries) == 20
        assert 0 < int(low) <= int(median) <= int(high), out.stdout
    assert len(re.findall(r"^client / resolver \((txt|nxdomain), [12] threads\): [\d.]+x",
                          out.stdout, re.MULTILINE)) == 4, out.stdout
    assert len(re.findall(r"^client / socketmod \((txt|nxdomain), [12] threads\): [\d.]+x",
                          out.stdout, re.MULTILINE)) == 4, out.stdout
