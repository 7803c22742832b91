"""Build the C parts; all metadata lives in pyproject.toml.

libmilter_ext._milter: where libmilter's headers are missing the package
installs without it: libmilter_ext.testing (the MTA side) then still drives
any milter.  Where they are present, a failed build is an error, never
silently skipped.  spfmilter._udp (a DNS query's send and wait, one GIL
release) needs only libc and is built where _milter is; without it
spfmilter.dnsclient uses the socket module's calls.
"""
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

_INCLUDE_DIRS = ("/usr/include", "/usr/local/include", sysconfig.get_paths()["include"])
HAVE_LIBMILTER = any(Path(d, "libmilter", "mfapi.h").exists() for d in _INCLUDE_DIRS)

setup(
    ext_modules=[
        Extension(
            "libmilter_ext._milter",
            sources=["libmilter_ext/_milter.c"],
            libraries=["milter"],
            extra_compile_args=["-pthread", "-Wall"],
            extra_link_args=["-pthread"],
            optional=not HAVE_LIBMILTER,
        ),
        Extension(
            "spfmilter._udp",
            sources=["spfmilter/_udp.c"],
            extra_compile_args=["-Wall"],
            optional=not HAVE_LIBMILTER,
        ),
    ]
)
