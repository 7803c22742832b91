"""A no-op milter on libmilter_ext, for bench/bench_extension.py.

Every stage is overridden and answers CONTINUE, so the MTA sends every stage
and waits for every reply -- the same work as bench/noop_milter.c and
bench/noop_pymilter.py.  ``--negotiated`` overrides only envfrom and eom
instead: libmilter_ext then negotiates the other stages away, as a real
milter that needs only those two stages would.  ``--four`` overrides
connect, helo, envfrom, eom and close (spfmilter's shape); ``--deferred``
the same stages with connect and helo ``@deferred`` and the default close,
so a session takes the GIL three times instead of six.

Usage: python bench/noop_libmilter_ext.py [--negotiated | --four | --deferred] SPEC
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


class NoopFour(NoopNegotiated):
    """spfmilter's stages: connect, helo, envfrom, eom (and close)."""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return lm.CONTINUE

    def helo(self, name: str) -> int:
        return lm.CONTINUE

    def close(self) -> None:
        pass


class NoopDeferred(NoopNegotiated):
    """The same stages, connect and helo deferred, close left to the default."""

    @lm.deferred
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return lm.CONTINUE

    @lm.deferred
    def helo(self, name: str) -> int:
        return lm.CONTINUE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="libmilter socket spec, e.g. unix:/tmp/x/sock")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--negotiated", action="store_true",
                       help="override only envfrom and eom")
    shape.add_argument("--four", action="store_true",
                       help="override connect, helo, envfrom, eom and close")
    shape.add_argument("--deferred", action="store_true",
                       help="as --four, connect and helo @deferred, the default close")
    args = parser.parse_args()
    milter = (NoopNegotiated if args.negotiated else NoopFour if args.four
              else NoopDeferred if args.deferred else NoopAllStages)
    lm.run(milter, args.spec, "noop_libmilter_ext", timeout=60)


if __name__ == "__main__":
    main()
