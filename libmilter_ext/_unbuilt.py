"""Stand-in for the C module ``_milter`` where it was not built or cannot load.

The MTA side (``libmilter_ext.testing``, ``libmilter_ext.protocol``) is pure
Python and drives any milter -- C, Go or Python -- over its socket, so it must
work on a machine without libmilter.  This module gives the package the
constants it defines at import time; everything that would talk to libmilter
(``register``, ``run``, ``main``, ``version``, ...) raises ImportError naming
the real cause.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Callable, NoReturn

from . import protocol as _P

#: Why the compiled module is missing (set by the package on fallback).
reason = "libmilter_ext._milter is not installed"

# libmilter's sfsistat values (mfapi.h); the wire constants come from protocol.py.
SMFIS_CONTINUE = 0
SMFIS_REJECT = 1
SMFIS_DISCARD = 2
SMFIS_ACCEPT = 3
SMFIS_TEMPFAIL = 4
SMFIS_NOREPLY = 7
SMFIS_SKIP = 8
SMFIS_ALL_OPTS = 10

globals().update({
    name: value for name, value in vars(_P).items()
    if name.startswith(("SMFIF_", "SMFIP_", "SMFIM_")) and isinstance(value, int)
})


class MilterError(Exception):
    """Base of the C module's errors (never raised here)."""


class StageError(MilterError):
    """An action outside the stage that allows it (never raised here)."""


class Context:
    """Placeholder: connections exist only with the compiled module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _unavailable("Context")


def explains(exc: ImportError, package: str) -> bool:
    """True if exc means the C module was not built or libmilter cannot be loaded.

    Other import errors (a refusal to load in a sub-interpreter, say) are real
    and must propagate.
    """
    if isinstance(exc, ModuleNotFoundError):
        return exc.name == f"{package}._milter"
    return "cannot open shared object file" in str(exc)


def stand_in(exc: ImportError, package: str) -> ModuleType:
    """Install this module as ``package._milter`` and return it."""
    global reason
    reason = str(exc)
    module = sys.modules[__name__]
    sys.modules[f"{package}._milter"] = module
    return module


def _unavailable(name: str) -> NoReturn:
    raise ImportError(
        f"libmilter_ext.{name} needs the compiled module libmilter_ext._milter ({reason}); "
        "install libmilter (Debian: libmilter-dev) and reinstall to serve a milter. "
        "libmilter_ext.testing and libmilter_ext.protocol work without it."
    )


def _stub(name: str) -> Callable[..., NoReturn]:
    def unavailable(*args: Any, **kwargs: Any) -> NoReturn:
        _unavailable(name)

    unavailable.__name__ = name
    return unavailable


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):
        raise AttributeError(name)
    return _stub(name)
