"""Edge cases through the real daemon: IPv4-mapped clients, the override domain,
forged-header removal after an internal error (zone data: edges.test)."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import pytest

from tests.procs import PYTHON, ROOT, Daemon, free_port
from tests.test_daemon import AR, AUTHSERV, FAIL, _wait_for, run, spf_results, write_config

OVERRIDES = """
[domain:lenient.edges.test]
mailfrom_fail = accept
helo_fail = accept

[domain:xn--bcher-kva.edges.test]
mailfrom_softfail = reject
"""


@pytest.fixture(scope="module")
def daemon(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfx", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "spfmilter.cfg"
        write_config(cfg, work, dns_server, extra=OVERRIDES)
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{work}/spf.sock", work) as proc:
            yield proc


def _ar(resp) -> str:
    """Our Authentication-Results value, unfolded."""
    return [m.value.replace("\n", "") for m in resp.modifications if m.name == AR][0]


def _log_line(daemon, qid: str) -> str:
    """The decision line of qid (logging goes through a queue: wait for it)."""
    def find() -> str | None:
        return next((x for x in daemon.stderr().splitlines()
                     if f"qid={qid} " in x and " action=" in x and " reason=" in x), None)
    _wait_for(lambda: find() is not None)
    return find() or ""


def _received_spf(resp) -> str:
    values = [m.value for m in resp.modifications if m.name == "Received-SPF"]
    assert len(values) == 1, resp.modifications
    return values[0]


# -- item 3: an IPv4-mapped client (family AF_INET6) is its IPv4 address --------

@pytest.mark.parametrize("ip", ["127.0.0.1", "::ffff:127.0.0.1"])
def test_mapped_internal_host_is_skipped(daemon, ip):
    resp = run(daemon, ip=ip, sender="<u@fail.spf.test>")
    assert resp.action == "continue"
    assert "internal host" in _ar(resp)


@pytest.mark.parametrize("ip", ["127.0.0.9", "::ffff:127.0.0.9"])
def test_mapped_trusted_relay_keeps_its_ar_headers(daemon, ip):
    resp = run(daemon, ip=ip, sender="<u@fail.spf.test>",
               headers=[(AR, f"{AUTHSERV}; spf=pass smtp.mailfrom=bank.example")])
    assert resp.action == "continue"
    assert not [m for m in resp.modifications if m.kind == "chgheader"]
    assert "trusted relay" in _ar(resp)


def test_mapped_client_not_in_a_list_still_removes_forged_headers(daemon):
    resp = run(daemon, ip="::ffff:127.0.0.2",
               headers=[(AR, f"{AUTHSERV}; spf=pass smtp.mailfrom=bank.example")])
    assert [(m.kind, m.index) for m in resp.modifications if m.kind == "chgheader"] == \
        [("chgheader", 1)]


def test_mapped_client_passes_ip4_and_is_shown_as_ipv4(daemon):
    resp = run(daemon, ip="::ffff:127.0.0.2", helo="lenient.edges.test",
               sender="<u@v4only.edges.test>", macros={"mail": {"i": "QMAP1"}})
    assert resp.action == "continue"
    assert spf_results(resp) == {"helo": "pass", "mailfrom": "pass"}
    assert "client-ip=127.0.0.2;" in _received_spf(resp)
    assert "ffff" not in _received_spf(resp)
    line = _log_line(daemon, "QMAP1")
    assert " ip=127.0.0.2 " in line and "mailfrom_spf=pass" in line


def test_mapped_client_macros_expand_as_ipv4(daemon):
    resp = run(daemon, ip="::ffff:127.0.0.4", helo="lenient.edges.test",
               sender="<u@v4only.edges.test>")
    assert (resp.code, resp.xcode) == FAIL
    assert "client 127.0.0.4 as in-addr (127.0.0.4) for v4only.edges.test" in resp.text
    # exists:%{i}: the dotted quad, not the 32 nibbles of an IPv6 address
    resp = run(daemon, ip="::ffff:127.0.0.3", helo="lenient.edges.test",
               sender="<u@byip.edges.test>")
    assert spf_results(resp)["mailfrom"] == "pass"


def test_mapped_forwarder_is_skipped(daemon):
    resp = run(daemon, ip="::ffff:127.0.0.7", helo="fwd.example", sender="<u@sender.example>")
    assert resp.action == "continue"
    assert "forwarder fwd.example" in _ar(resp)


# -- item 5: the override section is the checked domain's ------------------------

def test_override_follows_checked_domain_not_helo(daemon):
    # MAIL FROM without '@' is checked as the domain fail.spf.test: its verdict must not
    # come from the lenient section of the HELO name the client chose
    resp = run(daemon, ip="127.0.0.2", helo="lenient.edges.test", sender="<fail.spf.test>")
    assert (resp.code, resp.xcode) == FAIL
    assert "fail.spf.test" in resp.text
    # the lenient section does apply to the domain it names
    resp = run(daemon, ip="127.0.0.2", helo="lenient.edges.test",
               sender="<u@v4only.edges.test>")
    assert resp.action == "continue"
    resp = run(daemon, ip="127.0.0.4", helo="lenient.edges.test",
               sender="<u@lenient.edges.test>")
    assert resp.action == "continue"  # pass; and the null sender takes HELO's section:
    resp = run(daemon, ip="127.0.0.2", helo="lenient.edges.test", sender="<>")
    assert spf_results(resp) == {"helo": "pass", "mailfrom": "pass"}


def test_u_label_sender_takes_the_a_label_section(daemon):
    resp = run(daemon, ip="127.0.0.2", sender="<u@b\u00fccher.edges.test>")
    assert (resp.action, resp.code) == ("replycode", 550)
    assert "softfail" in resp.text and "xn--bcher-kva.edges.test" in resp.text
    resp = run(daemon, ip="127.0.0.2", sender="<u@B\u00dcCHER.edges.test.>")
    assert (resp.action, resp.code) == ("replycode", 550)


# -- item 10: on_error = accept still removes forged Authentication-Results --------

def test_internal_error_with_accept_still_removes_forged_headers(dns_server):
    forged = (AR, f"{AUTHSERV}; spf=pass smtp.mailfrom=bank.example")
    other = (AR, "other.example; dkim=pass header.d=bank.example")
    with tempfile.TemporaryDirectory(prefix="spfe", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        cfg.write_text(cfg.read_text().replace("timeout = 30", "timeout = 30\non_error = accept"))
        argv = [PYTHON, str(ROOT / "tests" / "milters" / "spf_broken_dns.py"), str(cfg)]
        with Daemon(argv, f"unix:{work}/spf.sock", work) as proc:
            # the check raises at MAIL FROM: accepted unchecked, forged field removed
            resp = run(proc, sender="<boom@pass.spf.test>", headers=[other, forged],
                       macros={"mail": {"i": "QERR1"}})
            assert resp.action == "continue"
            assert [(m.kind, m.index, m.value) for m in resp.modifications] == [
                ("chgheader", 2, "")]
            # judging a header raises (a no-reply stage): that field and the forged one
            # go, the verdict of the check still reaches the message
            resp = run(proc, headers=[forged, (AR, f"{AUTHSERV}; explode"), other],
                       macros={"mail": {"i": "QERR2"}})
            assert resp.action == "continue"
            deleted = sorted(m.index for m in resp.modifications if m.kind == "chgheader")
            assert deleted == [1, 2]
            assert spf_results(resp) == {"helo": "pass", "mailfrom": "pass"}
            line = _log_line(proc, "QERR1")
            assert "action=accept" in line and 'reason="internal error"' in line
        err = proc.stderr()
    assert "internal error in envfrom, action=accept" in err
    assert "internal error in header, action=accept" in err


def test_internal_error_in_header_stage_gives_on_error_verdict_at_eom(dns_server):
    with tempfile.TemporaryDirectory(prefix="spfe", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        cfg.write_text(cfg.read_text().replace("timeout = 30", "timeout = 30\non_error = reject"))
        argv = [PYTHON, str(ROOT / "tests" / "milters" / "spf_broken_dns.py"), str(cfg)]
        with Daemon(argv, f"unix:{work}/spf.sock", work) as proc:
            resp = run(proc, headers=[(AR, f"{AUTHSERV}; explode")])
            assert (resp.stage, resp.action, resp.code, resp.xcode) == (
                "eom", "replycode", 550, "5.3.0")
            assert not resp.modifications
            assert run(proc).action == "continue"



# -- reload: every option it cannot apply is named ---------------------------------

def test_reload_warns_for_every_restart_only_option(dns_server):
    from spfmilter import config

    with tempfile.TemporaryDirectory(prefix="spfr", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        changed = {  # a new value for every option a reload cannot apply
            ("milter", "socket"): f"unix:{work}/other.sock",
            ("milter", "name"): "othername",
            ("milter", "user"): "nobody",
            ("milter", "group"): "nogroup",
            ("milter", "umask"): "077",
            ("milter", "pidfile"): f"{work}/other.pid",
            ("milter", "timeout"): "31",
            ("metrics", "listen"): f"127.0.0.1:{free_port()}",
            ("metrics", "allow_remote"): "yes",
        }
        assert set(changed) == set(config.restart_options())
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{work}/spf.sock", work) as proc:
            text = cfg.read_text() + "\n[metrics]\n"
            for (section, option), value in changed.items():
                text = "\n".join(f"{option} = {value}" if line.startswith(f"{option} =")
                                 else line for line in text.split("\n"))
                if f"{option} = {value}" not in text:
                    text = text.replace(f"[{section}]\n", f"[{section}]\n{option} = {value}\n")
            cfg.write_text(text)
            proc.proc.send_signal(signal.SIGHUP)
            _wait_for(lambda: "configuration reloaded" in proc.stderr())
            for section, option in changed:
                assert f"reload: [{section}] {option} changed; it takes effect on restart" \
                    in proc.stderr()
            assert run(proc).action == "continue"  # still on the old socket
            assert (work / "spf.pid").exists() and not (work / "other.pid").exists()
