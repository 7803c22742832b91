"""Pieces the benchmarks share: /proc readings, percentiles, CLI helpers, the C no-op."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

#: The no-op milter written directly on libmilter: the floor of both benchmarks.
NOOP_C = Path(__file__).resolve().parent / "noop_milter.c"
#: The same no-op on libmilter_ext (every callback overridden, all answer CONTINUE).
NOOP_EXT = Path(__file__).resolve().parent / "noop_libmilter_ext.py"


class BenchError(Exception):
    """The benchmark could not run (build, install, start) or a milter failed under it."""


def cache_dir() -> Path:
    """Where benchmark venvs and binaries are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spfmilter-bench"


def note(text: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(f"# {text}", file=sys.stderr, flush=True)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-int(q * len(sorted_values)) // 100))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def int_list(text: str) -> list[int]:
    """argparse type for "1,8,32"."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers like 1,8,32")
    return values


def machine_line() -> str:
    """'# machine: ...' for the report header."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"# machine: {os.cpu_count()} CPUs {model}; Linux {platform.release()}; "
            f"Python {platform.python_version()}")


def system_busy_seconds() -> float:
    """CPU time all CPUs spent busy (not idle, not waiting for I/O) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (field 3 first), [] if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2:].split()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0 if it is gone."""
    fields = stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def build_c_noop(directory: Path) -> Path:
    """Compile bench/noop_milter.c with -O2 into directory (reused while it is unchanged)."""
    from tests.cmilter import CMilterError, build_noop_milter  # NOOP_C is its SOURCE

    try:
        return build_noop_milter(directory)
    except CMilterError as exc:
        raise BenchError(str(exc)) from None
