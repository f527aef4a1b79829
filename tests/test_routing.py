"""aiohttp's router answers unknown paths (404) and known paths with another method (405);
the guard middleware makes those answers OpenAI-shaped, recorded and counted like every
other refusal. The backend is the scripted test fixture (harness.scripted_backend)."""

from __future__ import annotations

import json
import logging

import pytest

from tests.proxy_support import ADMITTED, MakeProxy, ProxyUnderTest, make_proxy, proxy, raw_request  # noqa: F401


def _answer(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


def _request(method: str, path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode()


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/responses", "POST"), ("HEAD", "/v1/chat/completions", "POST"), ("PATCH", "/v1/completions", "POST"),
    ("OPTIONS", "/v1/models", "GET, HEAD"), ("POST", f"/v1/models/{ADMITTED}", "GET, HEAD"),
])
async def test_the_routers_405_is_openai_shaped_recorded_and_counted(
        proxy: ProxyUnderTest, method: str, path: str, allow: str) -> None:
    before = proxy.metric("case_proxy_requests_total", endpoint="other", outcome="rejected")
    backend_before = len(proxy.backend.requests)
    status, headers, body = _answer(await raw_request(proxy, _request(method, path, proxy.token)))
    assert status.startswith("HTTP/1.1 405 ") and headers["allow"] == allow
    if method != "HEAD":
        err = json.loads(body)["error"]
        assert err == {"message": f"method {method} is not allowed on {path}; use {allow}",
                       "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["status"], rec["path"]) == ("rejected", "method_not_allowed", 405, path)
    assert proxy.metric("case_proxy_requests_total", endpoint="other", outcome="rejected") == before + 1
    assert len(proxy.backend.requests) == backend_before


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_a_public_path_with_another_method_is_a_405_left_out_of_the_evidence(
        proxy: ProxyUnderTest, path: str) -> None:
    records = len(proxy.evidence())
    status, headers, body = _answer(await raw_request(proxy, _request("POST", path, None)))
    assert status.startswith("HTTP/1.1 405 ") and headers["allow"] == "GET, HEAD"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert len(proxy.evidence()) == records  # probes and scrapes leave no record


async def test_an_unknown_path_is_the_routers_404_recorded(proxy: ProxyUnderTest) -> None:
    backend_before = len(proxy.backend.requests)
    # %2F is not a path separator to the router: this is not the chat completions route
    for path, shown in (("/v1/files", "/v1/files"), ("/v1/chat%2Fcompletions", "/v1/chat/completions")):
        status, _, body = _answer(await raw_request(proxy, _request("POST", path, proxy.token)))
        assert status.startswith("HTTP/1.1 404 ")
        assert json.loads(body)["error"] == {"message": f"unknown endpoint POST {shown}",
                                             "type": "invalid_request_error", "param": None, "code": "unknown_url"}
        assert proxy.requests_evidence()[-1]["reason"] == "unknown_url"
    assert len(proxy.backend.requests) == backend_before


async def test_metrics_turned_off_is_a_404_not_an_internal_error(
        make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    """docs/http-api.md: ``GET /metrics`` is a 404 when metrics are off. The handler's
    HTTPNotFound used to escape the public-path branch and become a 500 with a traceback."""
    p = await make_proxy(env={"CASE_PROXY_METRICS_ENABLED": "false"})
    with caplog.at_level(logging.ERROR, logger="case_proxy"):
        status, _, body = _answer(await raw_request(p, _request("GET", "/metrics", None)))
    assert status.startswith("HTTP/1.1 404 ")
    assert json.loads(body)["error"]["code"] == "unknown_url"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
