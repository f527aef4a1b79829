"""The reference Case agent, run as a real subprocess against a fake OpenAI-compatible server.

The fake server below is a TEST FIXTURE: a small aiohttp app on 127.0.0.1 that replays a
session.json's steps as streamed ``chat.completion.chunk`` SSE (tool-call arguments split
into several deltas, a usage chunk, ``data: [DONE]``). It picks step N = the number of
assistant messages in the request, like the scripted backend does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from harness.fixture_catalog import export_commit, head_commit, list_fixtures, load_fixture, materialize, run_acceptance
from tests.proxy_support import serve_app

PROJECT_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-reference-agent-0123456789abcdef"
MODEL = "qwen3.6-35b-a3b"


class FakeOpenAIServer:
    """Streams a scripted session as OpenAI chat completion chunks (test fixture only)."""

    def __init__(self, steps: list[dict[str, Any]], *, status: int = 200, piece: int = 7) -> None:
        self.steps = steps
        self.status = status
        self.piece = piece
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner, port = await serve_app(app)
        return port

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: dict | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1780000000,
            "model": MODEL,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization"))
        body = await request.json()
        self.requests.append(body)
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "scripted failure", "type": "invalid_request_error", "code": None}},
                status=self.status,
            )
        n = sum(1 for m in body["messages"] if m.get("role") == "assistant")
        if n >= len(self.steps):
            return web.json_response({"error": {"message": f"script has no step {n}", "type": "server_error"}}, status=400)
        step = self.steps[n]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(self._chunk({"role": "assistant", "content": ""}))
        if step.get("reasoning"):
            await resp.write(self._chunk({"reasoning_content": step["reasoning"]}))
        content = step.get("content") or ""
        for i in range(0, len(content), 20):
            await resp.write(self._chunk({"content": content[i : i + 20]}))
        calls = step.get("tool_calls") or []
        for index, call in enumerate(calls):
            args = json.dumps(call.get("arguments", {}))
            head = {"index": index, "id": f"call_{n}_{index}", "type": "function", "function": {"name": call["name"], "arguments": ""}}
            await resp.write(self._chunk({"tool_calls": [head]}))
            for i in range(0, len(args), self.piece):
                await resp.write(self._chunk({"tool_calls": [{"index": index, "function": {"arguments": args[i : i + self.piece]}}]}))
        await resp.write(self._chunk({}, finish="tool_calls" if calls else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(self._chunk(None, usage={"prompt_tokens": 100 + n, "completion_tokens": 10, "total_tokens": 110 + n}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _agent_env(base_url: str, **overrides: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    env.update(
        {
            "PYTHONPATH": str(PROJECT_ROOT),
            "HOME": os.environ.get("HOME", "/tmp"),
            "OPENAI_BASE_URL": base_url,
            "OPENAI_API_KEY": API_KEY,
            "CASE_MODEL": MODEL,
        }
    )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run_agent(workdir: Path, task_file: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.reference_agent", "--task-file", str(task_file), "--workdir", str(workdir), *extra],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def task_repo(tmp_path):
    def make(fixture_id: str = "r1-string-slugify") -> tuple[Any, Path, Path, str]:
        fixture = load_fixture(fixture_id)
        repo, task = tmp_path / "repo", tmp_path / "task.md"
        sha = materialize(fixture, repo, task)
        return fixture, repo, task, sha

    return make


@pytest.mark.parametrize("fixture_id", list_fixtures())
def test_agent_solves_fixture_with_recorded_session(task_repo, tmp_path, fixture_id):
    fixture, repo, task, initial = task_repo(fixture_id)
    steps = fixture.load_session()["steps"]
    with FakeOpenAIServer(steps) as server:
        proc = _run_agent(repo, task, _agent_env(server.base_url))
    assert proc.returncode == 0, proc.stderr
    # A new commit on top of the initial one.
    final = head_commit(repo)
    assert final != initial
    parent = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD~1"], capture_output=True, text=True).stdout.strip()
    assert parent == initial
    # Hidden acceptance tests pass on a clean checkout of that commit.
    checkout = export_commit(repo, final, tmp_path / "checkout")
    result = run_acceptance(fixture, checkout)
    assert result.passed, result.output_tail
    # One request per step; the task file was the user message; streaming with usage.
    assert len(server.requests) == len(steps)
    first = server.requests[0]
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert first["model"] == MODEL
    assert first["messages"][1] == {"role": "user", "content": fixture.task_text}
    assert {t["function"]["name"] for t in first["tools"]} == {"list_files", "read_file", "write_file", "run_tests", "git_commit"}
    # Reassembled tool-call arguments were sent back verbatim in the history.
    last = server.requests[-1]["messages"]
    sent_calls = [c for m in last if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    scripted = [c for s in steps for c in s.get("tool_calls", [])]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in sent_calls] == [
        (c["name"], c.get("arguments", {})) for c in scripted
    ]
    tool_results = [m["content"] for m in last if m["role"] == "tool"]
    assert any(r.startswith("exit_code=0") for r in tool_results)
    assert any(r.startswith("committed ") for r in tool_results)
    # Auth went to the server; the key never reached the logs.
    assert set(server.auth_headers) == {f"Bearer {API_KEY}"}
    assert API_KEY not in proc.stderr and API_KEY not in proc.stdout
    assert "tool=write_file ok" in proc.stderr
    assert "usage prompt_tokens=" in proc.stderr


@pytest.mark.parametrize("missing", ["OPENAI_API_KEY", "OPENAI_BASE_URL", "CASE_MODEL"])
def test_missing_environment_is_a_usage_error(task_repo, missing):
    _, repo, task, _ = task_repo()
    proc = _run_agent(repo, task, _agent_env("http://127.0.0.1:9/v1", **{missing: None}))
    assert proc.returncode == 2
    assert missing in proc.stderr
    assert API_KEY not in proc.stderr


def test_bad_arguments_are_usage_errors(task_repo, tmp_path):
    _, repo, task, _ = task_repo()
    env = _agent_env("http://127.0.0.1:9/v1")
    assert _run_agent(repo, tmp_path / "nope.md", env).returncode == 2
    assert _run_agent(tmp_path / "nodir", task, env).returncode == 2
    assert _run_agent(repo, task, env, "--max-steps", "0").returncode == 2


def test_path_escapes_are_refused(task_repo, tmp_path):
    _, repo, task, initial = task_repo()
    outside = tmp_path / "escape.txt"
    (repo / "link").symlink_to(tmp_path, target_is_directory=True)
    steps = [
        {
            "content": None,
            "tool_calls": [
                {"name": "write_file", "arguments": {"path": "../escape.txt", "content": "pwned"}},
                {"name": "write_file", "arguments": {"path": str(outside), "content": "pwned"}},
                {"name": "read_file", "arguments": {"path": "/etc/hostname"}},
                {"name": "write_file", "arguments": {"path": "link/escape.txt", "content": "pwned"}},
                {"name": "write_file", "arguments": {"path": ".git/hooks/pre-commit", "content": "#!/bin/sh\nexit 0\n"}},
                {"name": "list_files", "arguments": {"path": "slugkit/../../"}},
                {"name": "read_file", "arguments": {"path": "slugkit/core.py"}},
            ],
        },
        {"content": "I could not do it."},
    ]
    with FakeOpenAIServer(steps) as server:
        proc = _run_agent(repo, task, _agent_env(server.base_url))
    # The model stopped without a commit: exit 1.
    assert proc.returncode == 1, proc.stderr
    assert "without making a commit" in proc.stderr
    assert not outside.exists()
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    assert head_commit(repo) == initial
    results = [m["content"] for m in server.requests[1]["messages"] if m["role"] == "tool"]
    assert len(results) == 7
    assert all(r.startswith("error: refused") for r in results[:6]), results
    assert "def slugify" in results[6]
    assert proc.stderr.count(" fail") == 6
    assert "tool=read_file ok" in proc.stderr


def test_step_budget_exhaustion(task_repo):
    _, repo, task, _ = task_repo()
    steps = [{"content": None, "tool_calls": [{"name": "list_files", "arguments": {}}]}] * 10
    with FakeOpenAIServer(steps) as server:
        proc = _run_agent(repo, task, _agent_env(server.base_url), "--max-steps", "3")
    assert proc.returncode == 1, proc.stderr
    assert "step budget of 3 exhausted" in proc.stderr
    assert len(server.requests) == 3


def test_commit_without_final_message_within_budget_is_incomplete(task_repo):
    fixture, repo, task, _ = task_repo()
    steps = fixture.load_session()["steps"]
    with FakeOpenAIServer(steps) as server:
        proc = _run_agent(repo, task, _agent_env(server.base_url), "--max-steps", str(len(steps) - 1))
    assert proc.returncode == 1
    assert "exhausted" in proc.stderr


def test_api_error_exits_3_with_error_class(task_repo):
    _, repo, task, _ = task_repo()
    with FakeOpenAIServer([], status=401) as server:
        proc = _run_agent(repo, task, _agent_env(server.base_url))
    assert proc.returncode == 3
    assert "AuthenticationError" in proc.stderr
    assert API_KEY not in proc.stderr


def test_connection_error_exits_3(task_repo):
    _, repo, task, _ = task_repo()
    proc = _run_agent(repo, task, _agent_env("http://127.0.0.1:9/v1"), "--request-timeout", "5")
    assert proc.returncode == 3
    assert "APIConnectionError" in proc.stderr


def test_code_under_test_cannot_read_the_api_key(task_repo):
    _, repo, task, _ = task_repo()
    probe = (
        "import os\n\n\ndef test_probe():\n"
        "    with open('leak.txt', 'w') as fh:\n"
        "        fh.write(repr({k: v for k, v in os.environ.items() if 'KEY' in k or 'OPENAI' in k}))\n"
    )
    steps = [
        {"tool_calls": [{"name": "write_file", "arguments": {"path": "tests/test_probe.py", "content": probe}}]},
        {"tool_calls": [{"name": "run_tests", "arguments": {}}]},
        {"tool_calls": [{"name": "git_commit", "arguments": {"message": "probe"}}]},
        {"content": "done"},
    ]
    with FakeOpenAIServer(steps) as server:
        proc = _run_agent(repo, task, _agent_env(server.base_url))
    assert proc.returncode == 0, proc.stderr
    assert (repo / "leak.txt").read_text() == "{}"
    log = subprocess.run(["git", "-C", str(repo), "log", "-p", "--all"], capture_output=True, text=True).stdout
    assert API_KEY not in log
