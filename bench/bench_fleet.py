"""Many MX hosts behind one caching resolver: spfmilter at fleet scale, measured.

The run builds a small network of private network namespaces (``ip netns``),
one per host, all on one bridge in a switch namespace of their own, with
addresses from 192.0.2.0/24 (RFC 5737) inside those namespaces only:

* ``dns`` 192.0.2.53: NSD serving bench/fleet-zones behind the counting relay
  of tests/dnsserver.py (every query that reaches the authoritative server is
  counted);
* ``res`` 192.0.2.54: unbound (tests/unbound.py), recursive, its stub zone
  pointing at ``dns``; started afresh, with a cold cache, for every cell;
* ``mx1`` ... ``mx3`` 192.0.2.25-27: Postfix, Sendmail, Postfix (the e2e
  harness, tests/e2e/mta.py), each with its own spfmilter on a unix socket
  using ``res`` as its nameserver; started afresh for every cell;
* ``cl1`` ... ``cl3`` 192.0.2.101-103: the SMTP clients.

Each cell (1, 2, 3 MX hosts) sends ``--messages`` messages with Postfix's
``smtp-source`` (one message per SMTP session, as from the Internet): six
load streams, each from one client address with its own sender domain and
2 parallel sessions, spread over the cell's MX hosts.  While the load runs,
a timing client of our own (the ``probe`` subcommand, in ``cl1``) plays
whole SMTP transactions (MAIL FROM to the reply after DATA) round-robin over
the MX hosts and times each one: smtp-source does not time transactions.
Printed per cell: messages per second (smtp-source messages over the wall
time of the load), p50/p99 transaction time (the probe's), spfmilter CPU per
message (utime+stime of every spfmilter process from /proc, over all
messages of the cell), queries the milters sent to the resolver and queries
that reached the authoritative server (flat: the resolver's cache is
shared; the JSON also counts the resolver's retransmissions among them,
questions asked again before the slow answer came, and the cache misses
without them), and how many messages the MTAs accepted (goal: all of them).
Sendmail queues without delivering (``queueonly``), so the table measures
SMTP reception with the milter, not a local mailer.

    .venv/bin/python bench/bench_fleet.py                  # 2,000 messages per cell
    .venv/bin/python bench/bench_fleet.py --messages 60 --json out.json

Needs root (network namespaces), Debian's nsd, unbound, postfix and the
Sendmail the e2e tests use.  Every namespace (and /etc/netns/NAME) made for
the run is removed at the end, also on error or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ZONES = BENCH / "fleet-zones"
SMTP_SOURCE = "/usr/sbin/smtp-source"
NET = "192.0.2"
DNS_ADDR = f"{NET}.53"
RESOLVER_ADDR = f"{NET}.54"
MX_ADDRS = [f"{NET}.25", f"{NET}.26", f"{NET}.27"]
CLIENT_ADDRS = [f"{NET}.101", f"{NET}.102", f"{NET}.103"]
MTAS = ["postfix", "sendmail", "postfix"]
RECIPIENT = "inbox@e2e.test"
#: Load streams per cell (smtp-source processes) and SMTP sessions in each.
STREAMS = 6
SESSIONS = 2
#: How long the resolver waits for the authoritative server (its minimum
#: retransmission timeout); an answer later than that comes too late for it.
#: Long, so that the slow counting relay on a loaded machine is not retried.
RESOLVER_WAIT_MS = 3000
READY_TIMEOUT = 90.0
LOAD_TIMEOUT = 900.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sender_domain(stream: int) -> str:
    return f"s{stream}.d.fleet.test"


def helo_name(client: int) -> str:
    return f"client{client + 1}.fleet.test"


# ---------------------------------------------------------------------------
# Hosts: each runs in its own namespace as "bench_fleet.py host ROLE ..."


def _reply(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _serve_commands(handlers: dict[str, Any]) -> None:
    """Answer one-line commands on stdin with one JSON line each, until EOF."""
    for line in sys.stdin:
        words = line.split()
        if words:
            _reply(handlers[words[0]](*words[1:]))


def host_dns(args: argparse.Namespace) -> None:
    from tests.dnsserver import DnsServer

    with DnsServer(ZONES, servfail_zones=(), drop=(), probe_zone="fleet.test",
                   host=args.address, host6="::1", late=RESOLVER_WAIT_MS / 1000) as server:
        _reply({"port": server.port})

        def stats() -> dict[str, Any]:
            return {kind: {f"{name} {qtype}": n for (name, qtype), n in sorted(counts.items())}
                    for kind, counts in (("queries", server.queries),
                                         ("retransmissions", server.retransmissions))}

        def reset() -> dict[str, Any]:
            server.reset_counts()
            return {}

        _serve_commands({"stats": stats, "reset": reset})


def host_resolver(args: argparse.Namespace) -> None:
    from tests.unbound import Unbound, Upstream

    host, port = args.upstream.rsplit(":", 1)
    upstream = Upstream(host, int(port), probe_zone="fleet.test")
    with Unbound(upstream, host=args.address, port=53, allow=[f"{NET}.0/24", "127.0.0.0/8"],
                 extra=[f"infra-cache-min-rtt: {RESOLVER_WAIT_MS}",
                        f"unknown-server-time-limit: {RESOLVER_WAIT_MS}"]) as resolver:
        _reply({"port": resolver.port})

        def stats() -> dict[str, Any]:
            got = resolver.stats()
            return {"queries": int(got.get("total.num.queries", -1)),
                    "cachehits": int(got.get("total.num.cachehits", -1))}

        def flush() -> dict[str, Any]:
            resolver.flush()
            return {}

        _serve_commands({"stats": stats, "flush": flush})


def host_mx(args: argparse.Namespace) -> None:
    from tests.e2e.mta import Mailbox, Postfix, Sendmail, SpfMilter, make_sasldb

    class NetPostfix(Postfix):
        """The e2e Postfix, also listening on this host's network address."""

        def __init__(self, *a: Any, address: str, **kw: Any) -> None:
            super().__init__(*a, **kw)
            master = self.config_dir / "master.cf"
            line = f"{address}:{self.port} inet n - n - - smtpd\n"
            master.write_text(line + master.read_text())

    class NetSendmail(Sendmail):
        """The e2e Sendmail on this host's address too, queueing without delivery."""

        def __init__(self, *a: Any, address: str, **kw: Any) -> None:
            super().__init__(*a, **kw)
            v4 = f"Port={self.port}, Name=MTA-v4')dnl"
            net = (f"DAEMON_OPTIONS(`Family=inet, Addr={address}, Port={self.port}, "
                   "Name=MTA-net')dnl")
            text = self.mc_text.replace(v4, v4 + "\n" + net, 1)
            text = text.replace("define(`confDELIVERY_MODE', `interactive')",
                                "define(`confDELIVERY_MODE', `queueonly')", 1)
            if net not in text or "queueonly" not in text:
                raise RuntimeError("the e2e sendmail.mc.in changed: cannot adapt it")
            self.mc.write_text(text)
            m4 = subprocess.run(["m4", str(self.mc)], capture_output=True, text=True)
            if m4.returncode != 0:
                raise RuntimeError(f"m4 failed:\n{m4.stderr}")
            self.cf.write_text(m4.stdout)

    workdir = Path(args.workdir)
    workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    postfix = args.mta == "postfix"
    group = "postfix" if postfix else ""
    sasl = make_sasldb(workdir / "sasldb2", "bench", "bench-pw", group=group)
    milter = SpfMilter(workdir / "milter", nameservers=[args.nameserver], group=group)
    sock = Path(milter.socket_path).parent
    sock.mkdir(mode=0o750, exist_ok=True)
    if postfix:
        shutil.chown(sock, group="postfix")
    milter.start()
    mta_cls = NetPostfix if postfix else NetSendmail
    mta = mta_cls(workdir / args.mta, milter.socket_path, sasl, address=args.address)
    try:
        mta.start()
        assert milter.daemon.proc is not None
        _reply({"port": mta.port, "milter_pid": milter.daemon.proc.pid})

        def accepted() -> int:
            if postfix:
                return len(Mailbox(mta.workdir / "mail").files())
            return sum(1 for p in (mta.workdir / "queue").rglob("qf*") if p.is_file())

        def stats(expected: str = "0") -> dict[str, Any]:
            deadline = time.monotonic() + 60  # Postfix delivers after accepting
            while accepted() < int(expected) and time.monotonic() < deadline:
                time.sleep(0.1)
            return {"accepted": accepted(), "milter_alive": milter.running,
                    "milter_errors": milter.log().count("Traceback")}

        _serve_commands({"stats": stats})
    finally:
        mta.stop()
        milter.stop()


def probe(args: argparse.Namespace) -> None:
    """Time SMTP transactions round-robin over the targets until stdin closes."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.targets]
    times: list[float] = []
    failures: list[str] = []
    per_target = {f"{h}:{p}": 0 for h, p in targets}
    body = f"From: <{args.sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: probe\r\n\r\nprobe\r\n"
    turn = 0
    while not stop.is_set() or len(times) + len(failures) < args.min:
        host, port = targets[turn % len(targets)]
        turn += 1
        try:
            with smtplib.SMTP(host, port, timeout=60, source_address=(args.source, 0)) as smtp:
                smtp.ehlo(args.helo)
                for _ in range(args.per_session):
                    started = time.perf_counter()
                    code, text = smtp.mail(args.sender)
                    if code == 250:
                        code, text = smtp.rcpt(RECIPIENT)
                    if code == 250:
                        code, text = smtp.data(body.encode())
                    if code != 250:
                        failures.append(f"{host}: {code} {text!r}")
                        smtp.rset()
                        continue
                    times.append(time.perf_counter() - started)
                    per_target[f"{host}:{port}"] += 1
        except (OSError, smtplib.SMTPException) as exc:
            failures.append(f"{host}: {exc!r}")
            time.sleep(0.1)
    _reply({"times": times, "failures": failures, "per_target": per_target})


# ---------------------------------------------------------------------------
# The network


def ip(*argv: str) -> None:
    out = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {out.stderr.strip()}")


class Network:
    """Namespaces on one bridge; every one made here is removed by close()."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.switch = f"sfb{self.tag}-sw"
        self.namespaces: list[str] = []
        self._links = 0

    def ns(self, role: str) -> str:
        return f"sfb{self.tag}-{role}"

    def build(self, hosts: dict[str, str]) -> None:
        """hosts: role -> IPv4 address; each role gets a namespace on the bridge."""
        self._add(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for role, address in hosts.items():
            name = self.ns(role)
            self._add(name)
            self._links += 1
            port = f"p{self._links}"
            ip("link", "add", "eth0", "netns", name, "type", "veth",
               "peer", "name", port, "netns", self.switch)
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            if role.startswith("mx"):
                # The MTAs' own lookups (Sendmail's reverse lookup of the
                # client) get a refusal at once, so that the resolver's count
                # is the milters' queries only.
                resolv = Path("/etc/netns") / name / "resolv.conf"
                resolv.parent.mkdir(parents=True, exist_ok=True)
                resolv.write_text("nameserver 127.0.0.1\n")

    def _add(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        for name in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:  # only processes inside a namespace of this run
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        self.namespaces.clear()


class Host:
    """``bench_fleet.py host ...`` (or another command) in a namespace, spoken to by lines."""

    def __init__(self, ns: str, argv: Sequence[str], log: Path) -> None:
        self.log = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, start_new_session=True)

    def read(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"host gave no answer (exit {self.proc.poll()}):\n"
                               f"{self.log.read_text(errors='replace')[-4000:]}")
        return json.loads(line)

    def ask(self, *command: str) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(" ".join(command) + "\n")
        stdin.flush()
        return self.read()

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        """Close stdin (the end of the probe's run) and read its last answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.read(timeout)

    def end(self) -> None:
        """Tell the host to stop (EOF on its stdin); close() waits for it."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def close(self, timeout: float = 30) -> None:
        self.end()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def close_all(hosts: Sequence[Host], timeout: float = 30) -> None:
    """Stop hosts together (each MTA and milter takes a few seconds to stop)."""
    for host in hosts:
        host.end()
    for host in hosts:
        host.close(timeout)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def auth_figures(stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    """What reached the authoritative server: every query, and the resolver's cache misses.

    Under load the server answers late and the resolver sends a question again
    before the answer came (a retransmission): a packet more, no cache miss more.
    """
    queries, retried = stats["queries"], stats["retransmissions"]
    return {"auth_queries": sum(queries.values()),
            "auth_retransmissions": sum(retried.values()),
            "auth_misses": sum(queries.values()) - sum(retried.values()),
            "auth_questions": sorted(queries)}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------
# The run


def run_cell(net: Network, workdir: Path, dns: Host, resolver: Host, n: int, messages: int,
             previous: threading.Thread | None) -> tuple[dict[str, Any], list[Host]]:
    """One cell's figures, and its hosts (to stop) -- after *previous* stopped the last ones."""
    me = [sys.executable, str(Path(__file__).resolve())]
    cell = workdir / f"cell{n}"
    cell.mkdir()
    hosts: list[Host] = []
    try:
        mxs = []
        for i in range(n):
            mx = Host(net.ns(f"mx{i + 1}"),
                      [*me, "host", "mx", "--mta", MTAS[i], "--address", MX_ADDRS[i],
                       "--nameserver", f"{RESOLVER_ADDR}:53",
                       "--workdir", str(cell / f"mx{i + 1}")], cell / f"mx{i + 1}.log")
            hosts.append(mx)
            mxs.append(mx)
        ready = [mx.read() for mx in mxs]
        if previous is not None:
            previous.join()  # the last cell's hosts have stopped: nothing else runs
        resolver.ask("flush")  # a cold cache for every cell
        targets = [f"{MX_ADDRS[i]}:{r['port']}" for i, r in enumerate(ready)]
        pids = [r["milter_pid"] for r in ready]
        dns.ask("reset")
        cpu_before = sum(cpu_seconds(p) for p in pids)

        probe_host = Host(net.ns("cl1"), [*me, "probe", "--source", CLIENT_ADDRS[0],
                                          "--helo", helo_name(0),
                                          "--sender", f"probe@{sender_domain(0)}",
                                          *sum((["--target", t] for t in targets), [])],
                          cell / "probe.log")
        hosts.append(probe_host)
        per_stream = [messages // STREAMS + (1 if k < messages % STREAMS else 0)
                      for k in range(STREAMS)]
        started = time.monotonic()
        load = []
        for k in range(STREAMS):
            if not per_stream[k]:
                continue
            client = k % len(CLIENT_ADDRS)
            argv = ["ip", "netns", "exec", net.ns(f"cl{client + 1}"), SMTP_SOURCE,
                    "-s", str(SESSIONS), "-m", str(per_stream[k]), "-l", "1024",
                    "-M", helo_name(client), "-f", f"load{k}@{sender_domain(k)}",
                    "-t", RECIPIENT, targets[k % n]]
            load.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=LOAD_TIMEOUT)[0] for p in load]
        wall = time.monotonic() - started
        probed = probe_host.finish()
    except BaseException:
        close_all(hosts, timeout=5)
        raise
    try:
        failed = [out for p, out in zip(load, outputs) if p.returncode != 0]
        if failed:
            raise RuntimeError("smtp-source failed:\n" + "\n".join(failed))
        cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
        expected = [sum(per_stream[k] for k in range(STREAMS) if k % n == i)
                    for i in range(n)]
        for i, target in enumerate(targets):
            expected[i] += probed["per_target"][target]
        stats = [mx.ask("stats", str(expected[i])) for i, mx in enumerate(mxs)]
        accepted = sum(s["accepted"] for s in stats)
        times = probed["times"] or [float("nan")]
        return {
            "mx_hosts": n,
            "mtas": "+".join(MTAS[:n]),
            "messages": messages,
            "probe_transactions": len(probed["times"]),
            "probe_failures": probed["failures"],
            "seconds": wall,
            "msgs_per_s": messages / wall,
            "p50_ms": 1000 * percentile(times, 0.50),
            "p99_ms": 1000 * percentile(times, 0.99),
            "milter_cpu_ms_per_msg": 1000 * cpu / (messages + len(probed["times"])),
            "resolver_queries": resolver.ask("stats")["queries"],
            **auth_figures(dns.ask("stats")),
            "accepted": accepted - len(probed["times"]),
            "milters_alive": all(s["milter_alive"] for s in stats),
            "milter_tracebacks": sum(s["milter_errors"] for s in stats),
        }, hosts
    except BaseException:
        close_all(hosts, timeout=5)
        raise


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'MX':>2}  {'MTAs':<24} {'msgs':>6} {'msg/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'milter CPU ms/msg':>17} {'resolver q':>10} {'auth q':>6} {'accepted':>8}")
    for r in rows:
        print(f"{r['mx_hosts']:>2}  {r['mtas']:<24} {r['messages']:>6} {r['msgs_per_s']:>7.1f} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['milter_cpu_ms_per_msg']:>17.2f} "
              f"{r['resolver_queries']:>10} {r['auth_queries']:>6} "
              f"{r['accepted']:>5}/{r['messages']:<5}")
    print(f"p50/p99: {sum(r['probe_transactions'] for r in rows)} transactions (MAIL FROM to "
          "the reply after DATA) timed by the probe client during the load; "
          "resolver q: queries the milters sent to the resolver; "
          "auth q: queries reaching NSD (of them retransmitted by the resolver: "
          + ", ".join(str(r["auth_retransmissions"]) for r in rows) + ")")


def run(args: argparse.Namespace) -> int:
    from tests.e2e.mta import make_workdir, postfix_binary, sendmail_binary

    if os.geteuid() != 0:
        raise SystemExit("bench_fleet.py needs root (ip netns)")
    if not os.access(SMTP_SOURCE, os.X_OK):
        raise SystemExit(f"{SMTP_SOURCE} missing: install Debian package postfix")
    postfix_binary()
    sendmail_binary()  # fetched and unpacked once, outside the namespaces
    workdir = make_workdir("spfmilter-fleet-")
    net = Network()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    dns: Host | None = None
    resolver: Host | None = None
    stopping: threading.Thread | None = None
    try:
        roles = {"dns": DNS_ADDR, "res": RESOLVER_ADDR}
        roles.update({f"mx{i + 1}": a for i, a in enumerate(MX_ADDRS[:max(args.hosts)])})
        roles.update({f"cl{i + 1}": a for i, a in enumerate(CLIENT_ADDRS)})
        net.build(roles)
        me = [sys.executable, str(Path(__file__).resolve())]
        dns = Host(net.ns("dns"), [*me, "host", "dns", "--address", DNS_ADDR],
                   workdir / "dns.log")
        dns_port = dns.read()["port"]
        resolver = Host(net.ns("res"), [*me, "host", "resolver", "--address", RESOLVER_ADDR,
                                        "--upstream", f"{DNS_ADDR}:{dns_port}"],
                        workdir / "res.log")
        resolver.read()
        for n in args.hosts:
            row, hosts = run_cell(net, workdir, dns, resolver, n, args.messages, stopping)
            rows.append(row)
            print(f"cell {n}: {json.dumps(row)}", file=sys.stderr, flush=True)
            # MTAs and milters take seconds to stop: the next cell starts meanwhile
            stopping = threading.Thread(target=close_all, args=(hosts,))
            stopping.start()
    finally:
        if stopping is not None:
            stopping.join()
        for server in (resolver, dns):
            if server is not None:
                server.close()
        net.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    ok = all(r["accepted"] == r["messages"] and not r["probe_failures"]
             and r["milters_alive"] and not r["milter_tracebacks"] for r in rows)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--messages", type=int, default=2000, help="messages per cell")
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 3],
                        choices=[1, 2, 3], help="cells: numbers of MX hosts")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    host = sub.add_parser("host", help="(internal) one host of the run, in its namespace")
    host.add_argument("role", choices=["dns", "resolver", "mx"])
    host.add_argument("--address", required=True)
    host.add_argument("--upstream")
    host.add_argument("--nameserver")
    host.add_argument("--mta", choices=["postfix", "sendmail"])
    host.add_argument("--workdir")
    pr = sub.add_parser("probe", help="(internal) the timing client, in a client namespace")
    pr.add_argument("--target", dest="targets", action="append", required=True)
    pr.add_argument("--source", required=True)
    pr.add_argument("--helo", required=True)
    pr.add_argument("--sender", required=True)
    pr.add_argument("--per-session", type=int, default=5)
    pr.add_argument("--min", type=int, default=20, help="transactions at least")
    args = parser.parse_args(argv)
    if args.command == "host":
        {"dns": host_dns, "resolver": host_resolver, "mx": host_mx}[args.role](args)
        return 0
    if args.command == "probe":
        probe(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
