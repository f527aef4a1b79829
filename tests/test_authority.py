"""Live authority (proxy.authority): an operator changes the decision record or the
admission JSON while the proxy serves. The hostile party is the change itself: a
revocation, a rejection, another model, another decision, a removed or broken file. The
scripted backend is a TEST FIXTURE standing in for an engine; it counts what reaches it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.admission import ArtifactError, load_admission, load_decision
from proxy.authority import Authority, judge
from tests.proxy_support import (  # noqa: F401 - make_proxy is a fixture
    ADMISSION,
    ProxyProcess,
    ProxyUnderTest,
    make_proxy,
    proxy_env,
    write_artifacts,
)


def _pinned(tmp_path: Path) -> tuple[Path, Path, Any]:
    d, a = write_artifacts(tmp_path)
    return d, a, load_admission(a)


def _rewrite_in_place(path: Path, **changes: Any) -> None:
    """The way ``jq ... > file`` or an editor without a temp file changes it: truncate,
    write, same inode."""
    data = {**json.loads(path.read_text()), **changes}
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(json.dumps(data))


def _replace_by_rename(path: Path, **changes: Any) -> None:
    """The way a careful tool changes it: a new file renamed over the old one."""
    data = {**json.loads(path.read_text()), **changes}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------- the pure judgement

@pytest.mark.parametrize(("which", "changes", "code"), [
    ("admission", {"admission_status": "revoked"}, "admission_status_blocks"),
    ("admission", {"admission_status": "rejected"}, "admission_status_blocks"),
    ("admission", {"model": "claude-sonnet-4-6"}, "admission_changed"),
    ("admission", {"provider": "anthropic"}, "admission_changed"),
    ("admission", {"aliases": ["gpt-4o"]}, "admission_changed"),
    ("admission", {"provider_class": "cloud"}, "provider_class_not_local_case_compatible"),
    ("decision", {"decision_status": "external_provider_allowed"}, "decision_not_local_provider_required"),
])
def test_a_change_that_no_longer_allows_serving_is_judged_with_its_code(tmp_path: Path, which: str,
                                                                        changes: dict[str, Any], code: str) -> None:
    d, a, pinned = _pinned(tmp_path)
    _rewrite_in_place(a if which == "admission" else d, **changes)
    verdict = judge(load_decision(d), load_admission(a), pinned)
    assert not verdict.serving and verdict.code == code


def test_candidate_and_admitted_both_keep_serving(tmp_path: Path) -> None:
    d, a, pinned = _pinned(tmp_path)
    _rewrite_in_place(a, admission_status="admitted")
    verdict = judge(load_decision(d), load_admission(a), pinned)
    assert verdict.serving and verdict.admission_status == "admitted"


def test_a_missing_or_broken_file_stops_serving(tmp_path: Path) -> None:
    d, a, pinned = _pinned(tmp_path)
    a.write_text("{not json")
    try:
        load_admission(a)
    except ArtifactError as exc:
        broken = exc
    verdict = judge(load_decision(d), broken, pinned)
    assert not verdict.serving and verdict.code == "admission_invalid"


# ---------------------------------------------------------------- the watch

@pytest.mark.parametrize("change", [_rewrite_in_place, _replace_by_rename], ids=["in-place", "rename-over"])
async def test_the_watch_sees_a_revocation_and_a_return(tmp_path: Path, change: Any) -> None:
    d, a, pinned = _pinned(tmp_path)
    authority = Authority(d, a, pinned)
    seen: list[tuple[bool, str]] = []
    authority.on_change.append(lambda old, new: seen.append((new.serving, new.code)))
    authority.refresh()
    assert authority.serving and not seen  # unchanged since start-up: nothing to record
    change(a, admission_status="revoked")
    assert authority.poll() and not authority.serving
    assert seen == [(False, "admission_status_blocks")]
    assert not authority.poll()  # nothing new
    change(a, admission_status="admitted")
    assert authority.poll() and authority.serving
    assert seen[-1] == (True, "ok")


def test_a_content_watch_survives_the_file_being_replaced(tmp_path: Path) -> None:
    """A rename over the file ends the kernel's watch on the old inode (IN_IGNORED). That
    must not count as a broken watch (which answers "changed" forever, so every look
    would read and judge both files again); the new file is watched instead, in place
    writes to it included."""
    from proxy.path_watch import PathWatch

    _, a, _ = _pinned(tmp_path)
    watch = PathWatch.open(a, content=True)
    assert watch is not None  # Linux, a local filesystem
    assert watch.changed()  # the first answer is always True
    assert not watch.changed()
    for status in ("admitted", "candidate"):
        _replace_by_rename(a, admission_status=status)
        assert watch.changed()
    _rewrite_in_place(a, admission_status="admitted")  # in place, into the newest inode
    assert watch.changed()
    assert not watch.changed() and not watch._broken
    watch.close()


async def test_a_removed_file_stops_serving(tmp_path: Path) -> None:
    d, a, pinned = _pinned(tmp_path)
    authority = Authority(d, a, pinned)
    d.unlink()
    assert authority.poll() and authority.verdict.code == "decision_record_missing"


async def test_a_check_that_fails_stops_forwarding_until_one_succeeds(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected failure in the check itself fails closed, and the watch survives it."""
    import proxy.authority as authority_module

    d, a, pinned = _pinned(tmp_path)
    authority = Authority(d, a, pinned, interval_s=0.01)
    real = authority_module.read_verdict

    def boom(*args: Any) -> Any:
        raise RuntimeError("unexpected")

    authority.start()
    try:
        monkeypatch.setattr(authority_module, "read_verdict", boom)
        _rewrite_in_place(a, admission_status="admitted")
        await _wait(lambda: not authority.serving)
        monkeypatch.setattr(authority_module, "read_verdict", real)
        await _wait(lambda: authority.serving)
    finally:
        await authority.stop()


# ---------------------------------------------------------------- against a proxy

async def _wait(cond: Any, timeout_s: float = 1.0) -> float:
    """Seconds until ``cond()`` holds; fails after ``timeout_s`` (the promised second)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        await asyncio.sleep(0.01)
    return loop.time() - start


async def test_revocation_in_process_turns_readyz_red_updates_the_gauge_and_records_why(
        make_proxy: Any, tmp_path: Path) -> None:
    p: ProxyUnderTest = await make_proxy()
    a = tmp_path / "admission.json"
    _rewrite_in_place(a, admission_status="revoked")
    await _wait(lambda: not p.running.state.authority.serving)
    async with aiohttp.ClientSession() as s, s.get(p.root_url + "/readyz") as r:
        body = await r.json()
    assert r.status == 503 and any("admission_status_blocks" in x for x in body["reasons"])
    labels = {"provider": "qwen-local", "model": ADMISSION["model"], "provider_class": "local_case_compatible"}
    assert p.metric("case_proxy_admission_info", admission_status="candidate", **labels) == 0
    assert p.metric("case_proxy_admission_info", admission_status="revoked", **labels) == 0
    changed = [r for r in p.evidence() if r["kind"] == "authority_changed"]
    assert [(r["serving"], r["reason"], r["admission_status"]) for r in changed] == [
        (False, "admission_status_blocks", "revoked")]
    _rewrite_in_place(a, admission_status="admitted")
    await _wait(lambda: p.running.state.authority.serving)
    assert p.metric("case_proxy_admission_info", admission_status="admitted", **labels) == 1
    out = await p.client().chat.completions.create(model=ADMISSION["model"], messages=[{"role": "user", "content": "hi"}])
    assert out.model == ADMISSION["model"]


async def test_revocation_against_a_running_proxy_process_through_the_sdk(scripted_backend: Any,
                                                                          tmp_path: Path) -> None:
    """The proof the operators asked for: a real `case-proxy serve` process, the official
    SDK as the client. Flip the admission to revoked: within a second the next request is
    refused with admission_blocks (403) and never reaches the backend; flip it back and
    requests flow again."""
    env = proxy_env(tmp_path, scripted_backend.base_url)
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    try:
        client = openai.AsyncOpenAI(base_url=proc.base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        await client.chat.completions.create(model=ADMISSION["model"], messages=msgs)
        before = len(scripted_backend.requests)
        admission = Path(env["CTO_HARNESS_CASE_MODEL_ADMISSION_FILE"])
        _rewrite_in_place(admission, admission_status="revoked")
        root = proc.base_url.removesuffix("/v1")

        async def red() -> bool:
            async with aiohttp.ClientSession() as s, s.get(root + "/readyz") as r:
                return r.status == 503

        loop = asyncio.get_running_loop()
        start = loop.time()
        while not await red():
            assert loop.time() - start < 1.0, "readyz still green a second after the revocation"
            await asyncio.sleep(0.02)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model=ADMISSION["model"], messages=msgs, stream=True)
        assert refused.value.code == "admission_blocks"
        assert len(scripted_backend.requests) == before, "a request reached the backend after the revocation"
        _rewrite_in_place(admission, admission_status="admitted")
        start = loop.time()
        while await red():
            assert loop.time() - start < 1.0
            await asyncio.sleep(0.02)
        out = await client.chat.completions.create(model=ADMISSION["model"], messages=msgs)
        assert out.model == ADMISSION["model"] and len(scripted_backend.requests) == before + 1
    finally:
        assert proc.stop() == 0
    evidence = [json.loads(x) for x in Path(env["CASE_PROXY_EVIDENCE_FILE"]).read_text().splitlines()]
    changes = [(r["serving"], r["reason"]) for r in evidence if r["kind"] == "authority_changed"]
    assert changes == [(False, "admission_status_blocks"), (True, "ok")]
    refusals = [r for r in evidence if r.get("reason") == "admission_blocks"]
    assert len(refusals) == 1 and refusals[0]["status"] == 403
