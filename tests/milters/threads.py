"""A test milter that reports the interpreter's thread states at eom.

Usage: threads.py SOCKET_SPEC

MAIL FROM <sleep@...> makes envfrom sleep (without the GIL) for a moment, so
concurrent sessions keep several of libmilter's worker threads busy at once
and its pool starts more, which it ends again once they are idle.  eom
answers with X-States (Python thread states in the interpreter), X-Tasks (OS
threads in the process) and X-Seen (distinct OS threads that ran a callback
so far).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import libmilter_ext as lm

_api = ctypes.pythonapi
_api.PyInterpreterState_Get.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
_api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
_api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Next.restype = ctypes.c_void_p
_seen: set[int] = set()


def thread_states() -> int:
    """How many thread states the interpreter holds (GIL held: none is deleted meanwhile)."""
    count, ts = 0, _api.PyInterpreterState_ThreadHead(_api.PyInterpreterState_Get())
    while ts:
        count += 1
        ts = _api.PyThreadState_Next(ts)
    return count


class Reporting(lm.Milter):
    def envfrom(self, sender, *params):
        _seen.add(threading.get_native_id())
        if sender.strip("<>").startswith("sleep@"):
            time.sleep(0.3)
        return lm.CONTINUE

    def eom(self):
        _seen.add(threading.get_native_id())
        states = thread_states()
        tasks = len(os.listdir("/proc/self/task"))
        self.addheader("X-States", str(states))
        self.addheader("X-Tasks", str(tasks))
        self.addheader("X-Seen", str(len(_seen)))
        return lm.CONTINUE


def main() -> None:
    lm.run(Reporting, sys.argv[1], "threads", timeout=30)


if __name__ == "__main__":
    main()
