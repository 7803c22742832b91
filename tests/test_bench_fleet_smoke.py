"""Smoke test of bench/bench_fleet.py: 1, 2 and 3 MX hosts in network namespaces, tiny.

Every message is accepted through every MTA with its own spfmilter, the
table has its shape, and the queries reaching the authoritative server stay
flat as MX hosts are added (the resolver's cache is shared: the same
questions reach it, each once, not counting the resolver's retransmissions
when an answer is late under load).  Full run:
``.venv/bin/python bench/bench_fleet.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import ROOT

SCRIPT = ROOT / "bench" / "bench_fleet.py"
MESSAGES = 24


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_fleet_small(tmp_path):
    before = namespaces()
    report = tmp_path / "fleet.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", str(MESSAGES), "--json", str(report)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert namespaces() == before, "the run left namespaces behind"
    rows = json.loads(report.read_text())
    assert [r["mx_hosts"] for r in rows] == [1, 2, 3]
    assert [r["mtas"] for r in rows] == ["postfix", "postfix+sendmail",
                                         "postfix+sendmail+postfix"]
    for row in rows:
        assert (row["messages"], row["accepted"]) == (MESSAGES, MESSAGES), row
        assert row["probe_failures"] == [] and row["probe_transactions"] >= 20, row
        assert row["milters_alive"] and row["milter_tracebacks"] == 0, row
        assert row["msgs_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row
        assert row["milter_cpu_ms_per_msg"] >= 0, row
        # 13 names in all (bench/fleet-zones): some milter asks for each of them
        assert row["resolver_queries"] >= 13 and row["auth_queries"] > 0, row
        assert row["auth_queries"] >= row["auth_misses"] >= 13, row
        # each question reached NSD once (a resolver's retransmission, sent before
        # the slow answer came, is no second miss): one shared cache
        assert row["auth_misses"] == len(row["auth_questions"]), row
    # flat: the same questions, each asked once, whatever the number of MX hosts
    assert all(r["auth_questions"] == rows[0]["auth_questions"] for r in rows), rows
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["MX", "MTAs", "msgs", "msg/s"], out.stdout
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"], out.stdout
