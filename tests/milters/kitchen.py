"""A test milter that uses every callback and action of libmilter_ext.

Driven by what the client sends: the MAIL FROM local part picks a verdict, an
``X-Do`` header lists actions for eom.  Reports what it saw in ``X-Seen-*``
headers added at eom, and on stdout.  Usage: kitchen.py SOCKET_SPEC [--deferred]
(--deferred: connect, helo, header, data, unknown and close are @lm.deferred)
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import weakref

import libmilter_ext as lm

LIVE: weakref.WeakSet = weakref.WeakSet()
lock = threading.Lock()
active = 0
peak = 0


class Kitchen(lm.Milter):
    macros = {"connect": "j", "envfrom": "i {auth_authen}", "eom": "i"}

    def __init__(self) -> None:
        LIVE.add(self)
        self.seen: list[str] = []
        self.do: list[str] = []
        self.body_bytes = b""
        self.aborts = 0
        self.raw_headers: list[tuple[str, str]] = []

    def connect(self, hostname, family, hostaddr):
        self.seen.append(f"connect {hostname} {family} {hostaddr!r} j={self.getsymval('j')}")
        return lm.CONTINUE

    def helo(self, name):
        self.seen.append(f"helo {name}")
        return lm.CONTINUE

    def envfrom(self, sender, *params):
        global active, peak
        self.do = []
        self.raw_headers = []
        self.body_bytes = b""
        self.seen.append(f"mail {sender} {' '.join(params)} i={self.getsymval('i')} "
                         f"auth={self.getsymval('{auth_authen}')}")
        local = sender.strip("<>").split("@")[0]
        if local == "slow":
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.3)
            with lock:
                active -= 1
            return lm.CONTINUE
        if local == "reject":
            self.setreply("550", "5.7.1", "100% rejected", "second line", "x" * 700)
            return lm.REJECT
        if local == "rejectnotext":
            self.setreply("550", "5.7.1")
            return lm.REJECT
        if local == "rejectnoxcode":
            self.setreply("553", None, "only text")
            return lm.REJECT
        if local == "rejectplain":
            return lm.REJECT
        if local == "tempfail":
            self.setreply("451", "4.7.1", "try again\r\nlater")
            return lm.TEMPFAIL
        if local == "discard":
            return lm.DISCARD
        if local == "accept":
            return lm.ACCEPT
        if local == "raise":
            raise RuntimeError("envfrom exploded")
        if local == "stage":
            try:
                self.addheader("X-Too-Early", "1")
            except lm.StageError as exc:
                self.setreply("550", "5.7.1", f"StageError: {exc}")
                return lm.REJECT
            return lm.CONTINUE
        if local == "badverdict":
            return "nonsense"
        return lm.CONTINUE

    def envrcpt(self, recipient, *params):
        self.seen.append(f"rcpt {recipient} {' '.join(params)}")
        if recipient.strip("<>").startswith("bad"):
            self.setreply("550", "5.1.1", "no such user")
            return lm.REJECT
        return lm.CONTINUE

    def data(self):
        self.seen.append("data")
        return lm.CONTINUE

    def unknown(self, command):
        self.seen.append(f"unknown {command}")
        return lm.CONTINUE

    @lm.noreply
    def header(self, name, value):
        self.raw_headers.append((name, value))
        if name == "X-Do":
            self.do = [a.strip() for a in value.split(",")]
        if name == "X-Raise":
            raise ValueError("header exploded")
        return lm.CONTINUE

    def eoh(self):
        self.seen.append("eoh")
        return lm.CONTINUE

    def body(self, chunk):
        self.body_bytes += chunk
        return lm.CONTINUE

    def eom(self):
        self.seen.append(f"eom i={self.getsymval('i')}")
        for action in self.do:
            if action == "addheader":
                self.addheader("X-Added", "appended")
            elif action == "insheader":
                self.addheader("X-Inserted", "at top", 0)
            elif action == "chgheader":
                self.chgheader("Subject", 1, "changed subject")
            elif action == "delheader":
                self.chgheader("X-Delete-Me", 1, None)
            elif action == "addrcpt":
                self.addrcpt("<added@example.org>")
            elif action == "addrcpt_par":
                self.addrcpt("<added2@example.org>", "NOTIFY=NEVER")
            elif action == "delrcpt":
                self.delrcpt("<gone@example.org>")
            elif action == "chgfrom":
                self.chgfrom("<new@example.org>")
            elif action == "chgfrom_args":
                self.chgfrom("<new2@example.org>", "SIZE=1000")
            elif action == "replacebody":
                self.replacebody(self.body_bytes.upper())
            elif action == "quarantine":
                self.quarantine("looks odd")
            elif action == "progress":
                self.progress()
            elif action == "echo":
                for name, value in self.raw_headers:
                    if name.startswith("X-8bit"):
                        self.addheader("X-Echo", value)
            elif action == "seen":
                for i, line in enumerate(self.seen):
                    self.addheader(f"X-Seen-{i}", line)
                self.addheader("X-Body-Length", str(len(self.body_bytes)))
                self.addheader("X-Aborts", str(self.aborts))
            elif action == "stats":
                gc.collect()
                self.addheader("X-Live", str(len(LIVE)))
                self.addheader("X-Peak", str(peak))
            elif action == "reject":
                self.setreply("554", "5.7.1", "rejected at eom")
                return lm.REJECT
        return lm.CONTINUE

    def abort(self):
        self.aborts += 1
        print("abort", flush=True)

    def close(self):
        print("close", flush=True)


class DeferredKitchen(Kitchen):
    """The same, with the stages that always continue deferred."""

    @lm.deferred
    def connect(self, hostname, family, hostaddr):
        return super().connect(hostname, family, hostaddr)

    @lm.deferred
    def helo(self, name):
        return super().helo(name)

    @lm.deferred
    def data(self):
        return super().data()

    @lm.deferred
    def header(self, name, value):
        return super().header(name, value)

    @lm.deferred
    def unknown(self, command):
        return super().unknown(command)

    @lm.deferred
    def close(self):
        super().close()


def on_hup() -> None:
    print("hup", flush=True)


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    print("starting", lm.version(), flush=True)
    milter = DeferredKitchen if sys.argv[2:] == ["--deferred"] else Kitchen
    lm.run(milter, sys.argv[1], "kitchen", timeout=30, on_hup=on_hup)
    print("stopped", flush=True)
