"""The SPF result cache and exp= through the real daemon and NSD (tests/data/zones/cache.test.zone).

One daemon serves every test here, so each test's first check can be answered
from an earlier one's cache entry: that is the point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.procs import PYTHON, ROOT, Daemon
from tests.test_daemon import AUTHSERV, FAIL, run, spf_results, write_config


@pytest.fixture(scope="module")
def daemon(dns_server):
    """The daemon as tests/test_daemon.py runs it (lookup_timeout = 2), with its own cache."""
    with tempfile.TemporaryDirectory(prefix="spfc", dir="/tmp") as tmp:
        workdir = Path(tmp)
        cfg = workdir / "spfmilter.cfg"
        write_config(cfg, workdir, dns_server)
        d = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                   f"unix:{workdir}/spf.sock", workdir)
        d.cfg = cfg
        with d:
            yield d


DEFAULT_FAIL_TEXT = "the sender is not authorized to use this domain"


def _passes(resp) -> bool:
    return resp.action == "continue" and spf_results(resp)["mailfrom"] == "pass"


def test_split_local_part_macro_alice_then_mallory(daemon):
    assert _passes(run(daemon, ip="127.0.0.3", sender="<alice@split.cache.test>"))
    resp = run(daemon, ip="127.0.0.3", sender="<mallory@split.cache.test>")
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", FAIL)


def test_split_local_part_macro_mallory_then_alice(daemon):
    resp = run(daemon, ip="127.0.0.4", sender="<mallory@split.cache.test>")
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", FAIL)
    assert _passes(run(daemon, ip="127.0.0.4", sender="<alice@split.cache.test>"))


def test_split_sender_macro_in_explanation_names_each_sender(daemon):
    first = run(daemon, ip="127.0.0.3", sender="<alice@leak.cache.test>")
    second = run(daemon, ip="127.0.0.3", sender="<mallory@leak.cache.test>")
    assert (first.code, first.xcode) == (second.code, second.xcode) == FAIL
    assert "sender alice@leak.cache.test rejected" in first.text
    assert "sender mallory@leak.cache.test rejected" in second.text
    assert "alice" not in second.text


def test_dead_exp_target_pass_is_pass(daemon, dns_counts):
    assert _passes(run(daemon, ip="127.0.0.2", sender="<u@deadexp.cache.test>"))
    assert dns_counts.count("x.timeout.spf.test") == 0  # exp= is for fail only


def test_dead_exp_target_fail_gets_default_explanation(daemon, dns_counts):
    resp = run(daemon, ip="127.0.0.5", sender="<u@deadexp.cache.test>")
    assert (resp.action, (resp.code, resp.xcode)) == ("replycode", FAIL)
    assert DEFAULT_FAIL_TEXT in resp.text
    assert dns_counts.count("x.timeout.spf.test", "TXT") >= 1  # looked up, after the verdict


def test_receiver_macro_is_the_mta_j_macro(daemon):
    resp = run(daemon, ip="127.0.0.3", sender="<u@receiver.cache.test>",
               macros={"connect": {"j": "mx1.receiver.example"}, "mail": {"i": "QID1"}})
    assert (resp.code, resp.xcode) == FAIL
    assert "mx1.receiver.example takes no mail from 127.0.0.3 for receiver.cache.test" \
        in resp.text
    # another receiving host, same client and sender: not the cached text
    other = run(daemon, ip="127.0.0.3", sender="<u@receiver.cache.test>",
                macros={"connect": {"j": "mx2.receiver.example"}, "mail": {"i": "QID2"}})
    assert "mx2.receiver.example takes no mail from 127.0.0.3" in other.text


def test_receiver_macro_without_j_is_the_authserv_id(daemon):
    resp = run(daemon, ip="127.0.0.4", sender="<u@receiver.cache.test>")
    assert (resp.code, resp.xcode) == FAIL
    assert f"{AUTHSERV} takes no mail from 127.0.0.4" in resp.text


def test_cli_test_receiver_is_the_authserv_id(daemon):
    out = subprocess.run(
        [PYTHON, "-m", "spfmilter", "-c", str(daemon.cfg), "test", "--ip", "127.0.0.4",
         "--helo", "pass.spf.test", "--from", "u@receiver.cache.test", "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["mailfrom"]["explanation"] == (
        f"{AUTHSERV} takes no mail from 127.0.0.4 for receiver.cache.test")


def _refused_at(resp) -> int:
    assert (resp.code, resp.xcode) == FAIL
    return int(re.search(r"refused at (\d+)", resp.text).group(1))


def test_time_macro_is_not_frozen_by_the_cache(daemon):
    before = int(time.time())
    first = _refused_at(run(daemon, ip="127.0.0.3", sender="<u@time.cache.test>"))
    assert before <= first <= time.time()
    while int(time.time()) == first:  # the next second (a wait, not a timing assertion)
        time.sleep(0.05)
    second = _refused_at(run(daemon, ip="127.0.0.3", sender="<u@time.cache.test>"))
    assert second > first
