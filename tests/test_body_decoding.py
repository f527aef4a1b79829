"""Request bodies are decoded by the proxy itself (proxy.body_decoding): every compressed
request is seen, recorded, counted and answered in the OpenAI error shape, and the body
limit holds for the decoded size. Hostile clients send raw bytes with aiohttp (the SDK
does not compress); the backend is the scripted TEST FIXTURE, which logs what arrives."""

from __future__ import annotations

import gzip
import zlib

import aiohttp
import brotli
import orjson
import pytest
from backports import zstd

from proxy.body_decoding import DecodeError, decode_body, parse_content_encoding
from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy  # noqa: F401

BODY = orjson.dumps({"model": ADMITTED, "messages": [{"role": "user", "content": "hi"}]})
COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
}


def generation_requests(proxy: ProxyUnderTest) -> list:
    return [r for r in proxy.backend.requests if r.path != "/v1/models"]


@pytest.mark.parametrize("coding", list(COMPRESS))
def test_each_coding_round_trips_and_a_bomb_stops_at_the_limit(coding: str) -> None:
    assert decode_body(COMPRESS[coding](BODY), [coding], 1024) == BODY
    bomb = COMPRESS[coding](b"\0" * (16 * 1024 * 1024))
    assert len(bomb) < 1024 * 1024
    with pytest.raises(DecodeError) as info:
        decode_body(bomb, [coding], 1024 * 1024)
    assert info.value.code == "request_too_large" and "once decoded" in info.value.message


@pytest.mark.parametrize("coding", list(COMPRESS))
@pytest.mark.parametrize("damage", ["truncated", "trailing", "garbage"])
def test_corrupt_or_truncated_data_is_a_clear_error(coding: str, damage: str) -> None:
    good = COMPRESS[coding](BODY)
    bad = {"truncated": good[:-4], "trailing": good + b"\x01\x02", "garbage": b"\x13not compressed at all"}[damage]
    with pytest.raises(DecodeError) as info:
        decode_body(bad, [coding], 1 << 20)
    assert info.value.code == "invalid_content_encoding"
    assert coding in info.value.message


def test_stacked_codings_are_undone_in_reverse_and_bounded() -> None:
    twice = zstd.compress(gzip.compress(BODY))
    assert decode_body(twice, parse_content_encoding("gzip, zstd"), 1024) == BODY
    assert parse_content_encoding("identity") == []
    with pytest.raises(DecodeError) as info:
        parse_content_encoding("gzip, gzip, gzip")
    assert info.value.code == "unsupported_content_encoding"
    with pytest.raises(DecodeError) as info:
        parse_content_encoding("compress")
    assert info.value.code == "unsupported_content_encoding" and "'compress'" in info.value.message


async def _post(proxy: ProxyUnderTest, path: str, data: bytes, encoding: str, token: bool = True,
                ) -> tuple[int, str, dict]:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    if token:
        headers["Authorization"] = f"Bearer {proxy.token}"
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(proxy.root_url + path, data=data, headers=headers) as r:
            return r.status, r.headers.get("Content-Type", ""), orjson.loads(await r.read())


@pytest.mark.parametrize("coding", list(COMPRESS))
async def test_compressed_bodies_are_decoded_by_the_proxy_and_forwarded_plain(proxy: ProxyUnderTest,
                                                                               coding: str) -> None:
    status, _, _ = await _post(proxy, "/v1/chat/completions", COMPRESS[coding](BODY), coding)
    assert status == 200
    got = generation_requests(proxy)[-1]
    assert got.body == orjson.loads(BODY)
    assert "content-encoding" not in {k.lower() for k in got.headers}
    assert proxy.requests_evidence()[-1]["content_encoding"] == coding
    assert proxy.metric("case_proxy_request_body_decodings_total", encoding=coding, result="decoded") == 1


async def test_a_compressed_body_cannot_hide_a_steering_field(proxy: ProxyUnderTest) -> None:
    hidden = orjson.dumps({**orjson.loads(BODY), "lora_path": "other"})
    status, _, err = await _post(proxy, "/v1/chat/completions", zstd.compress(hidden), "zstd")
    assert (status, err["error"]["code"]) == (403, "engine_override_refused")
    assert generation_requests(proxy) == []


@pytest.mark.parametrize(("coding", "data", "status", "code", "result"), [
    ("gzip", b"\x1f\x8b\x08\x00 this is not gzip", 400, "invalid_content_encoding", "corrupt"),
    ("zstd", b"\x28\xb5\x2f\xfd garbage", 400, "invalid_content_encoding", "corrupt"),
    ("br", b"\xff\xff\xff garbage", 400, "invalid_content_encoding", "corrupt"),
    ("zstd", zstd.compress(b" " * (8 * 1024 * 1024)), 413, "request_too_large", "too_large"),
    ("br", brotli.compress(b" " * (8 * 1024 * 1024)), 413, "request_too_large", "too_large"),
    ("compress", b"\x1f\x9d\x90", 415, "unsupported_content_encoding", "unsupported"),
])
async def test_bad_compressed_bodies_get_an_openai_error_a_record_and_a_metric(
        make_proxy, coding: str, data: bytes, status: int, code: str, result: str) -> None:  # noqa: F811
    proxy = await make_proxy(limits={"max_body_bytes": 1024 * 1024})
    got_status, ctype, err = await _post(proxy, "/v1/chat/completions", data, coding)
    assert (got_status, err["error"]["code"]) == (status, code)
    assert ctype.startswith("application/json") and set(err["error"]) == {"message", "type", "param", "code"}
    assert generation_requests(proxy) == []
    rec = proxy.requests_evidence()[-1]
    assert (rec["reason"], rec["status"]) == (code, status)
    label = coding if coding in COMPRESS else "unsupported"
    assert proxy.metric("case_proxy_request_body_decodings_total", encoding=label, result=result) == 1
    assert proxy.metric("case_proxy_requests_total", endpoint="chat_completions", outcome="rejected") == 1


async def test_a_zstd_messages_request_is_a_recorded_fallback_attempt(proxy: ProxyUnderTest) -> None:
    body = orjson.dumps({"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": []})
    status, _, err = await _post(proxy, "/v1/messages", zstd.compress(body), "zstd")
    assert (status, err["error"]["code"]) == (403, "external_provider_endpoint")
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["family"]) == ("refused", "external_provider_endpoint", "anthropic")
    assert proxy.metric("case_proxy_fallback_rejections_total", reason="external_provider_endpoint",
                        family="anthropic") == 1
