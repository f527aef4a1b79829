"""Every refusal the proxy makes, each with the allowed case beside it.

Each test proves three things where they apply: the client sees the right SDK exception
and code, nothing reached the backend (the scripted test fixture), and the counter and
evidence record moved.
"""

from __future__ import annotations

import asyncio
import base64
import os

import aiohttp
import openai
import pytest

from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy, raw_request  # noqa: F401

MSG = [{"role": "user", "content": "hi"}]


def generation_requests(proxy: ProxyUnderTest) -> list:
    return [r for r in proxy.backend.requests if r.path != "/v1/models"]


@pytest.mark.parametrize(("model", "family"), [
    ("claude-sonnet-4-6", "anthropic"),
    ("anthropic/claude-sonnet-4-6", "anthropic"),
    ("gpt-4o", "openai"),
    ("gemini-2.5-pro", "google"),
    ("Qwen3.6-35B-A3B", "other"),
    ("llama-3-70b", "other"),
])
async def test_model_pin_refuses_before_any_byte_goes_upstream(proxy: ProxyUnderTest, model: str, family: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await proxy.client().chat.completions.create(model=model, messages=MSG)
    assert info.value.code == "model_not_admitted"
    assert generation_requests(proxy) == []
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="model_not_admitted", family=family) == 1
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["family"], rec["requested_model"]) == (
        "refused", "model_not_admitted", family, model)
    # and the admitted model still runs
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert len(generation_requests(proxy)) == 1


async def test_model_pin_covers_streams_responses_and_embeddings(proxy: ProxyUnderTest) -> None:
    client = proxy.client()
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="claude-sonnet-4-6", messages=MSG, stream=True)
    with pytest.raises(openai.PermissionDeniedError):
        await client.responses.create(model="claude-sonnet-4-6", input="x")
    with pytest.raises(openai.PermissionDeniedError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.PermissionDeniedError):
        await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert generation_requests(proxy) == []
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="model_not_admitted", family="anthropic") == 2


async def test_missing_model_is_a_400(proxy: ProxyUnderTest) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().post("/chat/completions", cast_to=object, body={"messages": MSG})
    assert info.value.code == "model_missing"
    assert generation_requests(proxy) == []


@pytest.mark.parametrize(("field", "value", "family"), [
    ("fallbacks", ["claude-sonnet-4-6"], "anthropic"),
    ("models", ["qwen3.6-35b-a3b", "gpt-4o"], "openai"),
    ("provider", {"order": ["anthropic"], "allow_fallbacks": True}, "anthropic"),
    ("base_url", "https://api.anthropic.com", "anthropic"),
    ("api_base", "http://10.0.0.9:8000/v1", "other"),
    ("route", "fallback", "other"),
])
async def test_routing_override_fields_are_refused(proxy: ProxyUnderTest, field: str, value: object,
                                                   family: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, extra_body={field: value})
    assert info.value.code == "routing_override_refused"
    assert info.value.body["param"] == field
    assert proxy.requests_evidence()[-1]["param"] == field
    assert generation_requests(proxy) == []
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="routing_override_refused",
                        family=family) == 1


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/complete", "/anthropic/v1/messages",
                                  "/api/v1/messages", "/v1/messages/count_tokens"])
async def test_anthropic_endpoints_are_fallback_attempts(proxy: ProxyUnderTest, path: str) -> None:
    # The token as the Anthropic SDK carries a key (x-api-key): Case's own attempt.
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.root_url + path, json={"model": "claude-sonnet-4-6", "max_tokens": 5},
                          headers={"x-api-key": proxy.token, "anthropic-version": "2023-06-01"}) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "external_provider_endpoint"
    assert generation_requests(proxy) == []
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="external_provider_endpoint",
                        family="anthropic") == 1


async def test_provider_headers_are_refused_and_harmless_ones_pass(proxy: ProxyUnderTest) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG,
                                                     extra_headers={"anthropic-version": "2023-06-01"})
    assert info.value.code == "external_provider_header"
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="external_provider_header",
                        family="anthropic") == 1
    await proxy.client().chat.completions.create(
        model=ADMITTED, messages=MSG,
        extra_headers={"x-codex-turn": "1", "X-Forwarded-Host": "api.openai.com", "x-api-key": "sk-ant-zzz"})
    sent = {k.lower(): v for k, v in generation_requests(proxy)[-1].headers.items()}
    assert sent.get("x-codex-turn") == "1"
    assert "x-forwarded-host" not in sent and "x-api-key" not in sent


async def test_token_is_required_and_never_forwarded(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy(env={"CTO_HARNESS_CASE_LOCAL_API_KEY": "backend-key-0123456789"})
    with pytest.raises(openai.AuthenticationError) as info:
        await proxy.client(token="wrong-token-0123456789").chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.code == "invalid_token"
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", json={"model": ADMITTED, "messages": MSG}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "missing_token"
    assert generation_requests(proxy) == []
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    sent = generation_requests(proxy)[-1].headers
    auth = {k.lower(): v for k, v in sent.items()}["authorization"]
    assert auth == "Bearer backend-key-0123456789"
    assert proxy.token not in str(sent)


async def test_served_model_mismatch_withholds_the_response(proxy: ProxyUnderTest) -> None:
    proxy.backend.report_model = "claude-sonnet-4-6"
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.status_code == 502 and info.value.code == "served_model_mismatch"
    assert "Hello" not in str(info.value.body)
    stream = await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, stream=True)
    got = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            got.append(chunk)
    assert got == []  # nothing from the unverified backend reached the client
    assert proxy.metric("case_proxy_served_model_mismatches_total", endpoint="chat_completions") == 2
    recs = proxy.requests_evidence()[-2:]
    assert [r["served_model"] for r in recs] == ["claude-sonnet-4-6"] * 2


async def test_served_model_check_covers_responses_streams(proxy: ProxyUnderTest) -> None:
    proxy.backend.report_model = "gpt-4o"
    stream = await proxy.client().responses.create(model=ADMITTED, input="x", stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert proxy.metric("case_proxy_served_model_mismatches_total", endpoint="responses") == 1


async def test_backend_not_serving_the_model_means_not_ready(make_proxy, scripted_backend) -> None:  # noqa: F811
    scripted_backend.ready = False
    proxy = await make_proxy(wait_ready=False, limits={"readiness_interval_s": 0.05})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.root_url + "/readyz") as r:
            assert r.status == 503
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.status_code == 503 and info.value.code == "backend_not_ready"
    assert generation_requests(proxy) == []
    scripted_backend.ready = True
    await proxy.wait_ready()
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.root_url + "/readyz") as r:
            assert r.status == 200
    assert proxy.metric("case_proxy_backend_ready") == 1
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)


@pytest.mark.parametrize(("body", "ctype", "status", "code"), [
    (b"{not json", "application/json", 400, "invalid_json"),
    (b"[1, 2]", "application/json", 400, "invalid_body"),
    (b'{"model": "qwen3.6-35b-a3b"}', "text/plain", 415, "unsupported_content_type"),
])
async def test_bad_input_gets_a_clear_4xx(proxy: ProxyUnderTest, body: bytes, ctype: str, status: int,
                                          code: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", data=body,
                          headers={"Authorization": f"Bearer {proxy.token}", "Content-Type": ctype}) as r:
            assert r.status == status
            assert (await r.json())["error"]["code"] == code
    assert generation_requests(proxy) == []


async def test_oversized_body_is_413(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy(limits={"max_body_bytes": 4096})
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x" * 8000}])
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert len(generation_requests(proxy)) == 1


async def test_concurrency_cap_answers_429_with_retry_after(make_proxy) -> None:  # noqa: F811
    proxy = await make_proxy(limits={"max_concurrency": 1})
    proxy.backend.first_byte_delay_s = 2.0
    client = proxy.client()
    slow = asyncio.create_task(client.chat.completions.create(model=ADMITTED, messages=MSG))
    # Until the first request holds the one slot (a fixed 0.2 s sleep lost the race on a
    # loaded machine: the second request went first and was served).
    for _ in range(500):
        if proxy.running.state.in_flight == 1:
            break
        await asyncio.sleep(0.01)
    assert proxy.running.state.in_flight == 1
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.response.headers["retry-after"] == "1"
    assert (await slow).model == ADMITTED


async def test_connect_and_absolute_form_are_refused_and_recorded(proxy: ProxyUnderTest) -> None:
    creds = b"Proxy-Authorization: Basic " + base64.b64encode(f"case:{proxy.token}".encode()) + b"\r\n"
    out = await raw_request(proxy, b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n"
                            + creds + b"\r\n")
    assert out.startswith(b"HTTP/1.1 403")
    out = await raw_request(proxy, b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n"
                            + creds + b"\r\n{}")
    assert out.startswith(b"HTTP/1.1 403")
    recs = proxy.requests_evidence()[-2:]
    assert [r["target_host"] for r in recs] == ["api.anthropic.com", "api.openai.com"]
    assert [r["family"] for r in recs] == ["anthropic", "openai"]
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="forward_proxy_refused",
                        family="anthropic") == 1
    assert generation_requests(proxy) == []


async def test_evidence_failure_fails_closed(proxy: ProxyUnderTest) -> None:
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    forwarded = len(generation_requests(proxy))
    # Swap the log's descriptor for one on /dev/full: every write now fails (ENOSPC).
    writer = proxy.running.state.evidence._chain  # type: ignore[union-attr]
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, writer._fd)
    os.close(full)
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.status_code == 503 and info.value.code == "evidence_unavailable"
    # Once broken, nothing else is forwarded either.
    with pytest.raises(openai.InternalServerError):
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    # A descriptor swapped inside the process is no change on disk for the path check to
    # see; the forwarding record's write fails first, so nothing is forwarded.
    assert len(generation_requests(proxy)) == forwarded
    assert proxy.metric("case_proxy_evidence_write_failures_total") >= 2
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.root_url + "/readyz") as r:
            assert r.status == 503


async def test_a_log_renamed_away_refuses_before_anything_is_forwarded(proxy: ProxyUnderTest) -> None:
    """The log rotated under a running proxy: the next request is refused before it
    reaches the backend, and so is every one after."""
    await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    proxy.evidence_path.rename(proxy.evidence_path.with_name("rotated.jsonl"))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
        assert info.value.status_code == 503 and info.value.code == "evidence_unavailable"
    assert len(generation_requests(proxy)) == 1


async def test_response_is_withheld_when_its_record_cannot_be_written(proxy: ProxyUnderTest,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-check passes, the backend answers, then the record fails: the client gets
    503, never the unrecorded answer."""
    import errno

    import proxy.hashchain as hashchain

    writer = proxy.running.state.evidence._chain  # type: ignore[union-attr]
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        # the completion record only: the forwarding record before it is written
        if fd == writer._fd and b'"kind":"request"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(hashchain.os, "write", failing_write)
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.status_code == 503 and info.value.code == "evidence_unavailable"
    assert "Hello" not in info.value.response.text
    assert len(generation_requests(proxy)) == 1  # it was forwarded, but its answer was withheld
