"""What build is running: the installed distribution's version, for ``--version`` and the
``case_proxy_build_info`` metric, so an operator can tell which release a host runs
without reading its files."""

from __future__ import annotations

import platform
from importlib import metadata

DISTRIBUTION = "case-local-route"
# Code imported from a source tree that was never installed has no metadata to read.
UNKNOWN_VERSION = "0+unknown"


def version() -> str:
    """The installed version of ``case-local-route``, or ``0+unknown`` when not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def build_labels() -> dict[str, str]:
    """Label values of ``case_proxy_build_info`` (few and fixed per process)."""
    return {"version": version(), "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation()}


def version_line(prog: str) -> str:
    """What ``--version`` prints: the program, the version, the interpreter."""
    labels = build_labels()
    return f"{prog} {labels['version']} ({labels['python_implementation']} {labels['python_version']})"
