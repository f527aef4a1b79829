"""`python -m bench.stream_check_micro`: events per second through the stream check.

CPU only, no sockets: the checker (proxy.stream_check.StreamChecker) is fed a stream of
typical chat chunks (the bench SSE fixture's shape, about 250 bytes each) the way reads
arrive, and the best of several timed repeats is reported per shape. The numbers in
docs/stream-check.md come from this script.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import orjson

from proxy.served_model import UsageTotals
from proxy.stream_check import StreamChecker

MODEL = "qwen3.6-35b-a3b"


def typical_event(model: str = MODEL, end: bytes = b"\n\n") -> bytes:
    """A chat completion chunk as vLLM writes it (compact JSON), about 250 bytes."""
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-0f6c6d2bd5a94d7e9d4b3c1a2e5f7a90", "object": "chat.completion.chunk",
        "created": 1767225600, "model": model, "system_fingerprint": "fp_local",
        "choices": [{"index": 0, "delta": {"content": " the quick brown fox"}, "logprobs": None,
                     "finish_reason": None}]}) + end


def shapes() -> dict[str, list[bytes]]:
    """Reads of one stream of 1,000 events, per shape."""
    one = typical_event()
    crlf = typical_event(end=b"\r\n\r\n")
    indented = orjson.dumps(orjson.loads(one[6:-2]), option=orjson.OPT_INDENT_2)
    spaced = b"data: " + indented.replace(b"\n", b" ") + b"\n\n"
    return {
        "one event per read": [one] * 1000,
        "8 events per read": [one * 8] * 125,
        "one CRLF event per read": [crlf] * 1000,
        "non-canonical JSON (slow exact duplicate test)": [spaced] * 1000,
    }


def events_per_second(reads: list[bytes], make: Callable[[], Callable[[bytes], object]], repeats: int) -> float:
    events = sum(r.count(b"data:") for r in reads)
    best = float("inf")
    for _ in range(repeats):
        feed = make()
        t0 = time.perf_counter()
        for r in reads:
            feed(r)
        best = min(best, time.perf_counter() - t0)
    return events / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_check_micro", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per shape; the best is kept (default 30)")
    args = p.parse_args(argv)
    if not 1 <= args.repeats <= 1000:
        p.error("--repeats must be between 1 and 1000")
    print(f"event size: {len(typical_event())} bytes; Python {sys.version.split()[0]}")
    for name, reads in shapes().items():
        rate = events_per_second(reads, lambda: StreamChecker(MODEL, UsageTotals()).feed, args.repeats)
        print(f"{name}: {rate:,.0f} events/s ({1e6 / rate:.2f} us per event)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
