"""Harness for the end-to-end tests: real Sendmail, real Postfix, real spfmilter.

Everything runs on loopback in one private directory under /run (a short
path for unix sockets, in a directory that is not world-writable, so
Sendmail accepts the milter socket with its default file safety checks):

* :class:`SpfMilter` runs ``spfmilter -c CFG run --stderr`` as users do.
* :class:`Sendmail` builds a ``.cf`` from ``data/sendmail.mc.in`` plus
  ``etc/sendmail.mc.snippet`` and runs ``sendmail -C CF -bD``.
* :class:`Postfix` writes a private ``config_directory`` from
  ``data/postfix-*.in`` plus ``etc/postfix-main.cf.snippet`` and runs
  ``postfix -c DIR start``.
* :class:`Mailbox` reads what the MTA delivered; :func:`smtp` talks SMTP
  from a chosen loopback source address.

Sendmail and Postfix cannot both be installed (Debian's ``sendmail-bin`` and
``postfix`` conflict).  Postfix is the installed package; Sendmail runs from
the installed ``sendmail-bin`` if present, otherwise from ``sendmail-bin``'s
``.deb`` unpacked with ``dpkg-deb -x`` into :data:`CACHE_DIR` (its ``.cf``
is given with ``-C``, so it needs no file of the package's own).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import email.parser
import email.policy
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from tests.procs import ROOT, Daemon

DATA = Path(__file__).resolve().parent / "data"
SENDMAIL_SNIPPET = ROOT / "etc" / "sendmail.mc.snippet"
POSTFIX_SNIPPET = ROOT / "etc" / "postfix-main.cf.snippet"
SPFMILTER = ROOT / ".venv" / "bin" / "spfmilter"
#: Where an unpacked sendmail-bin .deb is kept between runs.
CACHE_DIR = Path("/var/cache/spfmilter-tests")

AUTHSERV_ID = "mx.e2e.test"
MAIL_DOMAIN = "e2e.test"
RECIPIENT = f"inbox@{MAIL_DOMAIN}"
START_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 20.0

SENDMAIL_BINARIES = ("/usr/libexec/sendmail/sendmail", "/usr/lib/sm.bin/sendmail")
SENDMAIL_CF_DIR = Path("/usr/share/sendmail/cf")
POSTFIX = "/usr/sbin/postfix"
_CLONE_NEWNET = 0x40000000


class HarnessError(RuntimeError):
    """A server of the e2e harness could not be set up; the message says why."""


# ---------------------------------------------------------------------------
# Packages


@contextlib.contextmanager
def _no_daemon_start() -> Iterator[None]:
    """A policy-rc.d that stops maintainer scripts from starting daemons."""
    path = Path("/usr/sbin/policy-rc.d")
    if path.exists():  # someone else's: leave it as it is
        yield
        return
    path.write_text("#!/bin/sh\nexit 101\n")
    path.chmod(0o755)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kwargs)  # type: ignore


def apt_install(packages: Sequence[str], debconf: str = "") -> None:
    """apt-get install packages (Debian), or raise HarnessError with apt's output."""
    if os.geteuid() != 0:
        raise HarnessError(f"need root to install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if debconf:
        _run(["debconf-set-selections"], input=debconf, env=env)
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", *packages]
    with _no_daemon_start():
        result = _run(argv, env=env)
        if result.returncode != 0:  # perhaps stale package lists
            _run(["apt-get", "update", "-q"], env=env)
            result = _run(argv, env=env)
    if result.returncode != 0:
        raise HarnessError(f"apt-get install {' '.join(packages)} failed:\n"
                           f"{result.stdout}{result.stderr}")


def _deb_version(package: str) -> str:
    result = _run(["apt-cache", "show", "--no-all-versions", package])
    match = re.search(r"^Version: (\S+)", result.stdout, re.M)
    if not match:
        raise HarnessError(f"apt-cache show {package}: no version\n{result.stderr}")
    return match.group(1)


def _lib_depends(package: str) -> list[str]:
    """The shared-library packages among package's Depends."""
    result = _run(["apt-cache", "show", "--no-all-versions", package])
    match = re.search(r"^Depends: (.*)$", result.stdout, re.M)
    names = [dep.split("|")[0].split()[0] for dep in match.group(1).split(",")] if match else []
    return [name for name in names if name.startswith("lib")]


def _missing_libraries(binary: Path) -> list[str]:
    ldd = _run(["ldd", str(binary)])
    return [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]


def _unpacked_sendmail() -> Path:
    """sendmail from sendmail-bin's .deb, unpacked into CACHE_DIR (once)."""
    version = _deb_version("sendmail-bin")
    dest = CACHE_DIR / f"sendmail-bin_{version}"
    binary = dest / "usr" / "libexec" / "sendmail" / "sendmail"
    if not binary.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            os.chmod(tmp, 0o755)  # apt's download user must write here
            got = _run(["apt-get", "download", f"sendmail-bin={version}"], cwd=tmp)
            debs = list(Path(tmp).glob("sendmail-bin_*.deb"))
            if got.returncode != 0 or not debs:
                raise HarnessError(f"apt-get download sendmail-bin failed:\n"
                                   f"{got.stdout}{got.stderr}")
            unpack = Path(tmp) / "root"
            x = _run(["dpkg-deb", "-x", str(debs[0]), str(unpack)])
            if x.returncode != 0:
                raise HarnessError(f"dpkg-deb -x {debs[0]} failed:\n{x.stderr}")
            unpack.rename(dest)
    if not binary.exists():
        raise HarnessError(f"{binary}: not in sendmail-bin {version}")
    if _missing_libraries(binary):
        apt_install(_lib_depends("sendmail-bin"))
        missing = _missing_libraries(binary)
        if missing:
            raise HarnessError(f"{binary}: libraries not found: {' '.join(missing)}")
    return binary


def sendmail_binary() -> Path:
    """A sendmail binary to run, and the m4 files to build its .cf (installed if missing)."""
    if not (SENDMAIL_CF_DIR / "m4" / "cf.m4").exists() or not shutil.which("m4"):
        apt_install(["sendmail-cf", "m4"])
    for path in SENDMAIL_BINARIES:
        if os.access(path, os.X_OK):
            return Path(path)
    return _unpacked_sendmail()


def postfix_binary() -> Path:
    """/usr/sbin/postfix, installing Debian's postfix (unconfigured) if missing."""
    if not os.access(POSTFIX, os.X_OK):
        apt_install(["postfix"], debconf="postfix postfix/main_mailer_type select "
                                        "No configuration\n")
    if not os.access(POSTFIX, os.X_OK):
        raise HarnessError(f"{POSTFIX} missing after installing postfix")
    return Path(POSTFIX)


@dataclass(frozen=True)
class SaslUser:
    """A user in a Cyrus sasldb that both MTAs authenticate against."""

    db: Path
    name: str
    password: str


def make_sasldb(path: Path, name: str, password: str, realm: str = AUTHSERV_ID,
                group: str = "") -> SaslUser:
    """A sasldb file with one user (realm: the MTAs' host name, Cyrus' default)."""
    if not shutil.which("saslpasswd2"):
        apt_install(["sasl2-bin"])
    made = _run(["saslpasswd2", "-c", "-p", "-f", str(path), "-u", realm, name],
                input=password)
    if made.returncode != 0 or not path.exists():
        raise HarnessError(f"saslpasswd2 failed:\n{made.stdout}{made.stderr}")
    if group:
        shutil.chown(path, group=group)
    path.chmod(0o640)
    return SaslUser(path, name, password)


def sasl_config(sasl: SaslUser) -> str:
    """Cyrus SASL application config: PLAIN/LOGIN checked against the sasldb."""
    return (f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasl.db}\n"
            "mech_list: PLAIN LOGIN\n")


# ---------------------------------------------------------------------------
# Small helpers


def fill(template: str, **values: object) -> str:
    """Replace @@NAME@@ in template; every placeholder must be given."""
    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder @@{key}@@ has no value")
        return str(values[key])
    return re.sub(r"@@([A-Z0-9_]+)@@", sub, template)


def ipv6_loopback() -> bool:
    """True when ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(hosts: Sequence[str]) -> int:
    """A TCP port that is free on every one of hosts."""
    for _ in range(50):
        first = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
        with socket.socket(first, socket.SOCK_STREAM) as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise HarnessError(f"no TCP port free on all of {hosts}")


def wait_for_smtp(host: str, port: int, proc: subprocess.Popen | None, log: str,
                  timeout: float = START_TIMEOUT) -> None:
    """Poll until an SMTP greeting comes from host:port, or raise with the log."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"MTA exited with status {proc.returncode} before listening "
                               f"on [{host}]:{port}\n{log_text(log)}")
        try:
            with smtplib.SMTP(host, port, timeout=2) as client:
                code, _ = client.noop()
                if code == 250:
                    return
                last = code
        except (OSError, smtplib.SMTPException) as exc:
            last = exc
        time.sleep(0.05)
    raise HarnessError(f"no SMTP service on [{host}]:{port} after {timeout}s ({last!r})\n"
                       f"{log_text(log)}")


def log_text(path: str | Path, tail: int = 200) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return f"---- {path} (last {tail} lines) ----\n" + "\n".join(lines[-tail:])


def make_workdir(prefix: str) -> Path:
    """A fresh 0755 directory under /run (short, root-owned, not world-writable)."""
    base = "/run" if os.access("/run", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------
# Snippets users paste


_FILTER_RE = re.compile(r"^INPUT_MAIL_FILTER\(`([^']+)',\s*`S=(?:local|unix):([^,']+)", re.M)


def sendmail_snippet(socket_path: str) -> tuple[str, str]:
    """(milter name, snippet text with the socket path replaced) from etc/."""
    text = SENDMAIL_SNIPPET.read_text()
    matches = _FILTER_RE.findall(text)
    if len(matches) != 1:
        raise HarnessError(f"{SENDMAIL_SNIPPET}: expected one INPUT_MAIL_FILTER with a "
                           f"local socket, found {matches}")
    name, path = matches[0]
    return name, text.replace(path, socket_path)


def filter_line(mc_text: str) -> str:
    """The INPUT_MAIL_FILTER line of an .mc text."""
    return next(line for line in mc_text.splitlines() if line.startswith("INPUT_MAIL_FILTER("))


def postfix_snippet(socket_path: str) -> str:
    """etc/postfix-main.cf.snippet with smtpd_milters' unix path replaced."""
    text = POSTFIX_SNIPPET.read_text()
    paths = re.findall(r"^smtpd_milters\s*=\s*unix:(\S+)\s*$", text, re.M)
    if len(paths) != 1:
        raise HarnessError(f"{POSTFIX_SNIPPET}: expected one smtpd_milters = unix:PATH line, "
                           f"found {paths}")
    return re.sub(r"^(smtpd_milters\s*=\s*unix:)\S+", lambda m: m.group(1) + socket_path,
                  text, flags=re.M)


def settings(cf_text: str) -> dict[str, str]:
    """NAME = VALUE lines of a main.cf text (comments and blanks skipped)."""
    found = {}
    for line in cf_text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            found[name.strip()] = value.strip()
    return found


# ---------------------------------------------------------------------------
# spfmilter


class SpfMilter:
    """The real spfmilter daemon with the e2e config, on a unix socket."""

    def __init__(self, workdir: Path, *, nameservers: Sequence[str], name: str = "spfmilter",
                 group: str = "", socket: str = "") -> None:
        """socket: a spec such as inet6:PORT@::1 instead of the unix socket."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = str(workdir / "sock" / "spfmilter.sock")
        self.spec = socket or f"unix:{self.socket_path}"
        self.config_path = workdir / "spfmilter.cfg"
        self.config_path.write_text(fill(
            (DATA / "spfmilter.cfg.in").read_text(), SOCKET=self.spec,
            MILTER_NAME=name, GROUP=group, AUTHSERV_ID=AUTHSERV_ID,
            NAMESERVERS=", ".join(nameservers)))
        self.config_path.chmod(0o644)
        if not SPFMILTER.exists():
            raise HarnessError(f"{SPFMILTER} missing: run scripts/setup")
        self.daemon = Daemon([str(SPFMILTER), "-c", str(self.config_path), "run", "--stderr"],
                             self.spec, workdir)

    def start(self) -> SpfMilter:
        started = self.log().count("spfmilter starting") if self.daemon.err.exists() else 0
        self.daemon.start()
        # The socket opens before the daemon drops root; "starting" is logged after.
        deadline = time.monotonic() + 15
        while self.log().count("spfmilter starting") <= started:
            if time.monotonic() > deadline or not self.running:
                raise HarnessError(f"spfmilter did not finish starting:\n{self.log()}")
            time.sleep(0.02)
        return self

    def stop(self) -> int:
        return self.daemon.stop()

    @contextlib.contextmanager
    def reconfigured(self, policy: str, extra: str = "") -> Iterator[None]:
        """Run with ``policy`` lines added to [policy] and ``extra`` sections appended
        (reloaded with SIGHUP, as an admin does), then with the e2e config again."""
        original = self.config_path.read_text()
        changed = original.replace("[policy]\n", f"[policy]\n{policy}\n", 1) + extra
        assert changed != original
        self.config_path.write_text(changed)
        try:
            self._reload()
            yield
        finally:
            self.config_path.write_text(original)
            self._reload()

    def _reload(self) -> None:
        assert self.daemon.proc is not None
        before = self.log().count("configuration reloaded")
        self.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while self.log().count("configuration reloaded") <= before:
            if time.monotonic() > deadline or not self.running:
                raise HarnessError(f"spfmilter did not reload:\n{self.log()}")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def log(self) -> str:
        return self.daemon.stderr()


# ---------------------------------------------------------------------------
# Delivered mail


class Mailbox:
    """A directory the MTA delivers into, one file per message (maildir new/ too)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def files(self) -> list[Path]:
        """Delivered files: not dot-files, not in a maildir's tmp/ (still being written)."""
        return sorted(p for p in self.directory.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and p.parent.name != "tmp")

    def find(self, token: str) -> list[Message]:
        """Delivered messages whose text contains token."""
        found = []
        for path in self.files():
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # maildir new/ -> cur/ by someone else: not here
                continue
            if token.encode() in data:
                found.append(email.parser.BytesParser(policy=email.policy.compat32)
                             .parsebytes(data))
        return found

    def raw(self, token: str) -> bytes:
        """The bytes of the one delivered message containing token (after wait_for)."""
        found = []
        for path in self.files():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if token.encode() in data:
                found.append(data)
        assert len(found) == 1, f"{len(found)} messages contain {token!r}"
        return found[0]

    def wait_for(self, token: str, timeout: float = DELIVERY_TIMEOUT) -> Message:
        """The one delivered message containing token, waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(token)
            if len(found) > 1:
                raise AssertionError(f"{len(found)} messages contain {token!r}")
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no message with {token!r} delivered in {timeout}s "
                                     f"into {self.directory}")
            time.sleep(0.05)


# ---------------------------------------------------------------------------
# SMTP client


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code at the start of the text, or ''."""
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.text)
        return match.group(1) if match else ""


class SmtpClient:
    """One SMTP session from a chosen source address; replies as :class:`Reply`."""

    def __init__(self, host: str, port: int, *, source: str, helo: str) -> None:
        self.smtp = smtplib.SMTP(timeout=60, source_address=(source, 0))
        code, text = self.smtp.connect(host, port)
        self.greeting = Reply(code, text.decode(errors="replace"))
        self.helo_reply = self.command(f"EHLO {helo}")
        if (self.greeting.code, self.helo_reply.code) != (220, 250):
            self.close()
            raise AssertionError(f"[{host}]:{port} from {source}: greeting {self.greeting}, "
                                 f"EHLO {self.helo_reply}")

    def command(self, line: str) -> Reply:
        self.smtp.putcmd(line)
        code, text = self.smtp.getreply()
        return Reply(code, text.decode(errors="replace"))

    def mail(self, sender: str) -> Reply:
        return self.command(f"MAIL FROM:<{sender}>")

    def rcpt(self, recipient: str = RECIPIENT) -> Reply:
        return self.command(f"RCPT TO:<{recipient}>")

    def rset(self) -> Reply:
        return self.command("RSET")

    def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def data(self, message: str) -> Reply:
        reply = self.command("DATA")
        if reply.code != 354:
            return reply
        body = message.replace("\r\n", "\n").replace("\n", "\r\n")
        body = re.sub(r"(?m)^\.", "..", body)
        if not body.endswith("\r\n"):
            body += "\r\n"
        self.smtp.send(body.encode() + b".\r\n")
        code, text = self.smtp.getreply()
        return Reply(code, text.decode(errors="replace"))

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            self.smtp.close()

    def __enter__(self) -> SmtpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def message(token: str, *, sender: str, extra_headers: Sequence[str] = ()) -> str:
    """A small test message whose Subject and body carry token."""
    lines = [*extra_headers,
             f"From: <{sender or 'mailer-daemon@' + MAIL_DOMAIN}>",
             f"To: <{RECIPIENT}>",
             f"Subject: e2e {token}",
             f"Message-ID: <{token}@client.e2e.test>",
             "",
             f"Body of {token}."]
    return "\r\n".join(lines) + "\r\n"


# ---------------------------------------------------------------------------
# Syslog capture (Sendmail logs only through syslog)


class SyslogSink:
    """A unix datagram socket collecting syslog lines into a file."""

    def __init__(self, path: Path, logfile: Path) -> None:
        self.path = path
        self.logfile = logfile
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="syslog-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        with open(self.logfile, "ab", buffering=0) as out:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                out.write(re.sub(rb"^<\d+>", b"", data).rstrip(b"\0\n") + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def private_namespace(sink: Path, hosts: Path, sasl_dir: Path, stash: Path, *,
                      network: bool = False) -> list[str]:
    """argv prefix: run a command in its own mount namespace with our files in system places.

    Sendmail logs only through syslog(3) to /dev/log; at start it looks up
    this machine's name through the C library (/etc/hosts), sleeping a minute
    when the name is not qualified; and Cyrus SASL reads its Sendmail.conf
    only from fixed directories.  A private mount namespace with a fresh /dev
    holding our syslog socket, our hosts file over /etc/hosts and our SASL
    config directory over /usr/lib/sasl2 serves all three without touching
    the host.  network: a private network namespace too, with only its own
    loopback (for listening on wildcard addresses without opening anything).
    """
    if not shutil.which("unshare") or _run(["unshare", "-m", "true"]).returncode != 0:
        raise HarnessError("unshare -m (a private mount namespace) does not work here")
    script = (
        'set -e; mkdir -p "$STASH"; mount --rbind /dev "$STASH"; '
        "mount -t tmpfs -o mode=755 e2edev /dev; "
        "for n in null zero full random urandom tty; do "
        '[ -e "$STASH/$n" ] || continue; : > /dev/$n; mount --bind "$STASH/$n" /dev/$n; done; '
        "ln -s /proc/self/fd /dev/fd; "
        ': > /dev/log; mount --bind "$SINK" /dev/log; '
        'mount --bind "$HOSTS" /etc/hosts; mount --bind "$SASL" /usr/lib/sasl2; exec "$@"'
    )
    if network:
        script = "ip link set lo up; " + script
    return ["env", f"STASH={stash}", f"SINK={sink}", f"HOSTS={hosts}", f"SASL={sasl_dir}",
            "unshare", "-m", *(["-n"] if network else []),
            "--propagation", "private", "sh", "-c", script, "sh"]


# ---------------------------------------------------------------------------
# MTAs


class Mta:
    """What the tests need of an MTA."""

    name = "mta"
    workdir: Path
    port: int
    hosts: tuple[str, ...]
    mailbox: Mailbox
    logfile: Path

    def log(self) -> str:
        return log_text(self.logfile)

    def connect(self, source: str, helo: str) -> SmtpClient:
        host = "::1" if ":" in source else "127.0.0.1"
        if host not in self.hosts:
            raise AssertionError(f"{self.name} does not listen on {host}")
        return SmtpClient(host, self.port, source=source, helo=helo)


#: Other milters of a chain: (name, unix socket path), in the order the MTA calls them.
MilterChain = Sequence[tuple[str, str]]


def sendmail_filter_line(name: str, socket_path: str) -> str:
    """An INPUT_MAIL_FILTER line for another milter of a chain (same flags as spfmilter's)."""
    return f"INPUT_MAIL_FILTER(`{name}', `S=local:{socket_path}, F=T, T=C:5m;S:20s;R:5m;E:5m')dnl"


class Sendmail(Mta):
    """A private sendmail -bD built from data/sendmail.mc.in and the etc/ snippet.

    ``before``/``after``: other milters that Sendmail calls before/after spfmilter.
    For the other documented routes: ``snippet`` replaces the etc/ snippet
    ("" for none), ``cf_lines`` are appended to the generated sendmail.cf,
    ``daemons`` (a function of the port giving DAEMON_OPTIONS lines) replaces
    the loopback listeners, with ``hosts`` the addresses to reach them, and
    ``network`` runs Sendmail in a network namespace of its own (clients
    follow it there, see :meth:`connect`).
    """

    name = "sendmail"

    def __init__(self, workdir: Path, milter_socket: str, sasl: SaslUser, *,
                 before: MilterChain = (), after: MilterChain = (),
                 snippet: str | None = None, cf_lines: Sequence[str] = (),
                 daemons: Callable[[int], str] | None = None,
                 hosts: tuple[str, ...] | None = None, network: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(mode=0o755, exist_ok=True)
        self.binary = sendmail_binary()
        self.network = network
        sasl_dir = workdir / "sasl2"
        sasl_dir.mkdir(mode=0o755, exist_ok=True)
        (sasl_dir / "Sendmail.conf").write_text(sasl_config(sasl))
        self.hosts = hosts or (("127.0.0.1", "::1") if ipv6_loopback() else ("127.0.0.1",))
        self.port = 10025 if network else free_port(self.hosts)  # every port is free there
        self.milter_name, snippet_text = sendmail_snippet(milter_socket)
        if snippet is not None:
            snippet_text = snippet
        snippet = "\n".join([*(sendmail_filter_line(*m) for m in before), snippet_text,
                             *(sendmail_filter_line(*m) for m in after)])
        maildir = workdir / "mail"
        for sub in ("queue", "mail"):
            (workdir / sub).mkdir(mode=0o700, exist_ok=True)
        (workdir / "service.switch").write_text("hosts files\naliases files\n")
        # Sendmail qualifies this machine's name through the hosts-only switch.
        (workdir / "hosts").write_text(
            f"127.0.0.1 {AUTHSERV_ID} localhost {socket.gethostname()}\n::1 localhost\n")
        (workdir / "statistics").write_bytes(b"")
        listeners = [f"DAEMON_OPTIONS(`Family=inet, Addr=127.0.0.1, Port={self.port}, "
                     "Name=MTA-v4')dnl"]
        if "::1" in self.hosts:
            listeners.append(f"DAEMON_OPTIONS(`Family=inet6, Addr=::1, Port={self.port}, "
                             "Name=MTA-v6')dnl")
        daemons_text = daemons(self.port) if daemons else "\n".join(listeners)
        self.mc_text = fill((DATA / "sendmail.mc.in").read_text(), CF_DIR=SENDMAIL_CF_DIR,
                            HOSTNAME=AUTHSERV_ID, WORK=workdir, PYTHON=sys.executable,
                            DELIVER=DATA / "deliver.py", MAILDIR=maildir, PORT=self.port,
                            DAEMONS=daemons_text, MAIL_DOMAIN=MAIL_DOMAIN, SNIPPET=snippet)
        self.mc = workdir / "sendmail.mc"
        self.mc.write_text(self.mc_text)
        self.cf = workdir / "sendmail.cf"
        m4 = _run(["m4", str(self.mc)])
        if m4.returncode != 0 or m4.stderr.strip():
            raise HarnessError(f"m4 {self.mc} failed:\n{m4.stderr}")
        self.cf.write_text(m4.stdout + "".join(f"{line}\n" for line in cf_lines))
        self.mailbox = Mailbox(maildir)
        self.logfile = workdir / "maillog"
        self.stderr_file = workdir / "sendmail.stderr"
        self.proc: subprocess.Popen | None = None
        self.sink: SyslogSink | None = None

    def start(self, *, wait: bool = True) -> Sendmail:
        """Start sendmail -bD; wait: until every listener greets (else just launch it)."""
        self.sink = SyslogSink(self.workdir / "syslog.sock", self.logfile)
        wrapper = private_namespace(self.workdir / "syslog.sock", self.workdir / "hosts",
                                    self.workdir / "sasl2", self.workdir / "dev",
                                    network=self.network)
        argv = [*wrapper, str(self.binary), "-C", str(self.cf), "-bD"]
        with open(self.stderr_file, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            for host in self.hosts if wait else ():
                with self.namespace():
                    wait_for_smtp(host, self.port, self.proc, str(self.stderr_file))
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}\n{self.log()}") from None
        return self

    @contextlib.contextmanager
    def namespace(self) -> Iterator[None]:
        """Sockets made in this block belong to Sendmail's network (if it has its own).

        setns(2) moves only the calling thread, and a socket keeps the
        namespace it was made in, so a client made here works after the block.
        """
        if not self.network:
            yield
            return
        assert self.proc is not None
        theirs_path = f"/proc/{self.proc.pid}/ns/net"
        deadline = time.monotonic() + START_TIMEOUT
        while os.readlink(theirs_path) == os.readlink("/proc/thread-self/ns/net"):
            if time.monotonic() > deadline or self.proc.poll() is not None:  # not unshared yet
                raise HarnessError(f"sendmail (pid {self.proc.pid}) has no network of its own")
            time.sleep(0.02)
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        theirs = os.open(theirs_path, os.O_RDONLY)
        try:
            if libc.setns(theirs, _CLONE_NEWNET) != 0:
                raise HarnessError(f"setns: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise HarnessError(f"setns back: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(own)
            os.close(theirs)

    def connect(self, source: str, helo: str) -> SmtpClient:
        with self.namespace():
            return super().connect(source, helo)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def log(self) -> str:
        return log_text(self.logfile) + "\n" + log_text(self.stderr_file)


class Postfix(Mta):
    """A private Postfix instance (postfix -c DIR) with the etc/ snippet in main.cf.

    ``before``/``after``: other milters that Postfix calls before/after spfmilter.
    """

    name = "postfix"

    def __init__(self, workdir: Path, milter_socket: str, sasl: SaslUser, *,
                 before: MilterChain = (), after: MilterChain = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(mode=0o755, exist_ok=True)
        self.binary = postfix_binary()
        self.hosts = ("127.0.0.1", "::1") if ipv6_loopback() else ("127.0.0.1",)
        self.port = free_port(self.hosts)
        self.config_dir = workdir / "etc"
        self.config_dir.mkdir(mode=0o755, exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        (workdir / "spool").mkdir(mode=0o755, exist_ok=True)  # root's; postfix fills it
        for sub in ("data", "mail"):
            (workdir / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(workdir / "data", postfix.pw_uid, postfix.pw_gid)
        os.chown(workdir / "mail", nobody.pw_uid, nobody.pw_gid)
        self.snippet = postfix_snippet(milter_socket)
        if before or after:
            chain = [*(p for _n, p in before), milter_socket, *(p for _n, p in after)]
            self.snippet = re.sub(r"(?m)^smtpd_milters\s*=.*$",
                                  "smtpd_milters = " + ", ".join(f"unix:{p}" for p in chain),
                                  self.snippet)
        main_cf = fill((DATA / "postfix-main.cf.in").read_text(), CONFIG_DIR=self.config_dir,
                       WORK=workdir, HOSTNAME=AUTHSERV_ID, MAIL_DOMAIN=MAIL_DOMAIN,
                       INET_PROTOCOLS="all" if "::1" in self.hosts else "ipv4",
                       MAIL_UID=nobody.pw_uid, MAIL_GID=nobody.pw_gid,
                       SNIPPET=self.snippet)
        (self.config_dir / "main.cf").write_text(main_cf)
        listen = "\n".join(
            f"{'[::1]' if ':' in host else host}:{self.port} inet n - n - - smtpd"
            for host in self.hosts)
        master = fill((DATA / "postfix-master.cf.in").read_text(), LISTEN=listen)
        (self.config_dir / "master.cf").write_text(master.replace("1000?", "1000"))
        # Debian's Postfix reads the Cyrus config from $config_directory/sasl.
        (self.config_dir / "sasl").mkdir(mode=0o755, exist_ok=True)
        (self.config_dir / "sasl" / "smtpd.conf").write_text(sasl_config(sasl))
        self.mailbox = Mailbox(workdir / "mail")
        self.logfile = workdir / "maillog"
        self.started = False

    def postfix_config(self) -> dict[str, str]:
        """The instance's effective non-default main.cf settings (postconf -n)."""
        out = _run(["postconf", "-c", str(self.config_dir), "-n"])
        if out.returncode != 0:
            raise HarnessError(f"postconf -n failed:\n{out.stderr}")
        return settings(out.stdout)

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.binary), "-c", str(self.config_dir), *args])

    def start(self) -> Postfix:
        started = self.postfix("start")
        self.started = True
        if started.returncode != 0:
            self.stop()
            raise HarnessError(f"postfix start failed ({started.returncode}):\n"
                               f"{started.stdout}{started.stderr}\n{self.log()}")
        try:
            for host in self.hosts:
                wait_for_smtp(host, self.port, None, str(self.logfile))
        except HarnessError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.started:
            self.postfix("stop")
            self.started = False
        pidfile = self.workdir / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError, IndexError):
                break
            time.sleep(0.05)
