"""`python -m bench.response_parser_micro`: CPU per backend response in the proxy's HTTP
client, parsing included.

No sockets: one ``proxy.backend_http._Connection`` on a stand-in transport is sent a
request and handed canned responses the way reads arrive (``data_received``), its
response read to the end and released back to the pool, ``--count`` times per shape.
The best of ``--repeats`` is reported in CPU time of the process (``time.process_time``,
less swayed than wall time by other work on a shared machine). ``--module`` names another
module with the same ``_Connection`` interface (how the hand-written parser this
replaced was timed: its file from git put beside it under another name).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from typing import Any

import orjson

MODEL = "qwen3.6-35b-a3b"
HEAD_BASE = (b"date: Sat, 28 Nov 2026 10:00:00 GMT\r\nserver: uvicorn\r\n"
             b"x-request-id: 0f6c6d2bd5a94d7e9d4b3c1a2e5f7a90\r\n")


def _json_answer() -> tuple[list[bytes], bytes]:
    body = orjson.dumps({
        "id": "chatcmpl-0f6c6d2bd5a94d7e9d4b3c1a2e5f7a90", "object": "chat.completion", "created": 1767225600,
        "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                     "message": {"role": "assistant", "content": "the quick brown fox " * 40}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 160, "total_tokens": 180}})
    head = (b"HTTP/1.1 200 OK\r\n" + HEAD_BASE + b"content-length: %d\r\ncontent-type: application/json\r\n\r\n"
            % len(body))
    return [head + body], body


def _sse_answer(events: int, per_read: int) -> tuple[list[bytes], bytes]:
    event = b"data: " + orjson.dumps({
        "id": "chatcmpl-0f6c6d2bd5a94d7e9d4b3c1a2e5f7a90", "object": "chat.completion.chunk",
        "created": 1767225600, "model": MODEL, "choices": [{"index": 0, "delta": {"content": " the quick brown fox"},
                                                            "logprobs": None, "finish_reason": None}]}) + b"\n\n"
    chunk = b"%x\r\n%s\r\n" % (len(event), event)
    head = (b"HTTP/1.1 200 OK\r\n" + HEAD_BASE
            + b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
    reads = [head] + [chunk * per_read] * (events // per_read) + [b"0\r\n\r\n"]
    return reads, event * events


def shapes() -> dict[str, tuple[list[bytes], bytes]]:
    """(reads, expected body) per shape."""
    return {
        "JSON answer, 1 KiB, one read": _json_answer(),
        "SSE stream, 200 events, one per read": _sse_answer(200, 1),
        "SSE stream, 200 events, 8 per read": _sse_answer(200, 8),
    }


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Pool:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[Any] = []

    def put_back(self, conn: Any) -> None:
        self.idle.append(conn)

    def forget(self, conn: Any) -> None:
        pass


def seconds_per_response(module: Any, reads: list[bytes], expected: bytes, count: int, repeats: int) -> float:
    loop = asyncio.new_event_loop()
    try:
        pool = _Pool(loop)
        conn = module._Connection(pool)
        conn.connection_made(_Transport())
        request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n"
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(count):
                waiter = conn.send(request, b"{}")
                for data in reads:
                    conn.data_received(data)
                resp = waiter.result() if waiter.done() else None
                if resp is None or not resp.complete():
                    raise AssertionError("the response was not parsed whole")
                body = resp.take()
                resp.release()
                if len(body) != len(expected) or not pool.idle or pool.idle.pop() is not conn:
                    raise AssertionError("the body was not read whole, or the connection not reused")
            best = min(best, time.process_time() - t0)
        if body != expected:
            raise AssertionError("the body read is not the body sent")
        return best / count
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.response_parser_micro", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10_000, help="responses per timed repeat (default 10,000)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per shape; the best is kept (default 5)")
    p.add_argument("--module", default="proxy.backend_http", help="the module whose _Connection is timed")
    args = p.parse_args(argv)
    if not 1 <= args.count <= 1_000_000 or not 1 <= args.repeats <= 100:
        p.error("--count must be 1-1,000,000 and --repeats 1-100")
    module = importlib.import_module(args.module)
    print(f"{args.module}; Python {sys.version.split()[0]}; best of {args.repeats} x {args.count:,} responses")
    for name, (reads, expected) in shapes().items():
        per = seconds_per_response(module, reads, expected, args.count, args.repeats)
        print(f"{name}: {per * 1e6:.2f} us per response")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
