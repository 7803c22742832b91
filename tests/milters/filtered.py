"""A test milter that asks for two header names only (filtered in C)."""

import sys

import libmilter_ext as lm


class Filtered(lm.Milter):
    header_names = frozenset({"Subject", "x-wanted"})

    def envfrom(self, sender, *params):
        self.seen = []
        return lm.CONTINUE

    @lm.noreply
    def header(self, name, value):
        self.seen.append(name)
        if value == "raise":
            raise RuntimeError("filtered header exploded")
        return lm.CONTINUE

    def eom(self):
        self.addheader("X-Seen", ",".join(self.seen))
        return lm.CONTINUE


if __name__ == "__main__":
    lm.run(Filtered, sys.argv[1], "filtered", timeout=30)
