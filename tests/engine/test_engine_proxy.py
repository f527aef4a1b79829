"""The proxy in front of a real llama.cpp server (tiny random-weight model, CPU).

The admission names the tiny model's alias, never qwen3.6-35b-a3b: nothing here may
claim a model that did not serve.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.engine.conftest import ALIAS, LlamaEngine, free_port
from tests.engine.tiny_model import tokenizer, write_tiny_model
from tests.proxy_support import ProxyUnderTest, make_proxy  # noqa: F401

MSG = [{"role": "user", "content": "hello there"}]
_TOKENS = tokenizer()[0]
# Random weights may emit an end token at any step; banning them makes long streams long.
# Token ids 128-255 are lone non-ASCII bytes: llama-cpp-python holds back text that is not
# yet valid UTF-8 (and rescans it every step), so banning them keeps a stream flowing.
NO_END = {str(_TOKENS.index(t)): -100 for t in ("<|im_end|>", "<|endoftext|>")} | {
    str(i): -100 for i in range(128, 256)}


@pytest.fixture
async def engine_proxy(make_proxy, llama_engine: LlamaEngine) -> ProxyUnderTest:  # noqa: F811
    return await make_proxy(admission={"model": ALIAS}, base_url=llama_engine.base_url)


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=0)
    b = write_tiny_model(tmp_path / "b.gguf", seed=0)
    c = write_tiny_model(tmp_path / "c.gguf", seed=1)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    assert a.stat().st_size < 1024 * 1024


async def test_engine_answers_any_model_name_directly(llama_engine: LlamaEngine) -> None:
    """The quirk the proxy protects against: llama.cpp 'serves' whatever model is named."""
    client = openai.AsyncOpenAI(base_url=llama_engine.base_url, api_key="x", max_retries=0)
    resp = await client.chat.completions.create(model="claude-sonnet-4-6", messages=MSG, max_tokens=4)
    assert resp.choices  # answered, under a name that is not its own


async def test_models_chat_stream_and_completions_through_the_proxy(engine_proxy: ProxyUnderTest) -> None:
    client = engine_proxy.client()
    assert [m.id for m in (await client.models.list()).data] == [ALIAS]
    resp = await client.chat.completions.create(model=ALIAS, messages=MSG, max_tokens=8)
    assert resp.model == ALIAS and resp.usage is not None and resp.usage.completion_tokens > 0
    chunks = 0
    stream = await client.chat.completions.create(model=ALIAS, messages=MSG, max_tokens=8, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        assert chunk.model == ALIAS
        chunks += 1
    assert chunks >= 2
    comp = await client.completions.create(model=ALIAS, prompt="the", max_tokens=4)
    assert comp.model == ALIAS
    recs = [r for r in engine_proxy.requests_evidence() if r["endpoint"] != "models"]
    assert [r["decision"] for r in recs] == ["admitted"] * 3
    assert recs[0]["usage"]["completion_tokens"] == resp.usage.completion_tokens
    # The engine ignores include_usage on streams: no usage is recorded, nothing is invented.
    assert "usage" not in recs[1] or recs[1]["usage"].get("completion_tokens") is None
    assert engine_proxy.metric("case_proxy_served_model_mismatches_total", endpoint="chat_completions") == 0


async def test_model_pin_refuses_before_the_engine_sees_it(engine_proxy: ProxyUnderTest,
                                                           llama_engine: LlamaEngine) -> None:
    before = len(llama_engine.access_lines())
    with pytest.raises(openai.PermissionDeniedError):
        await engine_proxy.client().chat.completions.create(model="claude-sonnet-4-6", messages=MSG, max_tokens=4)
    await asyncio.sleep(0.3)
    assert len(llama_engine.access_lines()) == before  # proven from the engine's own access log
    await engine_proxy.client().chat.completions.create(model=ALIAS, messages=MSG, max_tokens=2)
    for _ in range(20):
        if len(llama_engine.access_lines()) == before + 1:
            break
        await asyncio.sleep(0.1)
    assert len(llama_engine.access_lines()) == before + 1


async def test_engine_errors_reach_the_client_as_the_engine_sent_them(engine_proxy: ProxyUnderTest,
                                                                       llama_engine: LlamaEngine) -> None:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4}
    async with aiohttp.ClientSession() as s:
        async with s.post(llama_engine.base_url + "/chat/completions", json=body) as r:
            direct_status, direct_body = r.status, await r.read()
        async with s.post(engine_proxy.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {engine_proxy.token}"}) as r:
            proxied_status, proxied_body = r.status, await r.read()
    assert direct_status >= 400
    assert (proxied_status, proxied_body) == (direct_status, direct_body)


async def _wait_for(predicate, what: str, tries: int = 100) -> None:  # type: ignore[no-untyped-def]
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_long_stream_is_not_cut_by_the_proxys_own_readiness_probes(make_proxy,  # noqa: F811
                                                                           llama_engine: LlamaEngine) -> None:
    """llama-cpp-python aborts a running stream when any other request arrives; the
    proxy's periodic /v1/models probe must not be that request."""
    proxy = await make_proxy(admission={"model": ALIAS}, base_url=llama_engine.base_url,
                             limits={"readiness_interval_s": 0.05})
    stream = await proxy.client().chat.completions.create(model=ALIAS, messages=MSG, max_tokens=1000, stream=True,
                                                         extra_body={"logit_bias": NO_END})
    finish = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finish[-1] == "length"  # ran to max_tokens: nothing interrupted it
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["stream"]) == ("admitted", "ok", True)


async def test_client_disconnect_mid_stream_closes_the_engine_request(engine_proxy: ProxyUnderTest,
                                                                       llama_engine: LlamaEngine) -> None:
    """The proxy closes its upstream connection when the client goes, so the engine stops
    generating (its own log says so) instead of running to max_tokens for nobody."""
    disconnects = llama_engine.log_text().count("Disconnected from client")
    body = {"model": ALIAS, "messages": MSG, "max_tokens": 3500, "stream": True, "logit_bias": NO_END}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.post(engine_proxy.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {engine_proxy.token}"}) as r:
            assert r.status == 200
            assert b"data: " in await r.content.readany()
    await _wait_for(lambda: [r for r in engine_proxy.requests_evidence() if r.get("client_disconnected")],
                    "the evidence record")
    rec = engine_proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"]) == ("admitted", "client_disconnected")
    await _wait_for(lambda: llama_engine.log_text().count("Disconnected from client") > disconnects,
                    "the engine to log the disconnect")
    resp = await engine_proxy.client().chat.completions.create(model=ALIAS, messages=MSG, max_tokens=2)
    assert resp.model == ALIAS


async def test_engine_not_up_at_start_then_killed_mid_stream(make_proxy, tiny_model: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    engine = LlamaEngine(tiny_model, tmp_path / "late-engine.log", free_port())
    proxy = await make_proxy(admission={"model": ALIAS}, base_url=engine.base_url, wait_ready=False,
                             limits={"readiness_interval_s": 0.2})
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.root_url + "/readyz") as r:
                assert r.status == 503
        with pytest.raises(openai.InternalServerError) as info:
            await proxy.client().chat.completions.create(model=ALIAS, messages=MSG, max_tokens=2)
        assert info.value.code == "backend_not_ready"
        await asyncio.to_thread(engine.start)
        await proxy.wait_ready(timeout_s=30)
        stream = await proxy.client().chat.completions.create(model=ALIAS, messages=MSG, max_tokens=3500, stream=True,
                                                             extra_body={"logit_bias": NO_END})
        with pytest.raises(openai.APIError):
            n = 0
            async for _ in stream:
                n += 1
                if n == 2:
                    await asyncio.to_thread(engine.kill)
        rec = proxy.requests_evidence()[-1]
        assert rec["decision"] == "error" and rec["reason"] == "backend_protocol_error"
    finally:
        await asyncio.to_thread(engine.stop)
