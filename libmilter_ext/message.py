"""Whole-message milters: headers and body spooled to a file, parsed at eom."""

from __future__ import annotations

import email.policy
import tempfile
from email.feedparser import BytesFeedParser
from email.message import EmailMessage
from typing import IO

from . import CONTINUE, SMFIP_HDR_LEADSPC, Milter

SPOOL_MEMORY_LIMIT = 1 << 20  # bytes kept in memory before spooling to disk


class MessageMilter(Milter):
    """Collects the message; override :meth:`message` to see it as an EmailMessage.

    Lines end in "\n" in the parsed message, as the email package expects.

    Header values arrive from the MTA as text with 8-bit bytes escaped; they are
    written back as the original bytes, so the parsed message matches what was sent
    (with ``protocol = SMFIP_HDR_LEADSPC`` byte for byte, blanks after the colon included).
    """

    spool_limit: int = SPOOL_MEMORY_LIMIT

    def envfrom(self, sender: str, *params: str) -> int:
        self._spool_reset()
        self.sender = sender
        self.recipients: list[str] = []
        return CONTINUE

    def envrcpt(self, recipient: str, *params: str) -> int:
        self.recipients.append(recipient)
        return CONTINUE

    def header(self, name: str, value: str) -> int:
        # With SMFIP_HDR_LEADSPC the value keeps what followed the colon as is.
        colon = b":" if self._ctx.protocol & SMFIP_HDR_LEADSPC else b": "
        self._spool().write(_raw(name) + colon + _raw(value) + b"\r\n")
        return CONTINUE

    def eoh(self) -> int:
        self._spool().write(b"\r\n")
        return CONTINUE

    def body(self, chunk: bytes) -> int:
        self._spool().write(chunk)
        return CONTINUE

    def eom(self) -> int:
        spool = self._spool()
        spool.seek(0)
        parser = BytesFeedParser(policy=email.policy.default)
        carry = b""  # a CR at the end of a chunk whose LF may start the next
        for chunk in iter(lambda: spool.read(1 << 16), b""):
            chunk = carry + chunk
            carry = b"\r" if chunk.endswith(b"\r") else b""
            parser.feed(chunk[:len(chunk) - len(carry)].replace(b"\r\n", b"\n"))
        parser.feed(carry)
        msg = parser.close()
        try:
            return self.message(msg)  # type: ignore[arg-type]
        finally:
            self._spool_reset()

    def abort(self) -> None:
        self._spool_reset()

    def close(self) -> None:
        self._spool_reset()

    def message(self, msg: EmailMessage) -> int:
        """The complete message; return a verdict (actions are allowed here)."""
        return CONTINUE

    def raw(self) -> IO[bytes]:
        """The message as received (CRLF line ends), from its start; only in message()."""
        spool = self._spool()
        spool.seek(0)
        return spool

    def replace_body(self, body: bytes) -> None:
        """Replace the message body (in eom), in chunks libmilter accepts."""
        step = 65535
        for start in range(0, max(len(body), 1), step):
            self.replacebody(body[start:start + step])

    def _spool(self) -> IO[bytes]:
        spool = getattr(self, "_file", None)
        if spool is None:
            spool = self._file = tempfile.SpooledTemporaryFile(max_size=self.spool_limit)
        return spool

    def _spool_reset(self) -> None:
        spool = getattr(self, "_file", None)
        if spool is not None:
            spool.close()
            self._file = None


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
