"""[metrics]: the Prometheus endpoint of the real daemon, scraped over HTTP after
known transactions against NSD; the config rules; bounded labels."""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from spfmilter import config, metrics
from tests.procs import PYTHON, ROOT, Daemon, free_port
from tests.test_daemon import FAIL, TEMPERROR, _wait_for, run, write_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(listen: str) -> Samples:
    """Every sample the endpoint serves, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process pid listens on (from its fds and /proc/net/tcp*)."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    ports = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            ports.add(listening[target[8:-1]])
    return ports


def metrics_config(path: Path, workdir: Path, dns, listen: str, extra: str = "") -> None:
    """test_daemon's config with [metrics], without forwarders (whose check on every
    new connection would add DNS and cache counts of its own)."""
    write_config(path, workdir, dns, extra=f"\n[metrics]\nlisten = {listen}\n{extra}")
    path.write_text(path.read_text().replace("forwarders = fwd.example\n", ""))


@pytest.fixture(scope="module")
def mdaemon(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfm", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "spfmilter.cfg"
        listen = f"127.0.0.1:{free_port()}"
        metrics_config(cfg, work, dns_server, listen)
        proc = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                      f"unix:{work}/spf.sock", work)
        proc.cfg, proc.work, proc.listen = cfg, work, listen
        with proc:
            yield proc


def test_counts_after_known_transactions(mdaemon):
    before = scrape(mdaemon.listen)
    assert value(before, "spfmilter_transactions_total", action="reject",
                 reason="mailfrom_fail") == 0
    assert value(before, "spfmilter_dns_cache_misses_total") == 0
    literal = "[127.0.0.2]"  # an address literal HELO is not checked: only MAIL FROM is
    assert run(mdaemon, helo=literal).action == "continue"  # pass: TXT pass.spf.test
    assert run(mdaemon, ip="127.0.0.3", helo="[127.0.0.3]").action == "continue"  # DNS hit
    assert run(mdaemon, ip="127.0.0.3", helo="[127.0.0.3]").action == "continue"  # result hit
    assert run(mdaemon, helo=literal, sender="<u@softfail.spf.test>").action == "continue"
    resp = run(mdaemon, helo=literal, sender="<u@fail.spf.test>")
    assert (resp.code, resp.xcode) == FAIL
    resp = run(mdaemon, helo=literal, sender="<u@servfail.test>")
    assert (resp.code, resp.xcode) == TEMPERROR
    assert run(mdaemon, ip="127.0.0.1", sender="<u@fail.spf.test>").action == "continue"
    assert run(mdaemon, sender="<u@fail.spf.test>",
               macros={"mail": {"{auth_authen}": "bob"}}).action == "continue"
    assert run(mdaemon, ip="127.0.0.9", sender="<u@fail.spf.test>").action == "continue"
    assert run(mdaemon, helo="pass.spf.test").action == "continue"  # HELO checked too
    got = scrape(mdaemon.listen)

    def counted(action: str, reason: str) -> float:
        return value(got, "spfmilter_transactions_total", action=action, reason=reason)

    assert counted("accept", "policy") == 5
    assert counted("reject", "mailfrom_fail") == 1
    assert counted("tempfail", "mailfrom_temperror") == 1
    assert counted("accept", "skipped") == 3
    assert sum(v for (name, _), v in got.items() if name == "spfmilter_transactions_total") == 10
    for reason, count in [("internal_host", 1), ("authenticated", 1), ("trusted_relay", 1)]:
        assert value(got, "spfmilter_skips_total", reason=reason) == count
    spf = {(dict(labels)["identity"], dict(labels)["result"]): v
           for (name, labels), v in got.items() if name == "spfmilter_spf_results_total" and v}
    assert spf == {("mailfrom", "pass"): 4, ("mailfrom", "softfail"): 1,
                   ("mailfrom", "fail"): 1, ("mailfrom", "temperror"): 1,
                   ("helo", "pass"): 1}
    # DNS: pass.spf.test asked once, then answered from the DNS cache for 127.0.0.3.
    # Whole-result cache hits: the third check; the HELO checks of pass.spf.test from
    # 127.0.0.2 (the authenticated one, at HELO before the skip, and the last one)
    # and the last MAIL FROM check.
    assert value(got, "spfmilter_dns_cache_hits_total") == 1
    assert value(got, "spfmilter_spf_result_cache_hits_total") == 4
    # misses = queries sent: pass, softfail, fail and its exp=, servfail
    assert value(got, "spfmilter_dns_cache_misses_total") == 5
    assert value(got, "spfmilter_evaluation_seconds_count", stage="mailfrom") == 10
    assert value(got, "spfmilter_evaluation_seconds_count", stage="helo") == 2
    assert value(got, "spfmilter_internal_errors_total", stage="envfrom") == 0
    assert value(got, "spfmilter_dmarc_deferred_total") == 0
    info = [dict(labels) for (name, labels) in got if name == "spfmilter_build_info"]
    assert len(info) == 1 and info[0]["version"] == __import__("spfmilter").__version__
    assert info[0]["python"].startswith("3.") and info[0]["libmilter"]
    assert value(got, "process_open_fds") > 0
    # no label carries a domain or an address: only words from the fixed sets
    for name, labels in got:
        if name.startswith("spfmilter_") and name != "spfmilter_build_info":
            assert all(re.fullmatch(r"[a-z_]+", v) for k, v in labels if k != "le"), name
    assert listening_tcp_ports(mdaemon.proc.pid) == {int(mdaemon.listen.rsplit(":", 1)[1])}


def test_reload_counts_and_listen_is_restart_only(mdaemon, dns_server):
    before = value(scrape(mdaemon.listen), "spfmilter_reloads_total", result="ok")
    metrics_config(mdaemon.cfg, mdaemon.work, dns_server, mdaemon.listen,
                   extra="allow_remote = yes")
    mdaemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: value(scrape(mdaemon.listen), "spfmilter_reloads_total",
                            result="ok") == before + 1)
    good = mdaemon.cfg.read_text()
    mdaemon.cfg.write_text(good + "\n[policy2]\nx = 1\n")
    mdaemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: value(scrape(mdaemon.listen), "spfmilter_reloads_total",
                            result="refused") == 1)
    # a new listen address is for the next start; this one keeps serving
    other = f"127.0.0.1:{free_port()}"
    metrics_config(mdaemon.cfg, mdaemon.work, dns_server, other)
    mdaemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: value(scrape(mdaemon.listen), "spfmilter_reloads_total",
                            result="ok") == before + 2)
    _wait_for(lambda: "[metrics] listen changed; it takes effect on restart"
              in mdaemon.stderr())
    assert "[metrics] allow_remote changed" in mdaemon.stderr()
    assert listening_tcp_ports(mdaemon.proc.pid) == {int(mdaemon.listen.rsplit(":", 1)[1])}
    # a reload that changes [spf] replaces the checker: the DNS counters go on from
    # where the old checker left them
    hits = value(scrape(mdaemon.listen), "spfmilter_dns_cache_misses_total")
    mdaemon.cfg.write_text(mdaemon.cfg.read_text().replace("lookup_timeout = 2",
                                                           "lookup_timeout = 3"))
    mdaemon.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: value(scrape(mdaemon.listen), "spfmilter_reloads_total",
                            result="ok") == before + 3)
    assert run(mdaemon, helo="[127.0.0.2]").action == "continue"  # a fresh cache asks again
    assert value(scrape(mdaemon.listen), "spfmilter_dns_cache_misses_total") == hits + 1


def test_internal_error_counted_ipv6_endpoint(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfm", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        listen = f"[::1]:{free_port(socket.AF_INET6, '::1')}"
        metrics_config(cfg, work, dns_server, listen)
        argv = [PYTHON, str(ROOT / "tests" / "milters" / "spf_broken_dns.py"), str(cfg)]
        with Daemon(argv, f"unix:{work}/spf.sock", work) as proc:
            resp = run(proc, sender="<boom@pass.spf.test>")
            assert (resp.code, resp.xcode) == (451, "4.3.0")
            assert run(proc).action == "continue"
            got = scrape(listen)
        assert value(got, "spfmilter_internal_errors_total", stage="envfrom") == 1
        assert sum(v for (name, _), v in got.items()
                   if name == "spfmilter_internal_errors_total") == 1
        assert value(got, "spfmilter_transactions_total", action="accept",
                     reason="policy") == 1


def _free_privileged_port() -> int:
    for port in range(1023, 899, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024")


def test_privileged_port_bound_before_the_drop_to_nobody(dns_server):
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory(prefix="spfm", dir="/tmp") as d:
        base = Path(d)
        base.chmod(0o755)
        run_dir = base / "run"
        run_dir.mkdir()
        os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
        cfg = base / "c.cfg"
        listen = f"127.0.0.1:{_free_privileged_port()}"
        metrics_config(cfg, run_dir, dns_server, listen)
        cfg.write_text(cfg.read_text().replace("user =\ngroup =\n",
                                               "user = nobody\ngroup = nogroup\n"))
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{run_dir}/spf.sock", base) as proc:
            _wait_for(lambda: "spfmilter starting" in proc.stderr())
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(nobody.pw_uid)] * 4
            assert run(proc, sender="<u@fail.spf.test>").code == 550
            assert value(scrape(listen), "spfmilter_transactions_total", action="reject",
                         reason="mailfrom_fail") == 1


def test_off_by_default_opens_no_port(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfm", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{work}/spf.sock", work) as proc:
            assert run(proc).action == "continue"
            assert listening_tcp_ports(proc.proc.pid) == set()
        assert "metrics on" not in proc.stderr()
    assert config.loads("").metrics.listen is None


def test_endpoint_in_use_refuses_start(dns_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with tempfile.TemporaryDirectory(prefix="spfm", dir="/tmp") as d:
            cfg = Path(d) / "c.cfg"
            metrics_config(cfg, Path(d), dns_server, f"127.0.0.1:{port}")
            out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run",
                                  "--stderr"], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert f"cannot open the metrics endpoint 127.0.0.1:{port}" in out.stderr


# -- config ------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("", None),
    ("127.0.0.1:9120", ("127.0.0.1", 9120)),
    ("[::1]:9120", ("::1", 9120)),
    ("[0:0::1]:80", ("::1", 80)),
])
def test_listen_parses(text, expected):
    got = config.parse_listen(text)
    assert (None if got is None else (got.host, got.port)) == expected
    if got is not None:
        assert config.parse_listen(str(got)) == got


@pytest.mark.parametrize("text,message", [
    ("127.0.0.1", "expected address:port"),
    ("::1:9120", "expected address:port"),
    ("[127.0.0.1]:9120", "brackets are for IPv6"),
    ("[::1]9120", "expected [IPv6 address]:port"),
    ("localhost:9120", "is not an IP address"),
    ("127.0.0.1:0", "not a port number"),
    ("127.0.0.1:65536", "not a port number"),
])
def test_listen_errors_name_the_line(text, message):
    with pytest.raises(config.ConfigError) as err:
        config.loads(f"[metrics]\n\nlisten = {text}\n", filename="m.cfg")
    assert str(err.value).startswith("m.cfg:3: [metrics] listen: ")
    assert message in str(err.value)


def test_remote_listen_needs_allow_remote():
    text = "[metrics]\n# comment\nlisten = 192.0.2.1:9120\n"
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, filename="m.cfg")
    assert str(err.value).startswith("m.cfg:3: [metrics] listen: 192.0.2.1:9120 is not a"
                                     " loopback address")
    assert "allow_remote = yes" in str(err.value)
    with pytest.raises(config.ConfigError, match=r"m\.cfg:2: \[metrics\] listen: \[::\]"):
        config.loads("[metrics]\nlisten = [::]:9120\n", filename="m.cfg")
    cfg = config.loads(text + "allow_remote = yes\n")
    assert str(cfg.metrics.listen) == "192.0.2.1:9120" and cfg.metrics.allow_remote
    assert config.loads("[metrics]\nlisten = 127.8.9.1:1\n").metrics.listen.loopback


def test_check_config_reports_remote_listen(tmp_path):
    cfg = tmp_path / "m.cfg"
    cfg.write_text("[metrics]\nlisten = 0.0.0.0:9120\n")
    out = subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert f"{cfg}:2: [metrics] listen: 0.0.0.0:9120 is not a loopback address" in out.stderr


# -- bounded labels ------------------------------------------------------------

REASON_LABELS = {*metrics.REASONS.values(), "skipped", metrics.OTHER}
SKIP_LABELS = {*metrics.SKIPS.values(), "forwarder", metrics.OTHER}


def test_every_policy_reason_has_its_own_label():
    from spfmilter import policy
    from spfmilter.results import IDENTITIES, RESULTS, SpfResult
    seen = set()
    for identity in IDENTITIES:
        for result in RESULTS:
            spf = SpfResult(identity, result, domain="x.example")
            pol = config.loads(f"[policy]\n{identity}_{result} = reject\n").policy
            reason = policy.decide(policy.Facts("192.0.2.1", **{identity: spf}), pol).reason
            seen.add(metrics.reason_label(reason))
    assert seen == {f"{i}_{r}" for i in IDENTITIES for r in RESULTS}
    assert metrics.reason_label(policy.error_decision("tempfail").reason) == "internal_error"
    assert metrics.reason_label(policy.decide(policy.Facts("192.0.2.1"),
                                              config.loads("").policy).reason) == \
        "no_spf_result"
    for skip, label in [("local client", "local_client"), ("internal host", "internal_host"),
                        ("trusted relay", "trusted_relay"), ("authenticated", "authenticated"),
                        ("forwarder fwd.example", "forwarder")]:
        assert metrics.skip_label(skip) == label
        reason = policy.decide(policy.Facts("192.0.2.1", skip=skip),
                               config.loads("").policy).reason
        assert metrics.reason_label(reason) == "skipped"


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text())
def test_any_reason_maps_into_the_fixed_set(text):
    assert metrics.reason_label(text) in REASON_LABELS
    assert metrics.skip_label(text) in SKIP_LABELS
    assert metrics.reason_label("skipped: " + text) in REASON_LABELS
    assert metrics.skip_label("forwarder " + text) == "forwarder"


def test_dmarc_deferred_and_checker_swap_keep_counting():
    from spfmilter.spfcheck import SpfChecker
    old = SpfChecker(nameservers=[("127.0.0.1", 1)], cache_size=10)
    m = metrics.Metrics(old)
    m.dmarc_deferred()
    m.dmarc_deferred()
    assert m.registry.get_sample_value("spfmilter_dmarc_deferred_total") == 2
    old.cache.get(("x.example", "TXT"))  # two misses, one hit on the old checker
    old.cache.put(("x.example", "TXT"), "answer", 60)
    old.cache.get(("x.example", "TXT"))
    old.cache.get(("y.example", "TXT"))
    new = SpfChecker(nameservers=[("127.0.0.1", 1)], cache_size=10)
    m.use_checker(new)
    new.cache.get(("z.example", "TXT"))
    sample = m.registry.get_sample_value
    assert (sample("spfmilter_dns_cache_hits_total"),
            sample("spfmilter_dns_cache_misses_total")) == (1, 3)
    assert sample("spfmilter_dns_cache_entries") == 0  # the new cache's own size
    m.use_checker(new)  # the same checker again (a reload keeping [spf]): no double count
    assert sample("spfmilter_dns_cache_misses_total") == 3
