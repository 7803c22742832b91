"""The RFC 7208 test suite (openspf.org, release 2014.04) for tests/test_rfc7208.py.

``rfc7208-tests.yml`` ships in the ``test/`` directory of pyspf's sdist on
PyPI (BSD-3 licence; not vendored here).  :func:`fetch` downloads the sdist
with pip into a cache directory outside the source tree, checks it and the
extracted file against the SHA-256 sums in ``tests/data/rfc7208-tests.sha256``
and returns the file's path; ``scripts/setup`` runs it as
``python -m tests.rfc7208``, the test module again if the file is missing.

Each scenario's ``zonedata`` becomes one stand-in root zone for NSD
(:func:`zone_file`), served by :class:`tests.dnsserver.DnsServer`; names
marked ``TIMEOUT`` get no answer from its relay (:func:`timeouts`).  The
zonedata is read as pyspf's own test driver reads it: SPF records are also
published as TXT records unless the name has TXT data of its own
(``TXT: NONE`` means none), and a ``TIMEOUT`` entry makes every query type
without data before it time out.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.name
import pytest

PYSPF_VERSION = "2.0.14"
SDIST = f"pyspf-{PYSPF_VERSION}.tar.gz"
MEMBER = f"pyspf-{PYSPF_VERSION}/test/rfc7208-tests.yml"
SUITE = "rfc7208-tests.yml"
CHECKSUMS = Path(__file__).parent / "data" / "rfc7208-tests.sha256"
#: Outcomes of this run's cases by test id, for the summary line.
OUTCOMES = pytest.StashKey[dict[str, bool]]()

_SOA = ". 300 IN SOA ns.rfc7208.test. hostmaster.rfc7208.test. 1 3600 600 86400 300"


# -- fetching ------------------------------------------------------------------

def cache_dir() -> Path:
    """$SPFMILTER_TEST_CACHE, else the virtualenv's cache/, else ~/.cache/spfmilter-tests."""
    if os.environ.get("SPFMILTER_TEST_CACHE"):
        return Path(os.environ["SPFMILTER_TEST_CACHE"])
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "cache" / "spfmilter-tests"
    return Path.home() / ".cache" / "spfmilter-tests"


def _sums() -> dict[str, str]:
    sums = {}
    for line in CHECKSUMS.read_text(encoding="ascii").splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            sums[name] = digest
    return sums


def _verified(path: Path, sums: Mapping[str, str]) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sums[path.name]:
        raise RuntimeError(f"{path}: SHA-256 {digest}, expected {sums[path.name]} "
                           f"({CHECKSUMS}); remove it to download again")
    return True


def fetch(directory: Path | None = None) -> Path:
    """The path of a checked rfc7208-tests.yml, downloading pyspf's sdist if needed."""
    directory = directory or cache_dir()
    sums = _sums()
    suite, sdist = directory / SUITE, directory / SDIST
    if _verified(suite, sums):
        return suite
    directory.mkdir(parents=True, exist_ok=True)
    if not _verified(sdist, sums):
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", f"pyspf=={PYSPF_VERSION}", "-d", str(directory)]
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"cannot fetch the RFC 7208 test suite: {' '.join(pip)}: "
                               f"exit {done.returncode}\n{done.stderr[-2000:]}")
        _verified(sdist, sums)
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            raise RuntimeError(f"{sdist} has no {MEMBER}")
        data = member.read()
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, suite)
    _verified(suite, sums)
    return suite


# -- the cases -------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One test of the suite; ``results`` are the acceptable results."""

    scenario: int
    scenario_name: str
    name: str
    host: str
    helo: str
    mailfrom: str
    results: tuple[str, ...]
    explanation: str | None  # "DEFAULT": the default explanation (ours is empty)
    spec: str

    @property
    def id(self) -> str:
        return f"{self.scenario_name}/{self.name}"


def load(path: Path) -> tuple[list[dict[str, Any]], list[Case]]:
    """(scenarios, cases) of the suite file at *path*."""
    import yaml

    with open(path, "rb") as fh:
        scenarios = list(yaml.safe_load_all(fh))
    cases = []
    for number, scenario in enumerate(scenarios):
        slug = "-".join(scenario["description"].lower().split())
        for name, test in scenario["tests"].items():
            result = test["result"]
            cases.append(Case(number, slug, name, test["host"], test["helo"], test["mailfrom"],
                              tuple(result) if isinstance(result, list) else (result,),
                              test.get("explanation"), str(test.get("spec", ""))))
    return scenarios, cases


# -- zone data as NSD zone files ---------------------------------------------------

def _name(text: str) -> dns.name.Name | None:
    """The absolute name for *text*, or None where DNS cannot carry it."""
    labels = text.rstrip(".").split(".")
    try:
        return dns.name.Name([label.encode("utf-8") for label in labels] + [b""])
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
        return None


def _strings(value: str | list[str]) -> str:
    """TXT/SPF RDATA in zone-file syntax: each string quoted, at most 255 octets."""
    parts = [value] if isinstance(value, str) else list(value)
    if not parts:
        return r"\# 0"  # no strings at all (illegal, but the suite has it)
    out = []
    for part in parts:
        data = part.encode("utf-8")
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        for chunk in chunks:
            out.append('"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\'
                                     else f"\\{b:03d}" for b in chunk) + '"')
    return " ".join(out)


def _entries(zonedata: Mapping[str, list[Any]]) -> Iterator[tuple[str, list[Any]]]:
    """(lower-case name, entries) as pyspf's driver sees them: the last spelling wins."""
    merged: dict[str, list[Any]] = {}
    for name, entries in zonedata.items():
        merged[name.lower()] = entries
    return iter(merged.items())


def _served(entries: list[Any]) -> list[tuple[str, Any]]:
    """The (type, value) records a query can get: those before any TIMEOUT."""
    records: list[tuple[str, Any]] = []
    for entry in entries:
        if entry == "TIMEOUT":
            break
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"unexpected zonedata entry {entry!r}")
        ((rtype, value),) = entry.items()
        if value == "TIMEOUT":
            raise ValueError(f"per-type TIMEOUT not supported: {entry!r}")
        records.append((rtype, value))
    if not any(rtype == "TXT" for rtype, _ in records):  # SPF records double as TXT
        records += [("TXT", value) for rtype, value in records if rtype == "SPF"]
    return [(rtype, value) for rtype, value in records if value != "NONE"]


def zone_file(zonedata: Mapping[str, list[Any]]) -> str:
    """A root zone (".") serving every name of a scenario's zonedata."""
    lines = ["$TTL 300", _SOA, ". 300 IN NS ns.rfc7208.test."]
    for name, entries in _entries(zonedata):
        owner = _name(name)
        if owner is None:
            continue  # DNS cannot carry it, so nobody can ask for it
        for rtype, value in _served(entries):
            if rtype in ("TXT", "SPF"):
                if rtype == "SPF" and value == []:
                    continue  # NSD refuses it; type SPF is never asked for (RFC 7208 3.1)
                rdata = _strings(value)
            elif rtype == "MX":
                target = _name(str(value[1]))
                if target is None:
                    continue
                rdata = f"{int(value[0])} {target.to_text()}"
            elif rtype in ("PTR", "CNAME"):
                target = _name(str(value))
                if target is None:
                    continue
                rdata = target.to_text()
            elif rtype in ("A", "AAAA"):
                rdata = str(value)
            else:
                raise ValueError(f"{name}: unexpected record type {rtype}")
            lines.append(f"{owner.to_text()} IN {rtype} {rdata}")
    return "\n".join(lines) + "\n"


def timeouts(zonedata: Mapping[str, list[Any]]) -> dict[str, frozenset[str]]:
    """{name: the query types still answered} for every name with a TIMEOUT entry."""
    out = {}
    for name, entries in _entries(zonedata):
        if "TIMEOUT" in entries:
            out[name.rstrip(".")] = frozenset(rtype for rtype, _ in _served(entries))
    return out


class Unanswered:
    """The relay's predicate: True for a query that must time out."""

    def __init__(self, zonedata: Mapping[str, list[Any]]) -> None:
        self.answered = timeouts(zonedata)

    def __call__(self, name: str, qtype: str) -> bool:
        answered = self.answered.get(name)
        return answered is not None and qtype not in answered


# -- the summary line ---------------------------------------------------------------

def summary(config: pytest.Config) -> str | None:
    """ "N of M passed" for the RFC 7208 cases of this run, or None if none ran."""
    outcomes = config.stash.get(OUTCOMES, None)
    if not outcomes:
        return None
    return f"RFC 7208 test suite: {sum(outcomes.values())} of {len(outcomes)} passed"


if __name__ == "__main__":
    print(fetch())
