"""The bench's canned SSE backend (``bench.sse_backend``, a bench fixture: its events say
nothing about a model), run as a real process on 127.0.0.1: what it answers, read with
the official SDK, and the streaming scenario's pieces end to end through the real proxy.
Nothing here times anything."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from bench.loads import chat_body, run_streams, write_body
from bench.procs import MODEL, ROOT, Proc, start_proxy, start_sse_backend

CHUNKS = 20


@pytest.fixture
def sse(tmp_path: Path) -> Iterator[Proc]:
    backend = start_sse_backend(tmp_path, CHUNKS, 1.0)
    yield backend
    backend.stop()


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_streams_a_whole_answer_with_the_sdk_twice_on_one_connection(sse: Proc) -> None:
    client = openai.OpenAI(base_url=sse.url, api_key="unused-by-the-fixture", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    for _ in range(2):  # the second answer reuses the kept-alive connection
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     stream=True))
        assert {c.model for c in chunks} == {MODEL} and len(chunks) == CHUNKS + 2
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ab" * CHUNKS
        assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="x")


def test_a_client_leaving_mid_stream_does_not_stop_the_fixture(sse: Proc) -> None:
    with socket.create_connection(("127.0.0.1", sse.port), timeout=10) as s:
        body = chat_body("x", stream=True)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
    answer = _raw(sse.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and json.loads(answer.split(b"\r\n\r\n", 1)[1])["data"][0]["id"] == MODEL
    assert sse.alive()


def test_a_request_it_cannot_read_gets_400_and_a_closed_connection(sse: Proc) -> None:
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw(sse.port, chunked).startswith(b"HTTP/1.1 400 Bad Request")
    assert _raw(sse.port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request")


def test_it_refuses_to_listen_beyond_loopback_with_a_clear_error() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.sse_backend", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2 and "--host must be 127.0.0.1 or ::1" in out.stderr and "Traceback" not in out.stderr


def test_the_stream_scenario_pieces_run_end_to_end_through_the_proxy(sse: Proc, tmp_path: Path) -> None:
    """The bench's stream client, the proxy as the bench starts it, and this fixture: the
    proxy's model check passes on every event and each stream is counted whole."""
    token = "bench-test-token-0123456789"
    proxy = start_proxy(tmp_path, "proxy-test", sse.url, token)
    try:
        body = write_body(tmp_path, "stream.json", chat_body("x", stream=True))
        out = run_streams(proxy.url + "/chat/completions", 5, body, token, 0.0, 60)
        direct = run_streams(sse.url + "/chat/completions", 5, body, None, 0.0, 60)
    finally:
        proxy.stop()
    assert out["completed"] == direct["completed"] == 5 and out["errors"] == {}
    assert out["events"] == direct["events"] == 5 * (CHUNKS + 3)  # role, contents, finish, [DONE]
    records = [json.loads(line) for line in Path(str(proxy.extra["evidence_file"])).read_text().splitlines()]
    streamed = [r for r in records if r.get("kind") == "request"]
    assert len(streamed) == 5 and all(r["stream"] and r["served_model"] == MODEL and r["status"] == 200
                                      for r in streamed)
