"""The proxy as operators run it: `case-proxy` subprocesses, exit codes, SIGTERM drain,
and the canary test (no secret reaches logs, evidence, metrics or error bodies).

The backend is the scripted test fixture (harness.scripted_backend), in-process.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.proxy_support import ADMITTED, ROOT, ProxyProcess, cli, proxy_env


def test_check_config_ok_and_problems_named(tmp_path: Path) -> None:
    env = proxy_env(tmp_path, "http://127.0.0.1:8000/v1")
    ok = cli("check-config", env=env)
    assert ok.returncode == 0, ok.stderr
    bad = dict(env)
    del bad["CASE_PROXY_TOKEN"]
    bad["CTO_HARNESS_CASE_LOCAL_BASE_URL"] = ""
    out = cli("check-config", env=bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert any("CASE_PROXY_TOKEN" in line for line in lines)
    assert any("CTO_HARNESS_CASE_LOCAL_BASE_URL" in line for line in lines)


def test_check_config_names_gate_failures_without_echoing_the_url(tmp_path: Path) -> None:
    env = proxy_env(tmp_path, "https://api.anthropic.com/v1")
    Path(env["CTO_HARNESS_CASE_MODEL_ADMISSION_FILE"]).write_text(json.dumps({
        "schema_version": 1, "work_item": "CTO-WORK-020", "provider": "qwen-local",
        "provider_class": "local_case_compatible", "model": ADMITTED, "admission_status": "revoked"}))
    out = cli("check-config", env=env)
    assert out.returncode == 2
    assert "admission_status_blocks" in out.stderr and "external_provider_host" in out.stderr
    assert "api.anthropic.com" not in out.stderr + out.stdout


async def test_check_config_probe_asks_the_backend_for_the_admitted_model(scripted_backend, tmp_path: Path) -> None:
    """--probe makes the proxy's own readiness check once: it passes only when the backend
    lists the admitted model, and never echoes the backend URL."""
    env = proxy_env(tmp_path, scripted_backend.base_url)
    ok = await asyncio.to_thread(cli, "check-config", "--probe", env=env)
    assert ok.returncode == 0 and "the backend lists the admitted model" in ok.stdout, ok.stderr
    probes = sum(1 for r in scripted_backend.requests if r.path == "/v1/models")
    assert probes == 1
    assert (await asyncio.to_thread(cli, "check-config", env=env)).returncode == 0
    assert sum(1 for r in scripted_backend.requests if r.path == "/v1/models") == probes  # no flag, no probe
    scripted_backend.model = "some-other-model"
    other = await asyncio.to_thread(cli, "check-config", "--probe", env=env)
    assert other.returncode == 2 and "backend_not_ready: backend does not list the admitted model" in other.stderr
    await scripted_backend.stop()
    gone = await asyncio.to_thread(cli, "check-config", "--probe", env=env)
    assert gone.returncode == 2 and "backend /v1/models unreachable" in gone.stderr
    port = scripted_backend.base_url.rsplit(":", 1)[1].split("/")[0]
    assert port not in gone.stderr + gone.stdout + other.stderr + ok.stdout


def test_a_torn_log_stops_the_start_names_the_problem_and_stays_as_it_was(tmp_path: Path) -> None:
    """After a disk filled up mid-write the log ends in a partial line: the proxy will not
    chain onto it, says what is wrong and what to do, and changes nothing in it."""
    from proxy.hashchain import HashChainWriter

    env = proxy_env(tmp_path, "http://127.0.0.1:9/v1")
    log = Path(env["CASE_PROXY_EVIDENCE_FILE"])
    w = HashChainWriter(log)
    w.open()
    w.append({"kind": "request", "time": "2026-11-26T00:00:00.000Z", "request_id": "r0", "status": 200})
    w.close()
    log.write_bytes(log.read_bytes() + b'{"kind":"request","time":"2026-11-2')
    before = log.read_bytes()
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    # Its own exit code (not 2, a configuration error): a restart meets the same torn
    # file, so a service manager must be able to tell it apart and not restart.
    assert out.returncode == 4 and "CASE_PROXY_LISTENING" not in out.stdout
    assert "CASE_PROXY_EVIDENCE_FILE: cannot record evidence" in out.stderr
    assert "line 2: partial last line" in out.stderr and "start a new log under another name" in out.stderr
    assert log.read_bytes() == before


def test_serve_refuses_to_start_when_a_gate_blocks(tmp_path: Path) -> None:
    env = proxy_env(tmp_path, "http://127.0.0.1:8000/v1")
    Path(env["CTO_HARNESS_CASE_DECISION_FILE"]).write_text(json.dumps({
        "work_item": "CTO-WORK-020", "decision_status": "external_provider_allowed",
        "provider_class": "local_case_compatible", "decided_at": "2026-06-01T00:00:00Z"}))
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "decision_not_local_provider_required" in out.stderr
    assert "CASE_PROXY_LISTENING" not in out.stdout


def test_verify_evidence_cli(tmp_path: Path) -> None:
    from proxy.hashchain import HashChainWriter

    path = tmp_path / "ev.jsonl"
    w = HashChainWriter(path)
    w.open()
    for i in range(3):
        w.append({"kind": "request", "time": "2026-11-24T00:00:00.000Z", "request_id": f"r{i}", "status": 200})
    w.close()
    env = dict(os.environ)
    assert cli("verify-evidence", str(path), env=env).returncode == 0
    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    broken = cli("verify-evidence", str(path), env=env)
    assert broken.returncode == 1 and "broken" in broken.stdout
    assert cli("verify-evidence", str(tmp_path / "nope.jsonl"), env=env).returncode == 2


async def test_sigterm_lets_open_streams_finish_and_closes_the_log(scripted_backend, tmp_path: Path) -> None:
    scripted_backend.chunk_delay_s = 0.1
    scripted_backend.chunks = 15
    env = proxy_env(tmp_path, scripted_backend.base_url)
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
    stream = await client.chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}],
                                                  stream=True)
    chunks = 0
    async for _ in stream:
        chunks += 1
        if chunks == 2:
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
    assert chunks >= 15  # the open stream finished after SIGTERM
    assert await asyncio.to_thread(proc.stop) == 0
    records = [json.loads(x) for x in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "proxy_start" and records[-1]["kind"] == "proxy_stop"
    assert any(r.get("stream") and r.get("status") == 200 for r in records)
    assert cli("verify-evidence", str(tmp_path / "evidence.jsonl"), env=dict(os.environ)).returncode == 0


def _forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("="),
            urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)]


async def test_repeated_stop_signals_still_end_in_a_clean_exit(scripted_backend, tmp_path: Path) -> None:
    """Supervisors, systemd and Ctrl-C may signal twice: every later SIGTERM, up to the
    moment the process is gone, leaves the exit clean (0) and the log closed."""
    proc = ProxyProcess(proxy_env(tmp_path, scripted_backend.base_url), tmp_path / "proxy.log")
    await proc.start()
    assert proc.proc is not None
    pid = proc.proc.pid
    for _ in range(20_000):  # bounded: about 10 s at most
        if proc.proc.poll() is not None:
            break
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.0005)
    assert proc.stop() == 0, (tmp_path / "proxy.log").read_text()[-2000:]
    last = (tmp_path / "evidence.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["kind"] == "proxy_stop"


async def test_canary_secrets_appear_nowhere(scripted_backend, tmp_path: Path) -> None:
    """A full session with streaming, refusals, errors and a backend that echoes headers;
    afterwards no canary (raw, base64 or URL-encoded) is in any log line, evidence record,
    metric or error body."""
    token = "cpt-canary-" + secrets.token_hex(12)
    backend_key = "sk-canarybackend" + secrets.token_hex(12)
    env = proxy_env(tmp_path, scripted_backend.base_url, CASE_PROXY_TOKEN=token,
                    CTO_HARNESS_CASE_LOCAL_API_KEY=backend_key)
    scripted_backend.echo_headers = True
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    seen: list[str] = []
    try:
        client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=token, max_retries=0)
        msg = [{"role": "user", "content": f"my key is {backend_key} and token {token}"}]
        await client.chat.completions.create(model=ADMITTED, messages=msg)
        async for _ in await client.chat.completions.create(model=ADMITTED, messages=msg, stream=True):
            pass
        refusals = [
            dict(model=f"claude-{token}", messages=msg),
            dict(model=ADMITTED, messages=msg, extra_body={"api_key": backend_key}),
            dict(model=ADMITTED, messages=msg, extra_headers={"anthropic-version": token}),
        ]
        for kw in refusals:
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(**kw)
            seen.append(info.value.response.text)
        with pytest.raises(openai.AuthenticationError) as auth:
            await openai.AsyncOpenAI(base_url=proc.base_url, api_key=backend_key, max_retries=0
                                     ).chat.completions.create(model=ADMITTED, messages=msg)
        seen.append(auth.value.response.text)
        scripted_backend.fail_status = 500  # the error body echoes the headers it received
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model=ADMITTED, messages=msg)
        seen.append(err.value.response.text)
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.base_url.removesuffix("/v1") + "/metrics") as r:
                seen.append(await r.text())
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
    seen.append((tmp_path / "proxy.log").read_text())
    seen.append((tmp_path / "evidence.jsonl").read_text())
    assert "model_not_admitted" in seen[0]  # the places we scan really hold the session
    haystack = "\n".join(seen)
    for secret in (token, backend_key, scripted_backend.base_url):
        for form in _forms(secret):
            assert form not in haystack, f"a form of a canary leaked: {form[:6]}..."


class _CountingUpstream:
    """Stands in for the backend client: lists the admitted model and counts probes."""

    def __init__(self) -> None:
        self.probes = 0

    async def get_json(self, path: str, timeout_s: float, limit: int) -> tuple[int, object]:
        self.probes += 1
        return 200, {"object": "list", "data": [{"id": ADMITTED, "object": "model"}]}


async def test_readiness_probes_pause_while_requests_are_in_flight() -> None:
    """Single-slot engines abort a running stream when another request arrives, so the
    periodic probe must not fire while the proxy is relaying one."""
    from proxy.readiness import Readiness

    upstream, busy = _CountingUpstream(), [False]
    readiness = Readiness(upstream, ADMITTED, interval_s=0.01, timeout_s=1,  # type: ignore[arg-type]
                          busy=lambda: busy[0])
    readiness.start()
    try:
        for _ in range(200):
            if upstream.probes >= 3:
                break
            await asyncio.sleep(0.01)
        assert readiness.state.ready and upstream.probes >= 3
        busy[0] = True
        await asyncio.sleep(0.05)
        paused_at = upstream.probes
        await asyncio.sleep(0.2)
        assert upstream.probes == paused_at
        busy[0] = False
        await asyncio.sleep(0.1)
        assert upstream.probes > paused_at
    finally:
        await readiness.stop()


async def test_a_burst_of_connections_waits_in_the_listen_queue(scripted_backend, tmp_path: Path) -> None:
    """While the proxy's loop is busy (here: stopped outright), the kernel completes new
    connections into its listen queue. With aiohttp's default queue of 128, connections
    past it had their SYNs dropped and waited 1 s, then 3 s, for a retry."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    burst = min(400, somaxconn)
    assert burst > 200, f"net.core.somaxconn is {somaxconn}: too small to tell a 128 queue from a large one"
    proc = ProxyProcess(proxy_env(tmp_path, scripted_backend.base_url), tmp_path / "proxy.log")
    await proc.start()
    assert proc.proc is not None
    port = int(proc.base_url.split(":")[2].split("/")[0])
    socks: dict[int, socket.socket] = {}
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        poller = select.poll()  # not select(): descriptors may pass 1024
        for _ in range(burst):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            socks[s.fileno()] = s
            assert s.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
            poller.register(s, select.POLLOUT)
        pending = set(socks)
        deadline = time.monotonic() + 0.8  # under the first SYN retry (1 s)
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                if socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    pending.discard(fd)
                    poller.unregister(fd)
        assert len(pending) == 0, f"{len(pending)} of {burst} connections not completed by the kernel"
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        for s in socks.values():
            s.close()
        exit_code = await asyncio.to_thread(proc.stop)
    assert exit_code == 0
