"""The spfmilter daemon: socket, privileges, pidfile, logging, signals, reload."""

from __future__ import annotations

import errno
import grp
import logging
import logging.handlers
import os
import pwd
import socket
import stat
import sys
import sysconfig
import threading
from collections.abc import Callable

import libmilter_ext as lm

from . import config as configmod
from . import sdnotify
from .config import Config
from .logwriter import BatchingHandler
from .metrics import Metrics, MetricsServer
from .milter import Runtime, RuntimeHolder, SpfMilter, factory
from .spfcheck import SpfChecker

log = logging.getLogger("spfmilter")

# Start, stop and reload go above INFO, which is kept for one line per transaction.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


def make_checker(cfg: Config) -> SpfChecker:
    """An SpfChecker configured from the [spf] section."""
    return SpfChecker(nameservers=cfg.spf.nameservers, lookup_timeout=cfg.spf.lookup_timeout,
                      void_lookup_limit=cfg.spf.void_lookup_limit,
                      cache_size=cfg.spf.cache_size)


def setup_logging(cfg: Config, *, force_stderr: bool = False,
                  queued: bool = False) -> BatchingHandler | None:
    """Send logs to syslog (facility from config) or stderr; only the daemon calls this.

    queued: milter threads only hand records over and a writer thread does the
    writing, in batches (spfmilter.logwriter), so a slow syslog never holds up a
    connection.  Returns that handler, which the caller stops (it writes what is
    pending; after a fork, set logging up again).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if cfg.milter.log_target == "syslog" and not force_stderr and os.path.exists("/dev/log"):
        facility = logging.handlers.SysLogHandler.facility_names[cfg.milter.log_facility]
        handler = logging.handlers.SysLogHandler(address="/dev/log", facility=facility)
        handler.priority_map = {**handler.priority_map, "NOTICE": "notice"}
        handler.setFormatter(logging.Formatter(f"spfmilter[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s spfmilter %(levelname)s %(message)s"))
    root.setLevel(cfg.milter.log_level.upper())
    # Neither format shows the thread or process of a record: don't look them up
    # for every record (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if not queued:
        root.addHandler(handler)
        return None
    batching = BatchingHandler(handler)
    batching.start()
    root.addHandler(batching)
    return batching


def unix_socket_path(spec: str) -> str | None:
    """The filesystem path of a unix:/local: socket spec, else None."""
    for prefix in ("unix:", "local:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def claim_pidfile(path: str) -> None:
    """Refuse to start if another live spfmilter owns path; remove a stale one."""
    try:
        with open(path) as fh:
            pid = int(fh.read().strip() or 0)
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and pid != os.getpid() and _pid_alive(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            cmdline = b"spfmilter"
        if b"spfmilter" in cmdline:
            raise StartupError(f"{path}: spfmilter is already running as pid {pid}")
    log.warning("removing stale pidfile %s (pid %s)", path, pid or "unreadable")
    os.unlink(path)


def clear_stale_socket(path: str) -> None:
    """Remove a unix socket nobody listens on; refuse a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or change"
                           " [milter] socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            log.warning("removing stale socket %s", path)
            os.unlink(path)
            return
    raise StartupError(f"{path}: another milter is already listening there")


def _ids(cfg: Config) -> tuple[int | None, int | None]:
    uid = gid = None
    if cfg.milter.user:
        try:
            pw = pwd.getpwnam(cfg.milter.user)
        except KeyError:
            raise StartupError(f"[milter] user: no such user {cfg.milter.user!r}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if cfg.milter.group:
        try:
            gid = grp.getgrnam(cfg.milter.group).gr_gid
        except KeyError:
            raise StartupError(f"[milter] group: no such group {cfg.milter.group!r}") from None
    return uid, gid


def _prepare_dir(path: str, uid: int | None, gid: int | None) -> None:
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750)
        if os.geteuid() == 0:
            os.chown(directory, uid if uid is not None else -1, gid if gid is not None else -1)


def drop_privileges(uid: int | None, gid: int | None, user: str) -> None:
    """Become the configured user (only when started as root)."""
    if os.geteuid() != 0 or uid is None:
        return
    os.setgroups([])
    if user:
        os.initgroups(user, gid if gid is not None else os.getgid())
    if gid is not None:
        os.setgid(gid)
    os.setuid(uid)


def check_readable_as(uid: int | None, gid: int | None, user: str) -> None:
    """Refuse to start if the user we drop to could not read Python's own files
    (some modules are loaded only when first used, after the drop)."""
    if os.geteuid() != 0 or uid is None:
        return
    paths = (sysconfig.get_paths()["stdlib"], os.path.dirname(os.path.dirname(__file__)))
    os.setegid(gid if gid is not None else os.getgid())
    os.seteuid(uid)
    try:
        unreadable = [p for p in paths if not os.access(p, os.R_OK | os.X_OK,
                                                         effective_ids=True)]
    finally:
        os.seteuid(0)
        os.setegid(0)
    if unreadable:
        raise StartupError(f"user {user or uid} cannot read {unreadable[0]}: install "
                           "spfmilter and its Python where that user can read them")


def daemonize() -> None:
    """Detach from the terminal (SysV style): fork, setsid, fork, stdio to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


class Daemon:
    """Runs the milter for one config file until SIGTERM/SIGINT; SIGHUP reloads."""

    def __init__(self, path: str, cfg: Config) -> None:
        self.path = os.path.abspath(path)  # reload after a chdir("/") reads the same file
        self._stderr = False
        self._listener: BatchingHandler | None = None
        checker = make_checker(cfg)
        self.metrics = None if cfg.metrics.listen is None else Metrics(
            checker, libmilter=".".join(map(str, lm.version())))
        self.holder = RuntimeHolder(Runtime(cfg, checker, self.metrics))
        self.notifier = sdnotify.Notifier.from_environment()  # connected while still root
        self.connections = 0
        self._spec = cfg.milter.socket.spec  # a changed socket waits for a restart

    @property
    def config(self) -> Config:
        return self.holder.current.config

    def reload(self) -> bool:
        """Load the config file again; keep the old one if the new one is bad."""
        self.notifier.reloading()
        try:
            return self._load_again()
        finally:
            self.notifier.ready(self.status())

    def status(self) -> str:
        """The STATUS= line systemd shows."""
        return f"serving on {self._spec}, {self.connections} connections"

    def _counted(self, make: Callable[[], SpfMilter]) -> Callable[[], SpfMilter]:
        lock = threading.Lock()  # libmilter's worker threads make connections

        def counted() -> SpfMilter:
            with lock:
                self.connections += 1
            return make()
        return counted

    def _load_again(self) -> bool:
        try:
            new = configmod.load(self.path)
        except configmod.ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self._count_reload("refused")
            return False
        except OSError as exc:
            log.error("reload refused, keeping the running config: %s: %s", self.path, exc)
            self._count_reload("refused")
            return False
        old = self.holder.current
        for section, option in configmod.restart_options():
            if getattr(getattr(new, section), option) != \
                    getattr(getattr(old.config, section), option):
                log.warning("reload: [%s] %s changed; it takes effect on restart",
                            section, option)
        checker = old.checker if new.spf == old.config.spf else make_checker(new)
        if self.metrics is not None:
            self.metrics.use_checker(checker)
        self.holder.current = Runtime(new, checker, self.metrics)
        self._serve(self.holder.current)
        self._relog(new)
        for warning in configmod.warnings(new):
            log.warning("%s", warning)
        log.log(NOTICE, "configuration reloaded from %s", self.path)
        self._count_reload("ok")
        return True

    def on_hup(self) -> None:
        """SIGHUP: reload; any failure is logged and the running config kept."""
        running = self.holder.current
        try:
            self.reload()
        except Exception:
            self.holder.current = running
            self._serve(running)
            log.exception("reload failed, keeping the running config")
            self._count_reload("failed")

    def _serve(self, runtime: Runtime) -> None:
        """New connections get handlers of runtime (those negotiated keep theirs)."""
        make, cls = factory(runtime)
        lm.set_factory(self._counted(make), cls)

    def _count_reload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reload(result)

    def _relog(self, cfg: Config) -> None:
        old = self._listener
        self._listener = setup_logging(cfg, force_stderr=self._stderr, queued=True)
        if old is not None:
            old.stop()

    def run(self, *, detach: bool = False, stderr: bool = False) -> int:
        """Open the socket, drop privileges, write the pidfile and serve."""
        cfg = self.config
        self._stderr = stderr
        # Signals held since start-up are taken now: a SIGTERM stops cleanly once the
        # socket is open, a SIGHUP reloads once the milter serves (lm.main).
        lm.handle_signals(on_hup=self.on_hup)
        setup_logging(cfg, force_stderr=stderr)
        for warning in configmod.warnings(cfg):
            log.warning("%s", warning)
        uid, gid = _ids(cfg)
        check_readable_as(uid, gid, cfg.milter.user)
        spec = cfg.milter.socket.spec
        sock_path = unix_socket_path(spec)
        if cfg.milter.pidfile:
            claim_pidfile(cfg.milter.pidfile)
            _prepare_dir(cfg.milter.pidfile, uid, gid)
        if sock_path:
            _prepare_dir(sock_path, uid, gid)
            clear_stale_socket(sock_path)
        metrics_server = None
        if self.metrics is not None and cfg.metrics.listen is not None:
            try:  # bound as root (a port below 1024) and before the fork, so an error
                # is seen by whoever started us
                metrics_server = MetricsServer(self.metrics, cfg.metrics.listen)
            except OSError as exc:
                raise StartupError(f"cannot open the metrics endpoint {cfg.metrics.listen}:"
                                   f" {exc.strerror or exc}") from None
        make, cls = factory(self.holder.current)
        lm.register(self._counted(make), cfg.milter.name, milter_class=cls)
        lm.settimeout(cfg.milter.timeout)
        old_umask = os.umask(cfg.milter.umask)
        try:
            lm.open_socket(spec, remove_stale=True)
        except lm.MilterError as exc:
            raise StartupError(f"cannot open the milter socket {spec}: {exc}") from None
        finally:
            os.umask(old_umask)
        if sock_path and os.geteuid() == 0:
            os.chown(sock_path, uid if uid is not None else -1, gid if gid is not None else -1)
        if detach:
            daemonize()
        self._relog(cfg)  # after the fork: the log writer thread must live in this process
        reporter = sdnotify.StatusReporter(self.notifier, self.status)
        try:
            if metrics_server is not None:
                metrics_server.start()  # its thread too
                log.log(NOTICE, "metrics on http://%s/metrics", cfg.metrics.listen)
            if cfg.milter.pidfile:
                with open(cfg.milter.pidfile, "w") as fh:
                    fh.write(f"{os.getpid()}\n")
                if os.geteuid() == 0:
                    os.chown(cfg.milter.pidfile, uid if uid is not None else -1, -1)
            drop_privileges(uid, gid, cfg.milter.user)
            self.notifier.ready(self.status())  # the socket is open, root is gone
            reporter.start()
            log.log(NOTICE, "spfmilter starting on %s (libmilter %s, authserv-id %s)", spec,
                    ".".join(map(str, lm.version())), cfg.spf.authserv_id)
            lm.main(on_hup=self.on_hup)
        finally:
            if metrics_server is not None:
                metrics_server.stop()
            for path in (cfg.milter.pidfile, sock_path):
                if path:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            self.notifier.stopping()
            reporter.stop()
            log.log(NOTICE, "spfmilter stopped")
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
        return 0
