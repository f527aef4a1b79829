"""Traffic without the proxy token is not Case's (proxy.auth): its own outcome and
metric, never a fallback attempt in the report's reading (harness.report._is_fallback),
and a bounded number of records so a loop cannot fill the disk. A token-bearing
forward-proxy attempt stays a recorded fallback attempt. The backend is the scripted
TEST FIXTURE (harness.scripted_backend)."""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.error
import urllib.request
from urllib.parse import quote

import aiohttp
import pytest

from harness.report import _is_fallback
from proxy.auth import RecordBucket, authenticate, presented_tokens
from proxy.evidence import EvidenceRecord, records_from_bytes
from tests.proxy_support import ProxyUnderTest, make_proxy, proxy, raw_request  # noqa: F401

TOKEN = b"cpt-0123456789abcdef0123"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(("headers", "forward", "code"), [
    ({}, False, "missing_token"),
    ({"Authorization": "Bearer nope"}, False, "invalid_token"),
    ({"Authorization": "Basic " + base64.b64encode(b"x:" + TOKEN).decode()}, False, "missing_token"),
    ({}, True, "proxy_auth_required"),
    ({"Proxy-Authorization": _basic("case", "wrong")}, True, "proxy_auth_required"),
    ({"Proxy-Authorization": "Basic !!notbase64"}, True, "proxy_auth_required"),
    ({"Proxy-Authorization": _basic("case", TOKEN.decode())}, True, None),
    ({"Proxy-Authorization": "Bearer " + TOKEN.decode()}, True, None),
    ({"Authorization": "Bearer " + TOKEN.decode()}, False, None),
    ({"x-api-key": TOKEN.decode()}, False, None),
    # another provider's key beside the valid proxy credentials: still Case's
    ({"Authorization": "Bearer sk-other", "Proxy-Authorization": _basic("u", TOKEN.decode())}, True, None),
])
def test_authenticate_reads_every_place_a_client_carries_the_token(headers: dict[str, str], forward: bool,
                                                                   code: str | None) -> None:
    assert authenticate(headers, TOKEN, forward_proxy=forward).code == code


def test_presented_tokens_ignore_empty_and_odd_values() -> None:
    assert presented_tokens({"Authorization": "Bearer   ", "Proxy-Authorization": _basic("case", "")}) == []
    assert presented_tokens({"Proxy-Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()}) == []


def test_record_bucket_is_bounded_and_refills() -> None:
    bucket = RecordBucket(burst=3, per_s=2.0)
    assert [bucket.admit(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert bucket.suppressed == 2
    assert bucket.admit(0.1) is False  # 0.2 of a token: not yet
    assert bucket.admit(0.6) is True   # a full token again
    assert bucket.take_suppressed() == 3 and bucket.suppressed == 0
    for _ in range(10_000):
        bucket.admit(0.6)
    assert bucket.admit(1000.0) and bucket.admit(1000.0) and bucket.admit(1000.0) and not bucket.admit(1000.0)


def _records(proxy: ProxyUnderTest) -> list[EvidenceRecord]:
    """The log as the report reads it (verified chain, typed records)."""
    verdict, records = records_from_bytes(proxy.evidence_path.read_bytes())
    assert verdict.ok, verdict.problems
    return [r for r in records if r.kind == "request"]


async def test_tokenless_connect_and_provider_paths_are_not_fallback_attempts(proxy: ProxyUnderTest) -> None:
    """Any local process can send these; they must not fail Case's run."""
    out = await raw_request(proxy, b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 407") and b'Proxy-Authenticate: Basic realm="case-proxy"' in out
    out = await raw_request(proxy, b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
                            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 407")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.root_url + "/v1/messages", json={"model": "claude-sonnet-4-6"},
                          headers={"x-api-key": "sk-ant-zzz", "anthropic-version": "2023-06-01"}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_token"
    recs = _records(proxy)
    assert [(r.decision, r.reason) for r in recs] == [
        ("rejected", "proxy_auth_required"), ("rejected", "proxy_auth_required"), ("rejected", "invalid_token")]
    assert [r.target_host for r in recs[:2]] == ["api.anthropic.com", "api.openai.com"]
    assert not any(_is_fallback(r) for r in recs)
    assert proxy.metric("case_proxy_requests_total", endpoint="other", outcome="unauthenticated") == 3
    for reason in ("forward_proxy_refused", "external_provider_endpoint"):
        for family in ("anthropic", "openai"):
            assert proxy.metric("case_proxy_fallback_rejections_total", reason=reason, family=family) == 0


async def test_a_client_with_credentials_in_its_proxy_url_is_case(proxy: ProxyUnderTest) -> None:
    """urllib, as Case's tools use it, with HTTPS_PROXY=http://case:<token>@host:port:
    the CONNECT carries Proxy-Authorization and is a recorded fallback attempt."""
    url = f"http://case:{quote(proxy.token, safe='')}@127.0.0.1:{proxy.running.port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": url}))
    with pytest.raises(OSError) as info:
        await asyncio.to_thread(opener.open, "https://api.anthropic.com/v1/messages", timeout=10)
    assert "403" in str(info.value)
    rec = _records(proxy)[-1]
    assert (rec.decision, rec.reason, rec.target_host, rec.family) == (
        "refused", "forward_proxy_refused", "api.anthropic.com", "anthropic")
    assert _is_fallback(rec)
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="forward_proxy_refused",
                        family="anthropic") == 1
    assert proxy.token not in proxy.evidence_path.read_text()


async def test_a_loop_of_tokenless_requests_cannot_fill_the_log(proxy: ProxyUnderTest) -> None:
    proxy.running.state.unauthenticated_records = RecordBucket(burst=5, per_s=0.0)
    before = len(proxy.evidence())
    request = b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n"
    for _ in range(40):
        assert (await raw_request(proxy, request)).startswith(b"HTTP/1.1 407")
    assert len(proxy.evidence()) - before == 5
    assert proxy.metric("case_proxy_unauthenticated_records_suppressed_total") == 35
    assert proxy.metric("case_proxy_requests_total", endpoint="other", outcome="unauthenticated") == 40
    # Once the bucket refills, the next record says how many were left out.
    proxy.running.state.unauthenticated_records.per_s = 1000.0
    await asyncio.sleep(0.05)
    await raw_request(proxy, request)
    assert proxy.requests_evidence()[-1]["unauthenticated_suppressed"] == 35
    # Case's own traffic is never rate-limited.
    creds = b"Proxy-Authorization: Basic " + base64.b64encode(f"case:{proxy.token}".encode()) + b"\r\n"
    proxy.running.state.unauthenticated_records = RecordBucket(burst=0, per_s=0.0)
    n = len(proxy.evidence())
    for _ in range(10):
        await raw_request(proxy, request.removesuffix(b"\r\n") + creds + b"\r\n")
    assert len(proxy.evidence()) - n == 10


async def test_a_loop_of_tokenless_requests_cannot_fill_the_access_log(proxy: ProxyUnderTest,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The access line follows the record bucket: beyond it a tokenless request writes
    neither a record nor a log line, so a loop cannot fill the disk through stderr."""
    proxy.running.state.unauthenticated_records = RecordBucket(burst=5, per_s=0.0)
    request = b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="case_proxy.access"):
        for _ in range(40):
            assert (await raw_request(proxy, request)).startswith(b"HTTP/1.1 407")
        await asyncio.sleep(0.05)  # access lines are written after the answer (call_soon)
    lines = [r for r in caplog.records if r.name == "case_proxy.access"]
    assert len(lines) == 5 and all("reason=proxy_auth_required" in r.getMessage() for r in lines)
