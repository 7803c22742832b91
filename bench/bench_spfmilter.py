"""Application benchmark: spfmilter against spf-engine's pyspf-milter, same zones, same load.

Runs the real spfmilter daemon and spf-engine 3.1.0's ``pyspf-milter`` (from
PyPI, in a throwaway venv) side by side against one NSD serving
tests/data/zones and bench/zones, drives each with the same messages
(bench_app_load: a realistic mix of pass, include, redirect, mx, a, null
sender, softfail, neutral, none, NXDOMAIN, fail, HELO fail, permerror and
temperror, every message one whole SMTP session on a new milter connection)
at several numbers of concurrent connections, with a cold and a warm DNS
cache, and prints one table:

  milter x cache x connections -> messages/s, p50/p99 latency, milter CPU,
  client CPU, DNS server CPU and queries, RSS, errors and unexpected verdicts;

then spfmilter's RSS at the start, peak and end of a long run (50,000
messages by default), whether spfmilter and pyspf-milter gave the same
verdicts, the ratios, and whether the targets are met:

  * at 32 connections with a warm cache, spfmilter at least 3x pyspf-milter's
    messages/s and a lower p99 latency;
  * spfmilter's RSS flat over the long run;
  * issue 12's targets, judged from the table (app_table.issue12_targets).

Cold: the milter is restarted before the cell and every message uses names
never queried before.  Warm: after a warm-up pass over a fixed set of names,
the cell reuses them.  pyspf-milter keeps no DNS cache between messages, so
for it the two differ only by the restart.

pyspf-milter reads /etc/resolv.conf only, so with it the benchmark re-runs
itself inside a private network namespace (root and iproute2 needed) where
NSD listens on 127.0.0.1:53; see bench_app_dns.  The exit status is 0
whether or not the targets are met, non-zero when the benchmark itself failed
(a milter died, a message got no answer).

    .venv/bin/python bench/bench_spfmilter.py                     # full run, as root
    .venv/bin/python bench/bench_spfmilter.py --messages 500 --rss-messages 5000
    .venv/bin/python bench/bench_spfmilter.py --skip-pyspf        # spfmilter only
    .venv/bin/python bench/bench_spfmilter.py --opendmarc         # + OpenDMARC, as root

--opendmarc adds Debian's OpenDMARC checking SPF itself (libspf2; it only
adds headers) as the C row; it must be installed already (/usr/sbin/opendmarc).
--floors adds the no-op milters of bench_extension (bench/noop_milter.c on
libmilter, bench/noop_libmilter_ext.py) as floor rows under the same load.
--markdown FILE writes the table, the RSS run and issue 12's targets as
Markdown, for a closing note.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from app_table import (  # noqa: E402
    C_NOOP_LABEL,
    EXT_NOOP_LABEL,
    OPENDMARC_LABEL,
    PYSPF_LABEL,
    SPF_LABEL,
    issue12_targets,
    markdown,
    target_lines,
)
from bench_app_dns import (  # noqa: E402
    DnsError,
    Nsd,
    inside_netns,
    run_in_netns,
)
from bench_app_load import (  # noqa: E402
    AUTHSERV_ID,
    ENFORCING,
    HEADERS_ONLY,
    KINDS,
    NOOP,
    SCHEDULE,
    Outcome,
    WorkerResult,
    message,
    same,
    worker,
)
from benchlib import (  # noqa: E402
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

from libmilter_ext.testing import MilterClient, MilterError  # noqa: E402

SPF_ENGINE = "3.1.0"
OPENDMARC = Path("/usr/sbin/opendmarc")
TARGET_CONNS = 32
TARGET_RATIO = 3.0
#: RSS counts as flat when it grew by at most this many MiB ...
RSS_FLAT_MIB = 2.0
#: ... or by at most this fraction of where it started, whichever is larger.
RSS_FLAT_FRACTION = 0.03


# -- the milters -----------------------------------------------------------------------------


def default_venv() -> Path:
    return cache_dir() / f"spf-engine-{SPF_ENGINE}-py{sys.version_info[0]}.{sys.version_info[1]}"


_PROBE = ("import spf_engine, Milter, spf, dns.version; "
          "print(spf_engine.__version__, Milter.__version__, spf.__version__.split()[0], "
          "dns.version.version)")


def pyspf_versions(venv: Path) -> dict[str, str] | None:
    """Versions of spf-engine, pymilter, pyspf, dnspython in venv, or None if not usable."""
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "bin" / "pyspf-milter").exists()):
        return None
    found = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                           check=False)
    if found.returncode != 0:
        return None
    names = ("spf-engine", "pymilter", "pyspf", "dnspython")
    return dict(zip(names, found.stdout.split()))


def ensure_pyspf_venv(venv: Path) -> dict[str, str]:
    """A venv with spf-engine[milter] and dnspython from PyPI (made if missing); versions."""
    versions = pyspf_versions(venv)
    if versions and versions["spf-engine"] == SPF_ENGINE:
        return versions
    note(f"installing spf-engine {SPF_ENGINE} with pymilter and dnspython into {venv} ...")
    python = venv / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"spf-engine[milter]=={SPF_ENGINE}", "dnspython"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed (pymilter needs gcc, libmilter-dev and "
                             f"the Python headers):\n{done.stdout}{done.stderr}")
    versions = pyspf_versions(venv)
    if versions is None:
        raise BenchError(f"spf-engine installed in {venv} but pyspf-milter does not import")
    return versions


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spfmilter_config(workdir: Path, nameserver: str, metrics: bool = False) -> tuple[Path, str]:
    """Our default policy, no internal hosts (the zones' clients are 192.0.2/24, 2001:db8::/32);
    metrics: with the Prometheus endpoint on (a free loopback port)."""
    spec = f"unix:{workdir}/spf.sock"
    path = workdir / "spfmilter.cfg"
    path.write_text(f"""\
[milter]
socket = {spec}
user =
group =
pidfile = {workdir}/spf.pid
log_target = stderr
log_level = info

[spf]
authserv_id = {AUTHSERV_ID}
nameservers = {nameserver}

[policy]
internal_hosts =
""" + (f"\n[metrics]\nlisten = 127.0.0.1:{_free_port()}\n" if metrics else ""),
                    encoding="ascii")
    return path, spec


def pyspf_config(workdir: Path) -> tuple[Path, str]:
    """pyspf-milter configured like spfmilter's defaults.

    HELO and MAIL FROM fail reject (5.7.23), permerror accepts, temperror
    defers, an Authentication-Results field is added.  Its default
    skip_addresses (loopback) are replaced by three unused networks (empty
    crashes spf-engine 3.1.0), so that no client is skipped; no internal hosts.
    """
    spec = f"unix:{workdir}/pyspf.sock"
    path = workdir / "pyspf-milter.conf"
    path.write_text(f"""\
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = True
skip_addresses = 198.51.100.0/24,::ffff:198.51.100.0/120,2001:db8:ffff::/48
Header_Type = AR
Authserv_Id = {AUTHSERV_ID}
Lookup_Time = 20
Void_Limit = 2
Socket = {spec}
PidFile = {workdir}/pyspf.pid
UserID = {_user_name()}
InternalHosts = 192.0.2.254
""", encoding="ascii")
    return path, spec


def opendmarc_config(workdir: Path) -> tuple[Path, str]:
    """OpenDMARC checking SPF itself (libspf2) and only adding headers.

    SPFSelfValidate true, SPFIgnoreResults true (no other milter's result to
    trust), RejectFailures false; IgnoreHosts names an unused address instead of
    its default, loopback; no reports, no history, to stderr rather than syslog.
    """
    spec = f"unix:{workdir}/opendmarc.sock"
    ignore = workdir / "opendmarc.ignore"
    ignore.write_text("192.0.2.254\n", encoding="ascii")
    path = workdir / "opendmarc.conf"
    path.write_text(f"""\
AuthservID {AUTHSERV_ID}
Socket {spec}
PidFile {workdir}/opendmarc.pid
UserID {_user_name()}
Background false
Syslog false
SPFSelfValidate true
SPFIgnoreResults true
RejectFailures false
FailureReports false
IgnoreHosts {ignore}
""", encoding="ascii")
    return path, spec


def opendmarc_version() -> str:
    """OpenDMARC's version line, e.g. "1.4.2"; BenchError when it is not installed."""
    if not OPENDMARC.exists():
        raise BenchError(f"--opendmarc: {OPENDMARC} is missing; install Debian's opendmarc "
                         "(apt-get install opendmarc; with a /usr/sbin/policy-rc.d that exits "
                         "101 the service is not started).  This script installs nothing.")
    out = subprocess.run([str(OPENDMARC), "-V"], capture_output=True, text=True, check=False)
    words = (out.stdout + out.stderr).split()
    return next((w.lstrip("v") for w in words if w[:2] == "v1" or w[:1].isdigit()), "?")


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class MilterSpec:
    label: str
    argv: list[str]
    socket: str
    cleanup: list[Path]
    version: str
    check: str = ENFORCING  # how bench_app_load.unexpected() judges its answers


class MilterProc:
    """One running milter process; stderr goes to a file in the work directory."""

    def __init__(self, spec: MilterSpec, workdir: Path) -> None:
        self.spec = spec
        self.errfile = workdir / f"{spec.label}.stderr"
        for path in spec.cleanup:  # what a killed earlier instance may have left
            path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
        with open(self.errfile, "ab") as err:
            self.proc = subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=env,
                                         cwd=workdir)
        try:
            self._wait_ready()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with MilterClient(self.spec.socket, timeout=5.0):
                    return
            except MilterError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.spec.label} not serving {self.spec.socket} after "
                                     f"{timeout}s:\n{self.stderr_tail()}") from None
                time.sleep(0.05)

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.errfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.spec.label} exited with status {self.proc.returncode}:\n"
                             f"{self.stderr_tail()}")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return proc_rss_kib(self.pid) / 1024

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                note(f"{self.spec.label} ignored SIGTERM for {timeout}s and was killed")


# -- cells -----------------------------------------------------------------------------------


@dataclass
class Cell:
    milter: str
    cache: str
    conns: int
    round: int
    messages: int
    wall_s: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    milter_cpu_s: float
    client_cpu_s: float
    dns_cpu_s: float
    other_cpu_s: float
    rss_mib: float
    errors: int
    unexpected: int
    first_error: str = ""
    dns_queries: int = 0  # answered by NSD during the cell

    @property
    def us_per_msg(self) -> float:
        return self.milter_cpu_s / self.messages * 1e6 if self.messages else float("nan")

    @property
    def queries_per_msg(self) -> float:
        return self.dns_queries / self.messages if self.messages else float("nan")


@dataclass
class Load:
    """What one drive of a milter produced."""

    wall_s: float
    latencies: list[float]
    client_cpu_s: float
    milter_cpu_s: float
    dns_cpu_s: float
    other_cpu_s: float
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    errors: int = 0
    unexpected: int = 0
    first_error: str = ""
    dns_queries: int = 0


def drive(milter: MilterProc, nsd: Nsd, indices: Sequence[int], conns: int, cold: str | None,
          warm_names: int, keep_outcomes: bool) -> Load:
    """Play the messages ``indices`` with ``conns`` client processes, one connection each."""
    mp = multiprocessing.get_context("fork")
    conns = max(1, min(conns, len(indices)))
    barrier = mp.Barrier(conns + 1)
    queue = mp.Queue()
    procs = [
        mp.Process(target=worker, daemon=True,
                   args=(milter.spec.socket, list(indices[w::conns]), cold, warm_names,
                         keep_outcomes, barrier, queue, milter.spec.check))
        for w in range(conns)
    ]
    for proc in procs:
        proc.start()
    replies = []
    try:
        queries0 = nsd.queries()  # before the start: nsd-control's own CPU is not counted
        try:
            barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass
        cpu0, dns0, all0 = milter.cpu_seconds(), nsd.cpu_seconds(), system_busy_seconds()
        for _ in procs:
            replies.append(queue.get(timeout=3600))
        cpu1, dns1, all1 = milter.cpu_seconds(), nsd.cpu_seconds(), system_busy_seconds()
        queries1 = nsd.queries()
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = sorted({r[1] for r in replies if r[0] != "ok"})
    if failed:
        milter.check_alive()
        raise BenchError(f"{milter.spec.label}: client failed: {'; '.join(failed)}")
    parts: list[WorkerResult] = [r[1] for r in replies]
    client_cpu = sum(p.cpu_s for p in parts)
    load = Load(
        wall_s=max(p.end for p in parts) - min(p.start for p in parts),
        latencies=sorted(x for p in parts for x in p.latencies),
        client_cpu_s=client_cpu, milter_cpu_s=cpu1 - cpu0, dns_cpu_s=dns1 - dns0,
        other_cpu_s=max(0.0, (all1 - all0) - (cpu1 - cpu0) - (dns1 - dns0) - client_cpu),
        errors=sum(p.errors for p in parts),
        unexpected=sum(p.unexpected for p in parts),
        first_error=next((p.first_error for p in parts if p.first_error), ""),
        dns_queries=queries1 - queries0,
    )
    for p in parts:
        load.outcomes.update(p.outcomes)
    return load


def make_cell(milter: MilterProc, cache: str, conns: int, load: Load, rnd: int = 0) -> Cell:
    n = len(load.latencies)
    return Cell(
        milter=milter.spec.label, cache=cache, conns=conns, round=rnd, messages=n,
        wall_s=load.wall_s,
        msgs_per_s=n / load.wall_s if load.wall_s > 0 else float("inf"),
        p50_ms=percentile(load.latencies, 50) * 1e3, p99_ms=percentile(load.latencies, 99) * 1e3,
        milter_cpu_s=load.milter_cpu_s, client_cpu_s=load.client_cpu_s,
        dns_cpu_s=load.dns_cpu_s, other_cpu_s=load.other_cpu_s, rss_mib=milter.rss_mib(),
        errors=load.errors, unexpected=load.unexpected, first_error=load.first_error,
        dns_queries=load.dns_queries,
    )


# -- report ----------------------------------------------------------------------------------

HEAD = (f"{'milter':<13} {'cache':<5} {'conns':>5} {'msgs':>6} {'msgs/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'milter CPU s':>12} {'us/msg':>6} {'client CPU s':>12} "
        f"{'DNS CPU s':>9} {'q/msg':>5} {'busy':>5} {'other CPU s':>11} {'RSS MiB':>7} "
        f"{'errors':>6} {'unexp':>5}")


def format_cell(c: Cell, ncpu: int) -> str:
    busy = (c.milter_cpu_s + c.client_cpu_s + c.dns_cpu_s) / (c.wall_s * ncpu) * 100 \
        if c.wall_s > 0 else float("nan")
    return (f"{c.milter:<13} {c.cache:<5} {c.conns:>5} {c.messages:>6} {c.msgs_per_s:>7.0f} "
            f"{c.p50_ms:>7.2f} {c.p99_ms:>7.2f} {c.milter_cpu_s:>12.2f} {c.us_per_msg:>6.0f} "
            f"{c.client_cpu_s:>12.2f} {c.dns_cpu_s:>9.2f} {c.queries_per_msg:>5.2f} "
            f"{busy:>4.0f}% {c.other_cpu_s:>11.2f} {c.rss_mib:>7.1f} {c.errors:>6} "
            f"{c.unexpected:>5}")


def compare_verdicts(ours: dict, theirs: dict) -> tuple[list[str], dict]:
    """Lines on where the two milters' verdicts differ, and counts for JSON."""
    mismatches: Counter[str] = Counter()
    examples: dict[str, str] = {}
    code_diffs: Counter[str] = Counter()
    compared = 0
    for key, a in ours.items():
        b = theirs.get(key)
        if b is None:
            continue
        compared += 1
        index = key[-1]
        kind = message(index, None, 1).kind.name
        if not same(a, b):
            mismatches[kind] += 1
            examples.setdefault(kind, f"{SPF_LABEL} {_show(a)} / {PYSPF_LABEL} {_show(b)}")
        elif a.code != b.code:
            code_diffs[f"{kind}: {a.code} vs {b.code}"] += 1
    total = sum(mismatches.values())
    lines = ["", f"verdicts: {compared} messages sent to both milters, {total} mismatches "
                 "(action, enhanced code, SPF result of each identity both report)"]
    for kind, n in sorted(mismatches.items()):
        lines.append(f"  mismatch {kind}: {n}, e.g. {examples[kind]}")
    for text, n in sorted(code_diffs.items()):
        lines.append(f"  same verdict, different SMTP code ({SPF_LABEL} vs {PYSPF_LABEL}) "
                     f"for {text}: {n} messages")
    return lines, {"compared": compared, "mismatches": total, "by_kind": dict(mismatches),
                   "code_differences": dict(code_diffs)}


def _show(o: Outcome) -> str:
    text = o.action + (f" {o.code} {o.xcode}" if o.code else "")
    if o.results:
        text += " " + ",".join(f"{i}={r}" for i, r in o.results)
    return text + (f" ({o.detail})" if o.detail and o.action == "error" else "")


def ratio_lines(cells: list[Cell], concs: Sequence[int],
                other: str = PYSPF_LABEL) -> tuple[list[str], dict]:
    by = {(c.milter, c.cache, c.conns): c for c in cells}
    lines = ["", f"ratios {SPF_LABEL} / {other}",
             f"{'cache':<5} {'conns':>5} {'msgs/s':>7} {'p99':>6} {'CPU/msg':>8}"]
    verdict: dict = {}
    for cache in ("cold", "warm"):
        for conns in concs:
            a, b = by.get((SPF_LABEL, cache, conns)), by.get((other, cache, conns))
            if a is None or b is None:
                continue
            rate = a.msgs_per_s / b.msgs_per_s
            p99 = a.p99_ms / b.p99_ms
            cpu = a.us_per_msg / b.us_per_msg if b.us_per_msg else float("nan")
            lines.append(f"{cache:<5} {conns:>5} {rate:>6.2f}x {p99:>5.2f}x {cpu:>7.2f}x")
            if cache == "warm" and conns == TARGET_CONNS:
                verdict = {"msgs_ratio": rate, "p99_ratio": p99,
                           "throughput_met": rate >= TARGET_RATIO, "p99_met": a.p99_ms < b.p99_ms}
    return lines, verdict


def environment(args: argparse.Namespace, pyspf: dict[str, str] | None, nsd: Nsd) -> list[str]:
    import dns.version
    import spf

    import spfmilter

    lines = [
        machine_line(),
        f"# {SPF_LABEL} {spfmilter.__version__} (this tree; pyspf {spf.__version__.split()[0]}, "
        f"dnspython {dns.version.version}), daemon with the default policy, log_level info "
        "to a file",
    ]
    if args.opendmarc:
        lines.append(f"# {OPENDMARC_LABEL} {opendmarc_version()} ({OPENDMARC}, libspf2): "
                     "SPFSelfValidate true, SPFIgnoreResults true, RejectFailures false "
                     "(headers only: its unexp checks the SPF results, not the action)")
    if args.floors:
        import libmilter_ext

        libmilter = ".".join(map(str, libmilter_ext.version()))
        lines.append(f"# floors: {C_NOOP_LABEL} = bench/noop_milter.c on libmilter {libmilter} "
                     f"(gcc -O2), {EXT_NOOP_LABEL} = bench/noop_libmilter_ext.py on "
                     "libmilter_ext (this tree); every callback registered, each answers "
                     "continue; no DNS, so cold and warm are the same work (both cells run: "
                     "their difference is noise); unexp counts any other answer")
    if pyspf:
        lines.append(f"# {PYSPF_LABEL}: spf-engine {pyspf['spf-engine']}, pymilter "
                     f"{pyspf['pymilter']}, pyspf {pyspf['pyspf']}, dnspython "
                     f"{pyspf['dnspython']}; debugLevel 1 (syslog)")
    where = "in a private network namespace" if inside_netns() else "on the host's loopback"
    lines += [
        f"# DNS: NSD on {nsd.nameserver} {where}, serving tests/data/zones and bench/zones",
        f"# load: {args.messages} messages per cell, {args.rounds} round(s), the table shows "
        "each cell's median round by msgs/s; one client process per connection, "
        "each message one SMTP session on a new milter connection; mix (% of messages): "
        + ", ".join(f"{k.name} {k.weight}" for k in KINDS),
        f"# cold = milter restarted, every message's names new; warm = after a warm-up over "
        f"{args.warm_names} names, the cell reuses them",
        "# busy = (milter + client + DNS CPU) / (wall x CPUs); us/msg = milter CPU per message;"
        " q/msg = queries NSD answered per message;"
        " other CPU s = CPU used meanwhile by processes outside the benchmark (should be ~0);"
        " unexp = verdicts the zones do not imply",
    ]
    return lines


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the spfmilter daemon against spf-engine's pyspf-milter.")
    parser.add_argument("--messages", type=int, default=3000,
                        help="messages measured per cell (default 3000)")
    parser.add_argument("--concurrency", type=int_list, default=[1, 8, 32],
                        help="comma-separated numbers of concurrent connections (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times the whole matrix is run; the table shows each cell's "
                             "median round by messages/s (default 3)")
    parser.add_argument("--warm-names", type=int, default=500,
                        help="distinct name sets in the warm cells and warm-up, a multiple "
                             f"of {len(SCHEDULE)} (default 500)")
    parser.add_argument("--rss-messages", type=int, default=50000,
                        help="messages in spfmilter's RSS run (default 50000; 0 skips it)")
    parser.add_argument("--rss-concurrency", type=int, default=8,
                        help="connections in the RSS run (default 8)")
    parser.add_argument("--rss-samples", type=int, default=5,
                        help="RSS readings during the RSS run (default 5)")
    parser.add_argument("--skip-pyspf", action="store_true",
                        help="spfmilter only, no network namespace (for smoke tests; a real "
                             "run compares with pyspf-milter)")
    parser.add_argument("--pyspf-venv", type=Path, default=None,
                        help="venv for spf-engine, made if missing (default "
                             "~/.cache/spfmilter-bench/spf-engine-3.1.0-pyX.Y)")
    parser.add_argument("--metrics", action="store_true",
                        help="run spfmilter with [metrics] listen set (the Prometheus "
                             "endpoint's hot-path cost)")
    parser.add_argument("--opendmarc", action="store_true",
                        help=f"add a row for OpenDMARC checking SPF itself ({OPENDMARC}, "
                             "Debian's opendmarc; not installed by this script)")
    parser.add_argument("--floors", action="store_true",
                        help="add the no-op milters of bench_extension (C on libmilter, and "
                             "on libmilter_ext) as floor rows, under the same load")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results as JSON to this file")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                        help="also write the table, the RSS run and issue 12's targets as "
                             "Markdown to FILE")
    args = parser.parse_args(argv)
    if min(args.messages, args.warm_names, args.rounds) < 1 or args.rss_messages < 0:
        parser.error("--messages, --warm-names and --rounds must be positive, "
                     "--rss-messages >= 0")
    if args.warm_names % len(SCHEDULE):
        # message i's kind repeats every len(SCHEDULE) messages, its warm label every
        # warm_names: unless one divides the other, warm cells meet names never warmed
        parser.error(f"--warm-names must be a multiple of {len(SCHEDULE)} (the mix's period)")
    if args.rss_samples < 1 or args.rss_concurrency < 1:
        parser.error("--rss-samples and --rss-concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    try:
        pyspf = None
        if args.opendmarc:
            opendmarc_version()  # fails early when it is missing
        if not args.skip_pyspf or args.opendmarc:  # both resolve through /etc/resolv.conf
            again = list(raw)
            if not args.skip_pyspf:
                args.pyspf_venv = (args.pyspf_venv or default_venv()).resolve()
                again = [a for a in raw if not a.startswith("--pyspf-venv")]
                again.append(f"--pyspf-venv={args.pyspf_venv}")
            if not inside_netns():
                if not args.skip_pyspf:
                    ensure_pyspf_venv(args.pyspf_venv)  # PyPI is reachable only out here
                return run_in_netns([sys.executable, str(Path(__file__).resolve()), *again])
        if not args.skip_pyspf:
            pyspf = pyspf_versions(args.pyspf_venv)
            if pyspf is None:
                raise BenchError(f"no usable spf-engine in {args.pyspf_venv}")
        return run(args, pyspf)
    except (BenchError, DnsError) as exc:
        print(f"bench_spfmilter: error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, pyspf: dict[str, str] | None) -> int:
    port = 53 if inside_netns() else 0
    # A short directory: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="spfbench-") as tmpname, \
            Nsd("127.0.0.1", port) as nsd:
        tmp = Path(tmpname)
        specs = milter_specs(args, pyspf, tmp, nsd)
        env = environment(args, pyspf, nsd)
        print("\n".join(env), flush=True)
        cells, outcomes, problems = matrix(args, specs, tmp, nsd)
        rss = rss_run(args, specs[0], tmp, nsd) if args.rss_messages else None
    return report(args, cells, outcomes, problems, rss, pyspf is not None,
                  [line.lstrip("# ") for line in env])


def milter_specs(args: argparse.Namespace, pyspf: dict[str, str] | None, tmp: Path,
                 nsd: Nsd) -> list[MilterSpec]:
    """spfmilter first (the RSS run's milter), then OpenDMARC, pyspf-milter, the floors."""
    cfg, spf_sock = spfmilter_config(tmp, nsd.nameserver, args.metrics)
    specs = [MilterSpec(SPF_LABEL, [sys.executable, "-m", "spfmilter", "-c", str(cfg), "run",
                                    "--stderr"],
                        spf_sock, [tmp / "spf.sock", tmp / "spf.pid"], "this tree")]
    if args.opendmarc:
        conf, od_sock = opendmarc_config(tmp)
        specs.append(MilterSpec(OPENDMARC_LABEL, [str(OPENDMARC), "-f", "-c", str(conf)],
                                od_sock, [tmp / "opendmarc.sock", tmp / "opendmarc.pid"],
                                opendmarc_version(), check=HEADERS_ONLY))
    if pyspf is not None:
        conf, py_sock = pyspf_config(tmp)
        venv = args.pyspf_venv
        specs.append(MilterSpec(PYSPF_LABEL, [str(venv / "bin" / "python"),
                                              str(venv / "bin" / "pyspf-milter"), str(conf)],
                                py_sock, [tmp / "pyspf.sock", tmp / "pyspf.pid"],
                                pyspf["spf-engine"]))
    if args.floors:
        specs += floor_specs(tmp)
    return specs


def floor_specs(tmp: Path) -> list[MilterSpec]:
    """The two no-op milters of bench_extension (every stage registered, all continue)."""
    import libmilter_ext

    libmilter = ".".join(map(str, libmilter_ext.version()))
    c_sock, ext_sock = tmp / "noop-c.sock", tmp / "noop-ext.sock"
    return [
        MilterSpec(C_NOOP_LABEL, [str(build_c_noop(cache_dir())), f"unix:{c_sock}"],
                   f"unix:{c_sock}", [c_sock], f"libmilter {libmilter}", check=NOOP),
        MilterSpec(EXT_NOOP_LABEL, [sys.executable, str(NOOP_EXT), f"unix:{ext_sock}"],
                   f"unix:{ext_sock}", [ext_sock], "this tree", check=NOOP),
    ]


def matrix(args: argparse.Namespace, specs: Sequence[MilterSpec], tmp: Path,
           nsd: Nsd) -> tuple[list[Cell], dict[str, dict], list[str]]:
    """Every round x concurrency x milter x cache cell; milters take turns cell by cell."""
    ncpu = os.cpu_count() or 1
    cells: list[Cell] = []
    outcomes: dict[str, dict] = {spec.label: {} for spec in specs}
    problems: list[str] = []
    print(f"# progress, every round (the table below takes the median round):\n# {HEAD}",
          file=sys.stderr, flush=True)
    for rnd in range(1, args.rounds + 1):
        for conns in args.concurrency:
            for spec in specs:
                milter = MilterProc(spec, tmp)  # a fresh process: the cold cell's cache is empty
                try:
                    for cache in ("cold", "warm"):
                        if cache == "warm":  # the warm-up: every warm name once
                            drive(milter, nsd, range(args.warm_names), conns, None,
                                  args.warm_names, False)
                        load = drive(milter, nsd, range(args.messages), conns,
                                     f"r{rnd}c{conns}" if cache == "cold" else None,
                                     args.warm_names, spec.check == ENFORCING)
                        milter.check_alive()
                        cell = make_cell(milter, cache, conns, load, rnd)
                        cells.append(cell)
                        print(f"# {format_cell(cell, ncpu)}", file=sys.stderr, flush=True)
                        for index, got in load.outcomes.items():  # compare_verdicts' input
                            outcomes[spec.label][(rnd, cache, conns, index)] = got
                        if cell.errors:
                            problems.append(f"{spec.label} round {rnd} {cache} {conns} "
                                            f"connections: {cell.errors} messages failed, "
                                            f"first: {cell.first_error}")
                finally:
                    milter.stop()
    return cells, outcomes, problems


def median_cells(cells: Sequence[Cell]) -> list[Cell]:
    """Per milter, cache and concurrency, the round with the median messages/s."""
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.milter, cell.cache, cell.conns), []).append(cell)
    chosen = []
    for group in groups.values():
        ranked = sorted(group, key=lambda c: c.msgs_per_s)
        chosen.append(ranked[(len(ranked) - 1) // 2])
    order = {(c.milter, c.cache, c.conns): i for i, c in enumerate(cells)}
    return sorted(chosen, key=lambda c: (c.conns, order[(c.milter, c.cache, c.conns)]))


def report(args: argparse.Namespace, cells: list[Cell], outcomes: dict[str, dict],
           problems: list[str], rss: dict | None, compared: bool,
           preface: Sequence[str] = ()) -> int:
    """Print the table, RSS, verdicts, ratios and targets; write JSON; the exit status."""
    ncpu = os.cpu_count() or 1
    table = median_cells(cells)
    print(HEAD)
    for cell in table:
        print(format_cell(cell, ncpu))
    result: dict = {"cells": [asdict(c) for c in cells], "table": [asdict(c) for c in table],
                    "rss": rss}
    if rss is not None:
        print("", f"RSS of {SPF_LABEL} over {rss['messages']} warm messages at "
              f"{rss['conns']} connections ({rss['msgs_per_s']:.0f} msgs/s, "
              f"{rss['errors']} errors, {rss['unexpected']} unexpected):", sep="\n")
        print(f"  start {rss['before_mib']:.1f} MiB, peak {rss['peak_mib']:.1f} MiB, "
              f"end {rss['after_mib']:.1f} MiB (growth "
              f"{rss['after_mib'] - rss['before_mib']:+.1f} MiB); readings: "
              + ", ".join(f"{n}: {m:.1f}" for n, m in rss["samples"]))
        if rss["errors"]:
            problems.append(f"RSS run: {rss['errors']} messages failed")
    target: dict = {}
    if compared:
        lines, result["verdicts"] = compare_verdicts(outcomes[SPF_LABEL], outcomes[PYSPF_LABEL])
        print("\n".join(lines))
        lines, target = ratio_lines(table, args.concurrency)
        print("\n".join(lines))
        result["targets"] = target
    if any(c.milter == OPENDMARC_LABEL for c in table):
        lines, result["vs_opendmarc"] = ratio_lines(table, args.concurrency, OPENDMARC_LABEL)
        print("\n".join(lines))
    print("", "targets:", sep="\n")
    if target:
        print(f"  {TARGET_CONNS} connections, warm cache, msgs/s >= {TARGET_RATIO:g}x "
              f"{PYSPF_LABEL}: {'met' if target['throughput_met'] else 'MISSED'} "
              f"({target['msgs_ratio']:.2f}x)")
        print(f"  {TARGET_CONNS} connections, warm cache, p99 lower than {PYSPF_LABEL}: "
              f"{'met' if target['p99_met'] else 'MISSED'} ({target['p99_ratio']:.2f}x)")
    else:
        print(f"  vs {PYSPF_LABEL} at {TARGET_CONNS} connections, warm: not measured")
    if rss is not None:
        print(f"  RSS flat (growth <= max({RSS_FLAT_MIB:g} MiB, "
              f"{RSS_FLAT_FRACTION:.0%})): {'met' if rss['flat'] else 'MISSED'}")
    else:
        print("  RSS flat: not measured")
    targets = issue12_targets(table, rss)
    print("\n".join(target_lines(targets, table)))
    result["issue12_targets"] = [asdict(t) | {"verdict": t.verdict} for t in targets]
    if args.markdown:
        args.markdown.write_text(markdown(table, rss, targets, preface))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if problems:
        print("", "benchmark errors:", *[f"  {p}" for p in problems], sep="\n",
              file=sys.stderr)
        return 1
    return 0


def rss_run(args: argparse.Namespace, spec: MilterSpec, tmp: Path, nsd: Nsd) -> dict:
    """spfmilter's RSS after a warm-up (start), at its peak and at the end of
    ``rss_messages`` warm messages, played in ``rss_samples`` chunks.
    """
    milter = MilterProc(spec, tmp)
    stop = threading.Event()
    peak = [0.0]

    def sample() -> None:  # the peak between the chunks' readings
        while not stop.wait(0.25):
            peak[0] = max(peak[0], milter.rss_mib())

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    try:
        conns = args.rss_concurrency
        drive(milter, nsd, range(args.warm_names), conns, None, args.warm_names, False)
        before = peak[0] = milter.rss_mib()
        sampler.start()
        samples: list[tuple[int, float]] = []
        done = errors = bad = 0
        wall = 0.0
        step = -(-args.rss_messages // args.rss_samples)
        while done < args.rss_messages:
            chunk = range(done, min(done + step, args.rss_messages))
            load = drive(milter, nsd, chunk, conns, None, args.warm_names, False)
            milter.check_alive()
            done += len(chunk)
            wall += load.wall_s
            errors += load.errors
            bad += load.unexpected
            samples.append((done, milter.rss_mib()))
            note(f"RSS run: {done}/{args.rss_messages} messages, "
                 f"{len(chunk) / load.wall_s if load.wall_s else 0:.0f} msgs/s, "
                 f"RSS {samples[-1][1]:.1f} MiB")
        after = samples[-1][1]
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        milter.stop()
    limit = max(RSS_FLAT_MIB, RSS_FLAT_FRACTION * before)
    return {"messages": done, "conns": conns, "before_mib": before, "after_mib": after,
            "peak_mib": max(peak[0], before, *(m for _, m in samples)),
            "samples": samples, "msgs_per_s": done / wall if wall else float("nan"),
            "errors": errors, "unexpected": bad, "flat_limit_mib": limit,
            "flat": after - before <= limit}


if __name__ == "__main__":
    sys.exit(main())
