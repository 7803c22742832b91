"""Type stubs for the C part of libmilter_ext (see _milter.c)."""
from typing import Any, Callable

_Text = str | bytes

class MilterError(Exception): ...
class StageError(MilterError): ...

class Context:
    """One SMTP connection; its methods are libmilter actions."""
    @property
    def stage(self) -> str: ...
    @property
    def actions(self) -> int: ...
    @property
    def protocol(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def getsymval(self, name: _Text, /) -> str | None: ...
    def setsymlist(self, stage: int, macros: _Text, /) -> None: ...
    def setreply(self, rcode: _Text, xcode: _Text | None = ..., /, *lines: _Text) -> None: ...
    def addheader(self, name: _Text, value: _Text, idx: int = ..., /) -> None:
        """Checked now, queued: sent before the next other write or when eom returns."""
    def chgheader(self, name: _Text, idx: int, value: _Text | None = ..., /) -> None:
        """Checked now, queued: sent before the next other write or when eom returns."""
    def addrcpt(self, rcpt: _Text, args: _Text | None = ..., /) -> None: ...
    def delrcpt(self, rcpt: _Text, /) -> None: ...
    def chgfrom(self, sender: _Text, args: _Text | None = ..., /) -> None: ...
    def replacebody(self, chunk: bytes, /) -> None: ...
    def quarantine(self, reason: _Text, /) -> None: ...
    def progress(self) -> None: ...
    def set_header_filter(self, names: bytes | None, /) -> None: ...
    def set_deferred(self, stages: int, /) -> None:
        """SMFIP_NR_* bits of connect/helo/data/unknown: answered in C, method run later."""
    def set_close_deferred(self, deferred: bool, /) -> None:
        """True: close() runs at the next GIL hold of any callback, the context closed."""

def register(
    name: str,
    factory: Callable[[Context], Any],
    error_hook: Callable[[Any, str, BaseException], int] | None = ...,
    flags: int = ...,
    cls: type | None = ...,
) -> None: ...
def set_factory(factory: Callable[[Context], Any], cls: type | None = ...) -> None:
    """New connections: handlers from factory(ctx), of class cls (None: unknown).

    With cls, negotiation answers from cls._negotiation_template(actions,
    protocol) without the GIL and the handler is made at the first stage that
    enters Python, by the factory the connection negotiated with.
    """
def setconn(spec: _Text, /) -> None: ...
def opensocket(remove_stale: bool, /) -> None: ...
def settimeout(seconds: int, /) -> None: ...
def setbacklog(backlog: int, /) -> None: ...
def setdbg(level: int, /) -> None: ...
def setmaxdatasize(size: int, /) -> int: ...
def main() -> None: ...
def stop() -> None: ...
def shutdown(timeout: float, /) -> bool: ...
def version() -> tuple[int, int, int]: ...
def _park_limit(limit: int, /) -> int: ...
def _gil_entries() -> int:
    """How many times libmilter callbacks took the GIL since the module was loaded."""
def _gil_releases() -> int:
    """How many times a Context action let go of the GIL to write to the MTA."""
def _eom_write_failures() -> int:
    """How many eoms could not send their queued header changes once they returned."""
def forward_signals(signums: tuple[int, ...], /) -> None:
    """In the main thread: these signals, taken by another thread, are sent on to it."""
def signal_threads_parked(more_than: int, timeout: float, /) -> int:
    """Wait up to timeout s for more than more_than signal threads in our sigwait()."""

SMFIS_CONTINUE: int
SMFIS_REJECT: int
SMFIS_DISCARD: int
SMFIS_ACCEPT: int
SMFIS_TEMPFAIL: int
SMFIS_NOREPLY: int
SMFIS_SKIP: int
SMFIS_ALL_OPTS: int
SMFIF_ADDHDRS: int
SMFIF_CHGBODY: int
SMFIF_ADDRCPT: int
SMFIF_DELRCPT: int
SMFIF_CHGHDRS: int
SMFIF_QUARANTINE: int
SMFIF_CHGFROM: int
SMFIF_ADDRCPT_PAR: int
SMFIF_SETSYMLIST: int
SMFIP_NOCONNECT: int
SMFIP_NOHELO: int
SMFIP_NOMAIL: int
SMFIP_NORCPT: int
SMFIP_NOBODY: int
SMFIP_NOHDRS: int
SMFIP_NOEOH: int
SMFIP_NR_HDR: int
SMFIP_NOHREPL: int
SMFIP_NOUNKNOWN: int
SMFIP_NODATA: int
SMFIP_SKIP: int
SMFIP_RCPT_REJ: int
SMFIP_NR_CONN: int
SMFIP_NR_HELO: int
SMFIP_NR_MAIL: int
SMFIP_NR_RCPT: int
SMFIP_NR_DATA: int
SMFIP_NR_UNKN: int
SMFIP_NR_EOH: int
SMFIP_NR_BODY: int
SMFIP_HDR_LEADSPC: int
SMFIM_CONNECT: int
SMFIM_HELO: int
SMFIM_ENVFROM: int
SMFIM_ENVRCPT: int
SMFIM_DATA: int
SMFIM_EOM: int
SMFIM_EOH: int
