"""systemd's readiness protocol: state datagrams to the socket in $NOTIFY_SOCKET.

A service of ``Type=notify`` tells systemd it is ready (``READY=1``), that a
reload began (``RELOADING=1``) or that it is stopping (``STOPPING=1``), and
shows a free-text ``STATUS=`` in ``systemctl status``.  Outside systemd
(no NOTIFY_SOCKET) every call does nothing.

The socket is connected when the :class:`Notifier` is made, so it still works
after the daemon drops root for a user that could not open the path any more.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: How often (seconds) :class:`StatusReporter` refreshes STATUS= at most.
STATUS_INTERVAL = 10.0
_SEND_TIMEOUT = 2.0  # never hold up the daemon for a busy service manager


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a NOTIFY_SOCKET value ('@name' is abstract), else None."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used for a system service


class Notifier:
    """Sends state changes to the service manager; inert without NOTIFY_SOCKET."""

    def __init__(self, value: str | None) -> None:
        self.address = socket_address(value) if value else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        if value and self.address is None:
            log.warning("NOTIFY_SOCKET=%s: not a unix socket address, not notifying", value)
        if self.address is not None:
            self._connect()

    @classmethod
    def from_environment(cls) -> Notifier:
        """A Notifier for $NOTIFY_SOCKET (inert when it is unset or empty)."""
        return cls(os.environ.get("NOTIFY_SOCKET") or None)

    @property
    def active(self) -> bool:
        return self.address is not None

    def _connect(self) -> None:
        assert self.address is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.settimeout(_SEND_TIMEOUT)
        try:
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            log.warning("NOTIFY_SOCKET %s: %s", self.address.replace("\0", "@"), exc)
            return
        self._sock = sock

    def notify(self, *fields: str) -> bool:
        """Send one datagram of NAME=VALUE fields; False if it could not be sent."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        with self._lock:
            for attempt in (1, 2):
                if self._sock is None:
                    self._connect()  # the manager re-created its socket, say
                    if self._sock is None:
                        return False
                try:
                    self._sock.send(data)
                    return True
                except OSError as exc:
                    self._sock.close()
                    self._sock = None
                    if attempt == 2:
                        log.warning("NOTIFY_SOCKET: cannot send %s: %s", fields[0], exc)
        return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) tie it to the SIGHUP.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                           "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class StatusReporter:
    """A thread that sends STATUS=text() every interval seconds when text changed.

    The hot path only bumps a counter; the formatting and the datagram happen
    here, at a modest rate.
    """

    def __init__(self, notifier: Notifier, text: Callable[[], str],
                 interval: float = STATUS_INTERVAL) -> None:
        self._notifier = notifier
        self._text = text
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last = ""

    def start(self) -> StatusReporter:
        if self._notifier.active:
            self.last = self._text()
            self._thread = threading.Thread(target=self._loop, name="sd-status", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            text = self._text()
            if text != self.last and self._notifier.status(text):
                self.last = text

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._interval + 1)
            self._thread = None
