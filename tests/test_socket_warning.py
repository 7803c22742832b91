"""Milter sockets are unauthenticated: a socket beyond loopback is warned about.

check-config runs as a real process; the daemon's start log comes from the
real daemon bound to the wildcard inside a private network namespace (only
its own loopback there), so the test opens nothing to the network.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from spfmilter import config
from tests.procs import PYTHON, ROOT
from tests.test_daemon import _wait_for

WARNED = "not only loopback, and the milter protocol has no authentication"
BASE = "[spf]\nauthserv_id = mx.example.org\nlookup_timeout = 20\n"


@pytest.mark.parametrize("spec,warned", [
    ("inet:8891", True), ("inet:8891@0.0.0.0", True), ("inet6:8891", True),
    ("inet6:8891@::", True), ("inet:8891@192.0.2.1", True), ("inet6:8891@2001:db8::1", True),
    ("inet:8891@mx.example.org", True),
    ("inet:8891@127.0.0.1", False), ("inet:8891@127.0.0.5", False), ("inet6:8891@::1", False),
    ("inet6:8891@[::1]", False), ("inet6:8891@::ffff:127.0.0.1", False),
    ("inet:8891@localhost", False), ("unix:/run/spfmilter/spfmilter.sock", False),
])
def test_socket_warning_table(spec, warned):
    cfg = config.loads(f"[milter]\nsocket = {spec}\n{BASE}")
    found = [w for w in config.warnings(cfg) if WARNED in w]
    assert len(found) == (1 if warned else 0), config.warnings(cfg)
    if warned:
        assert found[0].startswith(f"[milter] socket = {cfg.milter.socket.spec}: listens on ")


def _check_config(tmp_path, spec: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.cfg"
    path.write_text(f"[milter]\nsocket = {spec}\n{BASE}")
    return subprocess.run([PYTHON, "-m", "spfmilter", "-c", str(path), "check-config"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_check_config_prints_the_warning(tmp_path):
    out = _check_config(tmp_path, "inet:8891")
    assert out.returncode == 0, out.stderr
    assert ("warning: [milter] socket = inet:8891: listens on every address, " + WARNED
            in out.stderr)
    assert "socket = inet:8891\n" in out.stdout  # the effective config is still printed
    quiet = _check_config(tmp_path, "inet6:8891@::1")
    assert quiet.returncode == 0 and WARNED not in quiet.stderr


@pytest.mark.parametrize("spec", ["inet:{port}", "inet6:{port}@::"])
def test_daemon_logs_the_warning_at_start(tmp_path, dns_server, spec):
    spec = spec.format(port=10025)  # a namespace of our own: every port is free
    cfgfile = tmp_path / "c.cfg"
    cfgfile.write_text(f"[milter]\nsocket = {spec}\nuser =\ngroup =\npidfile =\n"
                       f"log_target = stderr\n[spf]\nauthserv_id = mx.example.org\n"
                       f"nameservers = {dns_server.nameservers[0]}\n")
    err = tmp_path / "stderr.log"
    argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            PYTHON, "-m", "spfmilter", "-c", str(cfgfile), "run", "--stderr"]
    with open(err, "wb") as fh:
        proc = subprocess.Popen(argv, stderr=fh, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_for(lambda: "spfmilter starting" in err.read_text() or proc.poll() is not None,
                  timeout=30)
        log = err.read_text()
        assert proc.poll() is None, log
        lines = log.splitlines()
        warning = next(i for i, line in enumerate(lines) if WARNED in line)
        start = next(i for i, line in enumerate(lines) if "spfmilter starting" in line)
        assert warning < start and " WARNING [milter] socket = " in lines[warning]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
