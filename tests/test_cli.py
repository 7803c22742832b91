"""The spfmilter command as a real process: config file choice, default command,
values that pass check-config and must also run, reload after --daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from libmilter_ext.testing import MilterError, session
from tests.procs import PYTHON, ROOT, Daemon, wait_for_socket
from tests.test_daemon import _wait_for, run, write_config

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("SPFMILTER_CONFIG", None)


def spfmilter(*args: str, cwd: Path | None = None, timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "spfmilter", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


OFFLINE = """\
[spf]
authserv_id = mx.test.example
nameservers = 127.0.0.1:9
lookup_timeout = 1

[policy]
internal_hosts = 10.0.0.0/8
trusted_relays = ::ffff:192.0.2.0/120
"""


@pytest.mark.parametrize("ip,skip", [
    ("10.1.2.3", "internal host"), ("::ffff:10.1.2.3", "internal host"),
    ("[IPv6:::ffff:10.1.2.3]", "internal host"),
    ("192.0.2.25", "trusted relay"), ("::ffff:192.0.2.25", "trusted relay"),
])
def test_test_command_skips_mapped_client_as_its_ipv4_address(tmp_path, ip, skip):
    cfg = tmp_path / "c.cfg"
    cfg.write_text(OFFLINE)
    out = spfmilter("-c", str(cfg), "test", "--ip", ip, "--helo", "h.example",
                    "--from", "u@fail.example", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["skip"], data["action"], data["mailfrom"]) == (skip, "accept", None)


@pytest.mark.parametrize("form", [["-c", "{}"], ["--config", "{}"], ["--config={}"]])
def test_named_config_file_must_exist(tmp_path, form):
    missing = tmp_path / "nonexistent.cfg"
    args = [a.format(missing) for a in form]
    commands = [["test", "--ip", "10.1.2.3", "--helo", "h.example", "--from", "u@x.example"]]
    if form[0] == "-c":  # every command, once
        commands += [["check-config"], ["run"], []]
    for command in commands:
        out = spfmilter(*args, *command)
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        assert f"{missing}: cannot read" in out.stderr
        assert "Traceback" not in out.stderr


def test_config_from_environment_must_exist(tmp_path):
    missing = tmp_path / "nonexistent.cfg"
    out = subprocess.run([PYTHON, "-m", "spfmilter", "test", "--ip", "10.1.2.3", "--helo",
                          "h.example", "--from", "u@x.example"], capture_output=True,
                         text=True, timeout=60, env={**ENV, "SPFMILTER_CONFIG": str(missing)})
    assert out.returncode == 1 and f"{missing}: cannot read" in out.stderr


@pytest.mark.parametrize("option,value,message", [
    ("[milter]\ntimeout", "3000000000", "3000000000 is too large (maximum 2147483647)"),
    ("[milter]\ntimeout", "9" * 5000, "is not an integer"),
    ("[spf]\nlookup_timeout", "inf", "must be a number of seconds greater than 0"),
    ("[policy]\nreply_text", "{ip:99999999999}", "width or precision 99999999999"),
    ("[policy]\nreply_text", "{domain:.99999999999}", "width or precision 99999999999"),
    ("[milter]\npidfile", "/run/x\x00y.pid", "a path cannot hold control characters"),
])
def test_values_that_cannot_run_are_file_line_errors(tmp_path, option, value, message):
    cfg = tmp_path / "c.cfg"
    cfg.write_text(f"# spfmilter\n{option} = {value}\n")
    for command in ("check-config", "run"):
        out = spfmilter("-c", str(cfg), command)
        assert out.returncode == 1, (command, out.stderr)
        section, name = option[1:].split("]\n")
        assert out.stderr.startswith(f"spfmilter: {cfg}:3: [{section}] {name}: "), out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr


def test_largest_timeout_runs(tmp_path, dns_server):
    cfg = tmp_path / "c.cfg"
    write_config(cfg, tmp_path, dns_server)
    cfg.write_text(cfg.read_text().replace("timeout = 30", "timeout = 2147483647"))
    assert spfmilter("-c", str(cfg), "check-config").returncode == 0
    with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "--stderr"],
                f"unix:{tmp_path}/spf.sock", tmp_path) as proc:
        assert run(proc).action == "continue"
    assert "Traceback" not in proc.stderr()


def test_run_options_work_without_run(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfc", dir="/tmp") as d:
        work = Path(d)
        write_config(work / "c.cfg", work, dns_server)
        # --stderr alone: the default command run, logging to stderr
        with Daemon([PYTHON, "-m", "spfmilter", "-c", "c.cfg", "--stderr"],
                    f"unix:{work}/spf.sock", work) as proc:
            assert run(proc, sender="<u@fail.spf.test>").code == 550
            _wait_for(lambda: "mailfrom_spf=fail action=reject" in proc.stderr())
        out = spfmilter("--stderr", "check-config", cwd=work)
        assert out.returncode == 2 and "options of run" in out.stderr


def test_daemon_with_relative_config_reloads_the_same_file(dns_server):
    """--daemon without run, -c relative: the detached daemon (cwd /) reloads that file."""
    with tempfile.TemporaryDirectory(prefix="spfc", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        out = spfmilter("-c", "c.cfg", "--daemon", cwd=work)
        assert out.returncode == 0, out.stderr
        spec = f"unix:{work}/spf.sock"
        wait_for_socket(spec)
        pidfile = work / "spf.pid"  # written after the fork, once the socket is open
        _wait_for(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
        pid = int(pidfile.read_text())
        try:
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            assert run(Daemon([], spec, work), sender="<u@softfail.spf.test>").continues
            write_config(cfg, work, dns_server, policy="mailfrom_softfail = reject")
            os.kill(pid, signal.SIGHUP)
            _wait_for(lambda: run(Daemon([], spec, work),
                                  sender="<u@softfail.spf.test>").code == 550)
        finally:
            os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not (work / "spf.pid").exists())
        with pytest.raises(MilterError):
            session(spec, ip="127.0.0.2", helo="h", sender="<a@b.example>", timeout=2)
