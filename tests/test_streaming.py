"""The relay (proxy.streaming) writes exactly what ``StreamChecker`` releases, the bytes
``finish`` releases at the end of the body included: it never parses the stream
itself. The backend is the scripted test fixture (harness.scripted_backend)."""

from __future__ import annotations

import aiohttp
import pytest

from proxy import streaming
from proxy.stream_check import StreamChecker
from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy  # noqa: F401

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
