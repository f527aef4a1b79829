"""A second, short-lived vLLM (the session's own must stay up for the other tests):
the proxy starts while vLLM is still loading and turns ready when vLLM does; then vLLM
is killed in the middle of a stream, and no process of it is left behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from proxy.settings import ENV_API_KEY
from tests.proxy_support import make_proxy  # noqa: F401
from tests.vllm.conftest import SERVED, VllmEngine, free_port

MSG = [{"role": "user", "content": "hello there"}]


async def test_vllm_loading_when_the_proxy_starts_then_killed_mid_stream(make_proxy, tiny_hf_model: Path,  # noqa: F811
                                                                         vllm_key: str, tmp_path: Path) -> None:
    engine = VllmEngine(tiny_hf_model, tmp_path / "late-vllm.log", free_port(), vllm_key)
    engine.start(wait=False)
    try:
        proxy = await make_proxy(admission={"model": SERVED}, base_url=engine.base_url, wait_ready=False,
                                 env={ENV_API_KEY: vllm_key}, limits={"readiness_interval_s": 0.5})
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.root_url + "/readyz") as r:
                assert r.status == 503 and (await r.json())["status"] == "not_ready"
        with pytest.raises(openai.InternalServerError) as info:
            await proxy.client().chat.completions.create(model=SERVED, messages=MSG, max_tokens=2)
        assert info.value.code == "backend_not_ready"
        assert engine.access_lines() == []  # refused by the proxy, not by a half-started vLLM
        await asyncio.to_thread(engine.wait_ready)
        await proxy.wait_ready(timeout_s=30)
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.root_url + "/readyz") as r:
                assert r.status == 200
        pids = engine.group_pids()
        assert len(pids) >= 2  # API server, engine core (and workers): the group is what is stopped
        for pid in pids:  # vLLM's key reaches it by environment, never argv
            assert vllm_key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        stream = await proxy.client().chat.completions.create(model=SERVED, messages=MSG, max_tokens=2000,
                                                             stream=True, extra_body={"ignore_eos": True})
        n = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                n += 1
                if n == 3:
                    await asyncio.to_thread(engine.kill)
        assert n >= 3
        rec = proxy.requests_evidence()[-1]
        assert (rec["decision"], rec["reason"], rec["stream"]) == ("error", "backend_protocol_error", True)
        assert not engine.group_alive(), f"vLLM processes left after the kill: {engine.group_pids()}"
        await asyncio.sleep(1.5)
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.root_url + "/readyz") as r:
                assert r.status == 503  # the readiness probe noticed vLLM is gone
    finally:
        await asyncio.to_thread(engine.stop)
    assert not engine.group_alive()
