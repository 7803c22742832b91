"""Write Sendmail/Postfix milters in Python on Sendmail's libmilter.

Subclass :class:`Milter` (one instance per SMTP connection), override the
callbacks you need, and start it with :func:`run`::

    class Hello(libmilter_ext.Milter):
        def envfrom(self, sender, *params):
            if sender == "<spam@example.com>":
                self.setreply("550", "5.7.1", "go away")
                return libmilter_ext.REJECT
            return libmilter_ext.CONTINUE

    libmilter_ext.run(Hello, "unix:/run/hello.sock", "hello")

Negotiation needs no Python when the factory's class is known (see
:func:`set_factory`): the handler is made at the first stage that enters
Python.  Stages you don't override are never sent by the MTA, stages decorated with
:func:`noreply` don't make the MTA wait for an answer, stages decorated with
:func:`deferred` don't even take the GIL when they arrive (their method runs
just before the next stage that calls Python), and an exception in a
callback is logged and answered with :attr:`Milter.failsafe`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket as _socket
import sys
import threading
import time
from typing import Any, Callable, ClassVar

# RTLD_DEEPBIND: libmilter's own calls bind to this module's definitions first,
# so its signal thread sleeps in _milter.c's sigwait() (see there) and never
# takes a SIGHUP; restored at once, as the flags are process-wide.
_DLOPEN_FLAGS = sys.getdlopenflags()
sys.setdlopenflags(_DLOPEN_FLAGS | getattr(os, "RTLD_DEEPBIND", 0))
try:
    import libmilter_ext._milter as _milter
except ImportError as _exc:
    # Without libmilter the MTA side (testing, protocol) still works; serving a
    # milter then raises ImportError naming this cause.
    from . import _unbuilt

    if not _unbuilt.explains(_exc, __name__):
        raise
    _milter = _unbuilt.stand_in(_exc, __name__)
finally:
    sys.setdlopenflags(_DLOPEN_FLAGS)
from ._milter import (  # noqa: E402, F401  (re-exported; after the dlopen flags)
    SMFIF_ADDHDRS,
    SMFIF_ADDRCPT,
    SMFIF_ADDRCPT_PAR,
    SMFIF_CHGBODY,
    SMFIF_CHGFROM,
    SMFIF_CHGHDRS,
    SMFIF_DELRCPT,
    SMFIF_QUARANTINE,
    SMFIF_SETSYMLIST,
    SMFIM_CONNECT,
    SMFIM_DATA,
    SMFIM_ENVFROM,
    SMFIM_ENVRCPT,
    SMFIM_EOH,
    SMFIM_EOM,
    SMFIM_HELO,
    SMFIP_HDR_LEADSPC,
    SMFIP_NOBODY,
    SMFIP_NOCONNECT,
    SMFIP_NODATA,
    SMFIP_NOEOH,
    SMFIP_NOHDRS,
    SMFIP_NOHELO,
    SMFIP_NOMAIL,
    SMFIP_NORCPT,
    SMFIP_NOUNKNOWN,
    SMFIP_NR_BODY,
    SMFIP_NR_CONN,
    SMFIP_NR_DATA,
    SMFIP_NR_EOH,
    SMFIP_NR_HDR,
    SMFIP_NR_HELO,
    SMFIP_NR_MAIL,
    SMFIP_NR_RCPT,
    SMFIP_NR_UNKN,
    SMFIP_RCPT_REJ,
    SMFIP_SKIP,
    Context,
    MilterError,
    StageError,
    setbacklog,
    setdbg,
    setmaxdatasize,
    settimeout,
)

__all__ = [
    "ACCEPT", "CONTINUE", "DISCARD", "NOREPLY", "REJECT", "SKIP", "TEMPFAIL",
    "Context", "Milter", "MilterError", "StageError", "deferred", "handle_signals",
    "hold_signals", "main",
    "noreply",
    "open_socket",
    "register", "run", "set_factory", "setbacklog", "setdbg", "setmaxdatasize", "settimeout",
    "stop",
    "version",
]

log = logging.getLogger(__name__)

CONTINUE: int = _milter.SMFIS_CONTINUE
REJECT: int = _milter.SMFIS_REJECT
DISCARD: int = _milter.SMFIS_DISCARD
ACCEPT: int = _milter.SMFIS_ACCEPT
TEMPFAIL: int = _milter.SMFIS_TEMPFAIL
NOREPLY: int = _milter.SMFIS_NOREPLY
SKIP: int = _milter.SMFIS_SKIP

VERDICT_NAMES = {
    CONTINUE: "continue", REJECT: "reject", DISCARD: "discard", ACCEPT: "accept",
    TEMPFAIL: "tempfail", NOREPLY: "noreply", SKIP: "skip",
}

ALL_ACTIONS = (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS
               | SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR)

# stage method -> (protocol bit that skips it, protocol bit that makes it no-reply)
_STAGES = {
    "connect": (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    "helo": (SMFIP_NOHELO, SMFIP_NR_HELO),
    "envfrom": (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    "envrcpt": (SMFIP_NORCPT, SMFIP_NR_RCPT),
    "data": (SMFIP_NODATA, SMFIP_NR_DATA),
    "unknown": (SMFIP_NOUNKNOWN, SMFIP_NR_UNKN),
    "header": (SMFIP_NOHDRS, SMFIP_NR_HDR),
    "eoh": (SMFIP_NOEOH, SMFIP_NR_EOH),
    "body": (SMFIP_NOBODY, SMFIP_NR_BODY),
}

_MACRO_STAGES = {
    "connect": SMFIM_CONNECT, "helo": SMFIM_HELO, "envfrom": SMFIM_ENVFROM,
    "envrcpt": SMFIM_ENVRCPT, "data": SMFIM_DATA, "eoh": SMFIM_EOH, "eom": SMFIM_EOM,
}

# Bytes per reply line as libmilter gets it (UTF-8, "%" doubled): libmilter takes
# up to MAXREPLYLEN (980), SMTP 512 octets per line with the code and CRLF.
_REPLY_LINE_MAX = 400
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Surrogates that surrogateescape cannot encode (it only maps U+DC80..U+DCFF).
_UNENCODABLE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def noreply(method: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a stage callback as not answering: the MTA won't wait for it.

    A verdict it returns anyway (or the fail-safe of an exception) is not lost:
    it is answered at every later stage that replies, without calling Python,
    for as long as it would have held had the stage replied itself -- from
    connect(), helo() or unknown() for the rest of the SMTP session, from a
    message stage (envfrom() to body()) until the transaction ends (abort,
    the next MAIL, or eom).  A no-reply envrcpt() cannot reject one recipient:
    its verdict holds for the transaction.  SKIP is for a replying body() only.
    """
    method._milter_noreply = True  # type: ignore[attr-defined]
    return method


# Stages whose method may be deferred: their answer does not depend on the
# method (it is "continue"), so C gives it at once.
_DEFERRABLE = {"connect": SMFIP_NR_CONN, "helo": SMFIP_NR_HELO, "header": SMFIP_NR_HDR,
               "data": SMFIP_NR_DATA, "unknown": SMFIP_NR_UNKN}


def deferred(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage callback later, without making the stage take the GIL.

    For connect(), helo(), header(), data() and unknown() -- and close(), see
    below -- whose answer is always CONTINUE: the C layer answers the MTA at once (and
    negotiates the stage as no-reply when the MTA offers it, as :func:`noreply`
    does), keeps a copy of the arguments, and calls the method later in the
    same GIL hold as the next stage that does enter Python (or at abort or
    close if none does), in the order the stages came.  getsymval() still sees
    the stage's macros then: libmilter keeps connect's and helo's macros until
    the session ends, and clears only those of the stage it enters and later
    ones -- but a second HELO/EHLO (after STARTTLS, say) replaces helo's, so
    a deferred first helo() reads the second one's.  A deferred header() runs
    before the next stage's method (eoh, eom, or the abort), so getsymval()
    may see that stage's macros too; with a ``header_names`` filter only the
    fields it lets through wait.  A verdict it returns
    anyway (or the fail-safe of an exception) is carried as a no-reply
    stage's is: the stage that ran the method answers it.  Up to 16 calls
    (64 KiB of copied text) wait per connection; the stage after that runs
    them and queues itself.

    On close() it means: unless deferred calls are still waiting (then it
    runs in the close callback, after them), close() runs after libmilter's
    close callback has returned, with the context already closed (no
    getsymval), at the next GIL hold of any connection or at shutdown.  A
    class that does not override close() gets that for free.
    """
    method._milter_deferred = True  # type: ignore[attr-defined]
    return method


def version() -> tuple[int, int, int]:
    """The (major, minor, patch) version of the libmilter in use."""
    return _milter.version()


class Milter:
    """Base class of a milter: one instance per SMTP connection.

    Class attributes to override:
      failsafe  verdict after an exception in a callback (default TEMPFAIL)
      macros    {stage: "macro names"} the MTA should send at that stage
      header_names  only these header fields (any case) reach header(); the
                others are answered in C without taking the GIL (default: all);
                checked when the class is defined
      actions   SMFIF_* flags wanted (default: every action the MTA offers)
      protocol  extra SMFIP_* flags wanted (e.g. SMFIP_HDR_LEADSPC)

    The negotiation reads them from the class, before any handler exists (see
    :func:`set_factory`); a milter whose negotiation depends on the instance
    overrides _negotiate, which is then called on each connection.
    """

    failsafe: ClassVar[int] = TEMPFAIL
    macros: ClassVar[dict[str, str]] = {}
    header_names: ClassVar[frozenset[str] | None] = None
    actions: ClassVar[int | None] = None
    protocol: ClassVar[int] = 0

    _ctx: Context
    _protocol_cache: ClassVar[dict[type, int]] = {}
    _filter_cache: ClassVar[dict[type, bytes]] = {}
    _deferral_cache: ClassVar[dict[type, tuple[int, bool]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the class attributes when the class is defined, not per connection."""
        super().__init_subclass__(**kwargs)
        if cls.header_names is not None:
            _header_filter_blob(cls.__qualname__, cls.header_names)
        for name, value in vars(cls).items():
            if getattr(value, "_milter_deferred", False) and name not in _DEFERRABLE \
                    and name != "close":
                raise TypeError(f"{cls.__qualname__}.{name}: only connect, helo, header, "
                                "data, unknown and close can be deferred")

    # -- callbacks (override what you need) ----------------------------------
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        """Client connected; hostaddr is (ip, port), (ip, port, flow, scope), a path or None."""
        return CONTINUE

    def helo(self, name: str) -> int:
        """HELO/EHLO argument."""
        return CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        """MAIL FROM address (with angle brackets) and ESMTP parameters."""
        return CONTINUE

    def envrcpt(self, recipient: str, *params: str) -> int:
        """RCPT TO address and ESMTP parameters."""
        return CONTINUE

    def data(self) -> int:
        """DATA command."""
        return CONTINUE

    def unknown(self, command: str) -> int:
        """An SMTP command the MTA does not know."""
        return CONTINUE

    def header(self, name: str, value: str) -> int:
        """One header field (8-bit bytes arrive as surrogate escapes)."""
        return CONTINUE

    def eoh(self) -> int:
        """End of headers."""
        return CONTINUE

    def body(self, chunk: bytes) -> int:
        """A chunk of the body."""
        return CONTINUE

    def eom(self) -> int:
        """End of message: the only place for header/recipient/body actions.

        Header changes wait in C and reach the MTA, in call order, before the
        next other action that writes to it or when eom returns (see addheader).
        """
        return CONTINUE

    def abort(self) -> None:
        """The current message was aborted (RSET, error, disconnect)."""

    def close(self) -> None:
        """The connection is gone: release resources."""

    def on_exception(self, stage: str, exc: BaseException) -> int:
        """A callback raised: log it and answer the fail-safe verdict."""
        log.error("exception in %s callback: %s", stage, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return self.failsafe

    # -- negotiation ---------------------------------------------------------
    @classmethod
    def protocol_flags(cls) -> int:
        """SMFIP_* flags for this class: skip stages not overridden, no-reply where marked."""
        cached = Milter._protocol_cache.get(cls)
        if cached is not None:
            return cached
        flags = cls.protocol
        for name, (skip_bit, noreply_bit) in _STAGES.items():
            method = getattr(cls, name)
            if method is getattr(Milter, name):
                flags |= skip_bit
            elif getattr(method, "_milter_noreply", False) \
                    or getattr(method, "_milter_deferred", False):
                flags |= noreply_bit
            elif name == "body":
                flags |= SMFIP_SKIP  # body() may answer SKIP where the MTA allows it
        Milter._protocol_cache[cls] = flags
        return flags

    def _negotiate(self, offered_actions: int, offered_protocol: int) -> tuple[int, int]:
        """Answer (actions, protocol) for this connection; called with the handler made.

        Only called when the C layer has no template of the class's answer:
        the factory's class is not known, or the class overrides this method
        (then it is called on every connection, as the negotiation may depend
        on the instance).
        """
        actions, protocol, symlists, header_filter, deferred_stages, close_deferred = \
            type(self)._negotiation_template(offered_actions, offered_protocol, checked=False)
        for where, names in symlists:
            self._ctx.setsymlist(where, names)
        if header_filter is not None:
            self._ctx.set_header_filter(header_filter)
        if deferred_stages:
            self._ctx.set_deferred(deferred_stages)
        if close_deferred:
            self._ctx.set_close_deferred(True)
        return actions, protocol

    @classmethod
    def _negotiation_template(cls, offered_actions: int, offered_protocol: int, *,
                              checked: bool = True) -> tuple[Any, ...] | None:
        """The class's negotiation answer to this offer, for the C layer to reuse.

        (actions, protocol, ((SMFIM_*, b"macros"), ...), header filter bytes or
        None, deferred SMFIP_NR_* bits, close deferred): computed from the class
        attributes only.  None if the class overrides _negotiate.
        """
        if checked and cls._negotiate is not Milter._negotiate:
            return None
        wanted = ALL_ACTIONS if cls.actions is None else cls.actions
        if cls.macros:
            wanted |= SMFIF_SETSYMLIST
        actions = wanted & offered_actions
        protocol = cls.protocol_flags() & offered_protocol
        symlists: tuple[tuple[int, bytes], ...] = ()
        if cls.macros and actions & SMFIF_SETSYMLIST:
            symlists = tuple((_MACRO_STAGES[stage], names.encode("utf-8", "surrogateescape"))
                             for stage, names in cls.macros.items())
        header_filter = cls._header_filter() if cls.header_names is not None else None
        deferred_stages, close_deferred = cls._deferral()
        return actions, protocol, symlists, header_filter, deferred_stages, close_deferred

    @classmethod
    def _deferral(cls) -> tuple[int, bool]:
        """(SMFIP_NR_* bits of the deferred stages, is close() deferred) for this class."""
        cached = Milter._deferral_cache.get(cls)
        if cached is None:
            stages = 0
            for name, bit in _DEFERRABLE.items():
                method = getattr(cls, name)
                if method is not getattr(Milter, name) and getattr(method, "_milter_deferred",
                                                                   False):
                    stages |= bit
            close = cls.close is Milter.close or getattr(cls.close, "_milter_deferred", False)
            cached = Milter._deferral_cache[cls] = (stages, close)
        return cached

    @classmethod
    def _header_filter(cls) -> bytes:
        blob = Milter._filter_cache.get(cls)
        if blob is None:
            blob = _header_filter_blob(cls.__qualname__, cls.header_names or ())
            Milter._filter_cache[cls] = blob
        return blob

    # -- actions -------------------------------------------------------------
    def getsymval(self, name: str) -> str | None:
        """Value of a macro such as "i" or "{auth_authen}" (None if not sent)."""
        return self._ctx.getsymval(name)

    def setreply(self, rcode: str, xcode: str | None = None, *lines: str | None) -> None:
        """Set the SMTP reply for a REJECT/TEMPFAIL; text of any kind is made safe."""
        rcode = str(rcode)
        if not re.fullmatch(r"[45]\d\d", rcode):
            raise ValueError(f"setreply: reply code must be 4xx or 5xx, not {rcode!r}")
        if xcode is not None and not re.fullmatch(rf"{rcode[0]}\.\d{{1,3}}\.\d{{1,3}}", xcode):
            raise ValueError(f"setreply: extended code {xcode!r} does not fit {rcode}")
        safe = reply_lines(lines)
        self._ctx.setreply(rcode, xcode, *safe)

    def addheader(self, name: str, value: str | bytes, idx: int = -1) -> None:
        """Append a header, or insert it at position idx (0 = top).

        Checked now (errors are raised here), sent later: header changes wait
        in C and reach the MTA, in call order, just before the next other
        action that writes to it (addrcpt, delrcpt, chgfrom, replacebody,
        quarantine, progress) or when eom returns, before its verdict -- so
        eom keeps the GIL instead of handing it over once per change.  If a
        waiting change cannot be sent (the MTA hung up), that next action
        raises MilterError naming it; after eom returned, on_exception() is
        told and the fail-safe verdict answers.
        """
        self._ctx.addheader(name, value, idx)

    def chgheader(self, name: str, idx: int, value: str | bytes | None = None) -> None:
        """Change the idx-th (1-based) field called name; value None deletes it.

        Sent as addheader's changes are: before the next other write, or when
        eom returns.
        """
        self._ctx.chgheader(name, idx, value)

    def addrcpt(self, recipient: str, params: str | None = None) -> None:
        """Add an envelope recipient (with ESMTP parameters)."""
        self._ctx.addrcpt(recipient, params)

    def delrcpt(self, recipient: str) -> None:
        """Remove an envelope recipient."""
        self._ctx.delrcpt(recipient)

    def chgfrom(self, sender: str, params: str | None = None) -> None:
        """Change the envelope sender (with ESMTP parameters)."""
        self._ctx.chgfrom(sender, params)

    def replacebody(self, chunk: bytes) -> None:
        """Replace the body; call repeatedly to send it in pieces."""
        self._ctx.replacebody(chunk)

    def quarantine(self, reason: str) -> None:
        """Put the message in the MTA's quarantine."""
        self._ctx.quarantine(reason)

    def progress(self) -> None:
        """Tell the MTA we are still working (resets its timeout); sent at once.

        Queued header changes go out just before it; they do not reset the
        MTA's timeout by themselves until then (see addheader).
        """
        self._ctx.progress()


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 field-name: ftext


def _header_filter_blob(owner: str, names: Any) -> bytes:
    """header_names as the C filter wants them: b"name\\0name\\0\\0", lower case.

    Raises TypeError/ValueError naming the class and the offending name.
    """
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"{owner}.header_names must be a set of header names, "
                        f"not {type(names).__name__}")
    lowered = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{owner}.header_names: {name!r} is not a str")
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"{owner}.header_names: {name!r} is not a header field name "
                             "(one or more printable ASCII characters except ':')")
        lowered.add(name.lower())
    return b"".join(n.encode("ascii") + b"\0" for n in sorted(lowered)) + b"\0"


def _wire_len(ch: str) -> int:
    """Bytes of one character in a reply line: UTF-8 (surrogateescape), '%' doubled."""
    code = ord(ch)
    if code < 0x80:
        return 2 if ch == "%" else 1
    if 0xDC80 <= code <= 0xDCFF:
        return 1
    return 2 if code < 0x800 else 3 if code < 0x10000 else 4


def _fitting(part: str) -> int:
    """How many leading characters of part fit in _REPLY_LINE_MAX bytes."""
    if len(part) * 4 <= _REPLY_LINE_MAX:
        return len(part)
    size = 0
    for i, ch in enumerate(part):
        size += _wire_len(ch)
        if size > _REPLY_LINE_MAX:
            return i
    return len(part)


def reply_lines(texts: tuple[str | None, ...] | list[str | None]) -> list[str]:
    """Make reply text safe for libmilter: no CR/LF or controls, `%` doubled, short lines."""
    out: list[str] = []
    for text in texts:
        if text is None:
            continue
        for part in re.split(r"\r\n|\r|\n", str(text)):
            part = _UNENCODABLE.sub("?", _CONTROL.sub(" ", part).replace("\t", " "))
            while (limit := _fitting(part)) < len(part):
                cut = part.rfind(" ", 0, limit)
                cut = cut if cut > limit // 2 else limit
                out.append(part[:cut])
                part = part[cut:].lstrip(" ")
            out.append(part)
    out = [line.replace("%", "%%") for line in out][:32]
    if len(out) == 1 and not out[0]:
        return []
    return out


_FAILSAFE_VERDICTS = frozenset({CONTINUE, REJECT, DISCARD, ACCEPT, TEMPFAIL})


def _error_hook(handler: Milter | None, stage: str, exc: BaseException) -> int:
    """Called by the C layer on a libmilter thread: always returns a verdict."""
    if handler is None:
        log.error("cannot create the milter for a connection (%s): %s", stage, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return TEMPFAIL
    try:
        verdict = handler.on_exception(stage, exc)
    except BaseException as hook_exc:  # SystemExit too: this is no place to exit
        log.error("on_exception for %s raised %s: %s; answering tempfail", stage,
                  type(hook_exc).__name__, hook_exc,
                  exc_info=(type(hook_exc), hook_exc, hook_exc.__traceback__))
        return TEMPFAIL
    if not isinstance(verdict, int) or isinstance(verdict, bool) \
            or verdict not in _FAILSAFE_VERDICTS:
        log.error("on_exception for %s returned %r, not a verdict; answering tempfail",
                  stage, verdict)
        return TEMPFAIL
    return int(verdict)


def _maker(factory: Callable[[], Milter]) -> Callable[[Context], Milter]:
    def make(ctx: Context) -> Milter:
        milter = factory()
        milter._ctx = ctx
        return milter
    return make


def _factory_class(factory: Callable[[], Milter],
                   milter_class: type[Milter] | None) -> type[Milter] | None:
    if milter_class is None and isinstance(factory, type) and issubclass(factory, Milter):
        milter_class = factory
    if milter_class is not None and not (isinstance(milter_class, type)
                                         and issubclass(milter_class, Milter)):
        raise TypeError(f"milter_class must be a Milter subclass, not {milter_class!r}")
    return milter_class


def register(factory: Callable[[], Milter], name: str, *,
             flags: int = ALL_ACTIONS | SMFIF_SETSYMLIST,
             milter_class: type[Milter] | None = None) -> None:
    """Register the milter class (or factory) with libmilter under name.

    flags: the SMFIF_* actions registered with smfi_register; each connection
    then negotiates what it really uses (Milter.actions).  milter_class: the
    class factory() returns (implied when factory is a Milter subclass); see
    :func:`set_factory`.
    """
    _milter.register(name, _maker(factory), _error_hook, flags,
                     _factory_class(factory, milter_class))


def set_factory(factory: Callable[[], Milter], milter_class: type[Milter] | None = None) -> None:
    """Make factory() the handler of each new connection from now on (a reload, say).

    With the class it returns known (milter_class, or factory itself being a
    Milter subclass), negotiation does not enter Python: the C layer answers
    the MTA from the class's negotiation template (computed from its class
    attributes once per MTA offer; a class that overrides _negotiate is asked
    on each connection instead), and factory() runs at the first stage that
    does enter Python, in the same GIL hold.  A connection is always served
    by the factory it negotiated with, even if set_factory() is called before
    its handler is made; a handler of another class than milter_class is
    refused (the fail-safe verdict, logged).  A connection whose stages never
    enter Python gets no handler at all (and no close()).  Without a known
    class, negotiation calls factory() and _negotiate at once, as before.
    """
    _milter.set_factory(_maker(factory), _factory_class(factory, milter_class))


_DRAIN_SECONDS = 5.0  # how long main() waits for callbacks still running at the end
_listening: list[str] = []  # the socket spec main() serves, for stop() to wake it


def open_socket(spec: str, *, remove_stale: bool = True) -> None:
    """Create the listening socket now (before dropping privileges, say)."""
    _milter.setconn(spec)
    _milter.opensocket(remove_stale)
    _listening[:] = [spec]


def _wake(spec: str) -> None:
    """Connect once to our own socket to end libmilter's accept poll early."""
    kind, _, rest = spec.partition(":")
    try:
        if kind in ("unix", "local"):
            family, address = _socket.AF_UNIX, rest
        else:
            port, _, host = rest.partition("@")
            family = _socket.AF_INET6 if kind == "inet6" else _socket.AF_INET
            if not host or host in ("0.0.0.0", "::", "*"):
                host = "::1" if family == _socket.AF_INET6 else "127.0.0.1"
            address = (host, int(port))
        with _socket.socket(family, _socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)
    except (OSError, ValueError):
        pass  # the 5-second poll still ends the loop


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Control:
    """Process-wide run state: is smfi_main running, was a stop asked for."""

    stop_requested = False
    running = False
    on_hup: Callable[[], None] | None = None
    hups: list[int] = []  # SIGHUPs taken and not yet handled (one token each)
    reloading = False
    previous: dict[int, Any] = {}


def stop() -> None:
    """Ask :func:`main` to return (promptly); before main() starts, it won't run.

    smfi_stop waits for libmilter's accept loop, which polls with a 5-second
    timeout; connecting to our own socket meanwhile ends that wait at once.
    """
    _Control.stop_requested = True
    if not _Control.running:
        return
    stopper = threading.Thread(target=_milter.stop, name="smfi_stop", daemon=True)
    stopper.start()
    while stopper.is_alive():
        for spec in _listening:
            _wake(spec)
        stopper.join(0.05)


def _take_hups() -> bool:
    """Take every SIGHUP token waiting (each one exactly once); True if there was one."""
    taken = False
    while True:
        try:
            _Control.hups.pop()  # atomic: the main thread's handler and main() share it
        except IndexError:
            return taken
        taken = True


def _hup() -> None:
    """Call on_hup once for the SIGHUPs taken so far; one arriving meanwhile is next."""
    if _Control.reloading:
        return  # the running call takes it when it ends
    _Control.reloading = True
    try:
        while _take_hups():
            on_hup = _Control.on_hup
            if on_hup is None:
                stop()
                return
            try:
                on_hup()
            except Exception:  # a failed reload must not take the milter down
                log.exception("SIGHUP handler %s failed; still serving",
                              getattr(on_hup, "__qualname__", on_hup))
    finally:
        _Control.reloading = False


def _on_signal(signum: int, frame: Any) -> None:
    if signum != signal.SIGHUP:
        stop()
        return
    _Control.hups.append(signum)
    if _Control.running:
        _hup()  # else main() does, once it serves, with the on_hup it has then


def hold_signals() -> None:
    """Block SIGTERM, SIGINT and SIGHUP in this thread until handle_signals().

    Call it first thing in the main thread, before anything else starts (a
    thread started afterwards blocks them too): a signal sent meanwhile waits
    instead of killing the process, and is taken once handle_signals() runs.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def handle_signals(*, on_hup: Callable[[], None] | None = None) -> None:
    """Take SIGTERM/SIGINT (stop) and SIGHUP (on_hup, or stop) now.

    main() does this itself; call it earlier (run() does, before it opens
    the socket) so that a SIGTERM during start-up also ends in a clean stop.
    A SIGHUP that comes before main() serves is not lost: on_hup (the one
    main() is given, if any) runs once for it as soon as main() has started
    smfi_main; without one the milter then stops.  Signals held by
    :func:`hold_signals` are taken now.  Only the main thread can take
    signals: to serve from another thread, call this first in the main
    thread (which then waits with a timeout: Python runs a handler only
    between waits).  An exception in on_hup is logged and the milter goes on.
    """
    _Control.on_hup = on_hup
    for sig in _SIGNALS:
        previous = signal.signal(sig, _on_signal)
        if previous is not _on_signal:
            _Control.previous[sig] = previous
    if threading.current_thread() is threading.main_thread():
        _milter.forward_signals(_SIGNALS)  # one taken by another thread reaches this one
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _restore_signals() -> None:
    for sig, handler in _Control.previous.items():
        signal.signal(sig, handler)
    _Control.previous = {}


_SIGNAL_THREAD_WAIT = 5.0  # seconds for libmilter's signal thread to reach our sigwait()


def _await_signal_thread(running: threading.Thread, parked_before: int) -> None:
    """Wait until libmilter's signal thread, started by smfi_main, sleeps in our sigwait().

    If libmilter does not call our sigwait() (the module was not loaded with
    RTLD_DEEPBIND, or libmilter is linked in statically), its own stops the
    milter on a SIGHUP that reaches it: say so loudly.
    """
    deadline = time.monotonic() + _SIGNAL_THREAD_WAIT
    while running.is_alive() and time.monotonic() < deadline:
        if _milter.signal_threads_parked(parked_before, 0.05) > parked_before:
            log.debug("libmilter's signal thread is parked")
            return
    if running.is_alive():
        log.error("libmilter's signal thread did not call libmilter_ext's sigwait(): a SIGHUP"
                  " that reaches it stops the milter")


def _check_thread() -> bool:
    """True in the main thread; elsewhere refuse unless signals are already taken.

    libmilter blocks SIGTERM/SIGINT/SIGHUP in the thread that serves, so if the
    main thread does not take them in Python they kill the process (SIGTERM:
    exit -15, no close(), socket left behind).
    """
    if threading.current_thread() is threading.main_thread():
        return True
    if signal.getsignal(signal.SIGTERM) is not _on_signal:
        raise RuntimeError(
            "libmilter_ext: serving from a thread other than the main thread needs "
            "libmilter_ext.handle_signals() called in the main thread first; without it "
            "SIGTERM, SIGINT and SIGHUP would kill the process instead of stopping the milter"
        )
    return False


def main(*, on_hup: Callable[[], None] | None = None) -> None:
    """Run libmilter's loop until stopped; SIGTERM/SIGINT stop it.

    smfi_main runs in a helper thread so that the Python main thread keeps
    receiving signals: SIGHUP calls on_hup (e.g. reload a config) instead of
    stopping the milter, which is what libmilter alone would do: its own
    signal thread sleeps for good in _milter.c's sigwait() and never takes
    one.  A SIGHUP taken before (see handle_signals) is handled once
    smfi_main has started.  From another thread, main() serves only after
    handle_signals() ran in the main thread (else RuntimeError); it then
    returns in that thread on SIGTERM/SIGINT, and on_hup still runs in the
    main thread.
    """
    in_main_thread = _check_thread()
    if in_main_thread:
        handle_signals(on_hup=on_hup if on_hup is not None else _Control.on_hup)
    elif on_hup is not None:
        _Control.on_hup = on_hup
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            _milter.main()
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    try:
        if _Control.stop_requested:  # a SIGTERM during start-up
            if _listening:
                _milter.stop()  # closes the socket open_socket() made, and removes it
            return
        parked_before = _milter.signal_threads_parked(0, 0.0)
        thread = threading.Thread(target=loop, name="smfi_main", daemon=True)
        thread.start()
        # smfi_stop while smfi_main sets up its signal thread (it reinitializes
        # its stop lock there) is unsafe: a stop until then only sets
        # stop_requested, acted on here.
        _await_signal_thread(thread, parked_before)
        _Control.running = True
        if _Control.stop_requested:
            stop()
        if in_main_thread:
            _hup()
        elif _take_hups():  # the main thread's handler calls on_hup
            signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP)
        while thread.is_alive():
            thread.join(0.5)
    finally:
        _Control.running = False
        if in_main_thread:
            _restore_signals()
        # No callback may enter Python while the interpreter finalizes.
        _milter.shutdown(_DRAIN_SECONDS)
    if errors and _Control.stop_requested and isinstance(errors[0], MilterError):
        # smfi_stop just before smfi_main's listener started makes it fail to
        # reopen the socket the stop closed: that is the stop, not an error.
        log.info("libmilter stopped while starting: %s", errors[0])
    elif errors:
        raise errors[0]


def run(factory: Callable[[], Milter], socket: str, name: str, *, timeout: int = 600,
        backlog: int | None = None, debug: int = 0, remove_stale: bool = True,
        on_hup: Callable[[], None] | None = None) -> None:
    """Register, open the socket and serve until SIGTERM/SIGINT.

    socket: "unix:/path" (or "local:"), "inet:PORT@HOST", "inet6:PORT@HOST".
    Call it from the main thread, or from another one after handle_signals()
    in the main thread (see main()); otherwise RuntimeError, before anything opens.
    """
    in_main_thread = _check_thread()
    register(factory, name)
    if in_main_thread:  # from here a signal stops or reloads, never kills
        handle_signals(on_hup=on_hup if on_hup is not None else _Control.on_hup)
    elif on_hup is not None:
        _Control.on_hup = on_hup
    try:
        settimeout(timeout)
        if backlog is not None:
            setbacklog(backlog)
        if debug:
            setdbg(debug)
        open_socket(socket, remove_stale=remove_stale)
    except BaseException:
        if in_main_thread:
            _restore_signals()
        raise
    main(on_hup=on_hup)
