"""spfmilter's daemon, plus SIGUSR1: append the GIL entries of libmilter's
callbacks so far to the file named by the first argument.

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
        out.write(f"{_milter._gil_entries()}\n")


signal.signal(signal.SIGUSR1, report)
sys.exit(main())
