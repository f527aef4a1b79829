"""The examples in config/ are what operators copy: they must validate as shipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.admission import evaluate_admission_gates, load_admission, load_decision
from proxy.settings import ConfigError, load_settings

CONFIG = Path(__file__).resolve().parent.parent / "config"


def test_decision_and_admission_examples_validate_and_pass_the_gates() -> None:
    decision = load_decision(CONFIG / "decision.example.json")
    admission = load_admission(CONFIG / "admission.example.json")
    assert evaluate_admission_gates(decision, admission) == []
    assert admission.model == "qwen3.6-35b-a3b"


def test_proxy_example_toml_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CONFIG.parent)
    env = {"CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:8000/v1", "CASE_PROXY_TOKEN": "t" * 32}
    settings = load_settings(env=env, config_file=CONFIG / "proxy.example.toml")
    assert settings.limits.max_body_bytes == 64 * 1024 * 1024
    assert settings.decision_file == Path("config/decision.example.json")


def test_proxy_example_toml_without_token_names_the_variable() -> None:
    env = {"CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:8000/v1"}
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, config_file=CONFIG / "proxy.example.toml")
    assert any("CASE_PROXY_TOKEN" in p for p in info.value.problems)
