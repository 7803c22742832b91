"""A test milter that adds an Authentication-Results field at eom, as OpenDKIM/OpenDMARC do.

Stands next to spfmilter in a milter chain (tests/e2e/test_chain.py).  A
message asks for it with an ``X-Chain-NAME`` header (NAME: this milter's
name): ``insert`` puts the field on top (``smfi_insheader`` index 0),
``append`` adds it at the end (``smfi_addheader``); ``folds`` adds two
folded ``X-Fold-*`` fields, one folded with LF and one with CR LF, to show
which form the MTA turns into a proper folded line.  The field claims
AUTHSERV_ID and carries ``dkim=pass header.d=NAME.chain.test`` so that the
test can tell whose it is.  Other messages pass untouched.

Usage: ar_chain.py SOCKET_SPEC NAME AUTHSERV_ID
"""

from __future__ import annotations

import os
import sys

import libmilter_ext as lm


def factory(name: str, authserv_id: str) -> type[lm.Milter]:
    control = f"x-chain-{name}"

    class Chain(lm.Milter):
        def envfrom(self, sender: str, *params: str) -> int:
            self.mode = ""
            return lm.CONTINUE

        @lm.noreply
        def header(self, field: str, value: str) -> int:
            if field.lower() == control:
                self.mode = value.strip()
            return lm.CONTINUE

        def eom(self) -> int:
            value = f"{authserv_id}; dkim=pass header.d={name}.chain.test"
            if self.mode == "insert":
                self.addheader("Authentication-Results", value, 0)
            elif self.mode == "append":
                self.addheader("Authentication-Results", value)
            elif self.mode == "folds":
                self.addheader("X-Fold-LF", "first\n second\n\tthird")
                self.addheader("X-Fold-CRLF", "first\r\n second\r\n\tthird")
            return lm.CONTINUE

    return Chain


if __name__ == "__main__":
    spec, milter_name, authserv = sys.argv[1:4]
    os.umask(0)  # the socket is for any local MTA user (Postfix runs as postfix)
    print("starting", milter_name, flush=True)
    lm.run(factory(milter_name, authserv), spec, milter_name, timeout=30)
    print("stopped", flush=True)
