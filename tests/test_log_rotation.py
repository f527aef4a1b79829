"""Log rotation: SIGHUP seals the evidence log and opens a new one that names the old
one's last line; verify-evidence follows the link. Proven with Debian's real logrotate
(scripts/install-system-deps.sh installs it) against a running `case-proxy serve`. The
scripted backend is a TEST FIXTURE standing in for an engine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.evidence import EvidenceLog
from proxy.evidence_files import link_files, read_evidence_file
from proxy.hashchain import ChainError
from proxy.redact import Redactor
from tests.proxy_support import ADMITTED, ProxyProcess, cli, proxy_env

MSGS = [{"role": "user", "content": "hi"}]


def _log(path: Path) -> EvidenceLog:
    log = EvidenceLog(path, Redactor([]))
    log.open()
    return log


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _rotated_pair(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "evidence.jsonl"
    log = _log(path)
    log.write_redacted({"kind": "request", "time": "2026-11-28T00:00:00.000Z", "request_id": "a", "status": 200})
    path.rename(tmp_path / "evidence.jsonl.1")
    assert log.rotate(pid=1)
    log.write_redacted({"kind": "request", "time": "2026-11-28T00:00:01.000Z", "request_id": "b", "status": 200})
    log.close()
    return tmp_path / "evidence.jsonl.1", path


def test_a_rotation_seals_the_old_file_and_the_new_one_names_its_last_line(tmp_path: Path) -> None:
    old, new = _rotated_pair(tmp_path)
    assert _records(old)[-1]["kind"] == "log_sealed"
    first = _records(new)[0]
    assert first["kind"] == "log_continued" and first["seq"] == 0
    assert first["continues_sha256"] == read_evidence_file(old).verdict.last_sha256
    assert first["continues_records"] == 2
    links = link_files([read_evidence_file(new), read_evidence_file(old)])  # any order given
    assert links.order == [[str(old), str(new)]] and not links.problems


def test_rotate_does_nothing_while_the_path_still_names_the_log(tmp_path: Path) -> None:
    log = _log(tmp_path / "evidence.jsonl")
    assert log.rotate() is False
    log.check()
    log.close()


def test_a_rotation_never_extends_a_file_someone_else_put_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    log = _log(path)
    path.rename(tmp_path / "old.jsonl")
    path.write_text('{"kind":"request"}\n')
    with pytest.raises(ChainError, match="not this proxy's"):
        log.rotate()
    with pytest.raises(ChainError):
        log.check()  # fail closed
    assert path.read_text() == '{"kind":"request"}\n'


def _rewrite_first(path: Path, **changes: Any) -> None:
    """Edit the new file's first record and re-chain the rest, as a forger who knows the
    format would: the file alone still verifies, only the link can tell."""
    from proxy.hashchain import HashChainWriter

    records = _records(path)
    records[0].update(changes)
    path.unlink()
    w = HashChainWriter(path)
    w.open()
    for r in records:
        w.append({k: v for k, v in r.items() if k not in ("seq", "prev_sha256")})
    w.close()


@pytest.mark.parametrize(("change", "problem"), [
    ({"continues_records": 7}, "records precede it"),
])
def test_a_forged_link_is_a_broken_link(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    old, new = _rotated_pair(tmp_path)
    _rewrite_first(new, **change)
    links = link_files([read_evidence_file(old), read_evidence_file(new)])
    assert any(problem in p for p in links.problems)


def test_a_dropped_seal_breaks_the_link(tmp_path: Path) -> None:
    """An old file whose seal (and anything written before it) was cut away."""
    old, new = _rotated_pair(tmp_path)
    lines = old.read_bytes().splitlines(keepends=True)
    sealed_sha = read_evidence_file(old).verdict.last_sha256
    old.write_bytes(b"".join(lines[:-1]))
    # The new file still names the sealed line, which no file given ends with now.
    links = link_files([read_evidence_file(old), read_evidence_file(new)])
    assert any(sealed_sha in n for n in links.notes)
    out = cli("verify-evidence", str(old), str(new), env=dict(os.environ))
    assert "continues a log that was not given" in out.stdout


def test_two_files_continuing_one_log_is_a_fork(tmp_path: Path) -> None:
    old, new = _rotated_pair(tmp_path)
    twin = tmp_path / "twin.jsonl"
    shutil.copy(new, twin)
    links = link_files([read_evidence_file(p) for p in (old, new, twin)])
    assert any("both continue" in p for p in links.problems)
    assert cli("verify-evidence", str(old), str(new), str(twin), env=dict(os.environ)).returncode == 1


# ---------------------------------------------------------------- against a running proxy

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def _logrotate_config(tmp_path: Path, evidence: Path, pid: int) -> Path:
    """logrotate's plain rename (no copytruncate), then SIGHUP from postrotate."""
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"""{evidence} {{
    rotate 5
    missingok
    nocompress
    postrotate
        kill -HUP {pid}
    endscript
}}
""")
    conf.chmod(0o644)
    return conf


async def _status(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status


@pytest.mark.skipif(not Path(LOGROTATE).exists(), reason="logrotate missing: run scripts/install-system-deps.sh")
async def test_logrotate_rename_and_hup_against_a_running_proxy(scripted_backend: Any, tmp_path: Path) -> None:
    """The real logrotate renames the log and HUPs the proxy while a stream is open: the
    stream finishes, requests after it succeed, the old file ends sealed, the new one
    names it, and verify-evidence follows the link (exit 0: nothing unpaired)."""
    scripted_backend.chunk_delay_s = 0.05
    env = proxy_env(tmp_path, scripted_backend.base_url)
    evidence = Path(env["CASE_PROXY_EVIDENCE_FILE"])
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    assert proc.proc is not None
    try:
        client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
        await client.chat.completions.create(model=ADMITTED, messages=MSGS)

        async def stream() -> str:
            parts = []
            async for chunk in await client.chat.completions.create(model=ADMITTED, messages=MSGS, stream=True):
                parts.extend(c.delta.content or "" for c in chunk.choices)
            return "".join(parts)

        open_stream = asyncio.create_task(stream())
        await asyncio.sleep(0.15)  # under way
        conf = _logrotate_config(tmp_path, evidence, proc.proc.pid)
        out = await asyncio.to_thread(subprocess.run, [LOGROTATE, "--force", "--state", str(tmp_path / "state"),
                                                       str(conf)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rotated = Path(str(evidence) + ".1")
        assert rotated.exists()
        for _ in range(100):
            if evidence.exists() and evidence.stat().st_size:
                break
            await asyncio.sleep(0.02)
        assert _records(evidence)[0]["kind"] == "log_continued"
        assert await open_stream
        after = await client.chat.completions.create(model=ADMITTED, messages=MSGS)
        assert after.model == ADMITTED
        assert await _status(proc.base_url.removesuffix("/v1") + "/readyz") == 200
    finally:
        assert proc.stop() == 0
    old, new = _records(rotated), _records(evidence)
    assert old[-1]["kind"] == "log_sealed" and new[-1]["kind"] == "proxy_stop"
    assert sum(r.get("kind") == "request" for r in old + new) == 3
    verified = cli("verify-evidence", str(evidence), str(rotated), env=dict(os.environ))
    assert verified.returncode == 0, verified.stdout
    assert f"linked: {rotated} -> {evidence}" in verified.stdout


async def test_between_the_rename_and_the_hup_nothing_is_forwarded(scripted_backend: Any, tmp_path: Path) -> None:
    """The window logrotate leaves: the path no longer leads to the log. Refused (503
    evidence_unavailable, readyz red), not failed for good: the HUP resumes it."""
    env = proxy_env(tmp_path, scripted_backend.base_url)
    evidence = Path(env["CASE_PROXY_EVIDENCE_FILE"])
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    assert proc.proc is not None
    root = proc.base_url.removesuffix("/v1")
    try:
        client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
        evidence.rename(tmp_path / "evidence.old")
        before = len(scripted_backend.requests)
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model=ADMITTED, messages=MSGS)
        assert refused.value.status_code == 503 and refused.value.code == "evidence_unavailable"
        assert len(scripted_backend.requests) == before
        assert await _status(root + "/readyz") == 503
        proc.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await _status(root + "/readyz") == 200:
                break
            await asyncio.sleep(0.02)
        out = await client.chat.completions.create(model=ADMITTED, messages=MSGS)
        assert out.model == ADMITTED
    finally:
        assert proc.stop() == 0
    assert cli("verify-evidence", str(tmp_path / "evidence.old"), str(evidence), env=dict(os.environ)).returncode == 0


async def test_a_hup_to_the_supervisor_rotates_every_workers_log(scripted_backend: Any, tmp_path: Path) -> None:
    """With several workers logrotate signals the supervisor (the pid it knows); each
    worker must rotate its own file. Without the supervisor passing SIGHUP on, the
    workers' paths stay renamed and every request is refused."""
    from proxy.workers import worker_evidence_path

    env = proxy_env(tmp_path, scripted_backend.base_url)
    evidence = Path(env["CASE_PROXY_EVIDENCE_FILE"])
    proc = ProxyProcess(env, tmp_path / "proxy.log", "--workers", "2")
    await proc.start()
    assert proc.proc is not None
    logs = [worker_evidence_path(evidence, i) for i in range(2)]
    try:
        for log in logs:
            log.rename(Path(str(log) + ".1"))
        proc.proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if all(log.exists() and log.stat().st_size for log in logs):
                break
            await asyncio.sleep(0.02)
        client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
        for _ in range(6):  # spread over both workers by the kernel
            assert (await client.chat.completions.create(model=ADMITTED, messages=MSGS)).model == ADMITTED
    finally:
        assert proc.stop() == 0
    for log in logs:
        assert _records(log)[0]["kind"] == "log_continued"
        out = cli("verify-evidence", str(log) + ".1", str(log), env=dict(os.environ))
        assert out.returncode == 0 and "linked:" in out.stdout, out.stdout
