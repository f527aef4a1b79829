"""The OpenAI surface through the proxy, driven by the official SDK.

The backend is the scripted test fixture (harness.scripted_backend), not a model.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.redact import REDACTED
from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy, serve_app  # noqa: F401

TOOLS = [{
    "type": "function",
    "function": {
        "name": "write_file",
        "description": "Write a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"]},
    },
}]


async def test_models_list_and_retrieve_come_from_the_admission(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    models = await client.models.list()
    assert [m.id for m in models.data] == [ADMITTED]
    assert (await client.models.retrieve(ADMITTED)).id == ADMITTED
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("claude-sonnet-4-6")
    assert proxy.backend.requests == [] or all(r.path == "/v1/models" for r in proxy.backend.requests)


async def test_chat_completion_passes_through_with_vendor_extras(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    before = len(proxy.backend.requests)
    resp = await client.chat.completions.create(
        model=ADMITTED, messages=[{"role": "user", "content": "hi"}], max_tokens=16,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "top_k": 20},
    )
    assert resp.model == ADMITTED
    assert resp.choices[0].message.content
    sent = [r for r in proxy.backend.requests[before:] if r.path == "/v1/chat/completions"]
    assert len(sent) == 1
    assert sent[0].body["chat_template_kwargs"] == {"enable_thinking": True}
    assert sent[0].body["top_k"] == 20
    assert sent[0].body["model"] == ADMITTED
    # The official SDK's harmless headers pass; the client's credential does not.
    headers = {k.lower(): v for k, v in sent[0].headers.items()}
    assert any(k.startswith("x-stainless-") for k in headers)
    assert proxy.token not in json.dumps(headers)
    rec = proxy.requests_evidence()[-1]
    assert rec["decision"] == "admitted" and rec["served_model"] == ADMITTED and rec["status"] == 200
    assert rec["upstream_class"] == "loopback" and rec["upstream_fingerprint"].startswith("sha256:")
    assert proxy.metric("case_proxy_requests_total", endpoint="chat_completions", outcome="ok") == 1


async def test_the_record_id_is_always_drawn_and_a_client_id_is_kept_beside_it(proxy: ProxyUnderTest) -> None:
    """A client's X-Request-Id never becomes the record's id (it could collide with or
    forge another record's); it is kept as client_request_id when it is one plain ASCII
    value, and scanned for secrets like any client text."""
    client = proxy.client()
    messages = [{"role": "user", "content": "hi"}]
    token_shaped = "sk-proj-" + "k" * 24
    sent_ids = [token_shaped, "case-run-7", "case-run-7", "a b", "x" * 65, "-lead", None]
    for rid in sent_ids:
        await client.chat.completions.create(model=ADMITTED, messages=messages, max_tokens=4,
                                             extra_headers={"X-Request-Id": rid} if rid else {})
    recs = proxy.requests_evidence()[-len(sent_ids):]
    ids = [r["request_id"] for r in recs]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    assert token_shaped not in proxy.evidence_path.read_text()
    assert [r.get("client_request_id") for r in recs] == [
        REDACTED, "case-run-7", "case-run-7", None, None, None, None]
    # the backend sees the proxy's id, the one the record and the client's answer carry
    got = [r for r in proxy.backend.requests if r.path != "/v1/models"][-len(sent_ids):]
    assert [{k.lower(): v for k, v in r.headers.items()}["x-request-id"] for r in got] == ids


@pytest.mark.parametrize("id_lines", [
    b"x-request-id: one\r\nX-Request-Id: two\r\n",        # duplicates
    "x-request-id: \u0661\u0662\u0663\r\n".encode(),      # Unicode digits (isalnum() said yes)
    "x-request-id: abc\u00b2\r\n".encode(),                # superscript two
    b"x-request-id: ab\tcd\r\n",                          # a control character
])
async def test_odd_request_ids_are_not_recorded(proxy: ProxyUnderTest, id_lines: bytes) -> None:
    body = json.dumps({"model": ADMITTED, "messages": [{"role": "user", "content": "x"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.running.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                 b"authorization: Bearer " + proxy.token.encode() + b"\r\ncontent-type: application/json\r\n"
                 + id_lines + b"content-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    rec = proxy.requests_evidence()[-1]
    assert "client_request_id" not in rec and re.fullmatch(r"[0-9a-f]{32}", rec["request_id"])
    assert rec["request_id"].encode() in answer


async def test_streamed_tool_call_reassembles_through_the_sdk(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    stream = await client.chat.completions.create(
        model=ADMITTED, messages=[{"role": "user", "content": "write a file"}], tools=TOOLS, stream=True,
        stream_options={"include_usage": True},
    )
    names, args, usage, reasoning = [], "", None, ""
    async for chunk in stream:
        assert chunk.model == ADMITTED
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
    assert names == ["write_file"]
    json.loads(args)  # arguments split across chunks reassemble into valid JSON
    assert reasoning
    assert usage is not None and usage.completion_tokens > 0
    rec = proxy.requests_evidence()[-1]
    assert rec["stream"] is True and rec["usage"]["completion_tokens"] == usage.completion_tokens
    assert rec["ttft_ms"] is not None
    assert proxy.metric("case_proxy_tokens_total", kind="completion") == usage.completion_tokens


async def test_in_flight_gauge_counts_an_open_stream(proxy: ProxyUnderTest) -> None:
    proxy.backend.chunk_delay_s = 0.05
    assert proxy.metric("case_proxy_in_flight_requests") == 0
    stream = await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}],
                                                          stream=True)
    during = None
    async for _ in stream:
        if during is None:
            during = proxy.metric("case_proxy_in_flight_requests")
    assert during == 1
    assert proxy.metric("case_proxy_in_flight_requests") == 0


async def test_completions_embeddings_and_responses(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    comp = await client.completions.create(model=ADMITTED, prompt="def f():", max_tokens=8)
    assert comp.model == ADMITTED and comp.choices[0].text
    emb = await client.embeddings.create(model=ADMITTED, input=["a", "b"])
    assert len(emb.data) == 2 and emb.data[0].embedding
    resp = await client.responses.create(model=ADMITTED, input="hello", store=False)
    assert resp.model == ADMITTED and resp.output_text
    events = []
    stream = await client.responses.create(model=ADMITTED, input="hello", stream=True, store=False,
                                           include=["reasoning.encrypted_content"])
    async for event in stream:
        events.append(event.type)
    assert events[0] == "response.created" and events[-1] == "response.completed"
    endpoints = [r["endpoint"] for r in proxy.requests_evidence()]
    assert endpoints == ["completions", "embeddings", "responses", "responses"]


async def test_alias_is_rewritten_to_the_admitted_id_and_recorded(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy(admission={"aliases": ["qwen-local-default"]})
    before = len(proxy.backend.requests)
    resp = await proxy.client().chat.completions.create(
        model="qwen-local-default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert resp.model == ADMITTED
    sent = [r for r in proxy.backend.requests[before:] if r.path == "/v1/chat/completions"]
    assert sent[0].body["model"] == ADMITTED
    rec = proxy.requests_evidence()[-1]
    assert rec["alias_rewritten"] is True and rec["requested_model"] == "qwen-local-default"
    assert rec["effective_model"] == ADMITTED
    # The alias is not advertised: /v1/models lists exactly the admitted model.
    assert [m.id for m in (await proxy.client().models.list()).data] == [ADMITTED]


async def test_raw_stream_bytes_are_relayed_unchanged(proxy: ProxyUnderTest) -> None:
    """Byte-faithful: what the client reads equals what the backend wrote, event for event."""
    body = {"model": ADMITTED, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {proxy.token}"}) as r:
            assert r.status == 200
            via_proxy = await r.read()
    sent_bytes = proxy.backend.last_stream_bytes
    assert via_proxy == sent_bytes
    assert via_proxy.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize("agent", [b"my-agent/1.0", None])
async def test_headers_the_proxy_sets_reach_the_backend_once(proxy: ProxyUnderTest, agent: bytes | None) -> None:
    """Content-Type, X-Request-Id and User-Agent arrive once each, whatever case the
    client wrote them in (raw bytes here: HTTP libraries canonicalize names); the
    client's own User-Agent is kept, and without one the backend sees the proxy's
    rather than the HTTP library's."""
    body = json.dumps({"model": ADMITTED, "messages": [{"role": "user", "content": "x"}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
            b"authorization: Bearer " + proxy.token.encode() + b"\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"x-request-id: case-run-7\r\ncontent-length: %d\r\n" % len(body))
    if agent:
        head += b"user-agent: " + agent + b"\r\n"
    before = len(proxy.backend.requests)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.running.port)
    writer.write(head + b"\r\n" + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    sent = proxy.backend.requests[before:]
    assert len(sent) == 1
    names = sent[0].header_names
    for name in ("content-type", "x-request-id", "user-agent", "accept-encoding"):
        assert names.count(name) == 1, (name, names)
    got = {k.lower(): v for k, v in sent[0].headers.items()}
    assert got["x-request-id"] == proxy.requests_evidence()[-1]["request_id"] and got["accept-encoding"] == "identity"
    assert proxy.requests_evidence()[-1]["client_request_id"] == "case-run-7"
    assert got["user-agent"] == (agent or b"case-proxy").decode()
    assert got["content-type"].startswith("application/json")


async def test_websocket_upgrade_on_responses_is_refused_cleanly(proxy: ProxyUnderTest) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(proxy.base_url + "/responses", headers={"Authorization": f"Bearer {proxy.token}"})
    assert info.value.status == 426
    assert not [r for r in proxy.backend.requests if r.path == "/v1/responses"]


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions", "/v1/models"])
async def test_websocket_upgrade_gets_426_with_a_clear_message(proxy: ProxyUnderTest, path: str) -> None:
    """Codex's first try is a WebSocket on GET /v1/responses: 426 (not 405) makes it fall
    back to HTTP at once. Any path, raw handshake bytes as a WebSocket client sends them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.running.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Authorization: Bearer {proxy.token}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)  # the proxy closes after the 426
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 ")
    err = json.loads(body)["error"]
    assert err["code"] == "upgrade_required" and "HTTP" in err["message"]
    rec = proxy.requests_evidence()[-1]
    assert (rec["reason"], rec["status"]) == ("upgrade_required", 426)
    async with aiohttp.ClientSession() as s:  # a plain GET on the path is still a wrong method
        async with s.get(proxy.base_url + "/responses", headers={"Authorization": f"Bearer {proxy.token}"}) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", ["/api/tags", "/v1/props", "/props", "/version", "/api/v1/models",
                                  "/v1/files", "/v1/chat/completions/extra"])
async def test_side_door_paths_are_plain_404s(proxy: ProxyUnderTest, path: str) -> None:
    before = len(proxy.backend.requests)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.root_url + path, headers={"Authorization": f"Bearer {proxy.token}"}) as r:
            assert r.status == 404
            err = (await r.json())["error"]
    assert err["code"] == "unknown_url" and set(err) == {"message", "type", "param", "code"}
    assert len(proxy.backend.requests) == before
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="external_provider_endpoint",
                        family="anthropic") == 0


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/embeddings", "POST"),
    ("POST", "/v1/models", "GET, HEAD"), ("DELETE", "/v1/models/qwen3.6-35b-a3b", "GET, HEAD"),
])
async def test_a_known_path_with_the_wrong_method_is_a_405_naming_the_right_one(
        proxy: ProxyUnderTest, method: str, path: str, allow: str) -> None:
    before = len(proxy.backend.requests)
    async with aiohttp.ClientSession() as s:
        async with s.request(method, proxy.root_url + path, headers={"Authorization": f"Bearer {proxy.token}"}) as r:
            assert r.status == 405 and r.headers["Allow"] == allow
            err = (await r.json())["error"]
    assert err["code"] == "method_not_allowed" and allow in err["message"]
    assert len(proxy.backend.requests) == before
    assert proxy.requests_evidence()[-1]["status"] == 405


async def test_post_to_unknown_path_never_reaches_backend(proxy: ProxyUnderTest) -> None:
    before = len(proxy.backend.requests)
    with pytest.raises(openai.NotFoundError):
        await proxy.client().post("/chat/completion", cast_to=object, body={"model": ADMITTED})
    assert len(proxy.backend.requests) == before


async def test_backend_errors_pass_through_with_their_status(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    proxy.backend.fail_status = 400
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    proxy.backend.fail_status = 500
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 500
    assert proxy.metric("case_proxy_upstream_errors_total", kind="status_4xx") == 1
    assert proxy.metric("case_proxy_upstream_errors_total", kind="status_5xx") == 1


async def test_backend_redirect_is_never_followed(proxy: ProxyUnderTest) -> None:
    proxy.backend.redirect_to = "http://127.0.0.1:9/elsewhere"
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and info.value.code == "backend_redirect_refused"
    assert proxy.metric("case_proxy_upstream_errors_total", kind="redirect") == 1


async def test_unreachable_backend_is_a_clear_502(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy()
    await proxy.backend.stop()
    proxy.running.state.readiness.state.ready = True  # pretend it was ready a moment ago
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and info.value.code == "backend_unreachable"
    assert proxy.metric("case_proxy_upstream_errors_total", kind="connect") == 1


async def _backend_sending_bodies_in_parts(stall_after_first: bool) -> tuple[web.AppRunner, str]:
    """A raw backend (test fixture) whose non-streaming answers arrive in two parts 0.2 s
    apart; with ``stall_after_first`` every answer after the first stops mid-body."""
    answered = 0

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": ADMITTED, "object": "model", "owned_by": "t"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        nonlocal answered
        answered += 1
        body = json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": ADMITTED,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "in parts"}}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:25])
        await asyncio.sleep(0.2 if answered == 1 or not stall_after_first else 30)
        await resp.write(body[25:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner, port = await serve_app(app, shutdown_timeout=0.5)  # the stalled handler is cut at cleanup
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_a_body_in_parts_is_read_whole_and_a_stalled_one_times_out(make_proxy) -> None:  # noqa: F811
    runner, url = await _backend_sending_bodies_in_parts(stall_after_first=True)
    try:
        proxy = await make_proxy(base_url=url, limits={"idle_timeout_s": 1.0})
        done = await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
        assert done.choices[0].message.content == "in parts" and done.usage is not None
        assert done.usage.total_tokens == 5
        with pytest.raises(openai.InternalServerError) as info:
            await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 504 and info.value.code == "backend_timeout"
        assert [r["status"] for r in proxy.requests_evidence()] == [200, 504]
    finally:
        await runner.cleanup()


async def test_first_byte_timeout_is_504(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy(limits={"first_byte_timeout_s": 0.3})
    proxy.backend.first_byte_delay_s = 2.0
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504 and info.value.code == "backend_timeout"


async def test_idle_stream_is_terminated_with_an_error_event(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy(limits={"idle_timeout_s": 0.3})
    proxy.backend.chunk_delay_s = 1.0
    stream = await proxy.client().chat.completions.create(
        model=ADMITTED, messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert "stopped sending" in info.value.message
    assert proxy.requests_evidence()[-1]["reason"] == "backend_timeout"


async def test_a_slow_steady_stream_outlives_the_idle_limit(make_proxy) -> None:  # noqa: F811
    """Chunks 0.2 s apart under a 0.3 s idle limit: the stream lasts over a second and is
    never cut, however lazily the deadline moves."""
    proxy = await make_proxy(limits={"idle_timeout_s": 0.3})
    proxy.backend.chunk_delay_s, proxy.backend.chunks = 0.2, 6
    stream = await proxy.client().chat.completions.create(
        model=ADMITTED, messages=[{"role": "user", "content": "x"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text and proxy.requests_evidence()[-1]["reason"] == "ok"


async def test_engine_killed_mid_stream_ends_the_stream_with_an_error(proxy: ProxyUnderTest) -> None:
    proxy.backend.drop_after_chunks = 2
    stream = await proxy.client().chat.completions.create(
        model=ADMITTED, messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    rec = proxy.requests_evidence()[-1]
    assert rec["decision"] == "error" and rec["reason"] == "backend_protocol_error"


async def test_client_disconnect_mid_stream_cancels_the_upstream_request(proxy: ProxyUnderTest) -> None:
    proxy.backend.chunk_delay_s = 0.2
    proxy.backend.chunks = 50
    body = {"model": ADMITTED, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {proxy.token}"}) as r:
            await r.content.readany()
    # The proxy notices, records the disconnect and closes its upstream connection.
    for _ in range(100):
        recs = proxy.requests_evidence()
        if recs and recs[-1]["client_disconnected"]:
            break
        await asyncio.sleep(0.05)
    assert recs[-1]["client_disconnected"] is True
    assert recs[-1]["reason"] == "client_disconnected"
    # The client left: not a backend failure (a failed write must not be read as one).
    assert recs[-1]["decision"] == "admitted"
    for _ in range(100):
        if proxy.backend.cancelled_streams:
            break
        await asyncio.sleep(0.05)
    assert proxy.backend.cancelled_streams == 1
