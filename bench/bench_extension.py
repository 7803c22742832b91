"""Benchmark libmilter_ext against a C no-op milter and pymilter.

One run on one machine measures the same no-op milter written three ways --
in C directly on libmilter (bench/noop_milter.c, the floor), on
libmilter_ext (bench/noop_libmilter_ext.py) and on pymilter from PyPI
(bench/noop_pymilter.py, run from a throwaway venv) -- at several numbers of
concurrent connections, and prints one table (messages/s, p50/p99 latency,
milter and client CPU, RSS) followed by the ratios and whether the targets
are met:

  * libmilter_ext at least as fast as pymilter at every concurrency;
  * libmilter_ext within 1.5x of the C no-op at 32 connections.

The load is libmilter_ext.testing.MilterClient, one client process per
concurrent connection.  A message is, in mode ``session``, one whole SMTP
session on a new milter connection (negotiate, connect, helo, mail, rcpt,
data, headers, eoh, body, eom, quit); in mode ``reuse``, one transaction
(mail .. eom) on a milter connection kept open across messages.

The script reports; it does not judge: the exit status is 0 whether or not
the targets are met, and non-zero only when the benchmark itself failed.

    .venv/bin/python bench/bench_extension.py                 # full run
    .venv/bin/python bench/bench_extension.py --messages 500 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchlib import (  # noqa: E402
    NOOP_EXT,
    BenchError,
    build_c_noop,
    cache_dir,
    int_list,
    machine_line,
    note,
    percentile,
    proc_cpu_seconds,
    proc_rss_kib,
    system_busy_seconds,
)
from libmilter_ext import protocol as P  # noqa: E402
from libmilter_ext.testing import MilterClient, MilterError, Response  # noqa: E402

EXT_MILTER = NOOP_EXT
PY_MILTER = BENCH / "noop_pymilter.py"

# Stage bits that would let an MTA skip a stage or not wait for its reply.
ALL_STAGE_BITS = (
    P.SMFIP_NOCONNECT | P.SMFIP_NOHELO | P.SMFIP_NOMAIL | P.SMFIP_NORCPT | P.SMFIP_NOBODY
    | P.SMFIP_NOHDRS | P.SMFIP_NOEOH | P.SMFIP_NOUNKNOWN | P.SMFIP_NODATA
    | P.SMFIP_NR_CONN | P.SMFIP_NR_HELO | P.SMFIP_NR_MAIL | P.SMFIP_NR_RCPT
    | P.SMFIP_NR_DATA | P.SMFIP_NR_UNKN | P.SMFIP_NR_EOH | P.SMFIP_NR_BODY | P.SMFIP_NR_HDR
)

# What each message carries, shaped like a small real message from Sendmail.
CLIENT_NAME = "client.bench.example"
CLIENT_IP = "192.0.2.10"
SENDER = "alice@bench.example"
RECIPIENT = "bob@bench.example"
CONNECT_MACROS = {"j": "mx.bench.example", "daemon_name": "MTA", "if_addr": "127.0.0.1"}
MAIL_MACROS = {"i": "4Bq1Xb2Nz9z1", "mail_addr": SENDER}
RCPT_MACROS = {"rcpt_addr": RECIPIENT}
EOM_MACROS = {"i": "4Bq1Xb2Nz9z1"}
HEADERS = (
    ("From", f"Alice <{SENDER}>"),
    ("To", f"Bob <{RECIPIENT}>"),
    ("Subject", "benchmark message"),
    ("Date", "Tue, 1 Jul 2025 12:00:00 +0000"),
    ("Message-ID", "<bench.1@bench.example>"),
)
BODY = b"Hello Bob,\r\n\r\nthis is a small message for the milter benchmark.\r\n" * 4

C_LABEL = "C libmilter"
EXT_LABEL = "libmilter_ext"
EXT_NEG_LABEL = "libmilter_ext (negotiated)"
EXT_FOUR_LABEL = "libmilter_ext (4 stages)"
EXT_DEFERRED_LABEL = "libmilter_ext (4 stages, deferred)"
PY_LABEL = "pymilter"
CANDIDATE_LABEL = "libmilter_ext (candidate)"


@dataclass
class Impl:
    """One milter under test: how to start it and what it must negotiate."""

    label: str
    argv: list[str]
    all_stages: bool
    env: dict[str, str] = field(default_factory=dict)
    version: str = ""


@dataclass
class Cell:
    """The measurements of one implementation at one mode and concurrency."""

    impl: str
    mode: str
    concurrency: int
    messages: int
    wall_s: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    milter_cpu_s: float
    client_cpu_s: float
    other_cpu_s: float
    rss_mib: float

    @property
    def cpu_us_per_msg(self) -> float:
        return self.milter_cpu_s / self.messages * 1e6


# -- the implementations ---------------------------------------------------------------------


def pymilter_python(venv: Path) -> tuple[Path, str]:
    """A Python with pymilter installed in ``venv`` (made if missing); and pymilter's version."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import Milter; print(Milter.__version__)"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True, check=False)
        if found.returncode == 0:
            return python, found.stdout.strip()
    note(f"creating a venv with pymilter from PyPI in {venv} ...")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "pymilter"],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(
                f"{' '.join(cmd)} failed (pymilter needs gcc, libmilter-dev and the Python "
                f"headers):\n{result.stdout}{result.stderr}"
            )
    found = subprocess.run(probe, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise BenchError(f"pymilter installed in {venv} but does not import:\n{found.stderr}")
    return python, found.stdout.strip()


# -- milter processes ------------------------------------------------------------------------


class Running:
    """A milter process serving ``spec``, its stderr going to a file."""

    def __init__(self, impl: Impl, spec: str, workdir: Path) -> None:
        self.impl = impl
        self.spec = spec
        self.errfile = workdir / f"{impl.label.split()[0]}-{os.getpid()}-{id(self)}.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT), **impl.env}
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(
                [*impl.argv, spec], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, env=env, cwd=workdir,
            )
        try:
            self.protocol = self._wait_ready()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> int:
        """Negotiate once to see the milter up; return the protocol flags it asked for."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.impl.label} exited with {self.proc.returncode} before serving "
                    f"{self.spec}:\n{self.stderr()}"
                )
            try:
                with MilterClient(self.spec, timeout=5.0) as client:
                    return client.protocol
            except MilterError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.impl.label} not serving {self.spec} after {timeout}s:\n"
                        f"{self.stderr()}"
                    ) from None
                time.sleep(0.02)

    def stderr(self) -> str:
        try:
            return self.errfile.read_text(errors="replace").strip()
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads) so far."""
        return proc_cpu_seconds(self.proc.pid)

    def rss_mib(self) -> float:
        return proc_rss_kib(self.proc.pid) / 1024

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.impl.label} died with status {self.proc.returncode}:\n{self.stderr()}"
            )

    def signal_stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 20.0) -> str | None:
        """Wait after signal_stop(); a problem as text, None if it stopped cleanly."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"{self.impl.label} ignored SIGTERM for {timeout}s and was killed"
        if status != 0:
            return f"{self.impl.label} exited with status {status}:\n{self.stderr()}"
        return None


# -- the load --------------------------------------------------------------------------------


def _expect(response: Response, what: str) -> None:
    # "skipped"/"noreply" only for stages the negotiated variant asked to skip.
    if not response.continues or (what == "message" and response.action != "continue"):
        raise BenchError(f"{what}: the no-op milter answered {response.action!r}")


def _transaction(client: MilterClient) -> None:
    _expect(client.mail(SENDER, macros=MAIL_MACROS), "mail")
    _expect(client.rcpt(RECIPIENT, macros=RCPT_MACROS), "rcpt")
    _expect(client.data(), "data")
    _expect(client.message(HEADERS, BODY, EOM_MACROS), "message")


def _open(spec: str) -> MilterClient:
    client = MilterClient(spec, timeout=30.0)
    client.open()
    _expect(client.connect(CLIENT_NAME, CLIENT_IP, 40000, "4", CONNECT_MACROS), "connect")
    _expect(client.helo(CLIENT_NAME), "helo")
    return client


def _session(spec: str) -> None:
    client = _open(spec)
    try:
        _transaction(client)
    finally:
        client.close()


def _worker(spec: str, mode: str, warmup: int, count: int,
            barrier: threading.Barrier, results: multiprocessing.Queue) -> None:
    """One concurrent connection: warm up, wait for the others, then time ``count`` messages."""
    client = None
    try:
        if mode == "reuse":
            client = _open(spec)
            one = lambda: _transaction(client)  # noqa: E731
        else:
            one = lambda: _session(spec)  # noqa: E731
        for _ in range(warmup):
            one()
        barrier.wait()
        clock = time.perf_counter
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        latencies = []
        for _ in range(count):
            t0 = clock()
            one()
            latencies.append(clock() - t0)
        end = time.monotonic()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        results.put(("ok", start, end, cpu, latencies))
    except threading.BrokenBarrierError:
        results.put(("broken", "another client failed"))
    except BaseException as exc:  # reported to the parent, which fails the run
        barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if client is not None:
            client.close()


def run_cell(milter: Running, mode: str, concurrency: int, messages: int,
             warmup: int) -> Cell:
    """Drive ``milter`` with ``concurrency`` client processes; measure ``messages`` messages."""
    mp = multiprocessing.get_context("fork")
    barrier = mp.Barrier(concurrency + 1)
    results = mp.Queue()
    shares = [messages // concurrency + (i < messages % concurrency) for i in range(concurrency)]
    warm = max(1, -(-warmup // concurrency))
    procs = [
        mp.Process(target=_worker, args=(milter.spec, mode, warm, n, barrier, results),
                   daemon=True)
        for n in shares
    ]
    for proc in procs:
        proc.start()
    outcomes = []
    try:
        try:
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:
            pass
        cpu0, busy0 = milter.cpu_seconds(), system_busy_seconds()
        for _ in procs:
            outcomes.append(results.get(timeout=900))
        cpu1, busy1 = milter.cpu_seconds(), system_busy_seconds()
        rss = milter.rss_mib()
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [o[1] for o in outcomes if o[0] == "error"]
    if errors or any(o[0] != "ok" for o in outcomes):
        milter.alive()
        raise BenchError(f"{milter.impl.label}, {mode}, {concurrency} connections: "
                         + "; ".join(sorted(set(errors)) or ["a client failed"]))
    start = min(o[1] for o in outcomes)
    end = max(o[2] for o in outcomes)
    latencies = sorted(x for o in outcomes for x in o[4])
    wall = end - start
    client_cpu = sum(o[3] for o in outcomes)
    other_cpu = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - client_cpu)
    return Cell(
        impl=milter.impl.label, mode=mode, concurrency=concurrency, messages=len(latencies),
        wall_s=wall, msgs_per_s=len(latencies) / wall if wall > 0 else float("inf"),
        p50_ms=percentile(latencies, 50) * 1e3, p99_ms=percentile(latencies, 99) * 1e3,
        milter_cpu_s=cpu1 - cpu0, client_cpu_s=client_cpu, other_cpu_s=other_cpu,
        rss_mib=rss,
    )


# -- report ----------------------------------------------------------------------------------

TABLE_HEAD = (
    f"{'implementation':<27} {'mode':<7} {'conns':>5} {'msgs/s':>8} {'p50 ms':>7} "
    f"{'p99 ms':>7} {'milter CPU s':>12} {'us/msg':>6} {'client CPU s':>12} {'other':>5} "
    f"{'RSS MiB':>7}"
)


def format_cell(cell: Cell, ncpu: int) -> str:
    other = cell.other_cpu_s / (cell.wall_s * ncpu) * 100 if cell.wall_s > 0 else 0.0
    return (
        f"{cell.impl:<27} {cell.mode:<7} {cell.concurrency:>5} {cell.msgs_per_s:>8.0f} "
        f"{cell.p50_ms:>7.3f} {cell.p99_ms:>7.3f} {cell.milter_cpu_s:>12.2f} "
        f"{cell.cpu_us_per_msg:>6.0f} {cell.client_cpu_s:>12.2f} {other:>4.0f}% "
        f"{cell.rss_mib:>7.1f}"
    )


def median_cells(rounds: Sequence[Sequence[Cell]]) -> list[Cell]:
    """Per implementation, mode and concurrency: the round with the median msgs/s."""
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for cells in rounds:
        for cell in cells:
            groups.setdefault((cell.impl, cell.mode, cell.concurrency), []).append(cell)
    chosen = []
    for group in groups.values():
        group.sort(key=lambda c: c.msgs_per_s)
        chosen.append(group[(len(group) - 1) // 2])
    return chosen


def ratio_report(cells: list[Cell], modes: Sequence[str], concurrencies: Sequence[int],
                 target_conns: int = 32, c_factor: float = 1.5,
                 ext_label: str = EXT_LABEL) -> tuple[list[str], dict]:
    """Lines comparing libmilter_ext with pymilter and C, and the verdict on the targets."""
    by = {(c.impl, c.mode, c.concurrency): c for c in cells}
    lines = [
        "",
        f"ratios of {ext_label} (ext): msgs/s (targets: ext/py >= 1 everywhere, C/ext <= "
        f"{c_factor} at {target_conns} connections) and milter CPU per message (lower is better)",
        f"{'mode':<7} {'conns':>5} {'ext/py msgs/s':>13} {'C/ext msgs/s':>12} "
        f"{'ext/py CPU/msg':>14} {'ext/C CPU/msg':>13}",
    ]
    verdicts: dict = {}
    for mode in modes:
        slower_than_py: list[int] = []
        compared_py = False
        c_ratio_at_target = None
        for conns in concurrencies:
            ext = by.get((ext_label, mode, conns))
            py = by.get((PY_LABEL, mode, conns))
            cc = by.get((C_LABEL, mode, conns))
            if ext is None:
                continue
            ext_py = ext.msgs_per_s / py.msgs_per_s if py else None
            c_ext = cc.msgs_per_s / ext.msgs_per_s if cc else None
            py_cpu = ext.cpu_us_per_msg / py.cpu_us_per_msg if py and py.milter_cpu_s else None
            c_cpu = ext.cpu_us_per_msg / cc.cpu_us_per_msg if cc and cc.milter_cpu_s else None
            lines.append(
                f"{mode:<7} {conns:>5} {_x(ext_py):>13} {_x(c_ext):>12} "
                f"{_x(py_cpu):>14} {_x(c_cpu):>13}"
            )
            if ext_py is not None:
                compared_py = True
                if ext_py < 1.0:
                    slower_than_py.append(conns)
            if conns == target_conns:
                c_ratio_at_target = c_ext
        py_ok = None if not compared_py else not slower_than_py
        c_ok = None if c_ratio_at_target is None else c_ratio_at_target <= c_factor
        verdicts[mode] = {
            "ext_ge_pymilter": py_ok, "slower_than_pymilter_at": slower_than_py,
            f"c_over_ext_at_{target_conns}": c_ratio_at_target, "c_within_factor": c_ok,
        }
        py_text = ("not measured" if py_ok is None else "met" if py_ok
                   else f"MISSED at {', '.join(map(str, slower_than_py))} connections")
        c_text = ("not measured" if c_ok is None
                  else f"{'met' if c_ok else 'MISSED'} (C/ext {c_ratio_at_target:.2f}x)")
        lines.append(f"targets, {mode}: {ext_label} >= pymilter at every concurrency: "
                     f"{py_text}; within {c_factor}x of C at {target_conns} connections: "
                     f"{c_text}")
    return lines, verdicts


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def environment(impls: Sequence[Impl], args: argparse.Namespace, loadavg: str) -> list[str]:
    versions = ", ".join(f"{i.label} {i.version}" for i in impls if i.version)
    return [
        machine_line(),
        f"# milters: {versions}",
        f"# load: {args.messages} messages per cell after {args.warmup} warm-up messages, "
        f"{args.rounds} round(s) (median shown); one MilterClient process per connection; "
        f"socket {args.socket}; load average before: {loadavg}",
        "# session = new milter connection per message (negotiate .. quit); "
        "reuse = mail .. eom on one open connection",
        "# us/msg = milter CPU per message; other = CPU used by processes outside the "
        "benchmark, % of the machine",
    ]


# -- main ------------------------------------------------------------------------------------


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("session", "reuse")]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: modes are session and reuse")
    return modes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare libmilter_ext with a C no-op milter and pymilter.",
    )
    parser.add_argument("--messages", type=int, default=3000,
                        help="messages measured per cell (default 3000)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up messages per cell, spread over the connections "
                             "(default: a tenth of --messages)")
    parser.add_argument("--concurrency", type=int_list, default=[1, 8, 32],
                        help="comma-separated numbers of concurrent connections (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat the whole matrix; the table shows each cell's median "
                             "round by msgs/s (default 3)")
    parser.add_argument("--modes", type=mode_list, default=["session", "reuse"],
                        help="session, reuse or both (default session,reuse)")
    parser.add_argument("--socket", choices=("unix", "inet"), default="unix",
                        help="milter socket kind (default unix)")
    parser.add_argument("--skip-pymilter", action="store_true",
                        help="leave pymilter out (for quick smoke runs; a real run includes it)")
    parser.add_argument("--no-negotiated", action="store_true",
                        help="leave out the libmilter_ext variant that overrides only "
                             "envfrom and eom")
    parser.add_argument("--deferred", action="store_true",
                        help="add two libmilter_ext rows with spfmilter's stages (connect, "
                             "helo, envfrom, eom, close): as they are, and with connect "
                             "and helo @deferred and the default close")
    parser.add_argument("--pymilter-venv", type=Path, default=None,
                        help="venv for pymilter, made if missing (default: "
                             "~/.cache/spfmilter-bench/pymilter-pyX.Y)")
    parser.add_argument("--fresh-venv", action="store_true",
                        help="install pymilter into a throwaway venv under the temp dir")
    parser.add_argument("--candidate", type=Path, default=None, metavar="DIR",
                        help="also measure the libmilter_ext package found in DIR (a "
                             "candidate build with its _milter .so), all stages overridden")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.warmup is None:
        args.warmup = max(1, args.messages // 10)
    return args


def make_impls(args: argparse.Namespace, tmp: Path) -> list[Impl]:
    import libmilter_ext

    libmilter = ".".join(map(str, libmilter_ext.version()))
    c_binary = build_c_noop(cache_dir())
    impls = [
        Impl(C_LABEL, [str(c_binary)], True, version=f"libmilter {libmilter}"),
        Impl(EXT_LABEL, [sys.executable, str(EXT_MILTER)], True, version="(this tree)"),
    ]
    if args.candidate:
        package = args.candidate.resolve() / "libmilter_ext"
        if not package.is_dir():
            raise BenchError(f"--candidate {args.candidate}: no libmilter_ext package in it")
        impls.append(Impl(CANDIDATE_LABEL, [sys.executable, str(EXT_MILTER)], True,
                          env={"PYTHONPATH": str(args.candidate.resolve())},
                          version=f"(from {args.candidate})"))
    if not args.no_negotiated:
        impls.append(Impl(EXT_NEG_LABEL, [sys.executable, str(EXT_MILTER), "--negotiated"],
                          False))
    if args.deferred:
        impls.append(Impl(EXT_FOUR_LABEL, [sys.executable, str(EXT_MILTER), "--four"], False))
        impls.append(Impl(EXT_DEFERRED_LABEL, [sys.executable, str(EXT_MILTER), "--deferred"],
                          False))
    if not args.skip_pymilter:
        if args.fresh_venv:
            venv = tmp / "pymilter-venv"
        else:
            venv = args.pymilter_venv or (
                cache_dir() / f"pymilter-py{sys.version_info[0]}.{sys.version_info[1]}"
            )
        python, version = pymilter_python(venv)
        impls.append(Impl(PY_LABEL, [str(python), str(PY_MILTER)], True,
                          version=f"pymilter {version}"))
    return impls


def socket_spec(kind: str, tmp: Path, index: int) -> str:
    if kind == "unix":
        return f"unix:{tmp}/m{index}.sock"
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"inet:{probe.getsockname()[1]}@127.0.0.1"


def run(args: argparse.Namespace) -> int:
    ncpu = os.cpu_count() or 1
    rounds: list[list[Cell]] = []
    milters: list[Running] = []
    problems: list[str] = []
    # A short directory: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="mbench-") as tmpname:
        tmp = Path(tmpname)
        impls = make_impls(args, tmp)
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        try:
            for index, impl in enumerate(impls):
                milter = Running(impl, socket_spec(args.socket, tmp, index), tmp)
                milters.append(milter)
                stage_bits = milter.protocol & ALL_STAGE_BITS
                if impl.all_stages and stage_bits:
                    raise BenchError(
                        f"{impl.label} negotiated {P.flag_names(stage_bits, 'SMFIP_')}; "
                        f"the comparison needs every stage sent and answered"
                    )
            # Implementations take turns cell by cell, so a change in the machine's
            # background load during the run does not fall on one of them alone.
            for number in range(1, args.rounds + 1):
                cells = []
                for mode in args.modes:
                    for conns in args.concurrency:
                        for milter in milters:
                            cell = run_cell(milter, mode, conns, args.messages, args.warmup)
                            cells.append(cell)
                            note(f"round {number}/{args.rounds}: {format_cell(cell, ncpu)}")
                rounds.append(cells)
            for milter in milters:
                milter.alive()
        finally:
            # libmilter notices a stop request only every 5 s: signal all, then wait.
            for milter in milters:
                milter.signal_stop()
            for milter in milters:
                problem = milter.wait_stopped()
                if problem:
                    problems.append(problem)
    order = {impl.label: n for n, impl in enumerate(impls)}
    cells = sorted(median_cells(rounds), key=lambda c: (
        order[c.impl], args.modes.index(c.mode), args.concurrency.index(c.concurrency)))
    print("\n".join(environment(impls, args, loadavg)))
    print(TABLE_HEAD)
    for cell in cells:
        print(format_cell(cell, ncpu))
    lines, verdicts = ratio_report(cells, args.modes, args.concurrency)
    if args.candidate:
        more, verdicts["candidate"] = ratio_report(
            cells, args.modes, args.concurrency, ext_label=CANDIDATE_LABEL)
        lines += more
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "cells": [{**asdict(c), "cpu_us_per_msg": c.cpu_us_per_msg} for c in cells],
            "rounds": [[asdict(c) for c in r] for r in rounds],
            "targets": verdicts,
        }, indent=2))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
