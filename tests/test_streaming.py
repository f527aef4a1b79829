"""The relay (proxy.streaming) writes exactly what ``StreamChecker`` releases, the bytes
``finish`` releases at the end of the body included: it never parses the stream
itself. The backends are test fixtures (harness.scripted_backend, tests.hostile_backend),
no model behind them."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from proxy import streaming
from proxy.stream_check import StreamChecker
from tests.hostile_backend import HostileBackend, hostile  # noqa: F401
from tests.proxy_support import ADMITTED, MakeProxy, ProxyUnderTest, make_proxy, proxy  # noqa: F401

TAIL = b'data: {"id":"tail","object":"chat.completion.chunk","model":"' + ADMITTED.encode() + b'","choices":[]}\n\n'


class _HoldsTheLastEvent(StreamChecker):
    """A checker that releases one more event at the end of the body (as a checker that
    held its last block back until the end would)."""

    __slots__ = ()

    def finish(self) -> bytes:
        return super().finish() + TAIL


async def test_the_bytes_finish_releases_reach_the_client(
        proxy: ProxyUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "StreamChecker", _HoldsTheLastEvent)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {proxy.token}"},
                          json={"model": ADMITTED, "messages": [{"role": "user", "content": "hi"}],
                                "stream": True}) as r:
            assert r.status == 200
            body = await r.read()
    assert body.endswith(TAIL)
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["stream"]) == ("admitted", "ok", True)


def _chunk(content: str) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": ADMITTED,
                                     "choices": [{"index": 0, "delta": {"content": content}}]}) + b"\n\n"


async def test_an_http_1_0_client_gets_the_events_unframed(make_proxy: MakeProxy,  # noqa: F811
                                                            hostile: HostileBackend) -> None:
    """HTTP/1.0 has no chunked coding: the relay's direct writes (every read after the
    first) must be the bare events, the body ending with the connection."""
    hostile.body = _chunk("a")
    hostile.parts = [_chunk("b"), _chunk("c") + _chunk("d"), b"data: [DONE]\n\n"]
    proxy = await make_proxy(base_url=hostile.url)
    body = orjson.dumps({"model": ADMITTED, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.running.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nHost: p\r\nAuthorization: Bearer " + proxy.token.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the proxy closes an HTTP/1.0 answer
    writer.close()
    head, _, sent = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"transfer-encoding" not in head.lower()
    assert sent == hostile.body + b"".join(hostile.parts)
    assert proxy.requests_evidence()[-1]["reason"] == "ok"


async def test_a_slow_client_gets_every_event_in_order(make_proxy: MakeProxy, hostile: HostileBackend,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """While the client reads slowly, reads go to the relay task (whose writes wait for
    the client) and back to the direct path when it catches up: the client still gets
    every byte, in order, and both paths were taken."""
    taken, declined = [0], [0]
    flush = streaming.DirectRelay._flush

    def counting(self: streaming.DirectRelay) -> None:
        slow = self.transport.get_write_buffer_size() > streaming._DIRECT_WRITE_LIMIT
        (declined if slow else taken)[0] += 1
        flush(self)

    monkeypatch.setattr(streaming.DirectRelay, "_flush", counting)
    hostile.body = _chunk("first")
    hostile.parts = [_chunk(f"{i:04d}" + "x" * 30_000) for i in range(300)] + [b"data: [DONE]\n\n"]
    hostile.gap_s = 0.001
    proxy = await make_proxy(base_url=hostile.url)
    got = bytearray()
    async with aiohttp.ClientSession(read_bufsize=4096) as s:
        async with s.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {proxy.token}"},
                          json={"model": ADMITTED, "messages": [{"role": "user", "content": "hi"}],
                                "stream": True}) as r:
            assert r.status == 200
            for _ in range(100_000):  # bounded: 9 MB in reads of at most 4 KiB
                data = await r.content.read(4096)
                if not data:
                    break
                got += data
                if len(got) < 6_000_000:
                    await asyncio.sleep(0.0005)
    assert bytes(got) == hostile.body + b"".join(hostile.parts)
    assert taken[0] > 0 and declined[0] > 0
    assert proxy.requests_evidence()[-1]["reason"] == "ok"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_backends_request_id_never_reaches_the_client(make_proxy: MakeProxy,  # noqa: F811
                                                              hostile: HostileBackend, stream: bool) -> None:
    """The client's X-Request-Id names the proxy's record; one the backend sends (here in
    lower case, which a plain dict merge kept beside the proxy's) is dropped."""
    hostile.headers = {"x-request-id": "forged-by-backend", "X-Backend-Note": "kept"}
    if stream:
        hostile.body = _chunk("a") + b"data: [DONE]\n\n"
    else:
        hostile.content_type = "application/json"
        hostile.body = orjson.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": ADMITTED,
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": "a"}}]})
    proxy = await make_proxy(base_url=hostile.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {proxy.token}"},
                          json={"model": ADMITTED, "messages": [{"role": "user", "content": "hi"}],
                                "stream": stream}) as r:
            assert r.status == 200
            await r.read()
            ids, note = r.headers.getall("X-Request-Id"), r.headers.get("X-Backend-Note")
    assert ids == [proxy.requests_evidence()[-1]["request_id"]] and note == "kept"
