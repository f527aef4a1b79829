"""Test support: a real proxy on 127.0.0.1 in front of the scripted backend.

The scripted backend (harness.scripted_backend) is a TEST FIXTURE standing in for an
OpenAI-compatible engine because no GPU exists here; nothing it says is evidence about
a real model.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.server import RunningProxy, start_proxy
from proxy.settings import load_settings

ADMITTED = "qwen3.6-35b-a3b"

DECISION = {
    "work_item": "CTO-WORK-020",
    "decision_status": "local_provider_required",
    "provider_class": "local_case_compatible",
    "decided_at": "2026-06-01T02:00:00Z",
}
ADMISSION = {
    "schema_version": 1,
    "work_item": "CTO-WORK-020",
    "provider": "qwen-local",
    "provider_class": "local_case_compatible",
    "model": ADMITTED,
    "admission_status": "candidate",
    "aliases": [],
    "scope": ["stage2-artificial-fixture"],
}


def write_artifacts(directory: Path, decision: dict[str, Any] | None = None,
                    admission: dict[str, Any] | None = None) -> tuple[Path, Path]:
    d, a = directory / "decision.json", directory / "admission.json"
    d.write_text(json.dumps({**DECISION, **(decision or {})}))
    a.write_text(json.dumps({**ADMISSION, **(admission or {})}))
    return d, a


@dataclass
class ProxyUnderTest:
    running: RunningProxy
    token: str
    evidence_path: Path
    backend: Any  # harness.scripted_backend.ScriptedBackend

    @property
    def base_url(self) -> str:
        return self.running.base_url

    @property
    def root_url(self) -> str:
        return self.running.base_url.removesuffix("/v1")

    def client(self, token: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
        """The official SDK, retries off so every refusal is seen exactly once. Its
        default connect timeout (5 s) has expired twice on these loaded 2-core machines
        against the in-process proxy (ConnectTimeout in tests/test_request_fields.py, the
        proxy itself never slow in those runs' records): the tests here assert what is
        answered, not how fast (speed is the bench's), so connecting may take a minute."""
        kw.setdefault("timeout", openai.Timeout(120.0, connect=60.0))
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=token or self.token, max_retries=0, **kw)

    def evidence(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.evidence_path.read_text().splitlines() if line]

    def requests_evidence(self) -> list[dict[str, Any]]:
        return [r for r in self.evidence() if r.get("kind", "request") == "request"]

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample from the proxy's own registry."""
        text = self.running.state.metrics.render().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.running.state.readiness.state.ready:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"proxy not ready: {self.running.state.readiness.state.reason}")
            await asyncio.sleep(0.02)


MakeProxy = Callable[..., Awaitable[ProxyUnderTest]]


@pytest.fixture
async def make_proxy(scripted_backend: Any, tmp_path: Path) -> AsyncIterator[MakeProxy]:
    """Factory: start a proxy with optional admission/decision overrides, limits, env."""
    started: list[RunningProxy] = []

    async def factory(*, admission: dict[str, Any] | None = None, decision: dict[str, Any] | None = None,
                      limits: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                      base_url: str | None = None, wait_ready: bool = True, backend: Any = None) -> ProxyUnderTest:
        backend = backend or scripted_backend
        n = len(started)
        d, a = write_artifacts(tmp_path, decision, admission)
        token = "cpt-" + secrets.token_hex(16)
        evidence = tmp_path / f"evidence-{n}.jsonl"
        environ = {
            "CTO_HARNESS_CASE_DECISION_FILE": str(d),
            "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a),
            "CTO_HARNESS_CASE_LOCAL_BASE_URL": base_url or backend.base_url,
            "CASE_PROXY_TOKEN": token,
            "CASE_PROXY_EVIDENCE_FILE": str(evidence),
            **(env or {}),
        }
        config = None
        if limits:
            config = tmp_path / f"proxy-{n}.toml"
            config.write_text("[limits]\n" + "".join(f"{k} = {v!r}\n" for k, v in limits.items()))
        settings = load_settings(env=environ, config_file=config, host="127.0.0.1", port=0)
        running = await start_proxy(settings)
        started.append(running)
        put = ProxyUnderTest(running=running, token=token, evidence_path=evidence, backend=backend)
        if wait_ready:
            await put.wait_ready()
        return put

    yield factory
    for running in started:
        await running.stop()


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> ProxyUnderTest:
    return await make_proxy()


async def raw_request(proxy: ProxyUnderTest, request: bytes) -> bytes:
    """Send ``request`` as raw bytes (odd request targets no client library will send)
    and return the first read of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.running.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return data


async def serve_app(app: aiohttp.web.Application, **runner_kw: Any) -> tuple[aiohttp.web.AppRunner, int]:
    """Run ``app`` (a test backend) on 127.0.0.1 at a free port: (its runner, to clean up;
    the port)."""
    runner = aiohttp.web.AppRunner(app, **runner_kw)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def read_http_request(reader: asyncio.StreamReader, timeout_s: float | None = None) -> tuple[bytes, bytes]:
    """One request as the raw test backends read it: the head up to its blank line
    (within ``timeout_s``, if given), then a body of its Content-Length. Raises
    IncompleteReadError when the client hangs up first."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


# --- the proxy as a subprocess, as operators run it ---

ROOT = Path(__file__).resolve().parent.parent


def proxy_env(tmp_path: Path, base_url: str, **extra: str) -> dict[str, str]:
    d, a = write_artifacts(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTO_HARNESS_", "CASE_PROXY_"))}
    env.update({
        "CTO_HARNESS_CASE_DECISION_FILE": str(d),
        "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a),
        "CTO_HARNESS_CASE_LOCAL_BASE_URL": base_url,
        "CASE_PROXY_TOKEN": "cpt-" + secrets.token_hex(16),
        "CASE_PROXY_EVIDENCE_FILE": str(tmp_path / "evidence.jsonl"),
    })
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


class ProxyProcess:
    """`python -m proxy serve` on a free port; stderr goes to a file we can scan."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env, self.log_path, self.args = env, log_path, args
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    async def start(self) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "0", *self.args],
            env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        assert line.startswith("CASE_PROXY_LISTENING "), f"unexpected: {line!r}; log: {self.log_path.read_text()}"
        self.base_url = line.split()[1]
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                async with s.get(self.base_url.removesuffix("/v1") + "/readyz") as r:
                    if r.status == 200:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError("proxy never became ready")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode
