"""Group commit: records of requests that finish together reach the log in one write,
and no answer is released before its record is written. Real files, a real event loop,
the proxy on 127.0.0.1 with the official SDK as client. The backend is the scripted
OpenAI-compatible test fixture (no GPU here); its answers prove nothing about a model."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import openai
import pytest

import proxy.hashchain as hashchain
from proxy.evidence import EvidenceLog, records_from_bytes
from proxy.group_commit import GroupCommit
from proxy.hashchain import ChainError
from proxy.redact import Redactor
from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy  # noqa: F401

MSG = [{"role": "user", "content": "hi"}]


def _fields(n: int) -> dict[str, object]:
    return {"kind": "request", "time": "2026-11-26T00:00:00.000Z", "request_id": f"r{n}", "method": "POST",
            "path": "/v1/chat/completions", "decision": "admitted", "reason": "ok", "status": 200}


def _open_commit(tmp_path: Path) -> tuple[EvidenceLog, GroupCommit, list[int]]:
    """A fresh log and its group commit; the list collects the failure counts it reports."""
    log = EvidenceLog(tmp_path / "e.jsonl", Redactor())
    log.open()
    lost: list[int] = []
    return log, GroupCommit(log, asyncio.get_running_loop(), lost.append), lost


# Completion records only: a forwarded request's forwarding record (proxy.forwarding) is
# written before the backend sees it, so failing every write would refuse before
# forwarding; these tests are about the completion records' batch.
COMPLETIONS = b'{"kind":"request"'


def _count_writes(monkeypatch: pytest.MonkeyPatch, fail: bool = False, short: bool = False,
                  only: bytes | None = None) -> list[int]:
    """Sizes of the writes the chain writer makes (each one system call); with ``fail``,
    each fails as a full disk would; with ``short``, the first write of several records
    stops as a disk filling up would: after its first line and ten bytes of the next.
    ``only``: count, fail or shorten only writes that hold these bytes."""
    sizes: list[int] = []
    real_write = os.write
    shorted: list[bool] = []

    def write(fd: int, data: bytes) -> int:
        hit = only is None or only in data
        if hit:
            sizes.append(len(data))
        if fail and hit:
            raise OSError(errno.ENOSPC, "No space left on device")
        if short and hit and not shorted and data.count(b"\n") >= 2:
            shorted.append(True)
            return real_write(fd, data[:data.index(b"\n") + 11])
        return real_write(fd, data)

    monkeypatch.setattr(hashchain.os, "write", write)
    return sizes


async def test_records_staged_in_one_turn_reach_the_log_in_one_write(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log, commit, lost = _open_commit(tmp_path)
    told: list[bool] = []
    writes = _count_writes(monkeypatch)
    futures = [commit.stage(_fields(n), told.append) for n in range(5)]
    assert commit.pending and writes == [] and (tmp_path / "e.jsonl").read_bytes() == b""  # nothing written yet
    futures[1].cancel()  # a client gone while waiting disturbs no other waiter
    assert await asyncio.gather(futures[0], *futures[2:]) == [True] * 4
    assert len(writes) == 1 and told == [True] * 5 and lost == [] and not commit.pending
    verdict, records = records_from_bytes((tmp_path / "e.jsonl").read_bytes())
    assert verdict.ok and [r.request_id for r in records] == [f"r{n}" for n in range(5)]
    log.close()


async def test_a_record_written_at_once_takes_the_staged_ones_first(tmp_path: Path) -> None:
    """Order on disk is chain order even when a lone request writes while a batch waits."""
    log, commit, _ = _open_commit(tmp_path)
    staged = commit.stage(_fields(0))
    log.write_fields(_fields(1))
    assert await staged is True  # its line went out with the later one's write
    verdict, records = records_from_bytes((tmp_path / "e.jsonl").read_bytes())
    assert verdict.ok and [r.request_id for r in records] == ["r0", "r1"]
    log.close()


async def test_a_failed_batch_write_fails_every_record_in_it_and_the_log(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    log, commit, lost = _open_commit(tmp_path)
    _count_writes(monkeypatch, fail=True)
    futures = [commit.stage(_fields(n)) for n in range(3)]
    assert await asyncio.gather(*futures) == [False, False, False]
    assert lost == [3] and not log.healthy
    with pytest.raises(ChainError):
        commit.stage(_fields(9))
    log.close()


async def test_a_short_batch_write_releases_exactly_the_records_it_completed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, commit, lost = _open_commit(tmp_path)
    told: list[bool] = []
    _count_writes(monkeypatch, short=True)
    futures = [commit.stage(_fields(n), told.append) for n in range(4)]
    assert await asyncio.gather(*futures) == [True, False, False, False]
    assert told == [True, False, False, False] and lost == [3] and not log.healthy and log.written == 1
    verdict, records = records_from_bytes((tmp_path / "e.jsonl").read_bytes())
    assert [r.request_id for r in records] == ["r0"] and not verdict.ok  # the torn second line shows
    log.close()


async def test_concurrent_requests_share_writes_and_every_answer_has_its_record(
        proxy: ProxyUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    proxy.backend.first_byte_delay_s = 0.2  # the answers arrive together
    writes = _count_writes(monkeypatch, only=COMPLETIONS)
    client = proxy.client()
    n = 8
    answers = await asyncio.gather(*(client.chat.completions.create(model=ADMITTED, messages=MSG) for _ in range(n)))
    assert all(a.choices[0].message.content for a in answers)
    records = proxy.requests_evidence()
    assert len(records) == n and all(r["status"] == 200 and r["decision"] == "admitted" for r in records)
    assert len({r["request_id"] for r in records}) == n
    assert 1 <= len(writes) < n  # records shared writes
    assert proxy.metric("case_proxy_requests_total", endpoint="chat_completions", outcome="ok") == n
    assert proxy.running.state.evidence is not None and proxy.running.state.evidence.healthy


async def test_a_failed_batch_write_withholds_every_answer_of_the_batch(
        proxy: ProxyUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    proxy.backend.first_byte_delay_s = 0.2
    writes = _count_writes(monkeypatch, fail=True, only=COMPLETIONS)
    client = proxy.client()
    n = 6
    results = await asyncio.gather(*(client.chat.completions.create(model=ADMITTED, messages=MSG) for _ in range(n)),
                                   return_exceptions=True)
    assert all(isinstance(r, openai.InternalServerError) for r in results), results
    for r in results:
        assert isinstance(r, openai.InternalServerError)
        assert r.status_code == 503 and r.code == "evidence_unavailable" and "Hello" not in r.response.text
    assert 1 <= len(writes) < n
    assert proxy.metric("case_proxy_evidence_write_failures_total") == n
    assert proxy.metric("case_proxy_requests_total", endpoint="chat_completions", outcome="unavailable") == n


async def test_a_short_batch_write_answers_exactly_the_requests_whose_records_are_whole(
        proxy: ProxyUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """No record on disk speaks for an answer the client did not get."""
    proxy.backend.first_byte_delay_s = 0.2
    _count_writes(monkeypatch, short=True, only=COMPLETIONS)
    client = proxy.client()
    n = 6
    results = await asyncio.gather(*(client.chat.completions.with_raw_response.create(model=ADMITTED, messages=MSG)
                                     for _ in range(n)), return_exceptions=True)
    answered = {r.headers["x-request-id"] for r in results if not isinstance(r, BaseException)}
    refused = [r for r in results if isinstance(r, BaseException)]
    assert answered and refused and len(answered) + len(refused) == n
    for r in refused:
        assert isinstance(r, openai.InternalServerError) and r.code == "evidence_unavailable"
    verdict, records = records_from_bytes(proxy.evidence_path.read_bytes())
    assert not verdict.ok  # the torn line shows
    assert {r.request_id for r in records if r.kind == "request"} == answered
    assert proxy.metric("case_proxy_evidence_write_failures_total") == len(refused)
    assert proxy.metric("case_proxy_requests_total", endpoint="chat_completions", outcome="ok") == len(answered)


async def test_a_failing_callback_leaves_no_request_waiting(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    log, commit, _ = _open_commit(tmp_path)

    def broken(ok: bool) -> None:
        raise RuntimeError("a metrics bug")

    futures = [commit.stage(_fields(0), broken), commit.stage(_fields(1))]
    async with asyncio.timeout(5):
        assert await asyncio.gather(*futures) == [True, True]
    assert errors and isinstance(errors[0].get("exception"), RuntimeError)
    loop.set_exception_handler(None)
    log.close()
