"""DNS for the application benchmark: NSD serving the test zones, inside a netns if need be.

Both milters must resolve through the same server.  spfmilter can be given a
server address and port, but pyspf-milter only reads /etc/resolv.conf (port
53).  So the benchmark can run itself inside a private network namespace:
there NSD listens on 127.0.0.1:53 and ``/etc/netns/NAME/resolv.conf`` (which
``ip netns exec`` bind-mounts over /etc/resolv.conf) says ``nameserver
127.0.0.1``.  Without pyspf-milter no namespace is needed: NSD takes a free
port on loopback and spfmilter is pointed at it.

Unlike tests/dnsserver.py there is no counting relay in front of NSD: a relay
in Python would be the bottleneck of a cold-cache run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchlib import proc_cpu_seconds, stat_fields

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ZONE_DIRS = (ROOT / "tests" / "data" / "zones", BENCH / "zones")
#: Configured without a file: NSD answers SERVFAIL (a temperror case).
SERVFAIL_ZONES = ("servfail.test",)
NSD = "/usr/sbin/nsd"
NSD_CONTROL = "/usr/sbin/nsd-control"
PROBE = ("bench.test", "SOA")
#: Set in the environment of the benchmark re-run inside its namespace.
NETNS_ENV = "SPFMILTER_BENCH_NETNS"


class DnsError(Exception):
    """NSD or the network namespace could not be set up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on host a moment ago."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise DnsError(f"no free TCP+UDP port on {host}")


def zone_files() -> list[tuple[str, Path]]:
    """(zone name, file) for every NAME.zone in the zone folders; root.zone is '.'."""
    zones = []
    for directory in ZONE_DIRS:
        for path in sorted(directory.glob("*.zone")):
            name = path.name[: -len(".zone")]
            zones.append(("." if name == "root" else name, path))
    return zones


class Nsd:
    """NSD on host:port serving the test zones and bench/zones; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nsd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nameserver(self) -> str:
        """``HOST:PORT``, as spfmilter's ``[spf] nameservers`` takes it."""
        return f"{self.host}:{self.port}"

    def start(self) -> Nsd:
        if not os.path.exists(NSD):
            raise DnsError(f"{NSD} not found: install the Debian package nsd")
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-nsd-")
        tmp = Path(self._tmp.name)
        if not self.port:
            self.port = free_port(self.host)
        lines = [
            "server:",
            f"    ip-address: {self.host}@{self.port}",
            f"    port: {self.port}",
            "    do-ip6: no",
            "    server-count: 1",
            '    username: ""',
            '    chroot: ""',
            '    database: ""',
            f'    pidfile: "{tmp}/nsd.pid"',
            f'    zonelistfile: "{tmp}/zone.list"',
            f'    xfrdfile: "{tmp}/xfrd.state"',
            f'    xfrdir: "{tmp}"',
            "    rrl-ratelimit: 0",  # NSD's default 200/s would drop answers under load
            "    verbosity: 1",
            "    tcp-count: 500",
            "    zonefiles-write: 0",
            "remote-control:",  # on a unix socket (no TLS keys): for queries()
            "    control-enable: yes",
            f"    control-interface: {tmp}/control.sock",
        ]
        for name, path in zone_files():
            lines += ["zone:", f'    name: "{name}"', f'    zonefile: "{path}"']
        for name in SERVFAIL_ZONES:
            lines += ["zone:", f'    name: "{name}"', f'    zonefile: "{tmp}/missing/{name}"']
        conf = self._conf = tmp / "nsd.conf"
        conf.write_text("\n".join(lines) + "\n", encoding="ascii")
        self._log = tmp / "nsd.log"
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen([NSD, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        import dns.exception
        import dns.message
        import dns.query
        import dns.rcode

        query = dns.message.make_query(*PROBE)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DnsError(f"nsd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                answer = dns.query.udp(query, self.host, port=self.port, timeout=0.25)
            except (OSError, dns.exception.DNSException):
                if time.monotonic() > deadline:
                    raise DnsError(f"nsd not answering on {self.nameserver} after {timeout}s:"
                                   f"\n{self.log()}") from None
                time.sleep(0.05)
                continue
            if answer.rcode() != dns.rcode.NOERROR:
                raise DnsError(f"nsd answers {dns.rcode.to_text(answer.rcode())} for "
                               f"{' '.join(PROBE)}:\n{self.log()}")
            return

    def log(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except (AttributeError, OSError):
            return ""

    def queries(self) -> int:
        """Queries NSD has answered so far (nsd-control stats_noreset: num.queries)."""
        done = subprocess.run([NSD_CONTROL, "-c", str(self._conf), "stats_noreset"],
                              capture_output=True, text=True, check=False, timeout=30)
        for line in done.stdout.splitlines():
            if line.startswith("num.queries="):
                return int(line.split("=", 1)[1])
        raise DnsError(f"{NSD_CONTROL} stats_noreset gave no num.queries (status "
                       f"{done.returncode}): {(done.stdout + done.stderr).strip()[:300]}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of NSD and its child processes so far."""
        if self.proc is None:
            return 0.0
        parents = {int(e): _ppid(int(e)) for e in os.listdir("/proc") if e.isdigit()}
        family = {self.proc.pid}
        grew = True
        while grew:  # NSD forks xfrd and its server processes
            found = {pid for pid, ppid in parents.items() if ppid in family}
            grew = not found <= family
            family |= found
        return sum(proc_cpu_seconds(pid) for pid in family)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _ppid(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else -1


def inside_netns() -> bool:
    """True in the benchmark's re-run inside its network namespace."""
    return bool(os.environ.get(NETNS_ENV))


def run_in_netns(argv: Sequence[str]) -> int:
    """Run argv in a new network namespace whose resolv.conf says 127.0.0.1; its status.

    Needs root and iproute2.  The namespace has only loopback (brought up);
    it and /etc/netns/NAME are removed afterwards.
    """
    ip = shutil.which("ip")
    if ip is None:
        raise DnsError("the ip command (iproute2) is needed to make a network namespace")
    if os.geteuid() != 0:
        raise DnsError("a network namespace needs root; run as root, or use --skip-pyspf "
                       "(spfmilter alone needs no namespace)")
    name = f"spfbench{os.getpid()}"
    etc = Path("/etc/netns") / name
    created = False
    try:
        _run([ip, "netns", "add", name])
        created = True
        _run([ip, "-n", name, "link", "set", "lo", "up"])
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n", encoding="ascii")
        env = {**os.environ, NETNS_ENV: name}
        return subprocess.call([ip, "netns", "exec", name, *argv], env=env)
    finally:
        if created:
            subprocess.run([ip, "netns", "del", name], check=False)
        shutil.rmtree(etc, ignore_errors=True)


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DnsError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
