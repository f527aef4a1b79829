"""The vllm tier fails, never skips, when vLLM is not installed: a pytest run of one of
its tests against a missing vLLM interpreter must exit non-zero and name the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_missing_vllm_fails_the_tier_and_names_the_fix(tmp_path: Path) -> None:
    env = {**os.environ, "CASE_TEST_VLLM_PYTHON": str(tmp_path / "no-vllm" / "python")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "vllm",
                           "tests/vllm/test_vllm_harness.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    assert "make vllm-deps" in out and "1 error" in out
    assert "skipped" not in out
