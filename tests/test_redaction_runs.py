"""A whole run (scripted backend: a test fixture) with a hostile Case that sends the run
token as a padded ``model``: nothing the harness or the proxy writes keeps a 16-character
run of it."""

from __future__ import annotations

from pathlib import Path

import pytest

import harness.run as run_mod

from .harness_support import base_env, rogue_profile, run, write_artifacts

KNOWN_TOKEN = "run-token-for-redaction-0123456789abcdefABC"


def test_padded_model_token_reaches_no_file_of_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_mod, "new_run_token", lambda: KNOWN_TOKEN)
    arts = write_artifacts(tmp_path / "in")
    outcome = run(rogue_profile("padded-model"), base_env(arts), tmp_path / "runs")
    stdout = (outcome.run_dir / "case" / "stdout.log").read_text()
    assert "padded: refused 403" in stdout and "admitted: ok" in stdout  # the attack was made
    evidence = (outcome.run_dir / "proxy" / "evidence.jsonl").read_text()
    assert "[REDACTED]" in evidence
    runs = [KNOWN_TOKEN[i:i + 16] for i in range(len(KNOWN_TOKEN) - 15)]
    for path in outcome.run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert not [r for r in runs if r.encode() in data], path
