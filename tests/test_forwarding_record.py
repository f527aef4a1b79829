"""A record before the first byte (proxy.forwarding): every forwarded request is
preceded by a ``forwarding`` record in the file and followed by a completion record that
names it. Hostile and failing parties: a backend that looks at the evidence the moment a
request reaches it, a disk that refuses the write, a proxy SIGKILLed mid-stream. The
scripted backend is a TEST FIXTURE standing in for an engine."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from harness.report import collect_inputs, compute_report
from proxy import hashchain
from proxy.evidence_files import lines_from_bytes
from tests.proxy_support import (  # noqa: F401 - make_proxy is a fixture
    ADMITTED,
    ProxyProcess,
    ProxyUnderTest,
    cli,
    make_proxy,
    proxy_env,
    serve_app,
)

MSGS = [{"role": "user", "content": "hi"}]


class EvidenceWitness:
    """A backend (TEST FIXTURE) that, the moment a request reaches it, reads the proxy's
    evidence log and notes whether the request's forwarding record is already there."""

    def __init__(self) -> None:
        self.evidence: Path | None = None
        self.seen: list[tuple[str, bool]] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": ADMITTED, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id", "")
        assert self.evidence is not None
        records = [json.loads(x) for x in self.evidence.read_text().splitlines()]
        self.seen.append((rid, any(r["kind"] == "forwarding" and r["request_id"] == rid for r in records)))
        body = await request.json()
        if body.get("stream"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": ADMITTED,
                     "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
            await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
            await out.write_eof()
            return out
        return web.json_response({"id": "c", "object": "chat.completion", "created": 0, "model": ADMITTED,
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "ok"}}]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self._runner, port = await serve_app(app)
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def witness() -> AsyncIterator[EvidenceWitness]:
    w = EvidenceWitness()
    await w.start()
    yield w
    await w.stop()


@pytest.mark.parametrize("concurrent", [1, 8], ids=["alone", "batched"])
async def test_the_forwarding_record_is_in_the_file_before_the_backend_sees_the_request(
        make_proxy: Any, witness: EvidenceWitness, concurrent: int) -> None:
    p: ProxyUnderTest = await make_proxy(backend=witness)
    witness.evidence = p.evidence_path
    client = p.client()
    await asyncio.gather(*(client.chat.completions.create(model=ADMITTED, messages=MSGS, stream=bool(i % 2))
                           for i in range(concurrent)))
    assert len(witness.seen) == concurrent and all(found for _, found in witness.seen), witness.seen
    records = p.evidence()
    forwarding = {r["request_id"]: r for r in records if r["kind"] == "forwarding"}
    completions = [r for r in records if r["kind"] == "request" and r.get("forwarding_sha256")]
    assert len(forwarding) == len(completions) == concurrent
    # each completion names its own forwarding record's line
    _, lines = lines_from_bytes(p.evidence_path.read_bytes())
    sha_of = {ln.record.request_id: ln.sha256 for ln in lines if ln.record and ln.record.kind == "forwarding"}
    assert all(c["forwarding_sha256"] == sha_of[c["request_id"]] for c in completions)


async def test_a_forwarding_record_that_cannot_be_written_refuses_the_request(
        make_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk refuses the write after the pre-forward check passed: the request is
    refused and the backend never sees it."""
    p: ProxyUnderTest = await make_proxy()
    before = len(p.backend.requests)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hashchain.os, "write", full)
    with pytest.raises(openai.InternalServerError) as refused:
        await p.client().chat.completions.create(model=ADMITTED, messages=MSGS, stream=True)
    assert refused.value.status_code == 503 and refused.value.code == "evidence_unavailable"
    assert len(p.backend.requests) == before
    assert p.metric("case_proxy_evidence_write_failures_total") == 1  # one refused request, counted once


async def test_a_batched_forwarding_record_is_waited_for_before_forwarding(
        make_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With another request in flight the record goes into the shared write: the request
    must wait for that write's outcome. The disk refuses it: refused, never forwarded."""
    p: ProxyUnderTest = await make_proxy()
    p.backend.chunk_delay_s = 0.1
    client = p.client()
    slow = await client.chat.completions.create(model=ADMITTED, messages=MSGS, stream=True)
    first = await slow.__anext__()  # in flight now, its forwarding record written
    assert first.model == ADMITTED
    real_write = hashchain.os.write

    def refuse_forwarding(fd: int, data: bytes) -> int:
        if b'"kind":"forwarding"' in data:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(hashchain.os, "write", refuse_forwarding)
    before = len(p.backend.requests)
    with pytest.raises(openai.InternalServerError) as refused:
        await asyncio.wait_for(client.chat.completions.create(model=ADMITTED, messages=MSGS), 10)
    assert refused.value.code == "evidence_unavailable"
    assert len(p.backend.requests) == before
    await slow.close()


async def test_a_proxy_killed_mid_stream_leaves_a_visible_unpaired_forwarding_record(scripted_backend: Any,
                                                                                    tmp_path: Path) -> None:
    """SIGKILL while a stream is being delivered: the client has bytes, the proxy never
    wrote a completion. The forwarding record is there, and verify-evidence (exit 5)
    and the harness report (evidence_unpaired_forwarding) both say so."""
    scripted_backend.chunk_delay_s = 0.2
    scripted_backend.chunks = 20
    env = proxy_env(tmp_path, scripted_backend.base_url)
    evidence = Path(env["CASE_PROXY_EVIDENCE_FILE"])
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    assert proc.proc is not None
    try:
        client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
        await client.chat.completions.create(model=ADMITTED, messages=MSGS)  # one that completes
        stream = await client.chat.completions.create(model=ADMITTED, messages=MSGS, stream=True)
        got = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                got += 1
                if got == 2:
                    proc.proc.send_signal(signal.SIGKILL)
        assert got >= 2  # the client received part of the answer
    finally:
        proc.stop()
    records = [json.loads(x) for x in evidence.read_text().splitlines()]
    streamed = [r for r in records if r["kind"] == "forwarding" and r.get("stream")]
    assert len(streamed) == 1
    assert not any(r.get("request_id") == streamed[0]["request_id"] for r in records if r["kind"] == "request")
    out = cli("verify-evidence", str(evidence), env=dict(os.environ))
    assert out.returncode == 5, out.stdout
    assert f"request {streamed[0]['request_id']}" in out.stdout and "no completion record" in out.stdout
    run_dir = tmp_path / "run"
    (run_dir / "proxy").mkdir(parents=True)
    (run_dir / "proxy" / "evidence.jsonl").write_bytes(evidence.read_bytes())
    report = compute_report(collect_inputs(run_dir, decision_sha256_after=None, admission_sha256_after=None))
    codes = {r.code for r in report.reasons}
    assert report.status == "fail" and "evidence_unpaired_forwarding" in codes


async def test_a_clean_run_has_every_forwarding_record_paired(make_proxy: Any, tmp_path: Path) -> None:
    p: ProxyUnderTest = await make_proxy()
    client = p.client()
    for stream in (False, True):
        await client.chat.completions.create(model=ADMITTED, messages=MSGS, stream=stream)
    out = cli("verify-evidence", str(p.evidence_path), env=dict(os.environ))
    assert out.returncode == 0 and "unpaired" not in out.stdout
    run_dir = tmp_path / "run"
    (run_dir / "proxy").mkdir(parents=True)
    (run_dir / "proxy" / "evidence.jsonl").write_bytes(p.evidence_path.read_bytes())
    report = compute_report(collect_inputs(run_dir, decision_sha256_after=None, admission_sha256_after=None))
    assert "evidence_unpaired_forwarding" not in {r.code for r in report.reasons}
