"""spfmilter in a milter chain: another milter adds an Authentication-Results field at eom.

Issue 8 item 11.  OpenDKIM and OpenDMARC add their own Authentication-Results
field at eom, often with the same authserv-id as spfmilter.  Here a small test
milter (tests/milters/ar_chain.py) plays them, once *before* spfmilter in the
chain and once *after* it, through the real Sendmail and the real Postfix.

What the MTAs do (their source: Sendmail ``milter_data``/``milter_headers``/
``milter_changeheader``, Postfix ``milter_message``/``cleanup_find_header_start``):
both hand the message to the milters one after the other, each seeing the
header as the milters before it left it, and each milter's edits are applied
before the next one starts.  So the header indexes spfmilter counts while the
header comes in are still right at its own eom: they are never shifted by
another milter.  But a field that a milter *before* spfmilter added, inserted
or appended, reaches spfmilter like any field the client sent; when it claims
spfmilter's authserv-id, spfmilter cannot tell it from a forgery and deletes
it, in both MTAs.  Nothing in the milter protocol says where a field came
from, so spfmilter cannot do better.  Hence the order documented in README and
spfmilter(8): spfmilter first, the milters that add Authentication-Results
after it.  (Sendmail puts a field appended after a deletion into the deleted
field's place, "Milter change: default header" in its log.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.e2e.mta import (
    AUTHSERV_ID,
    Mta,
    Postfix,
    SaslUser,
    Sendmail,
    SpfMilter,
    make_sasldb,
    postfix_binary,
)
from tests.e2e.scenarios import ACCEPTED, auth_results, send, spf
from tests.procs import PYTHON, ROOT, Daemon

CHAIN_MILTER = ROOT / "tests" / "milters" / "ar_chain.py"
FORGED = (
    f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=bank.example",
    "Authentication-Results: other.example; dkim=pass header.d=pass.spf.test",
)


@pytest.fixture(scope="module", params=["sendmail", "postfix"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def workdir(e2e_dir: Path, kind: str) -> Path:
    path = e2e_dir / f"chain-{kind}"
    path.mkdir(mode=0o755)
    if kind == "postfix":
        postfix_binary()  # user and group postfix exist before anything uses them
    return path


@pytest.fixture(scope="module")
def chain(workdir: Path) -> Iterator[dict[str, str]]:
    """The two chain milters, 'before' and 'after': {name: socket path}."""
    sockets, daemons = {}, []
    for name in ("before", "after"):
        where = workdir / name
        where.mkdir(mode=0o755)
        sockets[name] = str(where / "sock")
        daemons.append(Daemon([PYTHON, str(CHAIN_MILTER), f"unix:{sockets[name]}", name,
                               AUTHSERV_ID], f"unix:{sockets[name]}", where).start())
    yield sockets
    for daemon in daemons:
        assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture(scope="module")
def milter(workdir: Path, kind: str, dns_server: DnsServer) -> Iterator[SpfMilter]:
    server = SpfMilter(workdir / "milter", nameservers=dns_server.nameservers,
                       group="postfix" if kind == "postfix" else "")
    server.start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mta(workdir: Path, kind: str, milter: SpfMilter, chain: dict[str, str]) -> Iterator[Mta]:
    sasl: SaslUser = make_sasldb(workdir / "sasldb2", "sasha", "s3cret-e2e",
                                 group="postfix" if kind == "postfix" else "")
    cls = Sendmail if kind == "sendmail" else Postfix
    server = cls(workdir / "mta", milter.socket_path, sasl,
                 before=[("before", chain["before"])], after=[("after", chain["after"])])
    server.start()
    yield server
    server.stop()


def deliver(mta: Mta, control: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Send a pass message with the forged fields and ``control``; its AR fields, top first."""
    tok, reply = send(mta, source="127.0.0.2", helo="pass.spf.test",
                      sender="alice@pass.spf.test", label="chain",
                      extra_headers=(*FORGED, control))
    assert reply.code == ACCEPTED, reply
    msg = mta.mailbox.wait_for(tok)
    fields = [(h.authserv_id, [(r.method, r.result) for r in h.results])
              for h in auth_results(msg)]
    ours = [h for h in auth_results(msg) if spf(h)]
    assert len(ours) == 1 and spf(ours[0]) == {"helo": ("pass", "pass.spf.test"),
                                               "mailfrom": ("pass", "pass.spf.test")}
    text = "".join(msg.get_all("Authentication-Results"))
    assert "bank.example" not in text  # the client's forgery is always gone
    return fields


SPF_PASS = (AUTHSERV_ID, [("spf", "pass"), ("spf", "pass")])
OTHER = ("other.example", [("dkim", "pass")])
CHAINED = (AUTHSERV_ID, [("dkim", "pass")])


@pytest.mark.parametrize("mode", ["insert", "append"])
def test_documented_order_spfmilter_first_keeps_the_later_milters_field(
        mta: Mta, kind: str, mode: str) -> None:
    fields = deliver(mta, f"X-Chain-after: {mode}")
    if mode == "insert":  # the later milter's field goes on top of ours
        assert fields == [CHAINED, SPF_PASS, OTHER]
    elif kind == "sendmail":  # appended into the slot of the forgery spfmilter deleted
        assert fields == [SPF_PASS, CHAINED, OTHER]
    else:
        assert fields == [SPF_PASS, OTHER, CHAINED]


@pytest.mark.parametrize("mode", ["insert", "append"])
def test_other_order_loses_the_earlier_milters_field(mta: Mta, mode: str) -> None:
    # It reached spfmilter as a field with our authserv-id: taken for a forgery.
    # The indexes are not shifted: had they been, other.example's field (or the
    # wrong one of ours) would be the one deleted.
    assert deliver(mta, f"X-Chain-before: {mode}") == [SPF_PASS, OTHER]


def test_fold_form_given_to_addheader(mta: Mta) -> None:
    """A value folded with a bare LF arrives as a folded field; with CR LF, a CR is left over.

    So spfmilter hands its folded values to smfi_insheader with "\\n" + space.
    """
    tok, reply = send(mta, source="127.0.0.2", helo="pass.spf.test",
                      sender="alice@pass.spf.test", label="folds",
                      extra_headers=("X-Chain-after: folds",))
    assert reply.code == ACCEPTED, reply
    mta.mailbox.wait_for(tok)
    raw = mta.mailbox.raw(tok)
    eol = b"\r\n" if raw.split(b"\n", 1)[0].endswith(b"\r") else b"\n"  # the file's own
    assert b"X-Fold-LF: first" + eol + b" second" + eol + b"\tthird" + eol in raw, raw
    assert b"X-Fold-CRLF: first\r" + eol + b" second\r" + eol + b"\tthird" + eol in raw, raw
