"""The CPU cost of one DNS query: spfmilter's paths and dnspython's, against a local NSD.

Each path asks NSD (bench_app_dns.Nsd, serving tests/data/zones and
bench/zones) --queries questions, every one for a name never asked before,
and the script reports the process CPU time (user + system, from
time.process_time) per query.  NSD's own CPU is not counted.  With
--threads N the queries are shared by N threads asking at once, as
libmilter's worker threads do: the CPU then includes handing the GIL
between them.  Paths take turns, round by round; the table shows each
path's median round and the range over rounds.

  resolver   dnspython's Resolver.resolve over spfmilter's TolerantNameserver:
             spfmilter's lookup before the DnsClient (a socket per query)
  client     spfmilter.dnsclient.DnsClient.query: spfmilter's lookup now (with
             the C helper spfmilter._udp: one GIL release per query)
  socketmod  the same client with native=False: the socket module's send and
             recv (two GIL releases per query; what runs without the helper)
  lookup     SpfChecker._lookup on a miss: the client plus turning the answer
             into pyspf's records and caching it (what pyspf's lookup costs)
  bare       dns.message.make_query + dns.query.udp, no retries, no checks
             beyond dnspython's: a floor for dnspython's message handling

Questions: TXT for LABEL.pass.bench.test (a positive answer with NSD's NS
and A records in the authority and additional sections), and with
--kind nxdomain TXT for LABEL.nx.spf.test (NXDOMAIN with an SOA).

  .venv/bin/python bench/bench_dns_query.py                 # ~30 s
  .venv/bin/python bench/bench_dns_query.py --queries 200 --rounds 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, bench_app_dns
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # spfmilter

import dns.message  # noqa: E402
import dns.name  # noqa: E402
import dns.query  # noqa: E402
import dns.rdatatype  # noqa: E402
import dns.resolver  # noqa: E402
from bench_app_dns import Nsd  # noqa: E402
from benchlib import int_list, machine_line  # noqa: E402

from spfmilter.dnsclient import EDNS_PAYLOAD, DnsClient  # noqa: E402
from spfmilter.dnscompat import make_resolver  # noqa: E402
from spfmilter.nameserver import TolerantNameserver  # noqa: E402
from spfmilter.spfcheck import SpfChecker, _Session  # noqa: E402

PATHS = ("resolver", "client", "socketmod", "lookup", "bare")
KINDS = {"txt": "{label}.pass.bench.test", "nxdomain": "{label}.nx.spf.test"}
TABLE_HEAD = (f"{'path':<10} {'kind':<9} {'threads':>7} {'queries':>7} {'us/query':>9} "
              f"{'min':>7} {'max':>7}")


def make_paths(host: str, port: int) -> dict[str, Callable[[str], object]]:
    """One function per path, each asking (name, TXT) once."""
    resolver = make_resolver([(host, port)], TolerantNameserver)
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    client = DnsClient([(host, port)])
    socketmod = DnsClient([(host, port)], native=False)
    checker = SpfChecker(nameservers=[(host, port)], lookup_timeout=5, cache_size=1_000_000)
    txt = dns.rdatatype.TXT

    def by_resolver(name: str) -> object:
        try:
            return resolver.resolve(name, "TXT", lifetime=5, search=False,
                                    raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:  # as spfcheck caught it, for the SOA
            return exc

    def by_client(name: str) -> object:
        return client.query(dns.name.from_text(name), txt, time.monotonic() + 5)

    def by_socket_module(name: str) -> object:
        return socketmod.query(dns.name.from_text(name), txt, time.monotonic() + 5)

    def by_lookup(name: str) -> object:
        return checker._lookup(_Session(checker, time.monotonic() + 5), name, "TXT")

    def bare(name: str) -> object:
        query = dns.message.make_query(name, txt, use_edns=0, payload=EDNS_PAYLOAD)
        return dns.query.udp(query, host, port=port, timeout=5)

    return {"resolver": by_resolver, "client": by_client, "socketmod": by_socket_module,
            "lookup": by_lookup, "bare": bare}


def cpu_per_query(ask: Callable[[str], object], names: list[str], threads: int = 1) -> float:
    """Microseconds of this process's CPU per call of *ask*, *names* shared by *threads*."""
    started = time.process_time()
    if threads == 1:
        for name in names:
            ask(name)
    else:
        workers = [threading.Thread(target=lambda part=names[n::threads]: [ask(x) for x in part])
                   for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return (time.process_time() - started) / len(names) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--queries", type=int, default=2000, help="queries per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int_list, default=[1, 8],
                        help="comma-separated numbers of threads asking at once (default 1,8)")
    parser.add_argument("--kind", choices=sorted(KINDS), action="append",
                        help="question kind (repeatable; default txt and nxdomain)")
    args = parser.parse_args(argv)
    kinds = args.kind or ["txt", "nxdomain"]
    labels = (f"q{n}" for n in itertools.count())
    print(machine_line())
    with Nsd() as nsd:
        paths = make_paths(nsd.host, nsd.port)
        for ask in paths.values():  # warm up imports and first sockets
            ask(KINDS["txt"].format(label="warmup"))
        results: dict[tuple[str, str, int], list[float]] = {}
        for _round in range(args.rounds):
            for threads in args.threads:
                for kind in kinds:
                    for path in PATHS:
                        names = [KINDS[kind].format(label=next(labels))
                                 for _ in range(args.queries)]
                        results.setdefault((path, kind, threads), []).append(
                            cpu_per_query(paths[path], names, threads))
    print(TABLE_HEAD)
    for threads in args.threads:
        for kind in kinds:
            for path in PATHS:
                values = results[(path, kind, threads)]
                print(f"{path:<10} {kind:<9} {threads:>7} {args.queries:>7} "
                      f"{statistics.median(values):>9.0f} {min(values):>7.0f} "
                      f"{max(values):>7.0f}")
    for threads in args.threads:
        for kind in kinds:
            before = statistics.median(results[("resolver", kind, threads)])
            now = statistics.median(results[("client", kind, threads)])
            print(f"client / resolver ({kind}, {threads} threads): {now / before:.2f}x "
                  f"the CPU per query")
            py = statistics.median(results[("socketmod", kind, threads)])
            print(f"client / socketmod ({kind}, {threads} threads): {now / py:.2f}x "
                  f"the CPU per query")
    return 0


if __name__ == "__main__":
    sys.exit(main())
