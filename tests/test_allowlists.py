"""The allow-lists of what may reach the engine (proxy.allowlists), as pure functions,
plus their TOML extension. The end-to-end proofs are in test_request_fields.py."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params

from proxy.allowlists import (
    CLIENT_EXTRAS,
    ENGINE_EXTRAS,
    OPENAI_FIELDS,
    check_fields,
    forwardable_request_headers,
    is_steering,
    parse_extra_fields,
)
from proxy.request_policy import Endpoint
from proxy.settings import ConfigError, load_settings

SDK_PARAMS = {
    Endpoint.CHAT: chat_params.CompletionCreateParamsBase,
    Endpoint.COMPLETIONS: completion_create_params.CompletionCreateParamsBase,
    Endpoint.RESPONSES: response_create_params.ResponseCreateParamsBase,
    Endpoint.EMBEDDINGS: embedding_create_params.EmbeddingCreateParams,
}


@pytest.mark.parametrize("endpoint", list(SDK_PARAMS))
def test_openai_fields_are_the_sdk_schema(endpoint: Endpoint) -> None:
    """The lists are written out (so a review sees them) and must equal the official SDK's
    request types: a new SDK field shows up here, not as a refused request."""
    sdk = set(typing.get_type_hints(SDK_PARAMS[endpoint]))
    if endpoint is not Endpoint.EMBEDDINGS:
        sdk.add("stream")
    assert OPENAI_FIELDS[endpoint] == sdk


def test_no_allowed_field_is_a_steering_field() -> None:
    for endpoint in OPENAI_FIELDS:
        for name in OPENAI_FIELDS[endpoint] | ENGINE_EXTRAS[endpoint] | CLIENT_EXTRAS[endpoint]:
            assert not is_steering(name), name


@pytest.mark.parametrize("field", [
    "lora", "lora_path", "bootstrap_host", "bootstrap_room", "kv_transfer_params", "vllm_xargs",
    "logits_processors", "user_config", "tags", "default_fallbacks", "LoRA_Path", "custom_logit_processor",
    "chat_template", "mock_response",
])
def test_steering_fields_are_fallback_refusals(field: str) -> None:
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], field: "x"})
    assert problem is not None
    assert (problem.code, problem.param, problem.fallback) == ("engine_override_refused", field, True)


def test_steering_field_wins_over_an_earlier_unknown_one() -> None:
    problem = check_fields(Endpoint.CHAT, {"model": "m", "whatever": 1, "lora_path": "other"})
    assert problem is not None and problem.code == "engine_override_refused" and problem.param == "lora_path"


def test_unknown_fields_are_refused_and_extras_pass() -> None:
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "frobnicate": 1})
    assert problem is not None
    assert (problem.code, problem.param, problem.fallback) == ("request_field_not_allowed", "frobnicate", False)
    ok = {"model": "m", "messages": [], "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05,
          "chat_template_kwargs": {"enable_thinking": False}, "stream": True, "stream_options": {}}
    assert check_fields(Endpoint.CHAT, ok) is None
    # engine extras are per endpoint: embeddings take none of them
    problem = check_fields(Endpoint.EMBEDDINGS, {"model": "m", "input": "x", "top_k": 3})
    assert problem is not None and problem.param == "top_k"


@pytest.mark.parametrize(("kwargs", "code", "param"), [
    ({"chat_template": "{{ evil }}"}, "engine_override_refused", "chat_template_kwargs.chat_template"),
    ({"enable_thinking": "yes"}, "request_field_not_allowed", "chat_template_kwargs.enable_thinking"),
    ({"tools_in_user_message": True}, "request_field_not_allowed", "chat_template_kwargs.tools_in_user_message"),
    ("enable_thinking", "request_field_not_allowed", "chat_template_kwargs"),
])
def test_chat_template_kwargs_take_vetted_keys_only(kwargs: object, code: str, param: str) -> None:
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "chat_template_kwargs": kwargs})
    assert problem is not None and (problem.code, problem.param) == (code, param)


def test_metadata_cannot_carry_gateway_routing() -> None:
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "metadata": {"tags": "team-b"}})
    assert problem is not None and (problem.code, problem.param) == ("engine_override_refused", "metadata.tags")
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "metadata": {"k": ["a"]}})
    assert problem is not None and problem.code == "request_field_not_allowed"
    assert check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "metadata": {"run": "r1"}}) is None
    # free-form keys that only name routing elsewhere are not fallback attempts here
    assert check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "metadata": {"region": "eu"}}) is None
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "metadata": {"litellm_x": "1"}})
    assert problem is not None and problem.code == "engine_override_refused"


def test_codex_client_metadata_passes_on_responses_and_is_vetted() -> None:
    body = {"model": "m", "input": [], "client_metadata": {"x-codex-installation-id": "abc"}}
    assert check_fields(Endpoint.RESPONSES, body) is None
    problem = check_fields(Endpoint.RESPONSES, {**body, "client_metadata": {"tags": "paid"}})
    assert problem is not None and problem.param == "client_metadata.tags" and problem.fallback
    problem = check_fields(Endpoint.CHAT, {"model": "m", "messages": [], "client_metadata": {}})
    assert problem is not None and problem.code == "request_field_not_allowed"


def test_a_refused_field_name_is_shown_sanitised() -> None:
    problem = check_fields(Endpoint.CHAT, {"model": "m", "x\r\ny\u2028" + "z" * 50: 1})
    assert problem is not None
    assert problem.param == "x??y?" + "z" * 50 and "\n" not in problem.message
    # Too long to show whole: dropped, not cut (a cut could keep most of a secret in it).
    problem = check_fields(Endpoint.CHAT, {"model": "m", "x\r\ny\u2028" + "z" * 100: 1})
    assert problem is not None
    assert problem.param == "[105 characters, too long to record]" and "z" * 20 not in problem.message


def test_operator_additions_extend_the_list() -> None:
    extra, problems = parse_extra_fields({"chat_completions": ["priority"], "all": ["cache_salt"]})
    assert problems == []
    assert check_fields(Endpoint.CHAT, {"model": "m", "priority": 1, "cache_salt": "s"}, extra) is None
    problem = check_fields(Endpoint.COMPLETIONS, {"model": "m", "priority": 1}, extra)
    assert problem is not None and problem.param == "priority"
    assert check_fields(Endpoint.EMBEDDINGS, {"model": "m", "cache_salt": "s"}, extra) is None


def test_headers_travel_by_allow_list() -> None:
    out = forwardable_request_headers([
        ("Authorization", "Bearer x"), ("X-Api-Key", "k"), ("Connection", "close"), ("X-Forwarded-Host", "h"),
        ("x-stainless-lang", "python"), ("User-Agent", "ua"), ("x-codex-turn", "1"), ("Accept", "*/*"),
        ("X-Data-Parallel-Rank", "1"), ("x-litellm-tags", "b"), ("X-Unknown", "1"), ("Proxy-Authorization", "p"),
    ])
    assert {k.lower() for k in out} == {"x-stainless-lang", "user-agent", "x-codex-turn", "accept"}


def _settings_with(tmp_path: Path, toml: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(toml)
    env = {"CASE_PROXY_TOKEN": "t" * 20, "CTO_HARNESS_CASE_DECISION_FILE": "d", "CASE_PROXY_EVIDENCE_FILE": "e",
           "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": "a", "CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:1"}
    return load_settings(env=env, config_file=cfg)


def test_toml_request_fields_are_validated_with_clear_errors(tmp_path: Path) -> None:
    settings = _settings_with(tmp_path, '[request_fields]\nresponses = ["priority"]\n')
    assert settings.extra_request_fields == {Endpoint.RESPONSES: frozenset({"priority"})}
    with pytest.raises(ConfigError) as info:
        _settings_with(tmp_path, '[request_fields]\nchat = ["x"]\ncompletions = ["lora_path", "a-b"]\n'
                                 'responses = "priority"\n')
    problems = "\n".join(info.value.problems)
    assert "unknown endpoint 'chat'" in problems
    assert "'lora_path' selects weights" in problems and "can never be allowed" in problems
    assert "'a-b' is not a field name" in problems
    assert "request_fields.responses: must be a list" in problems
    with pytest.raises(ConfigError) as info:
        _settings_with(tmp_path, "request_fields = 3\n")
    assert "[request_fields] must be a table" in str(info.value)
