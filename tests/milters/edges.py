"""Test milters for the edges of libmilter_ext: carried verdicts, SKIP, failing hooks.

Usage: edges.py SOCKET_SPEC MODE [PARK_LIMIT], MODE one of

  noreply   connect, helo, envfrom, header and body negotiated without reply;
            envrcpt, data and eoh reply.  The client hostname, HELO name and
            MAIL FROM local part pick a verdict ("reject", "tempfail", "accept",
            "raise"); a body chunk starting with b"skip" answers SKIP.
  replying  every stage replies; body() answers SKIP for a chunk starting with
            b"skip"; MAIL FROM <skip@...> answers SKIP from envfrom();
            <exit@...> raises and on_exception raises SystemExit;
            <hook99@...> raises and on_exception returns 99; <euro@...>
            rejects with a reply line of 400 euro signs.
  listneg   like replying, _negotiate() answers a list
  shortneg  like replying, _negotiate() answers a list of one int
  badfilter like replying, the header filter bytes lack their terminator
  rawhook   like replying, but registered with the C module's own error hook
            directly: <exit@...> makes the hook raise SystemExit, <hook99@...>
            makes it return 99.
  deferred  like replying, but connect, helo, header, data, unknown and close
            are @deferred; each call is printed (with the macros it reads) and
            listed in X-Calls at eom; data's verdict is picked by the first
            recipient's local part, unknown's by the command's first word.
  lazy      like replying with connect @deferred, registered as a factory with
            milter_class; SIGUSR1 reads the file "factory" in the working
            directory and calls set_factory: "first" (LazyFirst, filtering
            Subject in), "second" (LazySecond: another header filter), "wrong"
            (makes a LazyFirst, declared LazySecond), "raise" (raises), "again"
            (LazyFirst again, a new factory); eom adds X-Class and X-Factory.
  counting, eager  the shape of a real milter (connect, helo, envfrom, eom):
            counting defers connect and helo and keeps the default close,
            eager does neither; eom reports the process's GIL entries so far
            in X-Gil.

Every mode answers eom with X-Handler (a number per handler object), X-Headers
(the header names it saw) and X-Chunks (body chunks seen).
"""

from __future__ import annotations

import itertools
import logging
import signal
import sys

import libmilter_ext as lm

VERDICTS = {"reject": lm.REJECT, "tempfail": lm.TEMPFAIL, "accept": lm.ACCEPT,
            "discard": lm.DISCARD}
_serial = itertools.count(1)


def _verdict(word: str) -> int:
    if word == "raise":
        raise RuntimeError(f"asked to raise ({word})")
    return VERDICTS.get(word, lm.CONTINUE)


class Replying(lm.Milter):
    header_names = frozenset({"Subject", "X-Wanted"})

    def __init__(self) -> None:
        self.serial = next(_serial)
        self.headers: list[str] = []
        self.chunks = 0
        self.local = ""

    def connect(self, hostname, family, hostaddr):
        return _verdict(hostname.split(".")[0])

    def helo(self, name):
        return _verdict(name.split(".")[0])

    def envfrom(self, sender, *params):
        self.headers, self.chunks = [], 0
        self.local = sender.strip("<>").split("@")[0]
        if self.local == "skip":
            return lm.SKIP
        if self.local in ("exit", "hook99"):
            raise RuntimeError(f"envfrom raised for {self.local}")
        if self.local == "euro":
            self.setreply("550", "5.7.1", "\u20ac" * 400, "100% sure")
            return lm.REJECT
        return _verdict(self.local)

    def envrcpt(self, recipient, *params):
        return lm.CONTINUE

    def data(self):
        return lm.CONTINUE

    def header(self, name, value):
        print(f"header {name}: {value}", flush=True)
        self.headers.append(name)
        return _verdict(value)

    def eoh(self):
        return lm.CONTINUE

    def body(self, chunk):
        self.chunks += 1
        return lm.SKIP if chunk.startswith(b"skip") else lm.CONTINUE

    def eom(self):
        self.addheader("X-Handler", str(self.serial))
        self.addheader("X-Headers", ",".join(self.headers))
        self.addheader("X-Chunks", str(self.chunks))
        return lm.CONTINUE

    def on_exception(self, stage, exc):
        if self.local == "exit":
            raise SystemExit(3)
        if self.local == "hook99":
            return 99
        return super().on_exception(stage, exc)

    def close(self):
        print(f"close {self.serial}", flush=True)


class NoReply(Replying):
    @lm.noreply
    def connect(self, hostname, family, hostaddr):
        return super().connect(hostname, family, hostaddr)

    @lm.noreply
    def helo(self, name):
        return super().helo(name)

    @lm.noreply
    def envfrom(self, sender, *params):
        return super().envfrom(sender, *params)

    @lm.noreply
    def header(self, name, value):
        return super().header(name, value)

    @lm.noreply
    def body(self, chunk):
        return super().body(chunk)


class Deferred(Replying):
    macros = {"connect": "j", "helo": "{tls_version}", "envfrom": "i"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.rcpt_word = "ok"

    def _call(self, what: str) -> None:
        print(f"call {self.serial} {what}", flush=True)
        self.calls.append(what)

    @lm.deferred
    def connect(self, hostname, family, hostaddr):
        self._call(f"connect {hostname} {family} {hostaddr!r} j={self.getsymval('j')} "
                   f"stage={self._ctx.stage}")
        return super().connect(hostname, family, hostaddr)

    @lm.deferred
    def helo(self, name):
        self._call(f"helo {name} tls={self.getsymval('{tls_version}')}")
        if name.startswith("reply."):
            self.setreply("550", "5.7.1", f"helo {name} refused")
            return lm.REJECT
        return super().helo(name)

    def envfrom(self, sender, *params):
        self.calls = [c for c in self.calls if not c.startswith(("rcpt", "data"))]
        self._call(f"envfrom {sender} i={self.getsymval('i')}")
        return super().envfrom(sender, *params)

    def envrcpt(self, recipient, *params):
        if not any(c.startswith("rcpt") for c in self.calls):
            self.rcpt_word = recipient.strip("<>").split("@")[0]
        self._call(f"rcpt {recipient}")
        return lm.CONTINUE

    @lm.deferred
    def data(self):
        self._call("data")
        return _verdict(self.rcpt_word)

    @lm.deferred
    def header(self, name, value):
        shown = value if len(value) <= 40 else f"{value[:20]}... ({len(value)})"
        self._call(f"header {name}: {shown}")
        return super().header(name, value)

    @lm.deferred
    def unknown(self, command):
        self._call(f"unknown {command}")
        return _verdict(command.split()[0].lower())

    def abort(self):
        self._call("abort")

    def eom(self):
        self.addheader("X-Calls", ";".join(self.calls))
        self.addheader("X-Gil", str(lm._milter._gil_entries()))
        return super().eom()

    @lm.deferred
    def close(self):
        print(f"close {self.serial} closed={self._ctx.closed} calls={';'.join(self.calls)}",
              flush=True)


class Counting(lm.Milter):
    """connect and helo deferred, close not overridden: 3 GIL entries a session."""

    @lm.deferred
    def connect(self, hostname, family, hostaddr):
        return lm.CONTINUE

    @lm.deferred
    def helo(self, name):
        return lm.CONTINUE

    def envfrom(self, sender, *params):
        return lm.CONTINUE

    def eom(self):
        self.addheader("X-Gil", str(lm._milter._gil_entries()))
        return lm.CONTINUE


class Eager(Counting):
    """The same stages, none deferred, close overridden: 6 GIL entries a session."""

    def connect(self, hostname, family, hostaddr):
        return lm.CONTINUE

    def helo(self, name):
        return lm.CONTINUE

    def close(self):
        print("close", flush=True)


class ListNegotiation(Replying):
    """_negotiate answers a list, as a subclass may well do."""

    def _negotiate(self, offered_actions, offered_protocol):
        return list(super()._negotiate(offered_actions, offered_protocol))


class ShortNegotiation(Replying):
    def _negotiate(self, offered_actions, offered_protocol):
        return [super()._negotiate(offered_actions, offered_protocol)[0]]


class BadFilter(Replying):
    """Hands the C layer a header filter without its terminator."""

    @classmethod
    def _header_filter(cls):
        return b"subject"


class LazyFirst(Replying):
    def __init__(self, word: str = "first") -> None:
        super().__init__()
        self.word = word  # which set_factory() made it

    @lm.deferred
    def connect(self, hostname, family, hostaddr):
        return super().connect(hostname, family, hostaddr)

    def eom(self):
        self.addheader("X-Class", type(self).__name__)
        self.addheader("X-Factory", self.word)
        return super().eom()


class LazySecond(LazyFirst):
    header_names = frozenset({"X-Wanted"})


def _raising():
    raise RuntimeError("the factory is broken on purpose")


LAZY_FACTORIES = {"first": (LazyFirst, LazyFirst), "second": (LazySecond, LazySecond),
                  "again": (lambda: LazyFirst("again"), LazyFirst),
                  "wrong": (LazyFirst, LazySecond), "raise": (_raising, LazyFirst)}


def _switch_factory(signum, frame):
    word = open("factory").read().strip()
    make, cls = LAZY_FACTORIES[word]
    lm.set_factory(make, cls)
    print(f"factory {word}", flush=True)


MODES = {"noreply": NoReply, "replying": Replying, "listneg": ListNegotiation,
         "shortneg": ShortNegotiation, "badfilter": BadFilter, "deferred": Deferred,
         "counting": Counting, "eager": Eager}


def raw_hook(handler, stage, exc):
    """An error hook given straight to the C module: misbehaves on request."""
    local = getattr(handler, "local", "")
    if local == "exit":
        raise SystemExit(4)
    if local == "hook99":
        return 99
    return lm.TEMPFAIL


def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    spec, mode = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:  # how many closed sessions SMFIC_QUIT_NC may resume
        lm._milter._park_limit(int(sys.argv[3]))
    if mode == "rawhook":
        def make(ctx):
            milter = Replying()
            milter._ctx = ctx
            return milter
        lm._milter.register("edges", make, raw_hook, lm.ALL_ACTIONS | lm.SMFIF_SETSYMLIST)
        lm.settimeout(30)
        lm.open_socket(spec)
        lm.main()
    elif mode == "lazy":
        signal.signal(signal.SIGUSR1, _switch_factory)
        lm.register(lambda: LazyFirst(), "edges", milter_class=LazyFirst)
        lm.settimeout(30)
        lm.open_socket(spec)
        lm.main()
    else:
        lm.run(MODES[mode], spec, "edges", timeout=30)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
