"""Header fields through the real daemon: folding, bounds, ``mailfrom = address``.

The same daemon, DNS server and milter client as ``test_daemon.py``, with
``[headers] mailfrom = address``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import authres
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spfmilter.headers import FOLD_WIDTH, unfold
from tests.folding import check_lines
from tests.procs import PYTHON, Daemon
from tests.test_daemon import AR, AUTHSERV, run, write_config

RS = "Received-SPF"


@pytest.fixture(scope="module")
def daemon(dns_server) -> Iterator[Daemon]:  # noqa: ANN001  (fixture from conftest)
    with tempfile.TemporaryDirectory(prefix="spfh", dir="/tmp") as d:
        workdir = Path(d)
        cfg = workdir / "spfmilter.cfg"
        write_config(cfg, workdir, dns_server)
        text = cfg.read_text()
        assert "[headers]\nreceived_spf = yes\n" in text
        cfg.write_text(text.replace("[headers]\n", "[headers]\nmailfrom = address\n"))
        with Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                    f"unix:{workdir}/spf.sock", workdir) as server:
            yield server


def inserted(resp, name: str) -> str:  # noqa: ANN001
    """The one value inserted for field ``name``, its physical lines checked."""
    values = [m.value for m in resp.modifications if m.kind == "insheader" and m.name == name]
    assert len(values) == 1, resp.modifications
    check_lines(name, f"{name}: {values[0]}".split("\n"))
    return values[0]


def mailfrom_of(resp) -> tuple[str, str]:  # noqa: ANN001
    header = authres.AuthenticationResultsHeader.parse(f"{AR}: {inserted(resp, AR)}")
    assert header.authserv_id == AUTHSERV
    found = [(r.result, p.value) for r in header.results for p in r.properties
             if p.name == "mailfrom"]
    assert len(found) == 1, header
    return found[0]


@pytest.mark.parametrize("local", [
    '"a b"', '"a\\"b"', '"x\\\\y"', '"semi;colon(paren)"', '"at@sign"', "plain.dot-atom+tag",
])
def test_quoted_local_part_is_kept(daemon: Daemon, local: str) -> None:
    resp = run(daemon, sender=f"<{local}@pass.spf.test>")
    assert resp.action == "continue"
    assert mailfrom_of(resp) == ("pass", f"{local}@pass.spf.test")
    rspf = unfold(inserted(resp, RS))
    assert rspf.startswith("pass ")
    # Received-SPF quotes the whole address (RFC 7208 9.1), ";" as "?" as for every value.
    quoted = '"' + re.sub(r'(["\\])', r"\\\1", f"{local}@pass.spf.test").replace(";", "?") + '"'
    assert f"envelope-from={quoted};" in rspf or f"envelope-from={local}@pass.spf.test;" in rspf


_qcontent = st.one_of(
    st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c not in '"\\'),
    st.characters(min_codepoint=32, max_codepoint=126).map(lambda c: "\\" + c),
)


@settings(max_examples=max(1, int(os.environ.get("SPFMILTER_PROPERTY_EXAMPLES", "150")) // 5),
          derandomize=True, deadline=None)
@given(parts=st.lists(_qcontent, min_size=1, max_size=60))
def test_property_quoted_local_part_round_trips_through_the_daemon(daemon: Daemon,
                                                                   parts: list[str]) -> None:
    address = '"' + "".join(parts) + '"@pass.spf.test'
    resp = run(daemon, sender=f"<{address}>")
    assert resp.action == "continue"
    assert mailfrom_of(resp) == ("pass", address)


def test_long_identities_and_comments_are_folded_within_998(daemon: Daemon) -> None:
    # The reproduced case: long HELO and MAIL FROM domain, long comments.
    helo = ".".join(["h" * 63] * 3) + "." + "x" * 61
    domain = ".".join(["d" * 63] * 3) + ".spf.test"
    resp = run(daemon, helo=helo, sender=f"<{'(' * 60}@{domain}>")
    assert resp.action == "continue"
    value = inserted(resp, AR)
    assert len(unfold(value)) > 3 * FOLD_WIDTH
    header = authres.AuthenticationResultsHeader.parse(f"{AR}: {value}")
    assert [(r.method, r.result) for r in header.results] == [("spf", "none"), ("spf", "none")]
    assert [(p.name, p.value) for r in header.results for p in r.properties] == [
        ("helo", helo), ("mailfrom", f'"{"(" * 60}"@{domain}')]
    inserted(resp, RS)
