"""The kitchen milter started in the ways tests/test_signals.py needs.

Usage: signals.py SOCKET_SPEC MODE, MODE one of
  hup             on_hup prints "hup"
  hup-raises      on_hup prints "hup" and raises
  thread          handle_signals() in the main thread, run() in another one
  thread-untimed  the same, the main thread in join() without a timeout
  thread-refused  run() in another thread without handle_signals()
  usr1            on_hup prints "hup"; SIGUSR1 has a handler too
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from kitchen import Kitchen, on_hup  # this directory is sys.path[0]

import libmilter_ext as lm


def raising_hup() -> None:
    print("hup", flush=True)
    raise RuntimeError("reload exploded")


def serve_in_thread(spec: str, wait: float | None = 0.5) -> int:
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            lm.run(Kitchen, spec, "kitchen", timeout=30, on_hup=on_hup)
            print("run returned", flush=True)
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=serve, name="milter")
    worker.start()
    while worker.is_alive():  # with a timeout: Python runs signal handlers between waits
        worker.join(wait)
    if errors:
        print(f"refused: {type(errors[0]).__name__}: {errors[0]}", flush=True)
        return 3
    return 0


def main(spec: str, mode: str) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    if mode == "hup":
        lm.run(Kitchen, spec, "kitchen", timeout=30, on_hup=on_hup)
    elif mode == "hup-raises":
        lm.run(Kitchen, spec, "kitchen", timeout=30, on_hup=raising_hup)
    elif mode == "thread":
        lm.handle_signals()
        code = serve_in_thread(spec)
        if code:
            return code
    elif mode == "thread-untimed":
        lm.handle_signals()
        code = serve_in_thread(spec, wait=None)
        if code:
            return code
    elif mode == "thread-refused":
        return serve_in_thread(spec)
    elif mode == "usr1":
        signal.signal(signal.SIGUSR1, lambda signum, frame: print("usr1", flush=True))
        lm.run(Kitchen, spec, "kitchen", timeout=30, on_hup=on_hup)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
