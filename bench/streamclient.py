"""The streaming load client: N concurrent SSE streams, time to first event and the gaps
between events, measured on arrival.

Run in its own process (``python -m bench.streamclient ...``), so its CPU is not the
proxy's. It is a raw asyncio protocol on uvloop rather than an HTTP library, to keep the
client's own cost per event as low as Python allows: it sends one POST per connection
with ``Connection: close``, checks the status line, and counts SSE events by their
``\\n\\n`` terminator (no JSON parsing). Each event's gap is the time since the previous
event of the same stream arrived (events that arrive in the same read get a gap of 0).
A stream counts as complete when the server closes the connection after ``data: [DONE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from array import array

from .stats import percentile


class _Stream(asyncio.Protocol):
    __slots__ = ("req", "t0", "ttft", "last", "events", "gaps", "headers_done", "buf", "status", "tail", "done",
                 "prev_nl", "transport", "t_end", "client")

    def __init__(self, req: bytes, gaps: array, done: asyncio.Future, client: _Client) -> None:
        self.req = req
        self.gaps = gaps
        self.done = done
        self.client = client
        self.t0 = 0.0
        self.ttft: float | None = None
        self.last = 0.0
        self.events = 0
        self.headers_done = False
        self.buf = b""
        self.status = 0
        self.tail = b""
        self.prev_nl = False
        self.t_end = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]
        self.client.active += 1
        self.client.peak_active = max(self.client.peak_active, self.client.active)

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        if not self.headers_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.buf[:end], self.buf[end + 4:]
            self.buf = b""
            self.headers_done = True
            try:
                self.status = int(head.split(b" ", 2)[1])
            except (IndexError, ValueError):
                self.status = -1
            if not data:
                return
        n = data.count(b"\n\n")
        if self.prev_nl and data[:1] == b"\n":
            n += 1
        self.prev_nl = data[-1:] == b"\n" and data[-2:] != b"\n\n"
        if n:
            if self.ttft is None:
                self.ttft = t - self.t0
                n -= 1
                self.events += 1
                self.last = t
            if n:
                self.gaps.append(t - self.last)
                for _ in range(n - 1):
                    self.gaps.append(0.0)
                self.events += n
                self.last = t
        self.tail = (self.tail + data)[-256:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.t_end = time.perf_counter()
        self.client.active -= 1
        if not self.done.done():
            self.done.set_result(None)


class _Client:
    def __init__(self) -> None:
        self.active = 0
        self.peak_active = 0


async def _one(loop: asyncio.AbstractEventLoop, host: str, port: int, req: bytes, gaps: array,
               client: _Client, delay: float, timeout_s: float) -> dict[str, object]:
    if delay:
        await asyncio.sleep(delay)
    done: asyncio.Future = loop.create_future()
    proto = _Stream(req, gaps, done, client)
    proto.t0 = time.perf_counter()
    try:
        await loop.create_connection(lambda: proto, host, port)
        await asyncio.wait_for(done, timeout_s)
    except (TimeoutError, OSError) as exc:
        if proto.transport is not None:
            proto.transport.abort()
        return {"ok": False, "error": type(exc).__name__, "events": proto.events, "ttft": proto.ttft}
    ok = proto.status == 200 and b"data: [DONE]" in proto.tail
    return {"ok": ok, "status": proto.status, "events": proto.events, "ttft": proto.ttft,
            "duration": proto.t_end - proto.t0, "error": None if ok else "incomplete stream"}


async def run(url: str, streams: int, token: str | None, body: bytes, ramp_s: float, timeout_s: float) -> dict:
    assert url.startswith("http://127.0.0.1:"), "the bench only talks to 127.0.0.1"
    rest = url[len("http://"):]
    hostport, _, path = rest.partition("/")
    host, port = hostport.split(":")
    path = "/" + path
    lines = [f"POST {path} HTTP/1.1", f"Host: {hostport}", "Content-Type: application/json",
             "Accept: text/event-stream", f"Content-Length: {len(body)}", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    req = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    gaps = array("d")
    client = _Client()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    step = ramp_s / streams if streams > 1 else 0.0
    results = await asyncio.gather(*(
        _one(loop, host, int(port), req, gaps, client, i * step, timeout_s) for i in range(streams)))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    durations = [r["duration"] for r in ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["error"])] = errors.get(str(r["error"]), 0) + 1
    g = sorted(gaps)
    events = sum(int(r["events"]) for r in results)

    def pct(vals: list[float], q: float) -> float | None:
        v = percentile(vals, q)
        return None if v != v else v * 1e6  # noqa: PLR0124 - nan check

    return {
        "streams": streams, "completed": len(ok), "errors": errors, "events": events,
        "peak_concurrent": client.peak_active, "wall_s": wall,
        "events_per_s": events / wall if wall else 0.0,
        "client_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "ttft_us": {q: pct(ttfts, q) for q in (50, 90, 99)},
        "gap_us": {q: pct(g, q) for q in (50, 90, 99, 99.9)},
        "gap_mean_us": (sum(g) / len(g) * 1e6) if g else None,
        "gaps": len(g),
        "stream_duration_s": {q: (percentile(durations, q) if durations else None) for q in (50, 99)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streamclient")
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/chat/completions")
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread the stream starts over this many seconds")
    p.add_argument("--timeout-s", type=float, default=120.0, help="give up on a stream after this long")
    args = p.parse_args(argv)
    import resource as _r
    soft, hard = _r.getrlimit(_r.RLIMIT_NOFILE)
    if soft < hard:
        _r.setrlimit(_r.RLIMIT_NOFILE, (hard, hard))
    body = open(args.body_file, "rb").read()
    import os
    # The bearer token comes from the environment (BENCH_TOKEN), never argv.
    coro = run(args.url, args.streams, os.environ.get("BENCH_TOKEN") or None, body, args.ramp_s, args.timeout_s)
    try:
        import uvloop
        out = uvloop.run(coro)
    except ImportError:  # pragma: no cover
        out = asyncio.run(coro)
    # Percentile keys as strings for JSON.
    out["ttft_us"] = {str(k): v for k, v in out["ttft_us"].items()}
    out["gap_us"] = {str(k): v for k, v in out["gap_us"].items()}
    out["stream_duration_s"] = {str(k): v for k, v in out["stream_duration_s"].items()}
    sys.stdout.write("STREAM_JSON " + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
