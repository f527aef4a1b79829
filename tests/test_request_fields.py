"""Hostile clients (the official openai SDK, ``extra_body``/``extra_headers``) try to get
per-request weights, adapters, engines and routes past the proxy. The backend is the
scripted TEST FIXTURE (harness.scripted_backend), which logs every body and header it
receives: a refused field must never arrive there."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy  # noqa: F401

MSG = [{"role": "user", "content": "hi"}]


def generation_requests(proxy: ProxyUnderTest) -> list:
    return [r for r in proxy.backend.requests if r.path != "/v1/models"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"lora": [{"id": 0, "scale": 1.0}]}, "lora"),                      # llama.cpp
    ({"lora_path": "other"}, "lora_path"),                               # SGLang
    ({"bootstrap_host": "10.0.0.9", "bootstrap_room": 7}, "bootstrap_host"),  # SGLang PD disaggregation
    ({"kv_transfer_params": {"remote_host": "10.0.0.9"}}, "kv_transfer_params"),  # vLLM
    ({"vllm_xargs": {"k": 1}}, "vllm_xargs"),
    ({"logits_processors": ["evil.module:Proc"]}, "logits_processors"),
    ({"user_config": {"model_list": []}}, "user_config"),               # LiteLLM
    ({"tags": ["paid"]}, "tags"),
    ({"default_fallbacks": ["claude-sonnet-4-6"]}, "default_fallbacks"),
    ({"chat_template_kwargs": {"chat_template": "{{ x }}"}}, "chat_template_kwargs.chat_template"),
    ({"metadata": {"tags": "paid"}}, "metadata.tags"),
])
async def test_steering_fields_never_reach_the_engine(proxy: ProxyUnderTest, extra: dict, param: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, extra_body=extra)
    assert info.value.code == "engine_override_refused"
    assert info.value.body["param"] == param
    assert generation_requests(proxy) == []
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="engine_override_refused",
                        family="other") == 1
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["param"], rec["status"]) == (
        "refused", "engine_override_refused", param, 403)


async def test_steering_fields_are_refused_on_every_forwarded_endpoint(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    with pytest.raises(openai.PermissionDeniedError):
        await client.responses.create(model=ADMITTED, input="x", extra_body={"lora_path": "o"}, stream=True)
    with pytest.raises(openai.PermissionDeniedError):
        await client.completions.create(model=ADMITTED, prompt="x", extra_body={"lora": [{"id": 1}]})
    with pytest.raises(openai.PermissionDeniedError):
        await client.embeddings.create(model=ADMITTED, input="x", extra_body={"lora_request": {"name": "o"}})
    assert generation_requests(proxy) == []


async def test_unknown_fields_are_a_400_and_never_arrive(proxy: ProxyUnderTest) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG,
                                                     extra_body={"some_new_engine_knob": True})
    assert info.value.code == "request_field_not_allowed"
    assert info.value.body["param"] == "some_new_engine_knob"
    assert generation_requests(proxy) == []
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["param"]) == ("rejected", "request_field_not_allowed",
                                                             "some_new_engine_knob")
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="engine_override_refused",
                        family="other") == 0


async def test_schema_fields_and_engine_extras_arrive_unchanged(proxy: ProxyUnderTest) -> None:
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05,
             "chat_template_kwargs": {"enable_thinking": False}}
    await proxy.client().chat.completions.create(
        model=ADMITTED, messages=MSG, temperature=0.2, max_tokens=5, metadata={"run": "r1"}, extra_body=extra,
        extra_headers={"x-codex-turn": "3", "X-Data-Parallel-Rank": "1", "x-litellm-tags": "paid",
                       "X-Some-Header": "1"})
    got = generation_requests(proxy)[-1]
    assert {k: got.body[k] for k in extra} == extra
    assert got.body["temperature"] == 0.2 and got.body["metadata"] == {"run": "r1"}
    sent = {k.lower() for k in got.headers}
    assert "x-codex-turn" in sent
    assert not sent & {"x-data-parallel-rank", "x-litellm-tags", "x-some-header"}
    # The Responses API as Codex sends it passes too.
    await proxy.client().responses.create(
        model=ADMITTED, input="x", instructions="be brief", reasoning={"effort": "low"}, store=False,
        parallel_tool_calls=False, include=[], prompt_cache_key="k", stream=True)
    assert generation_requests(proxy)[-1].path == "/v1/responses"


async def test_operators_can_allow_more_fields(make_proxy, tmp_path: Path) -> None:  # noqa: F811
    cfg = tmp_path / "fields.toml"
    cfg.write_text('[request_fields]\nchat_completions = ["priority"]\n')
    proxy = await make_proxy(env={"CASE_PROXY_CONFIG": str(cfg)})
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, extra_body={"priority": 5})
    assert generation_requests(proxy)[-1].body["priority"] == 5
    with pytest.raises(openai.BadRequestError):
        await proxy.client().completions.create(model=ADMITTED, prompt="x", extra_body={"priority": 5})
    assert len(generation_requests(proxy)) == 1


async def test_a_codex_shaped_responses_request_passes_whole(proxy: ProxyUnderTest) -> None:
    """Codex CLI's ResponsesApiRequest fields and headers (codex-rs codex-api common.rs),
    sent raw: everything arrives, nothing is refused."""
    import aiohttp

    body = {"model": ADMITTED, "instructions": "You are Codex.", "stream": True, "store": False,
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            "tools": [], "tool_choice": "auto", "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "thread-1", "text": {"verbosity": "low"},
            "client_metadata": {"x-codex-installation-id": "inst-1"}}
    headers = {"Authorization": f"Bearer {proxy.token}", "originator": "codex_cli_rs", "version": "0.99.0",
               "session_id": "s-1", "x-codex-turn-state": "t", "x-openai-subagent": "review"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/responses", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
    got = generation_requests(proxy)[-1]
    assert got.body == body
    sent = {k.lower() for k in got.headers}
    assert {"originator", "version", "session_id", "x-codex-turn-state", "x-openai-subagent"} <= sent


@pytest.mark.parametrize("raw", [
    b'{"model":"claude-sonnet-4-6","model":"qwen3.6-35b-a3b","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"qwen3.6-35b-a3b","top_k":1,"top_k":"x","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"qwen3.6-35b-a3b",   "messages":[{"role":"user","content":"\\u0068i"}]}',
])
async def test_the_engine_gets_exactly_the_checked_object(proxy: ProxyUnderTest, raw: bytes) -> None:
    """A duplicate key is read last-wins by the proxy; an engine reading first-wins
    would run another model. What arrives is the checked object, re-serialized: one
    key each, the checked values."""
    import aiohttp
    import orjson

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", data=raw, headers={
                "Authorization": f"Bearer {proxy.token}", "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
    got = generation_requests(proxy)[-1]
    checked = orjson.loads(raw)
    assert got.body == checked and got.size == len(orjson.dumps(checked)) < len(raw)
