#!/usr/bin/env python3
"""A small milter on libmilter_ext: prints what it sees, rejects some mail in header().

    python examples/sample.py [--socket SPEC]     (or SAMPLE_MILTER_SOCKET=SPEC)

Sendmail: INPUT_MAIL_FILTER(`sample', `S=unix:/run/sample/sample.sock, F=T')
"""

from __future__ import annotations

import argparse
import os
import sys

import libmilter_ext as milter


class SampleMilter(milter.Milter):
    """Logs each stage; rejects a message whose Subject mentions 'viagra'."""

    macros = {"envfrom": "i {auth_authen}"}

    def log(self, *what: object) -> None:
        print(f"[{id(self):x}]", *what, flush=True)

    def connect(self, hostname, family, hostaddr):
        self.log("connect from", hostname, hostaddr)
        return milter.CONTINUE

    def helo(self, name):
        self.log("HELO", name)
        return milter.CONTINUE

    def envfrom(self, sender, *params):
        self.log("mail from", sender, *params, "queue id", self.getsymval("i"))
        return milter.CONTINUE

    def envrcpt(self, recipient, *params):
        self.log("rcpt to", recipient, *params)
        return milter.CONTINUE

    def header(self, name, value):
        self.log("header", f"{name}: {value}")
        if name.lower() == "subject" and "viagra" in value.lower():
            self.setreply("550", "5.7.1", "We don't want that here.")
            return milter.REJECT
        return milter.CONTINUE

    def eom(self):
        self.addheader("X-Sample-Milter", "seen")
        self.log("end of message")
        return milter.ACCEPT

    def close(self):
        self.log("close")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=os.environ.get(
        "SAMPLE_MILTER_SOCKET", "unix:/tmp/sample-milter.sock"))
    parser.add_argument("--name", default="sample")
    args = parser.parse_args(argv)
    print("libmilter", ".".join(map(str, milter.version())), "listening on", args.socket,
          flush=True)
    milter.run(SampleMilter, args.socket, args.name, timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
