"""A SCRIPTED OpenAI-compatible backend: a TEST FIXTURE, not a model.

No GPU exists on the development machines, so tests, the demo and the benchmark use this
stand-in for vLLM's OpenAI server. It says what it is everywhere: `/v1/models` entries
are ``owned_by: scripted-test-fixture``, every body and chunk carries
``system_fingerprint: scripted-test-fixture``, and every response has the header
``X-Scripted-Backend: 1``. Nothing it returns is evidence about a real model.

Behaviour can be steered in-process (attributes of ``ScriptedBackend``) so tests can
provoke the failures the proxy must handle, and it records what it received. In script
mode it replays a recorded tool-calling session (a fixture's ``session.json``): the
step is the number of assistant messages already in the conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, Field

FINGERPRINT = "scripted-test-fixture"
_BODY: web.RequestKey[dict[str, Any]] = web.RequestKey("body", dict)
DEFAULT_TEXT = "Hello from the scripted test backend."


class ScriptToolCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ScriptStep(BaseModel):
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ScriptToolCall] = Field(default_factory=list)


class SessionScript(BaseModel):
    description: str = ""
    steps: list[ScriptStep]


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    size: int
    time: float
    # Every header line's name as received, lower-cased, repeats kept (``headers`` folds them).
    header_names: list[str] = field(default_factory=list)


@dataclass
class ScriptedBackend:
    model: str = "qwen3.6-35b-a3b"
    script: SessionScript | None = None
    # Further ids /v1/models lists (nothing serves them): stands in for a router that also
    # offers an external provider's model, which the preflight must refuse.
    also_list: tuple[str, ...] = ()
    report_model: str | None = None
    echo_model: bool = False
    fail_status: int | None = None
    fail_raw: bytes | None = None  # with fail_status: this body as sent, not the OpenAI shape
    chunk_delay_s: float = 0.0
    chunks: int = 8
    first_byte_delay_s: float = 0.0
    drop_after_chunks: int | None = None
    echo_headers: bool = False
    redirect_to: str | None = None
    ready: bool = True
    record_requests: bool = True
    access_log: Path | None = None
    requests: list[ReceivedRequest] = field(default_factory=list)
    last_stream_bytes: bytes = b""
    cancelled_streams: int = 0
    base_url: str = ""
    _runner: web.AppRunner | None = None

    @property
    def served_model(self) -> str:
        return self.model

    # ------------------------------------------------------------------ helpers
    def _reported(self, body: dict[str, Any]) -> str:
        if self.echo_model and isinstance(body.get("model"), str):
            return body["model"]
        return self.report_model or self.model

    def _step(self, body: dict[str, Any]) -> ScriptStep:
        if self.script is None:
            if body.get("tools"):
                tool = body["tools"][0].get("function", {}).get("name", "tool")
                return ScriptStep(reasoning="scripted reasoning",
                                  tool_calls=[ScriptToolCall(name=tool, arguments={"path": "a.txt", "content": "x"})])
            return ScriptStep(reasoning="scripted reasoning", content=DEFAULT_TEXT)
        n = sum(1 for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "assistant")
        if n < len(self.script.steps):
            return self.script.steps[n]
        return ScriptStep(content="[scripted session exhausted]")

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = max(1, len(orjson.dumps(body.get("messages", body.get("input", body.get("prompt", ""))))) // 4)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _pieces(self, text: str) -> list[str]:
        n = max(1, min(self.chunks, len(text)))
        size = -(-len(text) // n)
        return [text[i:i + size] for i in range(0, len(text), size)]

    # ------------------------------------------------------------------ handlers
    @web.middleware
    async def _record(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if self.record_requests:
            self.requests.append(ReceivedRequest(request.method, request.path, {str(k): v for k, v in request.headers.items()}, body,
                                                 len(raw), time.time(), [str(k).lower() for k in request.headers]))
        if self.access_log is not None:
            with self.access_log.open("ab") as f:
                f.write(orjson.dumps({"method": request.method, "path": request.path,
                                      "model": body.get("model") if isinstance(body, dict) else None}) + b"\n")
        request[_BODY] = body if isinstance(body, dict) else {}
        resp = await handler(request)
        resp.headers["X-Scripted-Backend"] = "1"
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        ids = (self.model, *self.also_list) if self.ready else ()
        data = [{"id": mid, "object": "model", "created": 0, "owned_by": FINGERPRINT} for mid in ids]
        return web.json_response({"object": "list", "data": data}, headers={"X-Scripted-Backend": "1"})

    async def _model(self, request: web.Request) -> web.Response:
        if request.match_info["mid"] != self.model:
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error",
                                                "param": None, "code": "model_not_found"}}, status=404)
        return web.json_response({"id": self.model, "object": "model", "created": 0, "owned_by": FINGERPRINT})

    async def _pre(self, request: web.Request) -> web.Response | None:
        if self.first_byte_delay_s:
            await asyncio.sleep(self.first_byte_delay_s)
        if self.redirect_to:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        if self.fail_status and self.fail_raw is not None:
            return web.Response(status=self.fail_status, body=self.fail_raw, content_type="application/json")
        if self.fail_status:
            msg = "scripted failure"
            if self.echo_headers:
                msg += " headers=" + orjson.dumps({str(k): v for k, v in request.headers.items()}).decode()
            return web.json_response({"error": {"message": msg, "type": "invalid_request_error" if self.fail_status < 500
                                                else "server_error", "param": None, "code": None}},
                                     status=self.fail_status)
        return None

    def _content_for(self, request: web.Request, step: ScriptStep) -> str | None:
        if self.echo_headers and step.content is not None:
            return step.content + " headers=" + orjson.dumps({str(k): v for k, v in request.headers.items()}).decode()
        return step.content

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        early = await self._pre(request)
        if early is not None:
            return early
        body = request[_BODY]
        step = self._step(body)
        content = self._content_for(request, step)
        model = self._reported(body)
        rid, created = "chatcmpl-scripted-" + hashlib.sha1(orjson.dumps(body)).hexdigest()[:12], 1767225600
        calls: list[dict[str, Any]] = [{"id": f"call_{i}", "type": "function",
                  "function": {"name": c.name, "arguments": orjson.dumps(c.arguments).decode()}}
                 for i, c in enumerate(step.tool_calls)]
        finish = "tool_calls" if calls else "stop"
        pieces = self._pieces(content) if content else []
        completion_tokens = max(1, len(pieces) + len(calls))
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if step.reasoning:
                message["reasoning_content"] = message["reasoning"] = step.reasoning
            if calls:
                message["tool_calls"] = calls
            return web.json_response({
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": self._usage(body, completion_tokens)})

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}) + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        if step.reasoning:
            events.append(chunk({"reasoning_content": step.reasoning, "reasoning": step.reasoning}))
        events.extend(chunk({"content": p}) for p in pieces)
        for i, c in enumerate(calls):
            args = c["function"]["arguments"]
            third = max(1, len(args) // 3)
            events.append(chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                                 "function": {"name": c["function"]["name"], "arguments": ""}}]}))
            for j in range(0, len(args), third):
                events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + third]}}]}))
        events.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(b"data: " + orjson.dumps({
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": FINGERPRINT, "choices": [], "usage": self._usage(body, completion_tokens)}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Scripted-Backend": "1"})
        await resp.prepare(request)
        sent = bytearray()
        try:
            for i, ev in enumerate(events):
                if self.drop_after_chunks is not None and i >= self.drop_after_chunks:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if self.chunk_delay_s and i:
                    await asyncio.sleep(self.chunk_delay_s)
                await resp.write(ev)
                sent += ev
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled_streams += 1
            raise
        finally:
            self.last_stream_bytes = bytes(sent)
        await resp.write_eof()
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        early = await self._pre(request)
        if early is not None:
            return early
        body = request[_BODY]
        model, text = self._reported(body), " return 42\n"
        base = {"id": "cmpl-scripted", "object": "text_completion", "created": 1767225600, "model": model,
                "system_fingerprint": FINGERPRINT}
        if not body.get("stream"):
            return web.json_response({**base, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                           "finish_reason": "stop"}],
                                      "usage": self._usage(body, len(self._pieces(text)))})
        events = [b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "text": p, "logprobs": None,
                                                                  "finish_reason": None}]}) + b"\n\n"
                  for p in self._pieces(text)]
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    async def _embeddings(self, request: web.Request) -> web.Response:
        early = await self._pre(request)
        if early is not None:
            return early
        body = request[_BODY]
        inputs = body.get("input", "")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(inputs):
            digest = hashlib.sha256(orjson.dumps(item)).digest()
            data.append({"object": "embedding", "index": i, "embedding": [b / 255 for b in digest[:8]]})
        return web.json_response({"object": "list", "data": data, "model": self._reported(body),
                                  "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        early = await self._pre(request)
        if early is not None:
            return early
        body = request[_BODY]
        model, text = self._reported(body), DEFAULT_TEXT
        usage = {"input_tokens": 4, "output_tokens": len(self._pieces(text)), "total_tokens": 4 + len(self._pieces(text))}
        item = {"id": "msg_scripted", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        final = {"id": "resp_scripted", "object": "response", "created_at": 1767225600, "status": "completed",
                 "model": model, "output": [item], "usage": usage, "parallel_tool_calls": True, "tool_choice": "auto",
                 "tools": [], "metadata": {}}
        if not body.get("stream"):
            return web.json_response(final)
        pending = {**final, "status": "in_progress", "output": [], "usage": None}

        def ev(kind: str, payload: dict[str, Any], seq: int) -> bytes:
            data = {"type": kind, "sequence_number": seq, **payload}
            return f"event: {kind}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"

        events = [ev("response.created", {"response": pending}, 0),
                  ev("response.output_item.added", {"output_index": 0, "item": {**item, "status": "in_progress",
                                                                                "content": []}}, 1)]
        seq = 2
        for piece in self._pieces(text):
            events.append(ev("response.output_text.delta", {"item_id": "msg_scripted", "output_index": 0,
                                                             "content_index": 0, "delta": piece, "logprobs": []}, seq))
            seq += 1
        events.append(ev("response.output_text.done", {"item_id": "msg_scripted", "output_index": 0,
                                                        "content_index": 0, "text": text, "logprobs": []}, seq))
        events.append(ev("response.output_item.done", {"output_index": 0, "item": item}, seq + 1))
        events.append(ev("response.completed", {"response": final}, seq + 2))
        return await self._stream(request, events)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "scripted": True})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=1024 ** 3)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{mid:.+}", self._model)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/health", self._health)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.base_url = f"http://{host}:{sock.getsockname()[1]}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _serve(args: argparse.Namespace) -> int:
    script = SessionScript.model_validate_json(Path(args.script).read_bytes()) if args.script else None
    backend = ScriptedBackend(model=args.model, script=script, also_list=tuple(args.also_list),
                              report_model=args.report_model,
                              chunk_delay_s=args.chunk_delay_ms / 1000, chunks=args.chunks,
                              record_requests=False,
                              access_log=Path(args.access_log) if args.access_log else None)
    url = await backend.start(args.host, args.port)
    print(f"SCRIPTED_BACKEND_READY {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backend.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.scripted_backend",
                                description="Scripted OpenAI-compatible backend (a test fixture, not a model).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="qwen3.6-35b-a3b")
    p.add_argument("--script", default=None, help="session.json to replay")
    p.add_argument("--report-model", default=None, help="claim this model in responses (tests the served-model check)")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--access-log", default=None, help="append one JSON line per request received")
    p.add_argument("--also-list", action="append", default=[], metavar="MODEL",
                   help="list this id too in /v1/models (a router's extra model; repeatable)")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
