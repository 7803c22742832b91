"""The tree stays ruff clean (the config lives in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README").read_text()
    commands = [line.strip() for line in readme.splitlines()
                if line.startswith("    scripts/setup && ")]
    assert len(commands) == 2, commands  # run, and test
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
    assert ci[-1].strip() == test_command  # the suite's result is CI's result
