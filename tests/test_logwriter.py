"""The batching log writer: every line, in order, the same bytes as before.

Unit tests drive spfmilter.logwriter.BatchingHandler with the daemon's real
targets (a stream, a syslog datagram socket); the end-to-end tests run the
daemon and count its decision lines through SIGTERM.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from spfmilter.logwriter import BatchingHandler, info
from tests.procs import PYTHON, ROOT, Daemon
from tests.test_daemon import run, write_config

STDERR_FORMAT = "%(asctime)s spfmilter %(levelname)s %(message)s"  # as daemon.setup_logging
LONG = 3600.0  # a linger the test never waits out: stop() must cut it short


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.Logger(name)  # not in the hierarchy: pytest's handlers stay out
    logger.addHandler(handler)
    return logger


def _stream_target(path: Path) -> logging.StreamHandler:
    target = logging.StreamHandler(open(path, "w"))  # noqa: SIM115 -- closed by the test
    target.setFormatter(logging.Formatter(STDERR_FORMAT))
    return target


def test_every_line_in_order_through_stop(tmp_path: Path) -> None:
    """N lines from several threads: all written, each thread's in order, in at most
    two writes before stop (the writer waits out its linger, not one wake-up a line)."""
    target = _stream_target(tmp_path / "log")
    handler = BatchingHandler(target, linger=LONG)
    handler.start()
    logger = _logger("t.order", handler)
    threads, per_thread = 4, 500

    def work(t: int) -> None:
        for n in range(per_thread):
            logger.info("thread=%d n=%d", t, n)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    handler.stop()
    assert handler.batches <= 2
    logger.info("after stop")  # written at once, after everything before
    target.stream.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == threads * per_thread + 1
    assert lines[-1].endswith(" spfmilter INFO after stop")
    for t in range(threads):
        mine = [line.split(" n=")[1] for line in lines if f"thread={t} " in line]
        assert mine == [str(n) for n in range(per_thread)]


def test_flush_writes_what_is_pending(tmp_path: Path) -> None:
    """flush() (logging.shutdown calls it at exit) writes without stopping the writer."""
    target = _stream_target(tmp_path / "log")
    handler = BatchingHandler(target, linger=LONG)
    handler.start()
    logger = _logger("t.flush", handler)
    for n in range(50):
        logger.info("n=%d", n)
    handler.flush()
    assert len((tmp_path / "log").read_text().splitlines()) == 50
    logger.info("n=50")
    handler.stop()
    target.stream.close()
    assert len((tmp_path / "log").read_text().splitlines()) == 51


def _records() -> list[tuple[int, str, tuple, bool]]:
    return [
        (logging.INFO, "qid=%s ip=%s action=%s", ("Q1", "192.0.2.1", "accept"), False),
        (logging.WARNING, "plain %% text", (), False),
        (25, "spfmilter starting on %s", ("unix:/x",), False),
        (logging.INFO, "mapping %(a)s", ({"a": "b"},), False),
        (logging.ERROR, "internal error in %s: %s", ("envfrom", "boom"), True),
        (logging.INFO, "ends in a newline\n", (), True),
        (logging.DEBUG, "non-ascii \u2603 \udcff", (), False),
    ]


def _log_all(logger: logging.Logger) -> None:
    for level, msg, args, exc in _records():
        if exc:
            try:
                raise RuntimeError("kaboom")
            except RuntimeError:
                logger.log(level, msg, *args, exc_info=True)
        else:
            logger.log(level, msg, *args)


def _through_queue_listener(target: logging.Handler, name: str) -> None:
    """What the daemon did before: QueueHandler -> QueueListener -> target."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, target)
    listener.start()
    logger = _logger(name, logging.handlers.QueueHandler(records))
    logger.setLevel(logging.DEBUG)
    _log_all(logger)
    listener.stop()


def _through_batching(target: logging.Handler, name: str) -> None:
    handler = BatchingHandler(target, linger=LONG)
    handler.start()
    logger = _logger(name, handler)
    logger.setLevel(logging.DEBUG)
    _log_all(logger)
    handler.stop()


def test_stream_text_is_what_the_queue_listener_wrote(tmp_path: Path) -> None:
    texts = []
    for run_through in (_through_queue_listener, _through_batching):
        path = tmp_path / run_through.__name__
        target = _stream_target(path)
        target.setFormatter(logging.Formatter("spfmilter %(levelname)s %(message)s"))
        run_through(target, f"t.stream.{run_through.__name__}")
        target.stream.close()
        texts.append(path.read_bytes())
    assert texts[0] == texts[1]
    assert texts[1].count(b"Traceback (most recent call last)") == 2


def test_syslog_datagrams_are_what_the_queue_listener_sent() -> None:
    with tempfile.TemporaryDirectory(prefix="lw", dir="/tmp") as d:
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink.bind(f"{d}/log")
        sink.setblocking(False)
        got = []
        for run_through in (_through_queue_listener, _through_batching):
            target = logging.handlers.SysLogHandler(address=f"{d}/log", facility="mail")
            target.priority_map = {**target.priority_map, "NOTICE": "notice"}
            target.setFormatter(logging.Formatter("spfmilter[1]: %(message)s"))
            run_through(target, f"t.syslog.{run_through.__name__}")  # sent when it returns
            target.close()
            datagrams = []
            while True:
                try:
                    datagrams.append(sink.recv(65536))
                except BlockingIOError:
                    break
            got.append(datagrams)
        sink.close()
    assert got[0] == got[1]
    assert len(got[1]) == len(_records()) - 1  # the one with a lone surrogate is not sent
    assert got[1][0] == b"<22>spfmilter[1]: qid=Q1 ip=192.0.2.1 action=accept\x00"


def test_info_is_logger_info_without_the_caller(tmp_path: Path) -> None:
    handler = logging.StreamHandler(open(tmp_path / "log", "w"))  # noqa: SIM115
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger = _logger("t.info", handler)
    info(logger, "qid=Q ip=192.0.2.1 x=%s")  # the text is not a format any more
    quiet = _logger("t.info.quiet", handler)
    quiet.setLevel(logging.WARNING)
    info(quiet, "not shown")
    handler.stream.close()
    assert (tmp_path / "log").read_text() == "INFO t.info qid=Q ip=192.0.2.1 x=%s\n"


FORK_SCRIPT = """
import logging, os, sys
from spfmilter.logwriter import BatchingHandler
target = logging.StreamHandler(sys.stdout)
handler = BatchingHandler(target, linger=3600.0)
handler.start()
log = logging.Logger("fork")
log.addHandler(handler)
for n in range(100):
    log.warning("before %d", n)
pid = os.fork()
if pid == 0:
    log.warning("child")  # the writer thread is the parent's: written at once
    os._exit(0)  # as daemonize()'s parents leave: nothing flushed on the way out
os.waitpid(pid, 0)
log.warning("parent")
handler.stop()
"""


def test_fork_neither_loses_nor_repeats_a_line() -> None:
    out = subprocess.run([PYTHON, "-c", FORK_SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout.splitlines()
    assert out[:100] == [f"before {n}" for n in range(100)]  # written before the fork
    assert sorted(out[100:]) == ["child", "parent"]
    assert out[-1] == "parent"


# -- the daemon ------------------------------------------------------------------------

MESSAGES = 60


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_daemon_logs_every_message_in_order_through_stop(dns_server, stop_signal) -> None:
    with tempfile.TemporaryDirectory(prefix="spfw", dir="/tmp") as d:
        work = Path(d)
        cfg = work / "c.cfg"
        write_config(cfg, work, dns_server)
        daemon = Daemon([PYTHON, "-m", "spfmilter", "-c", str(cfg), "run", "--stderr"],
                        f"unix:{work}/spf.sock", work).start()
        try:
            for n in range(MESSAGES):
                sender = "<u@fail.spf.test>" if n % 3 == 0 else "<u@pass.spf.test>"
                run(daemon, sender=sender, macros={"mail": {"i": f"QN{n:03d}"},
                                                   "eom": {"i": f"QN{n:03d}"}})
        finally:
            assert daemon.stop(stop_signal) == 0
        lines = daemon.stderr().splitlines()
    decisions = [line for line in lines if " qid=QN" in line]
    assert [line.split(" qid=")[1][:5] for line in decisions] == \
        [f"QN{n:03d}" for n in range(MESSAGES)]
    for n, line in enumerate(decisions):
        action = "reject" if n % 3 == 0 else "accept"
        assert f" INFO qid=QN{n:03d} ip=127.0.0.2 helo=pass.spf.test " in line
        assert f" action={action} " in line
    assert lines[-1].endswith("NOTICE spfmilter stopped")
