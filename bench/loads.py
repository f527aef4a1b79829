"""The load generators, each in its own process: wrk (non-streaming) and
bench.streamclient (SSE streams). Bearer tokens travel by environment, never argv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .procs import ROOT, Proc
from .stats import WrkResult, parse_wrk

POST_LUA = Path(__file__).resolve().parent / "wrk" / "post.lua"


def chat_body(content: str, stream: bool = False, model: str = "qwen3.6-35b-a3b") -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def write_body(directory: Path, name: str, body: bytes) -> Path:
    path = directory / name
    path.write_bytes(body)
    return path


def run_wrk(url: str, body_file: Path, connections: int, duration_s: float, token: str | None,
            timeout_s: float = 10.0) -> WrkResult:
    """One wrk run against ``url`` (chat completions). wrk gets at most 2 threads: these
    machines have 2 cores and the thing measured needs one."""
    assert url.startswith("http://127.0.0.1:"), url
    threads = max(1, min(2, connections))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--timeout", f"{timeout_s:g}s", "-s", str(POST_LUA), url, "--", str(body_file)]
    env = {**os.environ, "BENCH_TOKEN": token or ""}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + timeout_s + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr.strip()[:300]}")
    return parse_wrk(out.stdout)


def measured_wrk(target: Proc, url: str, body_file: Path, connections: int, duration_s: float,
                 token: str | None) -> tuple[WrkResult, float]:
    """wrk plus the CPU seconds the target's process tree spent meanwhile."""
    cpu0 = target.cpu()
    res = run_wrk(url, body_file, connections, duration_s, token)
    return res, target.cpu() - cpu0


def run_streams(url: str, streams: int, body_file: Path, token: str | None, ramp_s: float,
                timeout_s: float) -> dict[str, object]:
    env = {**os.environ, "BENCH_TOKEN": token or ""}
    argv = [sys.executable, "-m", "bench.streamclient", "--url", url, "--streams", str(streams),
            "--body-file", str(body_file), "--ramp-s", str(ramp_s), "--timeout-s", str(timeout_s)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout_s + ramp_s + 60)
    for line in out.stdout.splitlines():
        if line.startswith("STREAM_JSON "):
            return json.loads(line[len("STREAM_JSON "):])
    raise RuntimeError(f"stream client failed ({out.returncode}): {out.stderr.strip()[-400:]}")
