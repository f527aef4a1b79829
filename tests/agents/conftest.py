"""The `agents` tier: unmodified third-party agent CLIs from PyPI as Case, in the sandbox,
through the proxy, against the scripted backend (a TEST FIXTURE: no GPU here).

`make agents-deps` (scripts/install-agents.sh) installs each agent into its own virtualenv
under .cache/agents/ and renders its run profile (config/agents/<name>.toml) with this
checkout's paths to .cache/agents/<name>.toml. Nothing here skips: a missing install fails
the test and names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.profile import ProfileError, RunProfile, load_run_profile

ROOT = Path(__file__).resolve().parents[2]
AGENTS_DIR = Path(os.environ.get("CASE_TEST_AGENTS_DIR", ROOT / ".cache" / "agents"))
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.agents)


def agent_profile(name: str) -> RunProfile:
    """The rendered profile of an installed agent; fails (never skips) when it is missing."""
    path = AGENTS_DIR / f"{name}.toml"
    if not path.is_file():
        pytest.fail(f"{name} is not installed ({path} is missing): run `make agents-deps`", pytrace=False)
    try:
        return load_run_profile(path)
    except ProfileError as exc:
        pytest.fail(f"{path}: {exc}; re-run `make agents-deps`", pytrace=False)
