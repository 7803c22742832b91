"""A test milter whose eom runs a script of actions, for the eom write tests.

The ``X-Script`` header carries JSON: ``{"do": [OP, ...], "end": VERDICT,
"on_exception": [OP, ...]}``.  eom runs each OP in order, then ends with
VERDICT ("continue", "accept", "reject", "tempfail", "discard", or "raise":
an exception, answered by on_exception, which runs its own OPs first).  OPs:

  ["add", name, value]           addheader(name, value)
  ["ins", idx, name, value]      addheader(name, value, idx)
  ["chg", name, idx, value]      chgheader(name, idx, value), value may be null
  ["addrcpt", addr] ["addrcpt_par", addr, args] ["delrcpt", addr]
  ["chgfrom", addr, args]        args may be null
  ["body", byte, n]              replacebody(bytes([byte]) * n)
  ["quarantine", reason] ["progress"]
  ["reply", code, text]          setreply(code, "<code digit>.7.1", text)
  ["wait", file]                 print "waiting for FILE", then wait (up to 20 s)
                                 until FILE exists in the working directory
  ["counters"]                   add X-Counters: "GIL-RELEASES EOM-WRITE-FAILURES"

An OP that raises MilterError, ValueError or TypeError is reported at once:
``err TYPE: MESSAGE`` on stdout and, when it can be added, an ``X-Err``
header with the same text.  Usage: scripted.py SOCKET_SPEC
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import libmilter_ext as lm

VERDICTS = {"continue": lm.CONTINUE, "accept": lm.ACCEPT, "reject": lm.REJECT,
            "tempfail": lm.TEMPFAIL, "discard": lm.DISCARD}


class Scripted(lm.Milter):
    def __init__(self) -> None:
        self.script: dict = {}

    def envfrom(self, sender, *params):
        self.script = {}
        return lm.CONTINUE

    def header(self, name, value):
        if name == "X-Script":
            self.script = json.loads(value)
        return lm.CONTINUE

    def eom(self):
        self._run(self.script.get("do", ()))
        end = self.script.get("end", "continue")
        if end == "raise":
            raise RuntimeError("the script raised")
        return VERDICTS[end]

    def on_exception(self, stage, exc):
        print(f"on_exception {stage}: {type(exc).__name__}: {exc}", flush=True)
        self._run(self.script.get("on_exception", ()))
        return super().on_exception(stage, exc)

    def _run(self, ops) -> None:
        for op in ops:
            try:
                self._op(*op)
            except (lm.MilterError, ValueError, TypeError) as exc:
                text = f"{type(exc).__name__}: {exc}"
                print(f"err {text}", flush=True)
                try:
                    self.addheader("X-Err", text)
                except lm.MilterError:
                    pass

    def _op(self, kind: str, *args) -> None:
        if kind == "add":
            self.addheader(args[0], args[1])
        elif kind == "ins":
            self.addheader(args[1], args[2], args[0])
        elif kind == "chg":
            self.chgheader(*args)
        elif kind == "addrcpt":
            self.addrcpt(args[0])
        elif kind == "addrcpt_par":
            self.addrcpt(args[0], args[1])
        elif kind == "delrcpt":
            self.delrcpt(args[0])
        elif kind == "chgfrom":
            self.chgfrom(args[0], args[1])
        elif kind == "body":
            self.replacebody(bytes([args[0]]) * args[1])
        elif kind == "quarantine":
            self.quarantine(args[0])
        elif kind == "progress":
            self.progress()
        elif kind == "reply":
            self.setreply(args[0], f"{args[0][0]}.7.1", args[1])
        elif kind == "wait":
            print(f"waiting for {args[0]}", flush=True)
            deadline = time.monotonic() + 20
            while not os.path.exists(args[0]) and time.monotonic() < deadline:
                time.sleep(0.01)
        elif kind == "counters":
            self.addheader("X-Counters", f"{lm._milter._gil_releases()} "
                                         f"{lm._milter._eom_write_failures()}")
        else:
            raise AssertionError(f"unknown op {kind!r}")


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    lm.run(Scripted, sys.argv[1], "scripted", timeout=30)
