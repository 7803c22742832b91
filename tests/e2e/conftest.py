"""Fixtures of the end-to-end tests: one private work directory, logs on failure."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mta import make_workdir


@pytest.fixture(scope="session")
def e2e_dir() -> Iterator[Path]:
    """A fresh directory under /run for every server of the e2e run; removed at the end."""
    path = make_workdir("spfmilter-e2e-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the MTA's and spfmilter's logs to a failing e2e test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        for name in ("mta", "milter"):
            server = funcargs.get(name)
            if server is not None:
                report.sections.append((f"{name} log", server.log()))
