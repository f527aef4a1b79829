"""Issue 18's hostile response heads, through the real proxy: a raw asyncio backend on
127.0.0.1 (a test fixture: no HTTP library, no model behind it) answers the generation
with exactly the bytes each case names. Each becomes a 502 `backend_protocol_error` in
the OpenAI error shape for the client (the official SDK), and a record that says so.

Against the hand-written parser this replaced (its proxy/backend_http.py put back, this
file run), 7 of these 14 failed: a Unicode digit in the status or in Content-Length (a
ValueError out of ``data_received``: asyncio logged a fatal error and dropped the
connection, so the client got a 502 only by accident), a status below 100 or above 599
and a bare LF after the status line (relayed to the client), a head over the limit
arriving in one piece and blanks after a chunk size (accepted). The other 7 it already
refused. A status below 100 also ends here in a 502 when the range check is removed
(llhttp then waits for a final answer and the fixture closes the connection); the
property tests (tests/test_response_parser_props.py) prove that check on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import openai
import orjson
import pytest

from tests.proxy_support import ADMITTED, MakeProxy, make_proxy, read_http_request  # noqa: F401

MSG = [{"role": "user", "content": "hi"}]
BODY = orjson.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": ADMITTED,
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "hi"}}]})
LISTING = orjson.dumps({"object": "list", "data": [{"id": ADMITTED, "object": "model", "owned_by": "t"}]})
JSON = b"Content-Type: application/json\r\n"


def answer(status: bytes = b"200 OK", extra: bytes = b"", body: bytes = BODY, length: bytes | None = None) -> bytes:
    cl = b"Content-Length: " + (length if length is not None else b"%d" % len(body)) + b"\r\n"
    return b"HTTP/1.1 " + status + b"\r\n" + JSON + extra + cl + b"\r\n" + body


def chunked(size_line: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: chunked\r\n\r\n"
            + size_line + b"\r\n" + BODY + b"\r\n0\r\n\r\n")


HOSTILE: dict[str, bytes] = {
    "status with a Unicode digit": answer(b"2\xb20 OK"),  # latin-1 '²': '2²0'.isdigit() is True
    "Content-Length of a Unicode digit": answer(length=b"\xb9"),  # '¹'
    "status below 100": answer(b"042 OK"),
    "status above 599": answer(b"600 OK"),
    "bare LF after the status line": answer(b"200 OK\nX-Hidden: in the reason phrase"),
    "bare LF between headers": answer(extra=b"X-A: 1\nX-B: 2\r\n"),
    "head over 64 KiB arriving whole": answer(extra=b"".join(b"X-%d: " % i + b"v" * 1000 + b"\r\n"
                                                             for i in range(70))),
    "Content-Length duplicates that differ": answer(extra=b"Content-Length: %d\r\n" % (len(BODY) + 1)),
    "signed Content-Length": answer(length=b"+%d" % len(BODY)),
    "Content-Length not digits": answer(length=b"%dx" % len(BODY)),
    "chunk size with a sign": chunked(b"+%x" % len(BODY)),
    "chunk size followed by a blank": chunked(b"%x " % len(BODY)),
    "chunk size not hex": chunked(b"%xg" % len(BODY)),
    "Content-Length beside Transfer-Encoding": chunked(b"%x" % len(BODY)).replace(
        b"Transfer-Encoding", b"Content-Length: %d\r\nTransfer-Encoding" % len(BODY)),
}


class RawBackend:
    """Answers ``GET .../models`` with the admitted model (so the proxy is ready) and
    every other request with ``self.answer``, byte for byte, then closes."""

    def __init__(self) -> None:
        self.answer = answer()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, _ = await read_http_request(reader, 10)
                if head.startswith(b"GET ") and b"/models " in head.split(b"\r\n", 1)[0]:
                    writer.write(b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: %d\r\n\r\n" % len(LISTING) + LISTING)
                    await writer.drain()
                    continue
                writer.write(self.answer)
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = RawBackend()
    await backend.start()
    yield backend
    await backend.stop()


async def test_an_honest_answer_through_the_raw_backend_reaches_the_client(
        make_proxy: MakeProxy, raw_backend: RawBackend) -> None:  # noqa: F811
    """The fixture itself is sound: its honest answer goes through (so the refusals
    below are about the bytes each case changes)."""
    proxy = await make_proxy(base_url=raw_backend.url)
    async with proxy.client() as client:
        done = await client.chat.completions.create(model=ADMITTED, messages=MSG)
        assert done.model == ADMITTED and done.choices[0].message.content == "hi"
        raw_backend.answer = chunked(b"%x;ext=1" % len(BODY))
        done = await client.chat.completions.create(model=ADMITTED, messages=MSG)
        assert done.choices[0].message.content == "hi"
    assert [r["status"] for r in proxy.requests_evidence()] == [200, 200]


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_head_is_a_502_with_a_record(make_proxy: MakeProxy, raw_backend: RawBackend,  # noqa: F811
                                                     case: str, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal is the parser's: nothing escapes ``data_received`` (asyncio would log
    it as a fatal error and close the connection, which also ends in a 502)."""
    raw_backend.answer = HOSTILE[case]
    proxy = await make_proxy(base_url=raw_backend.url)
    async with proxy.client() as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.status_code == 502 and info.value.code == "backend_protocol_error"
    body = info.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}  # the SDK unwraps "error"
    assert body["type"] == "api_error"
    rec = proxy.requests_evidence()[-1]
    assert (rec["status"], rec["decision"], rec["reason"]) == (502, "error", "backend_protocol_error")
    assert proxy.metric("case_proxy_upstream_errors_total", kind="protocol") == 1
    # Only asyncio's own report of a protocol callback that raised: other asyncio errors
    # (an earlier test's SDK client collected late) are not this test's.
    fatal = [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert [m for m in fatal if "data_received" in m] == []
