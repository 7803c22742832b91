"""Build the C part of libmilter_ext; all metadata lives in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "libmilter_ext._milter",
            sources=["libmilter_ext/_milter.c"],
            libraries=["milter"],
            extra_compile_args=["-pthread", "-Wall"],
            extra_link_args=["-pthread"],
        )
    ]
)
