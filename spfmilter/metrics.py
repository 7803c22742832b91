"""Prometheus metrics: counters the milter bumps, and the HTTP endpoint serving them.

One :class:`Metrics` lives as long as the daemon (reloads keep its counts) in a
registry of its own, not prometheus-client's global one.  The milter's hot path
only looks up a cached child and increments it; the DNS cache counters are read
from the checker when Prometheus scrapes (:class:`_CheckerCollector`).

Every label value comes from a fixed set: a reason or skip this module does not
know becomes ``other``, so no domain or address ever reaches a label.
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._version import __version__
from .config import ACTIONS, ListenAddress
from .results import IDENTITIES, RESULTS
from .spfcheck import SpfChecker
from .transaction import Verdict

#: transactions_total reason label for each Decision.reason policy gives.
REASONS: dict[str, str] = {
    **{f"{i} {r}": f"{i}_{r}" for i in IDENTITIES for r in RESULTS},
    "policy": "policy",  # checked, and no result the policy refuses
    "no SPF result": "no_spf_result",
    "internal error": "internal_error",
}
_SKIPPED_PREFIX = "skipped: "
#: skips_total reason label for each skip reason; "forwarder DOMAIN" is "forwarder".
SKIPS: dict[str, str] = {
    "local client": "local_client",
    "internal host": "internal_host",
    "trusted relay": "trusted_relay",
    "authenticated": "authenticated",
}
OTHER = "other"
#: Whether Verdict carries the dmarc_defer marker (issue 10 part 2) to count.
_VERDICT_DEFERS = hasattr(Verdict, "deferred")
#: internal_errors_total stage label: the milter stages SpfMilter implements.
STAGES = ("connect", "helo", "envfrom", "header", "eom", "abort", "close", OTHER)

#: Evaluation time buckets (seconds): a cache hit is sub-millisecond, the DNS
#: budget of RFC 7208 4.6.4 is 20 s.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 20.0, 30.0)


def reason_label(reason: str) -> str:
    """The bounded transactions_total label of a Decision.reason."""
    label = REASONS.get(reason)
    if label is not None:
        return label
    return "skipped" if reason.startswith(_SKIPPED_PREFIX) else OTHER


def skip_label(skip: str) -> str:
    """The bounded skips_total label of a skip reason."""
    label = SKIPS.get(skip)
    if label is not None:
        return label
    return "forwarder" if skip.startswith("forwarder ") else OTHER


class Metrics:
    """The daemon's counters; thread-safe, cheap to bump."""

    def __init__(self, checker: SpfChecker, *, libmilter: str = "") -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self._transactions = Counter(
            "spfmilter_transactions", "Transactions decided (one per log line), by action"
            " and reason", ["action", "reason"], registry=reg)
        self._spf = Counter(
            "spfmilter_spf_results", "SPF results of the identities checked in decided"
            " transactions, by identity and result", ["identity", "result"], registry=reg)
        self._skips = Counter(
            "spfmilter_skips", "Transactions not checked, by reason", ["reason"],
            registry=reg)
        self._deferred = Counter(
            "spfmilter_dmarc_deferred", "SPF rejects left to the DMARC verifier",
            registry=reg)
        self._seconds = Histogram(
            "spfmilter_evaluation_seconds", "Time to check an identity and judge, by stage",
            ["stage"], buckets=BUCKETS, registry=reg)
        self._errors = Counter(
            "spfmilter_internal_errors", "Internal errors (the on_error verdict given),"
            " by milter stage", ["stage"], registry=reg)
        self._reloads = Counter(
            "spfmilter_reloads", "Configuration reloads, by result", ["result"],
            registry=reg)
        Info("spfmilter_build", "Version of spfmilter, Python and libmilter",
             registry=reg).info({"version": __version__,
                                 "python": platform.python_version(),
                                 "libmilter": libmilter})
        self._dns = _CheckerCollector(checker)
        reg.register(self._dns)
        ProcessCollector(registry=reg)
        GCCollector(registry=reg)
        # Children looked up once: the hot path does a dict get and an inc().
        # The series alerts use exist from the start at 0 (rate() misses a
        # series that first appears at 1).
        self._transaction_children = {
            (action, reason): self._transactions.labels(action, reason)
            for action in ACTIONS for reason in ("policy", "mailfrom_fail",
                                                 "mailfrom_temperror")}
        self._spf_children = {(i, r): self._spf.labels(i, r)
                              for i in IDENTITIES for r in RESULTS}
        self._skip_children = {label: self._skips.labels(label)
                               for label in (*SKIPS.values(), "forwarder", OTHER)}
        self._stage_children = {s: self._seconds.labels(s) for s in IDENTITIES}
        self._error_children = {s: self._errors.labels(s) for s in STAGES}
        self._reload_children = {r: self._reloads.labels(r) for r in ("ok", "refused",
                                                                       "failed")}

    # -- the hot path ----------------------------------------------------------
    def transaction(self, verdict: Verdict, action: str) -> None:
        """Count a decided transaction where its log line is written."""
        reason = reason_label(verdict.decision.reason)
        key = (action, reason)
        child = self._transaction_children.get(key)
        if child is None:
            child = self._transaction_children.setdefault(
                key, self._transactions.labels(action, reason))
        child.inc()
        for spf in (verdict.helo, verdict.mailfrom):
            if spf is not None and spf.checked:
                self._spf_children[(spf.identity, spf.result)].inc()
        if verdict.skip is not None:
            self._skip_children[skip_label(verdict.skip)].inc()
        if _VERDICT_DEFERS and verdict.deferred:  # type: ignore[attr-defined]
            self._deferred.inc()

    def evaluation(self, stage: str, seconds: float) -> None:
        """Observe the time one check took; stage is "helo" or "mailfrom"."""
        self._stage_children[stage].observe(seconds)

    def dmarc_deferred(self) -> None:
        """Count an SPF reject deferred to DMARC, where no Verdict.deferred says so."""
        self._deferred.inc()

    # -- rare events -----------------------------------------------------------
    def internal_error(self, stage: str) -> None:
        """Count an internal error in a milter stage (a fixed set of names)."""
        self._error_children.get(stage, self._error_children[OTHER]).inc()

    def reload(self, result: str) -> None:
        """Count a reload: "ok", "refused" (bad config, old one kept) or "failed"."""
        self._reload_children[result].inc()

    def use_checker(self, checker: SpfChecker) -> None:
        """A reload replaced the checker: keep counting from the old one's totals."""
        self._dns.use(checker)


# DnsCache.stats() keys exposed as counters and gauges, per cache of the checker.
_CACHES = (
    ("cache", "spfmilter_dns_cache", "DNS answers"),
    ("results", "spfmilter_spf_result_cache", "whole SPF results"),
)


class _CheckerCollector:
    """Reads the checker's cache counters at scrape time (nothing on the hot path).

    A reload that replaces the checker adds the old one's totals to a base, so
    the counters never go back; counts a connection opened before the reload
    still makes on the old checker after it are not seen.
    """

    def __init__(self, checker: SpfChecker) -> None:
        self._lock = threading.Lock()
        self._checker = checker
        self._base = {attr: {"hits": 0, "misses": 0, "evictions": 0} for attr, _, _ in _CACHES}

    def use(self, checker: SpfChecker) -> None:
        with self._lock:
            if checker is self._checker:
                return
            for attr, _, _ in _CACHES:
                stats = getattr(self._checker, attr).stats()
                for key in self._base[attr]:
                    self._base[attr][key] += stats[key]
            self._checker = checker

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            current = {attr: getattr(self._checker, attr).stats() for attr, _, _ in _CACHES}
            base = {attr: dict(values) for attr, values in self._base.items()}
        for attr, prefix, what in _CACHES:
            stats, old = current[attr], base[attr]
            yield _counter(f"{prefix}_hits", f"Lookups of {what} answered from the cache",
                           stats["hits"] + old["hits"])
            if attr == "cache":  # a result lookup probes several keys: misses mean little
                yield _counter(f"{prefix}_misses", f"Lookups of {what} not in the cache"
                               " (each one a query to the nameservers)",
                               stats["misses"] + old["misses"])
            yield _counter(f"{prefix}_evictions", f"Cached {what} dropped for room",
                           stats["evictions"] + old["evictions"])
            yield _gauge(f"{prefix}_entries", f"Cached {what}", stats["size"])
            yield _gauge(f"{prefix}_max_entries", f"Cache size for {what}", stats["maxsize"])


def _counter(name: str, doc: str, value: float) -> Metric:
    metric = CounterMetricFamily(name, doc)
    metric.add_metric([], value)
    return metric


def _gauge(name: str, doc: str, value: float) -> Metric:
    metric = GaugeMetricFamily(name, doc)
    metric.add_metric([], value)
    return metric


# -- the endpoint --------------------------------------------------------------

class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper does not hold up the daemon's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # one line per mail transaction is the log's job, not one per scrape


class MetricsServer:
    """The HTTP endpoint: bound by the constructor (before privileges are dropped
    and before any fork), served from a thread by :meth:`start`."""

    def __init__(self, metrics: Metrics, listen: ListenAddress) -> None:
        server_class = _Server6 if ":" in listen.host else _Server
        self.listen = listen
        self._httpd = make_server(listen.host, listen.port, make_wsgi_app(metrics.registry),
                                  server_class=server_class, handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="spfmilter-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

