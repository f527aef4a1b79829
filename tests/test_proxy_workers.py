"""`case-proxy serve --workers N`: N forked workers share one port via SO_REUSEPORT.

Real subprocesses and sockets on 127.0.0.1; the backend is the scripted test fixture
(harness.scripted_backend), standing in for an engine because no GPU exists here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.workers import worker_evidence_path
from tests.proxy_support import ADMITTED, ROOT, ProxyProcess, cli, proxy_env


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _sample(text: str, name: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def _one_request(base_url: str, token: str, model: str) -> int:
    """One request on a fresh connection, so the kernel picks a worker each time.

    A connection that cannot be made is tried again on a new one, at most twice: after a
    whole test run of loopback connections, the kernel now and then drops every SYN of one
    client port that matches an old TIME_WAIT entry (``TcpExtPAWSTimewait`` in ``nstat``),
    which no worker sees. A request that got an answer is never repeated; one repeated
    after it reached a worker would be an extra record, and the count of 31 would fail."""
    for attempt in range(3):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0) as client:
            try:
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code
            except openai.APIConnectionError:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def _worker_pids(tmp_path: Path, n: int) -> list[int]:
    return [_records(worker_evidence_path(tmp_path / "evidence.jsonl", i))[0]["pid"] for i in range(n)]


def test_worker_evidence_path_keeps_directory_and_suffix() -> None:
    assert worker_evidence_path(Path("/var/log/case/evidence.jsonl"), 3) == Path("/var/log/case/evidence.worker3.jsonl")
    assert worker_evidence_path(Path("ev"), 0) == Path("ev.worker0")


async def test_workers_share_the_port_record_their_own_chains_and_sum_metrics(scripted_backend,
                                                                              tmp_path: Path) -> None:
    metrics_tmp = tmp_path / "tmpdir"
    metrics_tmp.mkdir()
    env = proxy_env(tmp_path, scripted_backend.base_url, TMPDIR=str(metrics_tmp))
    token = env["CASE_PROXY_TOKEN"]
    proc = ProxyProcess(env, tmp_path / "proxy.log", "--workers", "2")
    await proc.start()
    try:
        statuses = [await _one_request(proc.base_url, token, ADMITTED) for _ in range(30)]
        refused = await _one_request(proc.base_url, token, "claude-sonnet-4-6")
        assert statuses == [200] * 30 and refused == 403
        # Whichever worker answers the scrape, it shows both workers' traffic.
        for _ in range(6):
            async with aiohttp.ClientSession() as s, s.get(proc.base_url.removesuffix("/v1") + "/metrics") as r:
                text = await r.text()
            assert _sample(text, "case_proxy_requests_total", endpoint="chat_completions", outcome="ok") == 30
            assert _sample(text, "case_proxy_fallback_rejections_total", reason="model_not_admitted",
                           family="anthropic") == 1
            assert _sample(text, "case_proxy_backend_ready") == 1
        assert list(metrics_tmp.iterdir()), "the workers' metric files live in a temporary directory"
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0
    files = [worker_evidence_path(tmp_path / "evidence.jsonl", i) for i in range(2)]
    assert not (tmp_path / "evidence.jsonl").exists()
    per_worker = []
    for i, f in enumerate(files):
        recs = _records(f)
        assert recs[0]["kind"] == "proxy_start" and recs[0]["worker"] == i
        assert recs[-1]["kind"] == "proxy_stop"
        per_worker.append([r for r in recs if r["kind"] == "request"])
    assert sum(len(r) for r in per_worker) == 31
    assert all(per_worker), "the kernel spread 31 fresh connections over both workers"
    ids = [r["request_id"] for recs in per_worker for r in recs]
    assert len(set(ids)) == 31 and all(len(i) == 32 for i in ids), "request ids are unique across workers"
    assert len({_records(f)[0]["pid"] for f in files}) == 2
    verified = cli("verify-evidence", *map(str, files), env=dict(os.environ))
    assert verified.returncode == 0 and verified.stdout.count("chain intact") == 2
    assert list(metrics_tmp.iterdir()) == [], "the metrics directory is removed at stop"


@pytest.mark.prometheus
async def test_the_summed_exposition_passes_promtool(scripted_backend, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps` (Debian package prometheus)")
    env = proxy_env(tmp_path, scripted_backend.base_url)
    proc = ProxyProcess(env, tmp_path / "proxy.log", "--workers", "2")
    await proc.start()
    try:
        for model in (ADMITTED, ADMITTED, "claude-sonnet-4-6", "gpt-4o"):
            await _one_request(proc.base_url, env["CASE_PROXY_TOKEN"], model)
        async with aiohttp.ClientSession() as s, s.get(proc.base_url.removesuffix("/v1") + "/metrics") as r:
            text = await r.text()
    finally:
        await asyncio.to_thread(proc.stop)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _sample(text, "case_proxy_fallback_rejections_total", reason="model_not_admitted", family="openai") == 1
    assert _sample(text, "case_proxy_request_duration_seconds_count", endpoint="chat_completions") == 2


async def test_a_worker_that_dies_stops_every_worker(scripted_backend, tmp_path: Path) -> None:
    env = proxy_env(tmp_path, scripted_backend.base_url)
    proc = ProxyProcess(env, tmp_path / "proxy.log", "--workers", "2")
    await proc.start()
    assert proc.proc is not None
    victim, survivor = _worker_pids(tmp_path, 2)
    os.kill(victim, signal.SIGKILL)
    code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 1
    log = (tmp_path / "proxy.log").read_text()
    assert f"worker 0 (pid {victim}) exited with -9 while serving; stopping every worker" in log
    assert _records(worker_evidence_path(tmp_path / "evidence.jsonl", 1))[-1]["kind"] == "proxy_stop"
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)
    port = int(proc.base_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    proc.stop()


async def test_signalling_the_whole_group_stops_cleanly(scripted_backend, tmp_path: Path) -> None:
    """Ctrl-C and systemd reach every process: the workers drain, the supervisor exits 0."""
    env = proxy_env(tmp_path, scripted_backend.base_url)
    proc = ProxyProcess(env, tmp_path / "proxy.log", "--workers", "2")
    await proc.start()
    assert proc.proc is not None
    for pid in _worker_pids(tmp_path, 2):
        os.kill(pid, signal.SIGTERM)
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    assert "while serving" not in (tmp_path / "proxy.log").read_text()
    proc.stop()


def test_a_worker_that_cannot_record_stops_the_start(tmp_path: Path) -> None:
    """Worker 1's evidence path is a directory: it cannot record, so nothing serves."""
    worker_evidence_path(tmp_path / "evidence.jsonl", 1).mkdir()
    env = proxy_env(tmp_path, "http://127.0.0.1:9/v1")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0", "--workers", "2"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stderr
    assert "CASE_PROXY_LISTENING" not in out.stdout
    assert "CASE_PROXY_EVIDENCE_FILE: cannot record evidence" in out.stderr
    assert "worker 1 failed to start (exit 2); stopping all workers" in out.stderr
    assert time.monotonic() - started < 60
    assert _records(worker_evidence_path(tmp_path / "evidence.jsonl", 0))[-1]["kind"] == "proxy_stop"


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = proxy_env(tmp_path, "http://127.0.0.1:9/v1")
        out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", str(port), "--workers", "2"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_worker_count_out_of_range_is_named(tmp_path: Path, value: str) -> None:
    env = proxy_env(tmp_path, "http://127.0.0.1:9/v1")
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0", "--workers", value],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "workers" in out.stderr
    config = tmp_path / "proxy.toml"
    toml_value = value if value.isdigit() else json.dumps(value)
    config.write_text(f"[server]\nworkers = {toml_value}\n")
    checked = cli("check-config", "--config", str(config), env=env)
    assert checked.returncode == 2 and "setting 'workers'" in checked.stderr
