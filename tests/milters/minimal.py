"""A test milter overriding only envfrom (negotiation should skip the rest)."""

import sys

import libmilter_ext as lm


class Minimal(lm.Milter):
    def envfrom(self, sender, *params):
        return lm.REJECT if "reject" in sender else lm.CONTINUE


if __name__ == "__main__":
    lm.run(Minimal, sys.argv[1], "minimal", timeout=30)
