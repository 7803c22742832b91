"""A MessageMilter test milter: counts MIME parts, upper-cases text bodies."""

import sys

import libmilter_ext as lm
from libmilter_ext.message import MessageMilter


class Parts(MessageMilter):
    spool_limit = 1024  # small, so bigger messages go through the disk

    def message(self, msg):
        parts = [p for p in msg.walk() if not p.is_multipart()]
        self.addheader("X-Parts", str(len(parts)))
        self.addheader("X-Subject", str(msg["Subject"]))
        self.addheader("X-Attachments", ",".join(
            p.get_filename() for p in parts if p.get_filename()))
        if msg["X-Shout"]:
            self.replace_body(msg.get_body(("plain",)).get_content().upper().encode())
        return lm.CONTINUE


if __name__ == "__main__":
    lm.run(Parts, sys.argv[1], "parts", timeout=30)
