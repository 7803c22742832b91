"""Log lines written by one thread, in batches, so milter threads never wait on syslog.

:class:`BatchingHandler` replaces a ``QueueHandler``/``QueueListener`` pair.
A record's message is made once, in the thread that logs it (its arguments
may change afterwards); the record itself is kept, not copied.  The writer
thread wakes for the first record of a batch, hands every pending record to
the target handler (a stream target gets one write and one flush per batch)
and then pauses for ``linger`` seconds: under load it wakes about
``1/linger`` times a second instead of once per line -- each wake-up is a GIL
hand-off between threads.  Nothing is lost: :meth:`stop` (and ``flush``,
which ``logging.shutdown`` calls at exit) writes what is pending, records
logged after stop are written at once by the thread that logs them, and a
fork writes what is pending first, so the child starts empty and a parent
that leaves with ``os._exit`` has written everything.

:func:`info` logs a line already made, without ``findCaller`` (no format of
ours shows where a line was logged).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

__all__ = ["BatchingHandler", "info", "LINGER"]

#: Seconds the writer pauses after each batch.
LINGER = 0.05

_handlers: weakref.WeakSet[BatchingHandler] = weakref.WeakSet()


class BatchingHandler(logging.Handler):
    """Takes records from any thread; a writer thread passes them on to ``target``."""

    def __init__(self, target: logging.Handler, linger: float = LINGER) -> None:
        super().__init__()
        self.target = target
        self.linger = linger
        self.batches = 0  # writes so far (one per batch)
        self._init_state()
        _handlers.add(self)

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())  # guards _pending, _direct
        self._writing = threading.Lock()  # held while a batch is written; after _cond
        self._pending: list[logging.LogRecord] = []
        self._direct = True  # no writer thread: emit writes at once
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer thread (records logged before are written at once)."""
        with self._cond:
            if self._thread is not None:
                return
            self._direct = False
            self._thread = threading.Thread(target=self._run, name="spfmilter-log",
                                            daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write everything pending and end the writer; later records are written at once."""
        thread = self._thread
        if thread is not None:
            self._stopping.set()
            with self._cond:
                self._cond.notify()
            thread.join()
        with self._cond:
            self._direct = True
            self._thread = None
        self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg = record.getMessage()  # the text as it is now, made once
            record.args = None
        except Exception:
            self.handleError(record)
            return
        with self._cond:
            direct = self._direct
            if not direct:
                self._pending.append(record)
                if len(self._pending) == 1:
                    self._cond.notify()
        if direct:
            self.target.handle(record)

    def flush(self) -> None:
        """Write what is pending now, in this thread (after any batch being written)."""
        with self._cond, self._writing:
            batch, self._pending = self._pending, []
            self._write(batch)
        self.target.flush()

    def close(self) -> None:
        self.stop()
        _handlers.discard(self)
        super().close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                while not self._pending and not self._stopping.is_set():
                    self._cond.wait()
                self._writing.acquire()
                batch, self._pending = self._pending, []
            try:
                self._write(batch)
            finally:
                self._writing.release()
            self._stopping.wait(self.linger)

    def _write(self, batch: list[logging.LogRecord]) -> None:
        if not batch:
            return
        self.batches += 1
        target = self.target
        if type(target).emit is not logging.StreamHandler.emit or target.filters:
            for record in batch:
                target.handle(record)
            return
        # StreamHandler.emit's text for each record, in one write and one flush.
        assert isinstance(target, logging.StreamHandler)
        text = []
        for record in batch:
            try:
                text.append(target.format(record) + target.terminator)
            except Exception:
                target.handleError(record)
        target.acquire()
        try:
            try:
                target.stream.write("".join(text))
            except UnicodeError:  # nothing written: one line cannot be, the others can
                for record in batch:
                    target.handle(record)
            target.flush()
        except Exception:
            target.handleError(batch[-1])
        finally:
            target.release()


def _before_fork() -> None:
    for handler in list(_handlers):
        handler.flush()


def _after_fork_in_child() -> None:
    for handler in list(_handlers):  # the writer thread is the parent's
        handler._init_state()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def info(logger: logging.Logger, text: str) -> None:
    """Log ``text`` (already formatted) at INFO through ``logger``, as ``logger.info``
    would, without looking up the caller."""
    if logger.isEnabledFor(logging.INFO):
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0,
                                        text, None, None))
