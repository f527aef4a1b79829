"""Relaying an SSE stream from the backend: the bytes go through ``StreamChecker``
(proxy.stream_check, sans-IO), and only what it releases is written to the client.

This module does the I/O around the check and acts on its verdicts: it never looks
inside the stream itself. A refused stream ends with one last error event (the shape
both the Chat Completions and the Responses clients read) and its reason in the record.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from .codes import OUTCOME_OK, REASON_OK, Decision, ErrorCode, Outcome, UpstreamErrorKind
from .request_policy import forwardable_response_headers
from .state import Draft, ProxyState
from .stream_check import StreamChecker, StreamFault, StreamRefused
from .upstream import BackendError, BackendResponse


def stream_error_event(code: ErrorCode, message: str) -> bytes:
    """The last event of a refused stream: ``error`` for Chat Completions clients,
    ``type``/``code``/``message`` for Responses API clients (docs/http-api.md)."""
    err = {"message": message, "type": "api_error", "param": None, "code": code}
    return b"data: " + orjson.dumps({"type": "error", "error": err, "code": code, "message": message}) + b"\n\n"


class ClientGone(Exception):
    """The client went away mid-stream; the upstream request must be cancelled (proxy.forwarding_handler)."""

    def __init__(self, out: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.out = out


async def relay_stream(request: web.Request, state: ProxyState, draft: Draft,
                       resp: BackendResponse) -> web.StreamResponse:
    """Forward the SSE stream as ``StreamChecker`` releases it: every event checked
    (see proxy.stream_check), events held back until one names the admitted model. A
    refused stream ends with an error event and its reason in the record. Raises
    ClientGone if the client disconnects."""
    idle_s = state.settings.limits.idle_timeout_s
    out = web.StreamResponse(status=resp.status, headers={
        **forwardable_response_headers(resp.headers), "X-Request-Id": draft.request_id})
    checker = StreamChecker(state.admission.model, draft.usage)
    draft.stream = True

    async def write(data: bytes) -> None:
        try:
            if not out.prepared:
                await out.prepare(request)
                draft.ttft_s = time.perf_counter() - draft.started
            await out.write(data)
        except ConnectionResetError as exc:
            draft.client_disconnected = True
            raise ClientGone(out) from exc

    async def fail(code: ErrorCode, message: str, kind: UpstreamErrorKind | None = None,
                   cleared: bytes = b"") -> web.StreamResponse:
        draft.outcome, draft.decision, draft.reason = Outcome.UPSTREAM_ERROR, Decision.ERROR, code
        draft.upstream_error = kind
        draft.status = draft.status or resp.status
        draft.served_model = checker.served_model
        await write(cleared + stream_error_event(code, state.redactor.redact(message)))
        await out.write_eof()
        return out

    try:
        async for data in resp.chunks(idle_s):
            send = checker.feed(data)
            if not send:
                continue
            if not out.prepared:
                await write(send)
                continue
            # The usual event: written without the helper's coroutine (one frame less
            # per event, with 1,000 streams the relay's own cost); the same handling.
            try:
                await out.write(send)
            except ConnectionResetError as exc:
                draft.client_disconnected = True
                raise ClientGone(out) from exc
        tail = checker.finish()
    except StreamRefused as refused:
        kind = UpstreamErrorKind.PROTOCOL if refused.fault is StreamFault.PROTOCOL else None
        return await fail(ErrorCode(refused.fault.value), refused.message, kind, refused.cleared)
    except TimeoutError:
        return await fail(ErrorCode.BACKEND_TIMEOUT, "the backend stopped sending in the middle of the stream",
                          UpstreamErrorKind.TIMEOUT)
    except ValueError as exc:
        return await fail(ErrorCode.BACKEND_PROTOCOL_ERROR, str(exc), UpstreamErrorKind.PROTOCOL)
    except (BackendError, OSError):
        return await fail(ErrorCode.BACKEND_PROTOCOL_ERROR, "the backend connection broke in the middle of the stream",
                          UpstreamErrorKind.PROTOCOL)
    draft.served_model = checker.served_model
    await write(tail)  # what the end of the body releases (also prepares a response nothing reached yet)
    await out.write_eof()
    draft.outcome, draft.reason, draft.status = OUTCOME_OK, REASON_OK, resp.status
    return out
