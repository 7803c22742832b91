"""The RFC 7208 test suite, every case through ``spfmilter test --json`` as a real process.

Each scenario's zonedata is served by its own NSD on loopback (tests/rfc7208.py
turns it into a root zone; its relay lets TIMEOUT names time out); each case
runs the real command with a config whose nameservers point there.  The
mailfrom result must be one of the case's results and, where the case gives
one, the explanation must match ("DEFAULT": none of the domain's own).
The summary line "RFC 7208 test suite: N of M passed" ends the pytest report.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import rfc7208
from tests.dnsserver import DnsServer
from tests.procs import PYTHON, ROOT

SCENARIOS, CASES = rfc7208.load(rfc7208.fetch())
#: Processes run at once (the machine is small and shared).
WORKERS = int(os.environ.get("SPFMILTER_RFC7208_WORKERS", "4"))
#: Budget of one check; TIMEOUT cases spend all of it (room for a loaded machine).
LOOKUP_TIMEOUT = 2
PROCESS_TIMEOUT = 60
#: SPFMILTER_RFC7208_TRACE=1 (by hand): every case with --trace, whose result must agree.
TRACE = bool(os.environ.get("SPFMILTER_RFC7208_TRACE"))


@dataclass(frozen=True)
class Outcome:
    result: str | None
    explanation: str
    detail: str  # the comment, or why the process gave no result


def _config(path: Path, server: DnsServer) -> None:
    path.write_text(f"""\
[milter]
log_target = stderr
[spf]
nameservers = {server.nameservers[0]}
lookup_timeout = {LOOKUP_TIMEOUT}
check_helo = no
[policy]
internal_hosts =
""", encoding="ascii")


def _run(case: rfc7208.Case, config: Path) -> Outcome:
    argv = [PYTHON, "-m", "spfmilter", "-c", str(config), "test", f"--ip={case.host}",
            f"--helo={case.helo}", f"--from={case.mailfrom}", "--json"]
    if TRACE:
        argv.append("--trace")
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        return Outcome(None, "", f"no answer within {PROCESS_TIMEOUT}s")
    try:
        data = json.loads(done.stdout)
        mailfrom = data["mailfrom"]
        traced = [c["result"] for c in data["trace"]] if TRACE else [mailfrom["result"]]
    except (ValueError, KeyError, TypeError):
        return Outcome(None, "", f"exit {done.returncode}: {done.stdout}{done.stderr}"[-2000:])
    if traced[-1:] != [mailfrom["result"]] and mailfrom["checked"]:
        return Outcome(None, "", f"the trace says {traced}, the verdict {mailfrom['result']}")
    return Outcome(mailfrom["result"], mailfrom["explanation"], mailfrom["comment"])


def _selected(session: pytest.Session, module: object) -> set[str]:
    return {item.callspec.params["case"].id for item in session.items
            if getattr(item, "module", None) is module and hasattr(item, "callspec")}


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest) -> Iterator[dict[str, Outcome]]:
    """Every selected case run once, a few processes at a time."""
    wanted = [c for c in CASES if c.id in _selected(request.session, request.module)]
    with tempfile.TemporaryDirectory(prefix="spf7208-") as tmp:
        servers: dict[int, DnsServer] = {}
        configs: dict[int, Path] = {}
        for number in sorted({c.scenario for c in wanted}):
            zonedata = SCENARIOS[number]["zonedata"]
            zones = Path(tmp, str(number))
            zones.mkdir()
            (zones / "root.zone").write_text(rfc7208.zone_file(zonedata), encoding="ascii")
            servers[number] = DnsServer(zones, servfail_zones=(), drop=(), no_soa=(),
                                        unanswered=rfc7208.Unanswered(zonedata),
                                        probe_zone=".")
        try:
            with ThreadPoolExecutor(len(servers) or 1) as pool:  # NSD start-up is mostly waiting
                for started in pool.map(DnsServer.start, servers.values()):
                    assert started
            for number, server in servers.items():
                configs[number] = Path(tmp, f"{number}.cfg")
                _config(configs[number], server)
            with ThreadPoolExecutor(WORKERS) as pool:
                results = pool.map(lambda c: _run(c, configs[c.scenario]), wanted)
                yield dict(zip((c.id for c in wanted), results))
        finally:
            for server in servers.values():
                server.stop()


def _verdict(case: rfc7208.Case, outcome: Outcome) -> str | None:
    """Why *outcome* fails *case*, or None when it passes."""
    if outcome.result not in case.results:
        return f"result {outcome.result!r}, expected {' or '.join(case.results)}"
    if case.explanation is not None:  # given only for fail cases
        expected = "" if case.explanation == "DEFAULT" else case.explanation
        if outcome.explanation != expected:
            return f"explanation {outcome.explanation!r}, expected {expected!r}"
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: rfc7208.Case, outcomes: dict[str, Outcome],
              request: pytest.FixtureRequest) -> None:
    outcome = outcomes[case.id]
    why = _verdict(case, outcome)
    request.config.stash.setdefault(rfc7208.OUTCOMES, {})[case.id] = why is None
    assert why is None, (f"{case.id} (RFC 7208 {case.spec}): {why}; {outcome.detail}; "
                         f"ip={case.host} helo={case.helo!r} mailfrom={case.mailfrom!r}")


def test_suite_is_complete() -> None:
    assert len(CASES) == 203
    assert len({c.id for c in CASES}) == 203
