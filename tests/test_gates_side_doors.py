"""The configuration side doors: each gate against a hostile configuration (a profile,
environment, admission or backend listing that would hand Case another route), and the
honest configurations that must still pass. Pure: no socket, no subprocess."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import harness.run as run_mod
from harness.demo import NEGATIVE_CASES
from harness.gates import GateInputs, credential_files_in_reach, evaluate_gates, read_gate_inputs
from harness.profile import ConfigTemplate, RunProfile
from harness.provider_families import (
    PROVIDER_FAMILIES,
    ROUTE_VARIABLES,
    external_model_family,
    home_credential_files,
    provider_family_of,
)
from proxy.admission import Admission, DecisionRecord
from proxy.settings import ENV_ADMISSION_FILE, ENV_API_KEY, ENV_BASE_URL, ENV_DECISION_FILE

from .harness_support import ADMISSION, DECISION, reference_profile

ENV = {ENV_DECISION_FILE: "/d.json", ENV_ADMISSION_FILE: "/a.json", ENV_BASE_URL: "http://127.0.0.1:8000/v1"}
ADMITTED = ADMISSION["model"]
BACKEND_KEY = "backend-key-value-0123456789"


def _inputs(profile: RunProfile | None = None, env: dict[str, str] | None = None, **changes: Any) -> GateInputs:
    base: dict[str, Any] = dict(profile=profile or reference_profile(), env={**ENV, **(env or {})},
                                decision=DecisionRecord.model_validate(DECISION),
                                admission=Admission.model_validate(ADMISSION), backend_models=(ADMITTED,))
    base.update(changes)
    return GateInputs(**base)


def _failures(inputs: GateInputs) -> list[tuple[str, str]]:
    return [(f.code, f.message) for f in evaluate_gates(inputs).failures]


def _codes(inputs: GateInputs) -> set[str]:
    return {code for code, _ in _failures(inputs)}


def _template(content: str) -> ConfigTemplate:
    return ConfigTemplate(file="agent.toml", content=content)


# ----------------------------------------------------------------- honest configurations


def test_honest_profiles_pass() -> None:
    """The reference profile, an OpenAI-compatible CLI told the admitted model in LiteLLM's
    spelling, and a Codex-style config template with only placeholders: no gate fires."""
    honest = [
        reference_profile(),
        reference_profile(command=["aider", "--model", f"openai/{ADMITTED}", "--no-auto-commits",
                                   "--message-file", "{task_file}"]),
        reference_profile(command=["codex", "exec", "--provider", "openai", "-c", f"model={ADMITTED}"]),
        reference_profile(env_allow=["PATH", "HOME", "LANG", "OPENAI_BASE_URL", "OPENAI_API_KEY"],
                          config_template=_template(
                              'model = "{model}"\nmodel_provider = "local"\n'
                              '[model_providers.local]\nname = "local"\nbase_url = "{base_url}"\n'
                              'env_key = "OPENAI_API_KEY"\nwire_api = "chat"\n')),
        # mini-swe-agent's YAML: a `model:` block header, the admitted model nested under it.
        reference_profile(config_template=_template(
            'model:\n  model_class: litellm_textbased\n  model_name: "{model}"\n'
            '  model_kwargs:\n    custom_llm_provider: openai\n    api_base: "{base_url}"\n')),
    ]
    for profile in honest:
        assert _failures(_inputs(profile)) == [], profile.case.command
    # Unrelated variables of the operator's shell that share a provider's prefix are not
    # credentials (this machine has AWS_CA_BUNDLE set).
    assert _failures(_inputs(env={"AWS_CA_BUNDLE": "/etc/ssl/ca.pem", "AWS_REGION": "eu-west-1"})) == []


def test_route_variables_are_the_ones_the_harness_sets_for_case() -> None:
    """The endpoint and env_allow gates let ROUTE_VARIABLES through because the harness
    overwrites them; that holds only while the list and case_environment agree."""
    env = {name: "operator-value" for name in ROUTE_VARIABLES}
    out = run_mod.case_environment(env, list(ROUTE_VARIABLES), "http://127.0.0.1:5/v1", "tok", ADMITTED)
    assert set(out) == set(ROUTE_VARIABLES)
    assert "operator-value" not in out.values()


# ----------------------------------------------------------------- env_allow


@pytest.mark.parametrize("name", ["CTO_HARNESS_CASE_LOCAL_API_KEY", "CTO_HARNESS_CASE_LOCAL_BASE_URL",
                                  "CASE_PROXY_TOKEN", "CASE_PROXY_CONFIG", "CASE_HARNESS_EXTRA_SECRETS_FILE",
                                  "cto_harness_case_decision_file"])
def test_env_allow_naming_the_harness_or_proxy_configuration_blocks(name: str) -> None:
    failures = _failures(_inputs(reference_profile(env_allow=["PATH", name])))
    assert [code for code, _ in failures] == ["env_allow_harness_variable"]
    assert name in failures[0][1]


def test_env_allow_passing_a_secret_value_under_another_name_blocks() -> None:
    """A hostile profile copies the backend key into an innocent-looking variable."""
    secrets = (BACKEND_KEY, "run-token-value-0123456789abcdef")
    env = {ENV_API_KEY: BACKEND_KEY, "TOOL_SETTING": BACKEND_KEY, "TOOL_URL": f"x={BACKEND_KEY};y",
           "TOOL_TOKEN": "run-token-value-0123456789abcdef", "EDITOR": "vi"}
    profile = reference_profile(env_allow=["PATH", "TOOL_SETTING", "TOOL_URL", "TOOL_TOKEN", "EDITOR"])
    failures = _failures(_inputs(profile, env, secrets=secrets))
    assert [c for c, _ in failures] == ["env_allow_secret_value"] * 3
    assert {m.split()[4].rstrip(",") for _, m in failures} == {"TOOL_SETTING", "TOOL_URL", "TOOL_TOKEN"}
    assert not any(BACKEND_KEY in m or "run-token-value" in m for _, m in failures)
    # The same names with harmless values pass.
    assert _codes(_inputs(profile, {"TOOL_SETTING": "a", "TOOL_URL": "b", "TOOL_TOKEN": "c"}, secrets=secrets)) == set()


# ----------------------------------------------------------------- endpoints


@pytest.mark.parametrize("name", ["MY_LLM_BASE_URL", "TOOL_API_BASE", "DOCKER_HOST", "SEARCH_ENDPOINT",
                                  "SERVICE_ENDPOINT_URL", "TOOL_API_URL"])
def test_endpoint_variables_in_env_allow_block(name: str) -> None:
    failures = _failures(_inputs(reference_profile(env_allow=["PATH", name])))
    assert [c for c, _ in failures] == ["endpoint_variable_to_case"] and name in failures[0][1]


@pytest.mark.parametrize("where", ["command", "config_template"])
def test_a_literal_endpoint_in_the_profile_blocks(where: str) -> None:
    """The backend's own loopback URL written into the profile would let Case skip the proxy."""
    url = "http://127.0.0.1:8000/v1"
    profile = (reference_profile(command=["agent", "--api-base", url]) if where == "command"
               else reference_profile(config_template=_template(f'base_url = "{url}"\n')))
    failures = _failures(_inputs(profile))
    assert [c for c, _ in failures] == ["endpoint_in_profile"] and where in failures[0][1]
    assert url not in failures[0][1]


# ----------------------------------------------------------------- provider credentials

HOSTILE_PROVIDER_VARS = [
    "ANTHROPIC_API_KEY", "CLAUDE_CODE_USE_BEDROCK", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
    "AWS_BEARER_TOKEN_BEDROCK", "GOOGLE_APPLICATION_CREDENTIALS", "GEMINI_API_KEY", "VERTEXAI_PROJECT",
    "AZURE_OPENAI_API_KEY", "AZURE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENROUTER_API_KEY",
    "LITELLM_MASTER_KEY", "PORTKEY_API_KEY", "OLLAMA_HOST", "GROQ_API_KEY", "XAI_API_KEY", "MISTRAL_API_KEY",
    "TOGETHER_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_ORG_ID",
]


@pytest.mark.parametrize("name", HOSTILE_PROVIDER_VARS)
def test_provider_variable_passed_to_case_blocks_even_in_a_sandbox(name: str) -> None:
    for isolated in (False, True):
        failures = _failures(_inputs(reference_profile(env_allow=["PATH", name]), case_isolated=isolated))
        assert [c for c, _ in failures] == ["external_fallback_configured"], (name, isolated)
        assert name in failures[0][1]


@pytest.mark.parametrize("name", [*HOSTILE_PROVIDER_VARS, "OPENAI_API_KEY"])
def test_provider_variable_in_the_operator_shell_blocks_only_without_a_sandbox(name: str) -> None:
    """The decision (docs/gates.md): Case can read the harness's environment only when it
    runs unsandboxed (same uid, /proc/<ppid>/environ); then a key there is in its reach."""
    env = {name: "value-not-a-real-key-000000"}
    failures = _failures(_inputs(env=env, case_isolated=False))
    assert [c for c, _ in failures] == ["external_fallback_configured"] and name in failures[0][1]
    assert "value-not-a-real-key" not in failures[0][1]
    assert _failures(_inputs(env=env, case_isolated=True)) == []
    assert _failures(_inputs(env={name: ""}, case_isolated=False)) == []  # empty configures nothing


def test_operator_openai_base_url_blocks_when_external_only() -> None:
    assert _codes(_inputs(env={"OPENAI_BASE_URL": "https://api.openai.com/v1"})) == {"external_fallback_configured"}
    assert _codes(_inputs(env={"OPENAI_API_BASE": "https://llm.example.com/v1"})) == {"external_fallback_configured"}
    assert _codes(_inputs(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})) == set()


def test_every_provider_family_has_variables_that_block() -> None:
    """The data module drives the gate: one variable of each family, passed to Case."""
    for family in PROVIDER_FAMILIES:
        names = [*family.env_names, *(p + "API_KEY" for p in family.env_prefixes)]
        assert names, family.name
        for name in names:
            assert provider_family_of(name) == family.name, name
            assert "external_fallback_configured" in _codes(
                _inputs(reference_profile(env_allow=["PATH", name]))), (family.name, name)


# ----------------------------------------------------------------- credential files


@pytest.mark.parametrize("family,rel", home_credential_files())
def test_credential_files_in_the_operator_home_block_without_a_sandbox(tmp_path: Path, family: str, rel: str) -> None:
    home = tmp_path / "home"
    (home / rel).parent.mkdir(parents=True, exist_ok=True)
    (home / rel).write_text("not a real credential\n")
    env = {"HOME": str(home)}
    found = credential_files_in_reach(env, case_isolated=False)
    assert (family, str(home / rel)) in found
    failures = _failures(_inputs(env=env, credential_files=found))
    assert {c for c, _ in failures} == {"external_credential_file"}
    assert any(str(home / rel) in m for _, m in failures)
    # In a sandbox with a fresh HOME the operator's file is out of Case's reach ...
    assert credential_files_in_reach(env, case_isolated=True) == ()
    # ... unless the profile exposes it: the home directory itself or the file's folder.
    for exposed in (home, (home / rel).parent):
        assert (family, str(home / rel)) in credential_files_in_reach(env, case_isolated=True, exposed=[exposed])


def test_a_home_seed_carrying_credentials_blocks(tmp_path: Path) -> None:
    """A hostile profile's home seed (copied into Case's fresh HOME) brings gcloud ADC along."""
    seed = tmp_path / "seed"
    adc = seed / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    found = credential_files_in_reach({"HOME": str(tmp_path / "nohome")}, case_isolated=True, exposed=[seed])
    assert found == (("google-vertex", str(adc)),)
    assert _codes(_inputs(case_isolated=True, credential_files=found)) == {"external_credential_file"}
    assert credential_files_in_reach({"HOME": str(tmp_path / "nohome")}, case_isolated=True,
                                     exposed=[tmp_path / "empty"]) == ()


# ----------------------------------------------------------------- models


@pytest.mark.parametrize("profile", [
    reference_profile(command=["agent", "--model", "gpt-4o"]),
    reference_profile(command=["agent", "--weak-model=claude-3-5-haiku"]),
    reference_profile(command=["codex", "exec", "-c", 'model="o3"']),
    reference_profile(command=["agent", "--model", f"openrouter/qwen/{ADMITTED}"]),
    reference_profile(command=["agent", "--model", "llama-3-8b"]),
    reference_profile(command=["agent", "--planner", "gemini-2.5-pro"]),
    reference_profile(config_template=_template('model = "gemini-2.5-pro"\n')),
    reference_profile(config_template=_template('{"model": "{model}", "editor_model": "grok-4"}')),
    reference_profile(config_template=_template("fallback_model: bedrock/amazon.nova-pro-v1\n")),
    reference_profile(fallback_models=["llama-3-8b"]),
    reference_profile(fallback_models=["deepseek-chat"]),
    # A YAML block header is not a value, but what is nested under it, or a scalar on the
    # next line, is still judged (mini-swe-agent's config has a `model:` block).
    reference_profile(config_template=_template("model:\n  model_class: litellm\n  model_name: llama-3-8b\n")),
    reference_profile(config_template=_template("model:\n  llama-3-8b\n")),
    reference_profile(config_template=_template('model:\n  "llama-3-8b:"\n')),
], ids=["gpt-4o", "weak-model claude", "codex -c o3", "openrouter route", "other local model", "gemini word",
        "template gemini", "template grok", "template bedrock", "fallback other", "fallback deepseek",
        "yaml nested model_name", "yaml scalar on next line", "yaml quoted colon"])
def test_a_model_other_than_the_admitted_one_blocks(profile: RunProfile) -> None:
    failures = _failures(_inputs(profile))
    assert [c for c, _ in failures] == ["unadmitted_model_configured"], failures  # once, not per spelling


def test_model_names_by_family() -> None:
    expect = {"claude-sonnet-4-6": "anthropic", "gpt-5-codex": "openai", "openai/gpt-4o": "openai",
              "o3-mini": "openai", "gemini-2.5-pro": "google-vertex", "bedrock/anthropic.claude-v2": "aws-bedrock",
              "azure/my-deployment": "azure-openai", "grok-4": "xai", "openrouter/qwen/qwen3": "openrouter",
              "mistral-large-latest": "mistral", "сlaude-3-opus": "anthropic"}
    for name, family in expect.items():
        assert external_model_family(name) == family, name
    for local in (ADMITTED, f"openai/{ADMITTED}", "gpt-oss-20b", "google/gemma-3-27b", "llama-3-8b", "codex",
                  "openai", "/usr/lib/node_modules/@openai/codex/bin/codex.js", "OPENAI_API_KEY", "qwen3:8b"):
        assert external_model_family(local) is None, local


# ----------------------------------------------------------------- backend and admission


def test_a_backend_listing_an_external_model_beside_the_admitted_one_blocks() -> None:
    """A LiteLLM-style router that also serves claude would look like a local backend."""
    failures = _failures(_inputs(backend_models=(ADMITTED, "claude-sonnet-4-6", "gpt-4o")))
    assert [c for c, _ in failures] == ["backend_serves_external_model"] * 2
    assert "claude-sonnet-4-6" in failures[0][1] and "gpt-4o" in failures[1][1]
    # Other local models beside the admitted one are no external route.
    assert _failures(_inputs(backend_models=(ADMITTED, "gpt-oss-20b", "llama-3-8b"))) == []


@pytest.mark.parametrize("alias", ["claude-sonnet-4-6", "gpt-4o", "gemini-2.5-flash", f"openrouter/{ADMITTED}"])
def test_an_admission_alias_of_an_external_family_blocks(alias: str) -> None:
    """With it, a request for claude-sonnet-4-6 would be admitted (rewritten) and the report
    could not say 'no claude-sonnet-4-6'."""
    admission = Admission.model_validate({**ADMISSION, "aliases": [alias]})
    failures = _failures(_inputs(admission=admission))
    assert [c for c, _ in failures] == ["admission_alias_external"] and alias in failures[0][1]
    honest = Admission.model_validate({**ADMISSION, "aliases": ["qwen3.6", "local-coder"]})
    assert _failures(_inputs(admission=honest)) == []


def test_the_demo_shows_every_gate_of_this_module() -> None:
    """`make demo` runs one hostile configuration per side-door gate."""
    shown = {case.expected_code for case in NEGATIVE_CASES}
    assert {"env_allow_harness_variable", "env_allow_secret_value", "endpoint_variable_to_case", "endpoint_in_profile",
            "external_fallback_configured", "external_credential_file", "unadmitted_model_configured",
            "backend_serves_external_model", "admission_alias_external"} <= shown


# ----------------------------------------------------------------- the doc and the code agree


def test_malformed_artifacts_and_a_foreign_work_item_block(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    env = {**ENV, ENV_DECISION_FILE: str(bad), ENV_ADMISSION_FILE: str(bad)}
    inputs = read_gate_inputs(env, reference_profile(), lambda url, key: None)  # type: ignore[arg-type,return-value]
    assert {"decision_record_invalid", "admission_invalid"} <= _codes(inputs)
    foreign = Admission.model_validate({**ADMISSION, "work_item": "CTO-WORK-999"})
    assert {"work_item_mismatch", "admission_mismatch"} == _codes(_inputs(admission=foreign))


def _emitted_codes() -> set[str]:
    root = Path(__file__).resolve().parents[1]
    gates = (root / "harness" / "gates.py").read_text()
    admission = (root / "proxy" / "admission.py").read_text()
    codes = set(re.findall(r'_fail\(\s*"([a-z_]+)"', gates))
    codes |= set(re.findall(r'code="([a-z_]+)"', admission))
    codes |= set(re.findall(r'ArtifactError\("([a-z_]+)"', admission))
    codes |= {"decision_record_missing", "admission_missing"}  # load_* missing_code, and its _invalid twin
    return codes


def test_docs_gates_table_lists_every_code_and_names_real_tests() -> None:
    """docs/gates.md is the operator's table of causes and fixes: it must list exactly the
    codes the preflight can emit, and every test it cites must exist."""
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "gates.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    table = {re.match(r"\| `([a-z_]+)`", line)[1] for line in rows}  # type: ignore[index]
    assert table == _emitted_codes()
    tests = "".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    for line in rows:
        for name in re.findall(r"`(test_[a-z0-9_]+)`", line):
            assert f"def {name}(" in tests, name
    # The decision, as the code implements it, is stated and pinned by its tests.
    assert "**It blocks exactly when Case could read it.**" in doc
    assert "test_provider_variable_in_the_operator_shell_blocks_only_without_a_sandbox" in doc


def test_gate_messages_never_carry_a_secret_pasted_into_the_profile() -> None:
    """A hostile template puts the backend key and an Anthropic-shaped key where a model
    name goes; the gate quotes the value, redacted."""
    shaped = "sk-ant-api03-" + "A" * 40
    profile = reference_profile(config_template=_template(f'model = "{BACKEND_KEY}"\nweak_model = "{shaped}"\n'))
    failures = _failures(_inputs(profile, secrets=(BACKEND_KEY,)))
    assert [c for c, _ in failures] == ["unadmitted_model_configured"]  # both, redacted alike: one message
    text = " ".join(m for _, m in failures)
    assert BACKEND_KEY not in text and shaped not in text


def test_a_symlink_to_the_operator_credentials_exposes_them(tmp_path: Path) -> None:
    """A hostile profile exposes an innocent-looking path that links to ~/.aws."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("not a real credential\n")
    (tmp_path / "tools").symlink_to(home / ".aws")
    found = credential_files_in_reach({"HOME": str(home)}, case_isolated=True, exposed=[tmp_path / "tools"])
    assert found == (("aws-bedrock", str(home / ".aws" / "credentials")),)
