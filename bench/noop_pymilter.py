"""A no-op milter on pymilter (PyPI ``pymilter``), for bench/bench_extension.py.

Every callback is overridden and answers CONTINUE, so pymilter negotiates no
stage away and the MTA waits for every reply -- the same work as
bench/noop_milter.c and bench/noop_libmilter_ext.py.  Run it with a Python
that has pymilter installed (the benchmark makes a throwaway venv for it);
it needs nothing from this repository.

Usage: python bench/noop_pymilter.py SPEC
SIGTERM or SIGINT stops it (through libmilter's own signal thread).
"""

from __future__ import annotations

import sys

import Milter


class NoopMilter(Milter.Base):
    """Overrides every optional callback, so no stage is negotiated away."""

    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def hello(self, hostname):
        return Milter.CONTINUE

    def envfrom(self, f, *params):
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    def unknown(self, cmd):
        return Milter.CONTINUE

    def header(self, field, value):
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, blk):
        return Milter.CONTINUE

    def eom(self):
        return Milter.CONTINUE

    def abort(self):
        return Milter.CONTINUE

    def close(self):
        return Milter.CONTINUE


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC")
    Milter.factory = NoopMilter
    Milter.runmilter("noop_pymilter", sys.argv[1], timeout=60)


if __name__ == "__main__":
    main()
