"""Packaging QA: one version everywhere, the sdist, the RPM, the unit and MTA snippets.

The RPM is built for real with rpmbuild from the sdist, as a packager would
(``--nodeps``: Fedora's build dependencies are not Debian package names).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spfmilter import _version, cli, config

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spfmilter.spec"
ETC = ROOT / "etc"
VENV_BIN = Path(sys.executable).parent
VERSION = _version.__version__
DEFAULTS = config.loads("")
SOCKET_PATH = DEFAULTS.milter.socket.path
RUN_DIR = str(Path(SOCKET_PATH).parent)

# Files the binary package must carry (paths as rpm -qlp prints them).
RPM_FILES = [
    "/usr/bin/spfmilter",
    "/etc/spfmilter.cfg",
    "/etc/sysconfig/spfmilter",
    "/usr/lib/systemd/system/spfmilter.service",
    "/usr/lib/tmpfiles.d/spfmilter.conf",
    "/usr/share/man/man8/spfmilter.8",
    "/usr/share/man/man5/spfmilter.cfg.5",
    f"/usr/share/doc/spfmilter-{VERSION}/README",
    f"/usr/share/doc/spfmilter-{VERSION}/sample.py",
]
RPM_MODULES = [
    "spfmilter/__init__.py", "spfmilter/cli.py", "spfmilter/config.py", "spfmilter/daemon.py",
    "libmilter_ext/__init__.py", "libmilter_ext/_milter.pyi", "libmilter_ext/py.typed",
]


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def spec_tag(name: str) -> str:
    match = re.search(rf"^{name}:\s*(\S+)\s*$", SPEC.read_text(), re.MULTILINE)
    assert match, f"no {name}: tag in the spec"
    return match.group(1)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, built the setuptools way into a temp dir (nothing in the tree)."""
    out = tmp_path_factory.mktemp("sdist")
    run(sys.executable, "setup.py", "-q", "egg_info", "--egg-base", out,
        "sdist", "--dist-dir", out, cwd=ROOT)
    tarballs = list(out.glob("*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    return tarballs[0]


@pytest.fixture(scope="module")
def rpm(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The binary RPM built from the sdist with plain rpmbuild."""
    top = tmp_path_factory.mktemp("rpmbuild")
    (top / "SOURCES").mkdir()
    shutil.copy(sdist, top / "SOURCES")
    run("rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}", SPEC, cwd=top)
    rpms = list((top / "RPMS").glob("*/spfmilter-*.rpm"))
    assert len(rpms) == 1, rpms
    return rpms[0]


@pytest.fixture(scope="module")
def payload(rpm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RPM's files unpacked into a temp dir."""
    out = tmp_path_factory.mktemp("payload")
    work = out / rpm.name
    shutil.copy(rpm, work)
    run("rpm2archive", work)
    with tarfile.open(f"{work}.tgz") as archive:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17 / 3.11.4
            archive.extractall(out / "root", filter="data")
        else:
            archive.extractall(out / "root")
    return out / "root"


# -- one version --------------------------------------------------------------


def test_version_is_the_same_everywhere() -> None:
    setup_version = run(sys.executable, "setup.py", "--version", cwd=ROOT).stdout.split()[-1]
    cli_version = run(VENV_BIN / "spfmilter", "--version").stdout.strip()
    deb_version = run("dpkg-parsechangelog", "-S", "Version", cwd=ROOT).stdout.strip()
    assert spec_tag("Version") == VERSION
    assert setup_version == VERSION
    assert cli_version == f"spfmilter {VERSION}"
    assert deb_version == VERSION  # debian/changelog (a native package: no revision)


def test_spec_changelog_matches_version_and_release() -> None:
    release = spec_tag("Release").replace("%{?dist}", "")
    entry = re.search(r"^%changelog\n\* .* - (\S+)$", SPEC.read_text(), re.MULTILINE)
    assert entry, "no %changelog entry"
    assert entry.group(1) == f"{VERSION}-{release}"


# -- sdist --------------------------------------------------------------------


def test_sdist_carries_what_the_spec_and_the_tests_need(sdist: Path) -> None:
    prefix = f"spfmilter-{VERSION}/"
    assert sdist.name == f"spfmilter-{VERSION}.tar.gz"
    with tarfile.open(sdist) as archive:
        names = {name[len(prefix):] for name in archive.getnames() if name.startswith(prefix)}
    tracked = run("git", "ls-files", "etc", "man", "examples", "bench", "tests",
                  cwd=ROOT).stdout.split()
    expected = {"README", "spfmilter.spec", "pyproject.toml", "setup.py",
                "libmilter_ext/_milter.c", "libmilter_ext/_milter.pyi",
                "libmilter_ext/py.typed", "spfmilter/_version.py", "spfmilter/_udp.c", *tracked}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]


# -- RPM ----------------------------------------------------------------------


def test_rpmlint_finds_no_errors_in_the_spec() -> None:
    proc = subprocess.run(["rpmlint", str(SPEC)], capture_output=True, text=True)
    errors = [line for line in proc.stdout.splitlines() if ": E: " in line]
    assert not errors, proc.stdout
    assert "1 specfiles checked" in proc.stdout, proc.stdout + proc.stderr


def test_rpm_has_the_files_an_admin_expects(rpm: Path) -> None:
    files = set(run("rpm", "-qlp", rpm).stdout.split())
    assert set(RPM_FILES) <= files, sorted(set(RPM_FILES) - files)
    sitearch = {f.split("/libmilter_ext/")[0] for f in files if "/libmilter_ext/" in f}
    assert len(sitearch) == 1, sitearch
    site = sitearch.pop()
    assert {f"{site}/{m}" for m in RPM_MODULES} <= files
    assert [f for f in files if re.fullmatch(rf"{site}/libmilter_ext/_milter\..*\.so", f)]
    assert [f for f in files if re.fullmatch(rf"{site}/spfmilter/_udp\..*\.so", f)]
    assert not [f for f in files if f.endswith(".c")], "C source in the binary package"
    assert set(run("rpm", "-qcp", rpm).stdout.split()) == {"/etc/spfmilter.cfg",
                                                          "/etc/sysconfig/spfmilter"}
    assert {"/usr/share/man/man8/spfmilter.8", "/usr/share/man/man5/spfmilter.cfg.5"} <= set(
        run("rpm", "-qdp", rpm).stdout.split())


def test_rpm_metadata_and_scriptlets(rpm: Path) -> None:
    info = run("rpm", "-qp", "--queryformat", "%{NAME} %{VERSION} %{ARCH}", rpm).stdout
    name, version, arch = info.split()
    assert (name, version) == ("spfmilter", VERSION)
    assert arch != "noarch"  # it carries a compiled extension
    requires = set(run("rpm", "-qp", "--requires", rpm).stdout.splitlines())
    # The lowest versions pyproject allows, under Fedora/EPEL's names.
    floors = dict(re.findall(r'"([\w.-]+)>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()))
    assert {"python3-pyspf >= " + floors["pyspf"], "python3-authres >= " + floors["authres"],
            "python3-dns >= " + floors["dnspython"]} <= requires
    scripts = run("rpm", "-qp", "--scripts", rpm).stdout
    pre = scripts.split("preinstall scriptlet")[1].split("scriptlet")[0]
    assert "groupadd -r spfmilter" in pre and "useradd -r" in pre
    assert "systemctl" in scripts and "spfmilter.service" in scripts
    assert "try-restart spfmilter.service" in scripts
    assert "systemd-tmpfiles --create" in scripts
    assert "%systemd" not in scripts and "%tmpfiles" not in scripts  # all macros expanded


def test_rpm_payload_runs(payload: Path) -> None:
    """The packaged modules (with the packaged .so) run the packaged config."""
    [site] = {p.parent.parent for p in payload.glob("usr/lib*/**/libmilter_ext/__init__.py")}
    script = (payload / "usr/bin/spfmilter").read_text()
    assert script.startswith("#!/usr/bin/python3")
    # The venv's interpreter: it has the dependencies; the .so is for the same CPython.
    env_cmd = [sys.executable, "-c",
               "import sys; sys.path.insert(0, sys.argv.pop(1)); "
               "import libmilter_ext, spfmilter.cli; "
               "assert libmilter_ext.__file__.startswith(sys.path[0]), libmilter_ext.__file__; "
               "sys.argv[0] = 'spfmilter'; sys.exit(spfmilter.cli.main())",
               str(site)]
    assert run(*env_cmd, "--version", cwd=payload).stdout.strip() == f"spfmilter {VERSION}"
    dumped = run(*env_cmd, "-c", payload / "etc/spfmilter.cfg", "check-config",
                 cwd=payload).stdout
    assert dumped == config.dump(DEFAULTS)


# -- systemd, tmpfiles, sysconfig -------------------------------------------------


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ETC / "spfmilter.service")
    return parser


def test_unit_runs_the_daemon_the_way_the_config_expects() -> None:
    service = unit()["Service"]
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
    assert service["ExecStart"] == "/usr/bin/spfmilter -c ${CONFIG} run $OPTIONS"
    assert service["Environment"] == f"CONFIG={cli.DEFAULT_CONFIG}"
    assert service["EnvironmentFile"] == "-/etc/sysconfig/spfmilter"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    # It starts as the configured user, in the directory of the default socket
    # and PID file, which the hardening leaves writable.
    assert (service["User"], service["Group"]) == (DEFAULTS.milter.user, DEFAULTS.milter.group)
    assert "/run/" + service["RuntimeDirectory"] == RUN_DIR
    assert str(Path(DEFAULTS.milter.pidfile).parent) == RUN_DIR
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"] == RUN_DIR
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""  # no root, so no capability is needed


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at the venv's script.
    text = (ETC / "spfmilter.service").read_text()
    text = text.replace("/usr/bin/spfmilter", str(VENV_BIN / "spfmilter"))
    (tmp_path / "spfmilter.service").write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "spfmilter.service")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a typo in a setting is reported.
    text = (ETC / "spfmilter.service").read_text().replace("Restart=on-failure",
                                                          "Restart=on-falure")
    text = text.replace("/usr/bin/spfmilter", str(VENV_BIN / "spfmilter"))
    (tmp_path / "spfmilter.service").write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "spfmilter.service")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert "on-falure" in proc.stderr


def test_tmpfiles_creates_the_default_run_directory() -> None:
    lines = [line.split() for line in (ETC / "spfmilter.tmpfiles").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == [["d", RUN_DIR, "0750", DEFAULTS.milter.user, DEFAULTS.milter.group, "-"]]


def test_sysconfig_is_valid_shell_that_sets_nothing_by_default(tmp_path: Path) -> None:
    out = run("sh", "-c", 'set -eu; . "$1"; echo "CONFIG=${CONFIG:-unset}"', "sh",
              ETC / "spfmilter.sysconfig").stdout
    assert out.strip() == "CONFIG=unset"
    names = set(re.findall(r"^#?([A-Z_]+)=", (ETC / "spfmilter.sysconfig").read_text(),
                           re.MULTILINE))
    init = (ETC / "spfmilter.init").read_text()
    assert names == {"CONFIG", "OPTIONS", "SPFMILTER", "PIDFILE", "START_TIMEOUT",
                     "STOP_TIMEOUT"}
    assert all(f"{name}=${{{name}:-" in init for name in names - {"PIDFILE"})


# -- MTA snippets -----------------------------------------------------------------

SENDMAIL_CF = Path("/usr/share/sendmail/cf/m4/cf.m4")


def test_sendmail_snippet_builds_a_cf_with_the_milter(tmp_path: Path) -> None:
    assert shutil.which("m4") and SENDMAIL_CF.exists(), "scripts/setup installs m4, sendmail-cf"
    mc = tmp_path / "test.mc"
    mc.write_text(f"include(`{SENDMAIL_CF}')dnl\nOSTYPE(`linux')dnl\n"
                  + (ETC / "sendmail.mc.snippet").read_text()
                  + "MAILER(`local')dnl\nMAILER(`smtp')dnl\n")
    cf = run("m4", mc, cwd=tmp_path).stdout
    [xline] = [line for line in cf.splitlines() if line.startswith("Xspfmilter,")]
    assert f"S=local:{SOCKET_PATH}," in xline
    assert "O InputMailFilters=spfmilter" in cf.splitlines()
    envfrom = next(line for line in cf.splitlines() if line.startswith("O Milter.macros.envfrom="))
    macros = {m.strip() for m in envfrom.split("=", 1)[1].split(",")}
    assert {"i", "{auth_authen}"} <= macros
    # The read timeout must outlast one SPF check.
    match = re.search(r"T=([^,]+)", xline)
    assert match, xline
    timeouts = dict(item.split(":") for item in match.group(1).split(";"))
    read = timeouts["R"]
    seconds = int(read[:-1]) * (60 if read.endswith("m") else 1)
    assert seconds > 2 * DEFAULTS.spf.lookup_timeout
    assert "F=T" in xline and DEFAULTS.milter.name == "spfmilter"


def test_postfix_snippet_points_at_the_default_socket() -> None:
    settings = dict(re.findall(r"^(\w+) = ?(.*)$", (ETC / "postfix-main.cf.snippet").read_text(),
                               re.MULTILINE))
    assert settings["smtpd_milters"] == f"unix:{SOCKET_PATH}"
    assert settings["milter_default_action"] == "tempfail"
    assert settings["milter_protocol"] == "6"
    assert settings["non_smtpd_milters"] == ""
    text = (ETC / "postfix-main.cf.snippet").read_text()
    assert "usermod -a -G spfmilter postfix" in text
    assert "smtpd_milters = unix:/spfmilter/spfmilter.sock" in text  # the chroot case
