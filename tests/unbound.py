"""A real caching resolver (Debian's unbound) in front of the test NSD.

unbound runs as a recursive resolver on a private loopback port (or on a
given address and port, as in bench/bench_fleet.py) with one
stub zone, the root ``.``, pointing at the counting relay of a
:class:`~tests.dnsserver.DnsServer`: every name is resolved through the test
zones, and every query unbound sends upstream is counted there.  Its answers
carry TTLs counted down since it cached them, as a site's resolver would.

The default local zones that collide with test names (``test.``,
``invalid.``) are switched off, DNSSEC validation is not loaded (the test
zones are unsigned), and QNAME minimisation is off so that the upstream
query counts name exactly the names looked up.  Queries under the relay's
dropped names go to a stub zone of their own on the relay's other address
(::1), so that those timeouts, which unbound records per server address,
never mark the server of every other name down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from tests.dnsserver import DnsServer, _free_port, wait_answering

UNBOUND = "/usr/sbin/unbound"
UNBOUND_CHECKCONF = "/usr/sbin/unbound-checkconf"
UNBOUND_CONTROL = "/usr/sbin/unbound-control"
#: Default local zones of unbound that would answer test names itself.
NODEFAULT_ZONES = ("test", "invalid")


@dataclass(frozen=True)
class Upstream:
    """An authoritative server elsewhere (e.g. in another network namespace)."""

    host: str
    port: int
    probe_zone: str
    host6: str = ""
    drop: tuple[str, ...] = ()


class Unbound:
    """unbound on *host* resolving through *upstream*; use as a context manager.

    ``stop()`` then ``start()`` brings it back on the same port (a resolver
    that restarts); ``pause()``/``resume()`` freeze it (one that hangs).
    *port* 0 picks a free one; *allow* are the client networks it serves.
    """

    def __init__(self, upstream: DnsServer | Upstream, *, host: str = "127.0.0.1",
                 port: int = 0, allow: Sequence[str] = ("127.0.0.0/8",),
                 extra: Sequence[str] = ()) -> None:
        self.upstream = upstream
        self.host = host
        self.allow = tuple(allow)
        self.extra = tuple(extra)
        self.port = port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nameservers(self) -> list[str]:
        """``["127.0.0.1:PORT"]``: the form a config file takes."""
        return [f"{self.host}:{self.port}"]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", PORT)]``: the form SpfChecker takes."""
        return [(self.host, self.port)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Unbound:
        if self.running:
            raise RuntimeError("unbound already running")
        if not os.path.exists(UNBOUND):
            raise RuntimeError(f"{UNBOUND} not found: install Debian package unbound")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="spfmilter-unbound-")
        failures = []
        for _ in range(3):  # another process may grab the port we picked
            port = self.port or _free_port(self.host)
            conf = self._write_config(port)
            check = subprocess.run([UNBOUND_CHECKCONF, conf], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"unbound-checkconf {conf}:\n{check.stdout}{check.stderr}")
            with open(self._log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [UNBOUND, "-d", "-c", conf],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            try:
                wait_answering(self.host, port, self.upstream.probe_zone, udp=True,
                               proc=self._proc, name="unbound", log=self.log)
            except RuntimeError as exc:
                failures.append(str(exc))
                self._kill()
                if self.port:  # a restart must keep its port: nothing else to try
                    break
                continue
            self.port = port
            return self
        self.stop()
        raise RuntimeError("unbound did not start:\n" + "\n---\n".join(failures))

    def stop(self) -> None:
        """Stop the process; the port and the directory stay for a restart."""
        if self._proc is not None:
            self.resume()
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._kill()
            self._proc = None

    def pause(self) -> None:
        """Freeze unbound (SIGSTOP): queries reach its socket and go unanswered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Unbound:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def control(self, *command: str) -> str:
        """Run unbound-control with *command*; its output."""
        assert self._tmp is not None
        out = subprocess.run([UNBOUND_CONTROL, "-c", os.path.join(self._tmp.name, "unbound.conf"),
                              *command], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"unbound-control {' '.join(command)}: {out.stdout}{out.stderr}")
        return out.stdout

    def flush(self) -> None:
        """Empty every cache (a cold start without a restart) and zero the counters."""
        self.control("flush_zone", ".")
        self.control("flush_infra", "all")
        self.control("stats")  # reads and resets

    def stats(self) -> dict[str, float]:
        """unbound-control stats_noreset as a dict (e.g. ``total.num.queries``)."""
        found = {}
        for line in self.control("stats_noreset").splitlines():
            name, _, value = line.partition("=")
            try:
                found[name] = float(value)
            except ValueError:
                pass
        return found

    def log(self) -> str:
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    # -- internals ------------------------------------------------------

    @property
    def _log_path(self) -> str:
        assert self._tmp is not None
        return os.path.join(self._tmp.name, "unbound.log")

    def _kill(self) -> None:
        assert self._proc is not None
        self.resume()
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def _write_config(self, port: int) -> str:
        assert self._tmp is not None
        tmp = self._tmp.name
        up = self.upstream.port
        up6 = self.upstream.host6 or self.upstream.host
        lines = [
            "server:",
            f"    interface: {self.host}",
            f"    port: {port}",
            "    do-daemonize: no",
            '    username: ""',
            '    chroot: ""',
            f'    directory: "{tmp}"',
            f'    pidfile: "{tmp}/unbound.pid"',
            '    logfile: ""',
            "    use-syslog: no",
            "    verbosity: 1",
            "    num-threads: 1",
            "    so-reuseport: no",
            '    module-config: "iterator"',
            "    do-not-query-localhost: no",
            "    qname-minimisation: no",
            *(f"    access-control: {net} allow" for net in self.allow),
            "    infra-keep-probing: yes",
        ]
        lines += [f'    local-zone: "{zone}." nodefault' for zone in NODEFAULT_ZONES]
        lines += [f"    {line}" for line in self.extra]
        lines += ["remote-control:", "    control-enable: yes",
                  f'    control-interface: "{tmp}/control.sock"', "    control-use-cert: no",
                  "stub-zone:", '    name: "."', f"    stub-addr: {self.upstream.host}@{up}"]
        for name in self.upstream.drop:
            lines += ["stub-zone:", f'    name: "{name}."', f"    stub-addr: {up6}@{up}"]
        conf = os.path.join(tmp, "unbound.conf")
        with open(conf, "w", encoding="ascii") as fh:
            fh.write("\n".join(lines) + "\n")
        return conf


@pytest.fixture(scope="module")
def unbound(dns_server: DnsServer) -> Iterator[Unbound]:
    """unbound in front of the session NSD, for one test module."""
    with Unbound(dns_server) as resolver:
        yield resolver
