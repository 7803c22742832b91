"""Where a milter's CPU per message goes as connections grow (issue 12's scaling target).

Runs spfmilter and the floor milters (bench/noop_milter.c on libmilter, and
bench/noop_libmilter_ext.py in spfmilter's shape: connect and helo deferred,
envfrom, eom) under bench_spfmilter's load, at several numbers of
connections, and prints per message: milter CPU (user and system), context
switches, threads created, system calls (futex, poll, read, write), the DNS
queries NSD answered and the most threads seen at once.  The counts come from
``perf stat`` on the milter's process (software events and syscall
tracepoints: cheap, every thread, including threads that end during the
cell); the CPU from /proc/PID/stat.

``--cache warm`` (the default) measures messages whose names the warm-up
already looked up; ``--cache cold`` messages whose names are new (a tag per
cell, bench_spfmilter's cold messages: about two uncached queries each), after
the same warm-up, so both measure a milter whose threads and code are warm.
``--gil`` adds uprobes on the Python binary's PyEval_SaveThread (every
Py_BEGIN_ALLOW_THREADS: a GIL release around a blocking call) and
PyGILState_Release (the end of each libmilter_ext callback) and counts them
per message: the GIL releases a cell makes, contended or not.

Variants (``--variant NAME=CODE``) run spfmilter with Python CODE executed
before the daemon starts (e.g. ``--variant si5=import sys;
sys.setswitchinterval(0.005)``): an A/B of a setting without editing the
tree.  Every round runs every milter and variant once per concurrency, in
turn, so A and B share the machine's load; the table shows each cell's
median over the rounds.

    .venv/bin/python bench/bench_scaling.py                      # as root (perf)
    .venv/bin/python bench/bench_scaling.py --milters spfmilter --rounds 3 \\
        --variant "si20=import sys; sys.setswitchinterval(0.02)"
    .venv/bin/python bench/bench_scaling.py --no-perf            # CPU only, no root
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_app_dns import Nsd  # noqa: E402
from bench_app_load import ENFORCING, NOOP  # noqa: E402
from bench_spfmilter import MilterProc, MilterSpec, drive, spfmilter_config  # noqa: E402
from benchlib import (  # noqa: E402
    NOOP_EXT,
    BenchError,
    build_c_noop,
    cache_dir,
    int_list,
    machine_line,
    stat_fields,
)

#: perf events counted per cell, and the column each becomes.
EVENTS = {
    "context-switches": "cs",
    "sched:sched_process_fork": "threads+",
    "syscalls:sys_enter_futex": "futex",
    "syscalls:sys_enter_poll": "poll",
    "syscalls:sys_enter_read": "read",
    "syscalls:sys_enter_write": "write",
}
#: uprobes on the Python binary (--gil): each is one release of the GIL.
GIL_PROBES = {"PyEval_SaveThread": "gil-bt", "PyGILState_Release": "gil-cb"}
MILTERS = ("spfmilter", "C no-op", "ext no-op")
CACHES = ("warm", "cold")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    label: str
    cache: str
    conns: int
    messages: int
    user_s: float
    system_s: float
    counts: dict[str, float]
    max_threads: int
    msgs_per_s: float

    def per_msg(self, key: str) -> float:
        return self.counts.get(key, float("nan")) / self.messages


def _spfmilter_argv(cfg: Path, code: str) -> list[str]:
    boot = f"{code}\nimport sys\nfrom spfmilter.cli import main\nsys.exit(main())"
    return [sys.executable, "-c", boot, "-c", str(cfg), "run", "--stderr"]


def specs(args: argparse.Namespace, tmp: Path, nsd: Nsd) -> list[MilterSpec]:
    cfg, sock = spfmilter_config(tmp, nsd.nameserver)
    out = []
    if "spfmilter" in args.milters:
        out.append(MilterSpec("spfmilter", _spfmilter_argv(cfg, ""), sock,
                              [tmp / "spf.sock", tmp / "spf.pid"], "this tree"))
        for name, code in args.variant:
            out.append(MilterSpec(f"spfmilter {name}", _spfmilter_argv(cfg, code), sock,
                                  [tmp / "spf.sock", tmp / "spf.pid"], "this tree"))
    if "C no-op" in args.milters:
        c_sock = tmp / "noop-c.sock"
        out.append(MilterSpec("C no-op", [str(build_c_noop(cache_dir())), f"unix:{c_sock}"],
                              f"unix:{c_sock}", [c_sock], "libmilter", check=NOOP))
    if "ext no-op" in args.milters:
        e_sock = tmp / "noop-ext.sock"
        out.append(MilterSpec("ext no-op", [sys.executable, str(NOOP_EXT), "--deferred",
                                            f"unix:{e_sock}"],
                              f"unix:{e_sock}", [e_sock], "this tree", check=NOOP))
    return out


def _user_system(pid: int) -> tuple[float, float]:
    fields = stat_fields(pid)
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _thread_sampler(pid: int, stop: threading.Event, seen: list[int]) -> None:
    while not stop.wait(0.02):
        try:
            seen.append(len(os.listdir(f"/proc/{pid}/task")))
        except OSError:
            return


def gil_probes() -> dict[str, str]:
    """perf event names of GIL_PROBES on this Python binary, added unless present."""
    exe = os.path.realpath(sys.executable)
    listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True,
                            check=False).stdout
    events = {}
    for func, column in GIL_PROBES.items():
        if not any(f"on {func} in {exe}" in line for line in listed.splitlines()):
            done = subprocess.run(["perf", "probe", "-q", "-x", exe, "-a", func],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BenchError(f"perf probe -x {exe} -a {func}: {done.stderr.strip()}")
            listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True,
                                    check=False).stdout
        line = next(x for x in listed.splitlines() if f"on {func} in {exe}" in x)
        events[line.split()[0]] = column
    return events


def _perf_start(pid: int, out: Path, events: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = ["perf", "stat", "-x", ",", "-o", str(out), "-p", str(pid)]
    for event in events:
        argv += ["-e", event]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches to every thread before the load starts
    return proc


def _perf_stop(proc: subprocess.Popen[bytes], out: Path,
               events: dict[str, str]) -> dict[str, float]:
    proc.send_signal(2)
    proc.wait(10)
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in events and parts[0].replace(".", "").isdigit():
            counts[events[parts[2]]] = float(parts[0])
    return counts


def cell(spec: MilterSpec, cache: str, conns: int, args: argparse.Namespace, tmp: Path,
         nsd: Nsd, tag: str) -> Row:
    """One milter process: the warm-up, then ``args.messages`` measured messages."""
    milter = MilterProc(spec, tmp)
    try:
        drive(milter, nsd, range(args.warm_names), conns, None, args.warm_names, False)
        perf_out = tmp / "perf.csv"
        perf = _perf_start(milter.pid, perf_out, args.events) if args.perf else None
        record = None
        if args.record:
            name = f"{spec.label.replace(' ', '_')}-{conns}.data"
            what = ["-e", args.record_event] if args.record_event else ["-F", "999"]
            record = subprocess.Popen(["perf", "record", "-q", *args.record_graph, *what, "-p",
                                       str(milter.pid), "-o", str(args.record / name)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        stop, seen = threading.Event(), []
        sampler = threading.Thread(target=_thread_sampler, args=(milter.pid, stop, seen))
        sampler.start()
        u0, s0 = _user_system(milter.pid)
        load = drive(milter, nsd, range(args.messages), conns,
                     tag if cache == "cold" else None, args.warm_names,
                     spec.check == ENFORCING)
        u1, s1 = _user_system(milter.pid)
        stop.set()
        sampler.join()
        counts = _perf_stop(perf, perf_out, args.events) if perf is not None else {}
        counts["dns"] = load.dns_queries
        if record is not None:
            record.send_signal(2)
            record.wait(30)
        milter.check_alive()
        if load.errors or load.unexpected:
            raise BenchError(f"{spec.label}: {load.errors} errors, {load.unexpected} "
                             f"unexpected: {load.first_error}")
        n = len(load.latencies)
        return Row(spec.label, cache, conns, n, u1 - u0, s1 - s0, counts, max(seen, default=0),
                   n / load.wall_s)
    finally:
        milter.stop()


COLUMNS = ["cs", "threads+", "futex", "poll", "read", "write", "dns"]


def table(rows: Sequence[Row], gil: bool = False) -> list[str]:
    columns = COLUMNS + list(GIL_PROBES.values()) if gil else COLUMNS
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.label, row.cache, row.conns), []).append(row)
    head = (f"{'milter':<22} {'cache':<5} {'conns':>5} {'us/msg':>7} {'user':>6} {'sys':>6} "
            + " ".join(f"{c:>8}" for c in columns) + f" {'threads':>7} {'msgs/s':>7}")
    lines = [head]
    for (label, cache, conns), group in sorted(groups.items(),
                                               key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        def med(values: list[float]) -> float:
            return statistics.median(values)
        user = med([r.user_s / r.messages * 1e6 for r in group])
        system = med([r.system_s / r.messages * 1e6 for r in group])
        total = med([(r.user_s + r.system_s) / r.messages * 1e6 for r in group])
        counts = " ".join(f"{med([r.per_msg(c) for r in group]):>8.2f}" for c in columns)
        lines.append(f"{label:<22} {cache:<5} {conns:>5} {total:>7.0f} {user:>6.0f} {system:>6.0f} "
                     f"{counts} {max(r.max_threads for r in group):>7} "
                     f"{med([r.msgs_per_s for r in group]):>7.0f}")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500, help="messages per cell")
    parser.add_argument("--concurrency", type=int_list, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default="warm", help="warm, cold or warm,cold")
    parser.add_argument("--warm-names", type=int, default=500)
    parser.add_argument("--milters", default=",".join(MILTERS),
                        help=f"comma-separated, of {', '.join(MILTERS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CODE",
                        help="also run spfmilter with Python CODE run first")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="also perf record -g each cell into DIR/MILTER-CONNS.data")
    parser.add_argument("--record-event", metavar="EVENT",
                        help="what --record samples (default: cpu-clock at 999 Hz), e.g. "
                        "syscalls:sys_enter_futex")
    parser.add_argument("--no-perf", dest="perf", action="store_false",
                        help="leave perf stat out (CPU, threads and msgs/s only)")
    parser.add_argument("--gil", action="store_true",
                        help="also count GIL releases per message (uprobes on the Python "
                        "binary, see above)")
    parser.add_argument("--record-dwarf", action="store_true",
                        help="--record with --call-graph dwarf (stacks through libc)")
    args = parser.parse_args(argv)
    args.record_graph = ["--call-graph", "dwarf,16384"] if args.record_dwarf else ["-g"]
    args.milters = [m.strip() for m in args.milters.split(",")]
    args.cache = [c.strip() for c in args.cache.split(",")]
    if set(args.cache) - set(CACHES) or not args.cache:
        parser.error(f"--cache {','.join(args.cache)}: want warm, cold or both")
    if args.gil and not args.perf:
        parser.error("--gil counts with perf: drop --no-perf")
    unknown = set(args.milters) - set(MILTERS)
    if unknown:
        parser.error(f"unknown milters: {', '.join(sorted(unknown))}")
    variants = []
    for item in args.variant:
        name, sep, code = item.partition("=")
        if not sep or not name:
            parser.error(f"--variant {item!r}: want NAME=CODE")
        variants.append((name, code))
    args.variant = variants
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.events = dict(EVENTS)
    if args.gil:
        args.events.update(gil_probes())
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="spfscale-") as tmpname, Nsd() as nsd:
        tmp = Path(tmpname)
        print(f"{machine_line()}; load {os.getloadavg()[0]:.1f}", flush=True)
        tags = (f"s{n}x" for n in itertools.count())  # each cold cell's names are new
        for rnd in range(args.rounds):
            for conns in args.concurrency:
                for cache in args.cache:
                    for spec in specs(args, tmp, nsd):
                        row = cell(spec, cache, conns, args, tmp, nsd, next(tags))
                        rows.append(row)
                        print(f"# round {rnd + 1} {row.label} {cache} {conns}: "
                              f"{(row.user_s + row.system_s) / row.messages * 1e6:.0f} "
                              f"us/msg (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
                              flush=True)
    print(f"# {args.messages} messages per cell, {'/'.join(args.cache)}, {args.rounds} rounds "
          f"(medians); load at the end {os.getloadavg()[0]:.1f}")
    print("\n".join(table(rows, args.gil)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
