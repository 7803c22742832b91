"""The Debian package: built with dpkg-buildpackage, checked by lintian, installed for real.

The build runs in a copy of the tree in a temp dir (nothing is written into the
source tree).  The install test installs the .deb on this machine, runs the
installed daemon as its systemd unit would (the unit's ExecStart, as its
User=), sends messages through it and purges the package again; the fixture
purges on failure too, so the machine is left as it was found.
"""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from libmilter_ext.testing import session
from spfmilter import _version, config
from tests.procs import ROOT, Daemon

VERSION = _version.__version__
DEFAULTS = config.loads("")
SOCKET_PATH = DEFAULTS.milter.socket.path
RUN_DIR = str(Path(SOCKET_PATH).parent)
USER = DEFAULTS.milter.user
UNIT = "/lib/systemd/system/spfmilter.service"
SITE = "/usr/lib/python3/dist-packages"
EXAMPLES = "/usr/share/doc/spfmilter/examples"

# Files the package must carry (paths as dpkg-deb -c prints them, without ".").
DEB_FILES = [
    "/usr/bin/spfmilter",
    "/etc/spfmilter.cfg",
    UNIT,
    "/usr/lib/tmpfiles.d/spfmilter.conf",
    "/usr/share/man/man8/spfmilter.8.gz",
    "/usr/share/man/man5/spfmilter.cfg.5.gz",
    "/usr/share/doc/spfmilter/copyright",
    "/usr/share/doc/spfmilter/README.gz",
    f"{EXAMPLES}/sendmail.mc.snippet",
    f"{EXAMPLES}/postfix-main.cf.snippet",
    f"{EXAMPLES}/sample.py",
    f"{SITE}/spfmilter/cli.py",
    f"{SITE}/spfmilter/daemon.py",
    f"{SITE}/libmilter_ext/__init__.py",
    f"{SITE}/libmilter_ext/testing.py",
]
# The package's dependencies on the Python libraries, by their PyPI names.
DEBIAN_NAMES = {"pyspf": "python3-spf", "dnspython": "python3-dnspython",
                "authres": "python3-authres", "prometheus-client": "python3-prometheus-client"}
#: Needed only by an option (dmarc_defer) and not packaged by Debian 12:
#: check-config names the missing package when the option is on.
NOT_IN_DEBIAN = {"publicsuffixlist"}


def run(*args: str | Path, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_tree(dest: Path) -> None:
    """The work tree's files (tracked and new, not ignored) copied to *dest*."""
    names = run("git", "ls-files", "-z", "-co", "--exclude-standard", cwd=ROOT).stdout
    for name in filter(None, names.split("\0")):
        src = ROOT / name
        if not src.is_symlink() and not src.exists():  # deleted, not yet committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name, follow_symlinks=False)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spfmilter_VERSION_ARCH.deb, built by dpkg-buildpackage from a copy of the tree."""
    top = tmp_path_factory.mktemp("debbuild")
    src = top / "spfmilter"
    copy_tree(src)
    run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src)
    arch = run("dpkg", "--print-architecture").stdout.strip()
    path = top / f"spfmilter_{VERSION}_{arch}.deb"
    assert path.is_file(), sorted(p.name for p in top.iterdir())
    return path


def deb_field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "--field", deb, name).stdout.strip()


def floors() -> dict[str, str]:
    """pyproject's dependencies: {PyPI name: lowest version}."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert deps, "no dependencies in pyproject.toml"
    pairs = re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps.group(1))
    return dict(pairs)


# -- build and lint -------------------------------------------------------------


def test_changelog_version_is_the_package_version() -> None:
    version = run("dpkg-parsechangelog", "-S", "Version", cwd=ROOT).stdout.strip()
    assert version == VERSION  # native package: no Debian revision


def test_control_depends_on_the_lowest_versions_pyproject_asks_for() -> None:
    control = (ROOT / "debian" / "control").read_text()
    assert set(floors()) - NOT_IN_DEBIAN == set(DEBIAN_NAMES), floors()
    for name, floor in floors().items():
        if name in NOT_IN_DEBIAN:
            assert name not in control
            continue
        assert f"{DEBIAN_NAMES[name]} (>= {floor})" in control, (name, floor)


def test_package_builds_and_lintian_finds_no_errors(deb: Path) -> None:
    assert deb_field(deb, "Package") == "spfmilter"
    assert deb_field(deb, "Version") == VERSION
    assert deb_field(deb, "Architecture") not in ("all", "")  # a compiled extension
    depends = deb_field(deb, "Depends")
    for name in ("adduser", "python3-spf", "python3-dnspython", "python3-authres",
                 "libmilter1.0.1", "libc6", "python3 ("):
        assert name in depends, depends
    proc = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True,
                          text=True)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert not errors and proc.returncode == 0, proc.stdout + proc.stderr


def test_package_has_the_files_an_admin_expects(deb: Path) -> None:
    listing = run("dpkg-deb", "-c", deb).stdout.splitlines()
    files = {line.split()[5].lstrip(".") for line in listing}
    assert set(DEB_FILES) <= files, sorted(set(DEB_FILES) - files)
    assert [f for f in files if re.fullmatch(rf"{SITE}/libmilter_ext/_milter\..*\.so", f)]
    assert [f for f in files if re.fullmatch(rf"{SITE}/spfmilter/_udp\..*\.so", f)]
    assert not [f for f in files if f.endswith(".c")], "C source in the binary package"
    with tempfile.TemporaryDirectory() as ctrl:
        run("dpkg-deb", "--control", deb, ctrl)
        assert (Path(ctrl) / "conffiles").read_text().split() == ["/etc/spfmilter.cfg"]
        postinst = (Path(ctrl) / "postinst").read_text()
        postrm = (Path(ctrl) / "postrm").read_text()
    assert "adduser --system --group" in postinst
    # the user exists before systemd-tmpfiles creates its directory
    assert postinst.index("adduser") < postinst.index("systemd-tmpfiles")
    assert "deluser --system" in postrm and '"$1" = "purge"' in postrm


# -- installed for real ---------------------------------------------------------


def installed() -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "spfmilter"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and "installed" in proc.stdout.split()


def account_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        try:
            grp.getgrnam(USER)
        except KeyError:
            return False
    return True


def purge() -> None:
    run("dpkg", "--purge", "spfmilter")


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """A machine without spfmilter installed; purged again afterwards, pass or fail."""
    if installed() or account_exists() or os.path.exists(RUN_DIR):
        pytest.fail("spfmilter is installed here (package, user or /run/spfmilter): "
                    "this test installs and purges it, so it runs only on a machine without")
    try:
        yield
    finally:
        if subprocess.run(["dpkg-query", "-W", "spfmilter"], capture_output=True).returncode == 0:
            purge()
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def unit_service() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    assert parser.read(UNIT), f"{UNIT} not installed"
    return parser["Service"]


def exec_start(service: configparser.SectionProxy, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd expands it: ${X} one word, $X split at spaces."""
    words: list[str] = []
    for word in shlex.split(service["ExecStart"]):
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def test_installed_package_runs_as_the_unit_would_and_purges_clean(
        deb: Path, clean_machine: None, dns_server) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb), env=env)
    assert installed()
    account = pwd.getpwnam(USER)
    assert grp.getgrgid(account.pw_gid).gr_name == DEFAULTS.milter.group
    assert account.pw_shell in ("/usr/sbin/nologin", "/bin/false"), account.pw_shell
    run_dir = os.stat(RUN_DIR)  # made by the tmpfiles entry in postinst
    assert (run_dir.st_uid, oct(run_dir.st_mode & 0o777)) == (account.pw_uid, "0o750")
    assert "/etc/spfmilter.cfg" in run("dpkg-query", "-W", "-f", "${Conffiles}",
                                       "spfmilter").stdout

    # The installed program (not the source tree's) checks the installed config.
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    assert run("/usr/bin/spfmilter", "--version", cwd=Path("/"), env=clean).stdout.strip() == \
        f"spfmilter {VERSION}"
    dumped = run("/usr/bin/spfmilter", "check-config", cwd=Path("/"), env=clean).stdout
    assert dumped == config.dump(DEFAULTS)

    # As the unit runs it: its ExecStart, its User= and Group=, with CONFIG and
    # OPTIONS as an admin sets them in the EnvironmentFile.
    service = unit_service()
    assert (service["User"], service["Group"]) == (USER, DEFAULTS.milter.group)
    with tempfile.TemporaryDirectory(prefix="spfdeb") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        cfg = work / "spfmilter.cfg"
        cfg.write_text(f"[spf]\nauthserv_id = mx.test.example\n"
                       f"nameservers = {dns_server.nameservers[0]}\nlookup_timeout = 2\n"
                       "[policy]\ninternal_hosts =\n")
        cfg.chmod(0o644)
        unit_env = dict(line.split("=", 1) for line in [service["Environment"]])
        unit_env.update(CONFIG=str(cfg), OPTIONS="--stderr")
        argv = exec_start(service, unit_env)
        assert argv[:3] == ["/usr/bin/spfmilter", "-c", str(cfg)] and "run" in argv
        as_user = ["setpriv", f"--reuid={service['User']}", f"--regid={service['Group']}",
                   "--init-groups", "--"]
        daemon = Daemon(as_user + argv, f"unix:{SOCKET_PATH}", work,
                        env={**clean, "PYTHONPATH": ""})
        with daemon:
            status = Path(f"/proc/{daemon.proc.pid}/status").read_text()  # type: ignore[union-attr]
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(account.pw_uid)] * 4
            assert os.stat(SOCKET_PATH).st_uid == account.pw_uid
            passed = session(daemon.spec, ip="127.0.0.2", helo="pass.spf.test",
                             sender="<user@pass.spf.test>", headers=(("Subject", "t"),),
                             body=b"hello\r\n", macros={"mail": {"i": "QDEB1"}})
            last = list(passed.values())[-1]
            assert last.action == "continue"
            [ar] = [m.value for m in last.modifications if m.name == "Authentication-Results"]
            assert ar.startswith("mx.test.example") and "spf=pass" in ar, ar
            failed = session(daemon.spec, ip="127.0.0.2", helo="pass.spf.test",
                             sender="<user@fail.spf.test>", macros={"mail": {"i": "QDEB2"}})
            assert list(failed.values())[-1].code == 550
            assert daemon.stop(signal.SIGTERM) == 0
        log = daemon.stderr()
        assert "qid=QDEB1" in log and "Traceback" not in log, log

    purge()
    assert not installed()
    assert not account_exists(), "purge left the spfmilter user or group"
    leftovers = [p for p in ("/etc/spfmilter.cfg", "/usr/bin/spfmilter", UNIT, RUN_DIR,
                             f"{SITE}/spfmilter", f"{SITE}/libmilter_ext",
                             "/usr/share/doc/spfmilter") if os.path.lexists(p)]
    assert not leftovers, leftovers
