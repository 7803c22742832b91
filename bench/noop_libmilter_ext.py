"""A no-op milter on libmilter_ext, for bench/bench_extension.py.

Every stage is overridden and answers CONTINUE, so the MTA sends every stage
and waits for every reply -- the same work as bench/noop_milter.c and
bench/noop_pymilter.py.  ``--negotiated`` overrides only envfrom and eom
instead: libmilter_ext then negotiates the other stages away, as a real
milter that needs only those two stages would.

Usage: python bench/noop_libmilter_ext.py [--negotiated] SPEC
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
from typing import Any

import libmilter_ext as lm


class NoopAllStages(lm.Milter):
    """Overrides every callback, so no stage is negotiated away."""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return lm.CONTINUE

    def helo(self, name: str) -> int:
        return lm.CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        return lm.CONTINUE

    def envrcpt(self, recipient: str, *params: str) -> int:
        return lm.CONTINUE

    def data(self) -> int:
        return lm.CONTINUE

    def unknown(self, command: str) -> int:
        return lm.CONTINUE

    def header(self, name: str, value: str) -> int:
        return lm.CONTINUE

    def eoh(self) -> int:
        return lm.CONTINUE

    def body(self, chunk: bytes) -> int:
        return lm.CONTINUE

    def eom(self) -> int:
        return lm.CONTINUE

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class NoopNegotiated(lm.Milter):
    """Overrides only envfrom and eom; the other stages are negotiated away."""

    def envfrom(self, sender: str, *params: str) -> int:
        return lm.CONTINUE

    def eom(self) -> int:
        return lm.CONTINUE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="libmilter socket spec, e.g. unix:/tmp/x/sock")
    parser.add_argument("--negotiated", action="store_true",
                        help="override only envfrom and eom")
    args = parser.parse_args()
    milter = NoopNegotiated if args.negotiated else NoopAllStages
    lm.run(milter, args.spec, "noop_libmilter_ext", timeout=60)


if __name__ == "__main__":
    main()
