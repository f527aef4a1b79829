"""Canned SSE answers for the streaming scenario: a BENCH FIXTURE, not a model.

The streaming counterpart of nginx answering canned JSON. The scripted test backend
(``harness.scripted_backend``, aiohttp) spent about 30 us of CPU per event on the 2-core
bench machines and let every stream drift (each 5 ms sleep starts after the previous
write), so at high stream counts the backend, not the proxy, set the pace. This one is a
raw asyncio protocol on uvloop: every event is built and framed once at start, and each
stream sends its events on an absolute schedule (start + i x spacing) with one live timer
per stream. Nothing it sends says anything about a real model.

It answers ``GET /v1/models`` (the admitted model, for the proxy's readiness probe) and
``POST /v1/chat/completions`` with a stream: a role event, ``--chunks`` content events, a
finish event and ``data: [DONE]``, in chunked transfer encoding on a keep-alive
connection (closed after the answer if the request asked). Anything else gets 404.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson

FINGERPRINT = "bench-canned-sse"
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024


def _frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def stream_events(model: str, chunks: int) -> list[bytes]:
    """The SSE events of one answer (each ends in its blank line), as the scripted
    backend and vLLM shape chat completion chunks."""
    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1767225600, "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}) + b"\n\n"

    return ([chunk({"role": "assistant", "content": ""})] + [chunk({"content": "ab"}) for _ in range(chunks)]
            + [chunk({}, "stop"), b"data: [DONE]\n\n"])


def _response(status: str, body: bytes, content_type: str, close: bool) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"X-Bench-Fixture: {FINGERPRINT}\r\n{connection}\r\n").encode() + body


class _Answers:
    """Everything a connection sends, built once."""

    def __init__(self, model: str, chunks: int, delay_s: float) -> None:
        self.delay_s = delay_s
        self.events = [_frame(ev) for ev in stream_events(model, chunks)]
        self.events[-1] += b"0\r\n\r\n"  # the last event ends the chunked body
        head = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                f"Transfer-Encoding: chunked\r\nX-Bench-Fixture: {FINGERPRINT}\r\n")
        self.stream_head = head.encode()
        models = orjson.dumps({"object": "list", "data": [
            {"id": model, "object": "model", "created": 1767225600, "owned_by": FINGERPRINT}]})
        self.models = {close: _response("200 OK", models, "application/json", close) for close in (False, True)}
        missing = orjson.dumps({"error": {"message": "not served by the bench fixture", "type": "not_found"}})
        self.not_found = {close: _response("404 Not Found", missing, "application/json", close)
                          for close in (False, True)}
        self.bad = _response("400 Bad Request", b'{"error":{"message":"malformed request"}}', "application/json",
                             True)


class _Connection(asyncio.Protocol):
    """One client connection: requests in order, one answer at a time."""

    def __init__(self, answers: _Answers, loop: asyncio.AbstractEventLoop) -> None:
        self._a = answers
        self._loop = loop
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._next_request()

    def _next_request(self) -> None:
        while not self._busy and self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._fail()
                return
            try:
                method, path, length, close = _parse_head(bytes(self._buf[:end]))
            except ValueError:
                self._fail()
                return
            if end + 4 + length > len(self._buf):
                return  # the body is still coming
            del self._buf[:end + 4 + length]
            self._answer(method, path, close)

    def _answer(self, method: str, path: str, close: bool) -> None:
        assert self._transport is not None
        if method == "POST" and path == "/v1/chat/completions":
            self._busy = True
            head = self._a.stream_head + (b"Connection: close\r\n" if close else b"") + b"\r\n"
            self._transport.write(head + self._a.events[0])
            self._schedule(self._loop.time(), 1, close)
            return
        if method == "GET" and path == "/v1/models":
            self._transport.write(self._a.models[close])
        else:
            self._transport.write(self._a.not_found[close])
        if close:
            self._transport.close()

    def _schedule(self, start: float, i: int, close: bool) -> None:
        self._timer = self._loop.call_at(start + i * self._a.delay_s, self._send, start, i, close)

    def _send(self, start: float, i: int, close: bool) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        transport.write(self._a.events[i])
        if i + 1 < len(self._a.events):
            self._schedule(start, i + 1, close)
        elif close:
            transport.close()
        else:
            self._busy = False
            self._next_request()

    def _fail(self) -> None:
        assert self._transport is not None
        self._transport.write(self._a.bad)
        self._transport.close()


def _parse_head(head: bytes) -> tuple[str, str, int, bool]:
    """Method, path, body length and whether the client asked to close; ValueError for
    what this fixture does not take (no chunked request bodies, no oversized ones)."""
    lines = head.decode("latin-1").split("\r\n")
    method, path, version = lines[0].split(" ", 2)
    length, close = 0, version == "HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        if key == "content-length":
            length = int(value)
            if not 0 <= length <= _MAX_BODY:
                raise ValueError("content-length out of range")
        elif key == "transfer-encoding":
            raise ValueError("request bodies must carry a content-length")
        elif key == "connection":
            close = value.lower() == "close"
    return method, path.split("?", 1)[0], length, close


async def serve(host: str, port: int, model: str, chunks: int, delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    answers = _Answers(model, chunks, delay_ms / 1000)
    server = await loop.create_server(lambda: _Connection(answers, loop), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"SSE_BACKEND_READY http://{host}:{bound[1]}/v1", flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse_backend", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="qwen3.6-35b-a3b")
    p.add_argument("--chunks", type=int, default=200, help="content events per answer")
    p.add_argument("--delay-ms", type=float, default=5.0, help="spacing of a stream's events")
    args = p.parse_args(argv)
    if args.chunks < 1 or args.delay_ms < 0:
        p.error("--chunks must be >= 1 and --delay-ms >= 0")
    if args.host not in ("127.0.0.1", "::1"):
        p.error(f"--host must be 127.0.0.1 or ::1 (a bench fixture listens on loopback only), not {args.host!r}")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.run(serve(args.host, args.port, args.model, args.chunks, args.delay_ms))
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port, args.model, args.chunks, args.delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
