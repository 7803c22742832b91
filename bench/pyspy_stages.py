#!/usr/bin/env python3
"""Split a py-spy profile of a milter by milter stage.

Reads py-spy's ``--format raw`` output (one collapsed stack and a sample count
per line) and prints, per stage (the milter callback on the stack: connect,
helo, envfrom, header, eom, close, ...), its share of the samples, how many of
them end in Python code or in native code, and the top functions by self and
by inclusive samples.  Samples with no callback on the stack are put under
"libmilter (no callback)" when libmilter's engine is on the stack, else
"other" (main thread, logging, ...).  Kernel time is invisible to py-spy: read
it from /proc/PID/stat (see bench/README, "Where the time goes").

  .venv/bin/python bench/pyspy_stages.py native.raw [--top 6]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

CALLBACK = re.compile(r"^\w*Milter\.(negotiate|connect|helo|envfrom|envrcpt|data|header|eoh"
                      r"|body|eom|abort|close|unknown) \(")


def is_python(frame: str) -> bool:
    """A frame of Python code (py-spy writes ``func (file.py:line)``)."""
    return ".py:" in frame


def stage_of(frames: Sequence[str]) -> str:
    """The milter callback a stack is in, outermost first."""
    for frame in frames:
        m = CALLBACK.match(frame)
        if m:
            return m.group(1)
    if frames == ["(no frame)"]:
        return "(no frame)"
    if any(f.startswith("mi_engine ") or "libmilter" in f for f in frames):
        return "libmilter (no callback)"
    return "other"


def short(frame: str) -> str:
    """A frame without its line number, so a function counts once."""
    return re.sub(r":\d+\)$", ")", frame)


def load(path: Path) -> list[tuple[list[str], int]]:
    """(frames, samples) per line of a py-spy raw file."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():  # an empty stack: a sample with no frame (e.g. nobody held the GIL)
            stacks.append((stack.split(";") if stack else ["(no frame)"], int(count)))
    return stacks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=6, help="functions listed per stage")
    args = parser.parse_args(argv)
    stacks = load(args.raw)
    total = sum(n for _, n in stacks)
    per: dict[str, Counter] = defaultdict(Counter)
    self_: dict[str, Counter] = defaultdict(Counter)
    incl: dict[str, Counter] = defaultdict(Counter)
    for frames, n in stacks:
        stage = stage_of(frames)
        per[stage]["samples"] += n
        per[stage]["python" if is_python(frames[-1]) else "native"] += n
        self_[stage][short(frames[-1])] += n
        for f in {short(f) for f in frames}:
            incl[stage][f] += n
    print(f"{total} samples in {args.raw}")
    print(f"{'stage':26} {'share':>6} {'python':>7} {'native':>7}")
    order = sorted(per, key=lambda s: -per[s]["samples"])
    for s in order:
        c = per[s]
        print(f"{s:26} {c['samples'] / total:6.1%} {c['python'] / total:7.1%} "
              f"{c['native'] / total:7.1%}")
    for s in order:
        n = per[s]["samples"]
        print(f"\n== {s}: {n} samples ({n / total:.1%})")
        print("  self:")
        for f, k in self_[s].most_common(args.top):
            print(f"    {k / total:6.1%}  {f}")
        print("  inclusive (below the callback):")
        shown = 0
        for f, k in incl[s].most_common():
            if k == n or CALLBACK.match(f):  # the callback and the frames above it
                continue
            print(f"    {k / total:6.1%}  {f}")
            shown += 1
            if shown == args.top:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
