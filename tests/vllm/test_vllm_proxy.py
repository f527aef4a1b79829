"""The proxy in front of REAL vLLM (CPU build, tiny random-weight model) through the
official `openai` SDK. Where a test needs vLLM's own view of what reached it, it reads
vLLM's access log or its /metrics, never the proxy's word.

Random weights emit noise (control characters, U+FFFD): tests assert on structure,
usage, finish_reason and [DONE], never on text. The admission names the tiny model,
never qwen3.6-35b-a3b.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.settings import ENV_API_KEY
from tests.proxy_support import ProxyUnderTest, make_proxy  # noqa: F401
from tests.vllm.conftest import SERVED, VllmEngine

MSG = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["unit"], "additionalProperties": False},
    },
}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
async def vproxy(make_proxy, vllm_engine: VllmEngine) -> ProxyUnderTest:  # noqa: F811
    """The proxy pinned to the tiny model on vLLM, holding vLLM's key (clients never do)."""
    return await make_proxy(admission={"model": SERVED}, base_url=vllm_engine.base_url,
                            env={ENV_API_KEY: vllm_engine.api_key or ""})


def direct(engine: VllmEngine, key: str | None = "engine") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=engine.base_url, api_key=engine.api_key if key == "engine" else (key or "none"),
                              max_retries=0)


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def vllm_metrics(engine: VllmEngine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """vLLM's own /metrics as {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as s:
        async with s.get(engine.root_url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in metrics.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))


# ------------------------------------------------------------------ vLLM's own behaviour

async def test_vllm_itself_lists_only_its_served_name_and_404s_other_models(vllm_engine: VllmEngine) -> None:
    """What the proxy is measured against: vLLM would answer a wrong model with a 404 of
    its own, and wants its key."""
    client = direct(vllm_engine)
    assert [m.id for m in (await client.models.list()).data] == [SERVED]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="claude-sonnet-4-6", messages=MSG, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        await direct(vllm_engine, key="wrong-key").models.list()


# ------------------------------------------------------------------ through the proxy

async def test_models_and_chat_json_through_the_proxy(vproxy: ProxyUnderTest) -> None:
    client = vproxy.client()
    assert [m.id for m in (await client.models.list()).data] == [SERVED]
    resp = await client.chat.completions.create(model=SERVED, messages=MSG, max_tokens=8, seed=7)
    assert resp.model == SERVED and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 8
    again = await client.chat.completions.create(model=SERVED, messages=MSG, max_tokens=8, seed=7)
    assert again.choices[0].message.content == resp.choices[0].message.content  # a fixed seed repeats
    rec = [r for r in vproxy.requests_evidence() if r["endpoint"] == "chat_completions"][0]
    assert (rec["decision"], rec["reason"], rec["served_model"]) == ("admitted", "ok", SERVED)
    assert rec["usage"] == resp.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})


async def test_chat_stream_role_token_finish_and_usage_chunks(vproxy: ProxyUnderTest) -> None:
    stream = await vproxy.client().chat.completions.create(model=SERVED, messages=MSG, max_tokens=6, stream=True,
                                                          stream_options={"include_usage": True},
                                                          extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert all(c.model == SERVED for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 6
    rec = vproxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["stream"]) == ("admitted", "ok", True)
    assert rec["usage"]["completion_tokens"] == 6 and rec["usage"]["prompt_tokens"] == last.usage.prompt_tokens


async def test_chat_stream_ends_with_done(vproxy: ProxyUnderTest) -> None:
    body = {"model": SERVED, "messages": MSG, "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(vproxy.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {vproxy.token}"}) as r:
            raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    assert all(json.loads(e[len(b"data: "):])["model"] == SERVED for e in events[:-1])


async def test_forced_tool_call_json_and_stream(vproxy: ProxyUnderTest) -> None:
    """tool_choice naming a function: vLLM enforces it with structured outputs, so even
    random weights produce that call."""
    client = vproxy.client()
    resp = await client.chat.completions.create(model=SERVED, messages=MSG, tools=[WEATHER_TOOL],
                                                tool_choice=FORCE_WEATHER, max_tokens=64, seed=1)
    calls = resp.choices[0].message.tool_calls
    assert resp.model == SERVED and calls and calls[0].function.name == "get_weather"
    if resp.choices[0].finish_reason != "length":
        assert isinstance(json.loads(calls[0].function.arguments), dict)  # JSON, by the grammar
    stream = await client.chat.completions.create(model=SERVED, messages=MSG, tools=[WEATHER_TOOL],
                                                  tool_choice=FORCE_WEATHER, max_tokens=64, seed=1, stream=True)
    names = [tc.function.name async for c in stream if c.choices and c.choices[0].delta.tool_calls
             for tc in c.choices[0].delta.tool_calls if tc.function and tc.function.name]
    assert names == ["get_weather"]
    recs = vproxy.requests_evidence()[-2:]
    assert [(r["decision"], r["reason"], r["stream"]) for r in recs] == [("admitted", "ok", False),
                                                                          ("admitted", "ok", True)]


async def test_completions_json_and_stream(vproxy: ProxyUnderTest) -> None:
    client = vproxy.client()
    comp = await client.completions.create(model=SERVED, prompt="the quick", max_tokens=4,
                                           extra_body={"ignore_eos": True})
    assert comp.model == SERVED and comp.usage is not None and comp.usage.completion_tokens == 4
    assert comp.choices[0].finish_reason == "length"
    stream = await client.completions.create(model=SERVED, prompt="the quick", max_tokens=4, stream=True,
                                             extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert chunks and all(c.model == SERVED for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert [r["endpoint"] for r in vproxy.requests_evidence()[-2:]] == ["completions", "completions"]


async def test_responses_api_json_and_stream(vproxy: ProxyUnderTest) -> None:
    client = vproxy.client()
    resp = await client.responses.create(model=SERVED, input="hello there", max_output_tokens=8)
    assert resp.model == SERVED and resp.status in ("completed", "incomplete")
    assert resp.usage is not None and 0 < resp.usage.output_tokens <= 8
    stream = await client.responses.create(model=SERVED, input="hello there", max_output_tokens=8, stream=True)
    types = [e.type async for e in stream]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    recs = vproxy.requests_evidence()[-2:]
    assert [(r["endpoint"], r["decision"], r["reason"], r["served_model"]) for r in recs] == [
        ("responses", "admitted", "ok", SERVED)] * 2


async def test_model_pin_proven_from_vllms_access_log(vproxy: ProxyUnderTest, vllm_engine: VllmEngine) -> None:
    """A request for another model never reaches vLLM (which would have answered 404)."""
    before = len(vllm_engine.access_lines())
    for model in ("claude-sonnet-4-6", "qwen3.6-35b-a3b", SERVED + " "):
        with pytest.raises(openai.PermissionDeniedError):
            await vproxy.client().chat.completions.create(model=model, messages=MSG, max_tokens=2)
    await vproxy.client().chat.completions.create(model=SERVED, messages=MSG, max_tokens=2)
    await wait_for(lambda: len(vllm_engine.access_lines()) >= before + 1, "vLLM to log the admitted request")
    await asyncio.sleep(0.5)
    new = vllm_engine.access_lines()[before:]
    assert len(new) == 1 and '"POST /v1/chat/completions' in new[0] and " 200" in new[0]
    assert [r["decision"] for r in vproxy.requests_evidence()[-4:]] == ["refused"] * 3 + ["admitted"]


async def test_messages_refused_although_vllm_serves_it(vproxy: ProxyUnderTest, vllm_engine: VllmEngine) -> None:
    """vLLM answers Anthropic's /v1/messages itself; through the proxy it is a refused
    fallback path, and vLLM's access log proves it never arrived."""
    body = {"model": SERVED, "max_tokens": 4, "messages": MSG}
    async with aiohttp.ClientSession() as s:
        async with s.post(vllm_engine.base_url + "/messages", json=body, headers=vllm_engine.auth_headers()) as r:
            assert r.status == 200 and (await r.json())["type"] == "message"
    before = len(vllm_engine.access_lines("/v1/messages"))
    with pytest.raises(openai.PermissionDeniedError) as info:
        await vproxy.client().post("/messages", cast_to=object, body=body)
    assert info.value.code == "external_provider_endpoint"
    await asyncio.sleep(0.5)
    assert len(vllm_engine.access_lines("/v1/messages")) == before
    rec = vproxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["family"]) == ("refused", "external_provider_endpoint", "anthropic")


async def test_vllm_errors_reach_the_sdk_in_the_openai_shape(vproxy: ProxyUnderTest, vllm_engine: VllmEngine) -> None:
    """A prompt past --max-model-len: vLLM's own 400 in the OpenAI shape, relayed as sent."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": "zq " * 6000}], "max_tokens": 4}
    async with aiohttp.ClientSession() as s:
        async with s.post(vllm_engine.base_url + "/chat/completions", json=body,
                          headers=vllm_engine.auth_headers()) as r:
            direct_status, direct_body = r.status, await r.json()
    assert direct_status == 400 and isinstance(direct_body["error"]["message"], str)
    with pytest.raises(openai.BadRequestError) as info:
        await vproxy.client().chat.completions.create(**body)
    assert info.value.status_code == 400 and info.value.body == direct_body["error"]
    assert vproxy.requests_evidence()[-1]["reason"] == "backend_status_400"


async def test_the_backend_key_is_added_by_the_proxy(vproxy: ProxyUnderTest, vllm_engine: VllmEngine) -> None:
    """vLLM refuses requests without its key; the client holds only the proxy's token,
    and a hostile client sending its own backend credentials does not replace the key."""
    with pytest.raises(openai.AuthenticationError):
        await direct(vllm_engine, key=vproxy.token).models.list()
    resp = await vproxy.client().chat.completions.create(
        model=SERVED, messages=MSG, max_tokens=2,
        extra_headers={"X-Api-Key": "client-chosen-key", "Api-Key": "client-chosen-key"})
    assert resp.model == SERVED
    # The key reached vLLM, and nothing written about it: not the proxy's evidence, not vLLM's log.
    key = vllm_engine.api_key
    assert key and key not in vproxy.evidence_path.read_text() and key not in vllm_engine.log_text()


async def test_vllms_401_becomes_an_openai_shaped_502(make_proxy, vllm_engine: VllmEngine) -> None:  # noqa: F811
    """The proxy holding a wrong key: readiness says why, and a request (readiness
    pretended green, as if the key had been rotated on vLLM since) gets an OpenAI-shaped
    502 instead of vLLM's bare {"error":"Unauthorized"} 401 that would blame the client."""
    proxy = await make_proxy(admission={"model": SERVED}, base_url=vllm_engine.base_url, wait_ready=False,
                             env={ENV_API_KEY: "vbk-not-the-key-0123456789"},
                             limits={"readiness_interval_s": 3600.0})
    await wait_for(lambda: proxy.running.state.readiness.state.checks >= 1, "the first readiness check")
    assert proxy.running.state.readiness.state.reason == "backend /v1/models answered HTTP 401"
    with pytest.raises(openai.InternalServerError) as not_ready:
        await proxy.client().chat.completions.create(model=SERVED, messages=MSG, max_tokens=2)
    assert not_ready.value.code == "backend_not_ready"
    before = len(vllm_engine.access_lines())
    proxy.running.state.readiness.state.ready = True
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=SERVED, messages=MSG, max_tokens=2)
    assert info.value.status_code == 502 and info.value.code == "backend_auth_refused"
    await wait_for(lambda: len(vllm_engine.access_lines()) > before, "vLLM to log the refused request")
    assert " 401" in vllm_engine.access_lines()[before]


async def test_client_disconnect_cancels_vllms_request(vproxy: ProxyUnderTest, vllm_engine: VllmEngine) -> None:
    """The client goes after the first tokens of a 3,800-token stream that ignores EOS:
    vLLM's own gauge of running requests drops to zero and its generated-token counter
    stops short of the 3,800 tokens it would otherwise always make. (How far short
    depends on the machine: the tiny model makes thousands of tokens a second here, and
    on a loaded machine 3,200 were made before the cancellation arrived; without the
    cancellation every one of the 3,800 is made.)"""
    m0 = await vllm_metrics(vllm_engine)
    body = {"model": SERVED, "messages": MSG, "max_tokens": 3800, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(vproxy.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {vproxy.token}"}) as r:
            assert r.status == 200
            assert b"data: " in await r.content.readany()  # vLLM is generating: it sent a chunk
            # Gone at once: a /metrics call here (it was one) can take longer than the
            # tiny model needs for all 3,800 tokens while vLLM's server is busy streaming.
    await wait_for(lambda: any(r.get("client_disconnected") for r in vproxy.requests_evidence()), "the record")
    rec = vproxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"]) == ("admitted", "client_disconnected")
    running = 1.0
    for _ in range(100):
        running = total(await vllm_metrics(vllm_engine), "vllm:num_requests_running")
        if running == 0:
            break
        await asyncio.sleep(0.1)
    assert running == 0
    m2 = await vllm_metrics(vllm_engine)
    generated = total(m2, "vllm:generation_tokens_total") - total(m0, "vllm:generation_tokens_total")
    assert generated < body["max_tokens"], f"vLLM made all {generated} tokens: the request was never cancelled"


async def test_the_proxys_records_match_vllms_own_counters(vproxy: ProxyUnderTest,
                                                          vllm_engine: VllmEngine) -> None:
    """Every admitted request the proxy recorded is one vLLM counted, with the same
    tokens; every refused one is absent from vLLM's counters."""
    m0 = await vllm_metrics(vllm_engine)
    client = vproxy.client()
    await client.chat.completions.create(model=SERVED, messages=MSG, max_tokens=3)
    stream = await client.chat.completions.create(model=SERVED, messages=MSG, max_tokens=3, stream=True,
                                                  stream_options={"include_usage": True})
    [c async for c in stream]
    await client.completions.create(model=SERVED, prompt="the", max_tokens=3)
    await client.responses.create(model=SERVED, input="hi", max_output_tokens=3)
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=3)
    with pytest.raises(openai.PermissionDeniedError):
        await client.post("/messages", cast_to=object, body={"model": SERVED, "messages": MSG, "max_tokens": 3})
    await asyncio.sleep(0.5)
    m1 = await vllm_metrics(vllm_engine)
    recs = [r for r in vproxy.requests_evidence() if r["endpoint"] != "models"]
    admitted = [r for r in recs if r["decision"] == "admitted"]
    assert len(admitted) == 4 and len(recs) == 6
    delta = lambda name, **lab: total(m1, name, **lab) - total(m0, name, **lab)  # noqa: E731
    # vLLM's HTTP counter, per route: exactly the admitted requests, none of the refused.
    for endpoint, route in (("chat_completions", "/v1/chat/completions"), ("completions", "/v1/completions"),
                            ("responses", "/v1/responses")):
        assert delta("http_requests_total", handler=route, method="POST") == len(
            [r for r in admitted if r["endpoint"] == endpoint]), route
    assert delta("http_requests_total", handler="/v1/messages") == 0
    assert delta("vllm:request_success_total") == len(admitted)
    assert delta("vllm:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in admitted)
    assert delta("vllm:generation_tokens_total") == sum(r["usage"]["completion_tokens"] for r in admitted)
