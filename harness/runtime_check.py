"""Before a run: the programs it will start must be installed in this interpreter.

A run needs the fixture's acceptance runner (the harness's acceptance worker) and, for the
reference agent, the
``openai`` SDK. Without them a run used to end ``fail`` with "0 failed, 0 errors of 0",
which reads like a broken Case rather than a missing package. ``run_problems`` names
what is missing and how to install it, so the run stops with a usage error before a run
directory exists and before Case starts.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec

FindSpec = Callable[[str], "ModuleSpec | None"]
_PYTHONS = ("python", "python3")
# Modules a Case command can run that need a package at run time:
# module -> ((what it needs, what installs it), ...). The reference agent's client is the
# openai SDK, and its run_tests tool runs the fixture's visible tests with pytest.
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "harness.reference_agent": (
        ("openai", "pip install 'case-local-route[agent]'"),
        ("pytest", "pip install pytest; it is a dependency of case-local-route, so reinstalling the package "
                   "brings it back"),
    ),
}


def python_module(argv: Sequence[str]) -> str | None:
    """``MODULE`` when ``argv`` is ``python -m MODULE ...`` (this interpreter), else None."""
    if len(argv) >= 3 and (argv[0] in _PYTHONS or argv[0] == sys.executable) and argv[1] == "-m":
        return argv[2]
    return None


def _installed(module: str, find_spec: FindSpec) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a malformed name
        return False


def run_problems(acceptance_argv: Sequence[str], case_argv: Sequence[str],
                 find_spec: FindSpec | None = None) -> list[str]:
    """What this interpreter lacks to run the acceptance tests and the Case command, one
    line each with its fix; empty when nothing is missing. Commands that are not
    ``python -m MODULE`` are external programs, not checked here."""
    find_spec = find_spec or importlib.util.find_spec
    problems: list[str] = []
    runner = python_module(acceptance_argv)
    if runner is not None and not _installed(runner, find_spec):
        fix = ("it is part of case-local-route: reinstall the package" if runner.startswith("harness.") else
               f"pip install {runner}; it is a dependency of case-local-route, so reinstalling the package "
               "brings it back")
        problems.append(
            f"the acceptance test runner '{runner}' is not installed for {sys.executable}: without it no "
            f"acceptance test can run and the run could only fail; install it ({fix})")
    agent = python_module(case_argv)
    for needed, fix in _NEEDS.get(agent or "", ()):
        if not _installed(needed, find_spec):
            problems.append(f"the Case command runs {agent}, which needs the '{needed}' package, not installed "
                            f"for {sys.executable}: {fix}")
    return problems
