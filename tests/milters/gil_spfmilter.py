"""spfmilter's daemon, plus SIGUSR1: append "ENTRIES RELEASES" so far (the GIL
entries of libmilter's callbacks, the GIL releases of Context actions) to the
file named by the first argument.

Usage: gil_spfmilter.py COUNT_FILE SPFMILTER_ARGS...
"""

from __future__ import annotations

import signal
import sys

import libmilter_ext._milter as _milter
from spfmilter.cli import main

count_file = sys.argv.pop(1)


def report(signum, frame) -> None:
    with open(count_file, "a") as out:
        out.write(f"{_milter._gil_entries()} {_milter._gil_releases()}\n")


signal.signal(signal.SIGUSR1, report)
sys.exit(main())
