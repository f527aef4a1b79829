"""Relaying an SSE stream from the backend: the bytes go through ``StreamChecker``
(proxy.stream_check, sans-IO), and only what it releases is written to the client.

This module does the I/O around the check and acts on its verdicts: it never looks
inside the stream itself. After the first event, reads are checked and written by a
plain callback (``DirectRelay``) rather than the relay task; the task takes them back
while the client is slow, and ends the stream. A refused stream ends with one last
error event (the shape both the Chat Completions and the Responses clients read) and its
reason in the record.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11

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


# The client's unsent bytes past which reads go back to the relay task, whose writes
# wait for the client (aiohttp's drain); the direct path never waits.
_DIRECT_WRITE_LIMIT = 64 * 1024


class DirectRelay:
    """Once the response has started, the backend's reads are checked and written to
    the client by a plain callback (``BackendResponse.sink``), not by the relay task:
    with 1,000 streams the task wake-up, the generator step and aiohttp's two write
    coroutines per event were the relay's own cost.

    The sink takes a read only while the relay task waits with nothing buffered, so bytes
    keep their order. It does the work in a callback scheduled for the loop's next turn
    (``_flush``), not inside ``data_received``: writing there, the 1,000-stream gap p99
    grew from about 12 to 21 ms (docs/performance.md). Reads that arrive before the
    callback runs are checked and written together. While the client is slow the reads
    go back to the task, whose writes wait for it. A refusal or a client gone ends the
    task's wait (``interrupt``); the task acts on it."""

    __slots__ = ("checker", "transport", "chunked", "resp", "refused", "gone", "_pending", "_loop")

    def __init__(self, checker: StreamChecker, transport: asyncio.Transport, chunked: bool,
                 resp: BackendResponse) -> None:
        self.checker = checker
        self.transport = transport
        self.chunked = chunked
        self.resp = resp
        self.refused: StreamRefused | None = None
        self.gone = False
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def __call__(self, data: bytes) -> None:
        pending = self._pending
        pending.append(data)
        if len(pending) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        resp = self.resp
        if resp.sink is not self:  # the relay has ended (cancelled, or stopped below)
            return
        transport = self.transport
        if transport.get_write_buffer_size() > _DIRECT_WRITE_LIMIT:
            resp.put_back(data)  # a slow client: the task writes it, and waits
            return
        try:
            send = self.checker.feed(data)
        except StreamRefused as refused:
            send, refused.cleared = refused.cleared, b""
            self.refused = refused
            self._stop()
        except Exception as exc:  # noqa: BLE001 - no loop callback may leave a stream running unchecked
            send = b""
            self.refused = StreamRefused(StreamFault.PROTOCOL, f"the stream check failed: {type(exc).__name__}")
            self._stop()
        if send:
            if transport.is_closing():
                self.gone = True
                self._stop()
            elif self.chunked:  # the framing aiohttp's writer uses for this response
                transport.write(b"%x\r\n%b\r\n" % (len(send), send))
            else:
                transport.write(send)

    def _stop(self) -> None:
        self.resp.sink = None
        self.resp.interrupt()


async def relay_stream(request: web.Request, state: ProxyState, draft: Draft,
                       resp: BackendResponse) -> web.StreamResponse:
    """Forward the SSE stream as ``StreamChecker`` releases it: every event checked
    (see proxy.stream_check), events held back until one names the admitted model. A
    refused stream ends with an error event and its reason in the record. Raises
    ClientGone if the client disconnects."""
    idle_s = state.settings.limits.idle_timeout_s
    out = web.StreamResponse(status=resp.status,
                             headers=forwardable_response_headers(resp.headers, draft.request_id))
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
        resp.sink = None
        draft.outcome, draft.decision, draft.reason = Outcome.UPSTREAM_ERROR, Decision.ERROR, code
        draft.upstream_error = kind
        draft.status = draft.status or resp.status
        draft.served_model = checker.served_model
        await write(cleared + stream_error_event(code, state.redactor.redact(message)))
        await out.write_eof()
        return out

    direct: DirectRelay | None = None
    try:
        async for data in resp.chunks(idle_s):
            send = checker.feed(data)
            if not send:
                continue
            if not out.prepared:
                await write(send)
                transport = request.transport  # None only for a client already gone
                if transport is not None:  # from here on, reads go to the direct path while it can take them
                    direct = resp.sink = DirectRelay(checker, transport, request.version >= HttpVersion11, resp)
                continue
            # A read the direct path left to the task (a slow client, or one buffered
            # before the response started): written without the helper's coroutine.
            try:
                await out.write(send)
            except ConnectionResetError as exc:
                draft.client_disconnected = True
                raise ClientGone(out) from exc
        if direct is not None:
            if direct.refused is not None:
                raise direct.refused
            if direct.gone:
                draft.client_disconnected = True
                raise ClientGone(out)
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
    finally:
        resp.sink = None  # also when cancelled (a client gone): a callback still due does nothing
    draft.served_model = checker.served_model
    await write(tail)  # what the end of the body releases (also prepares a response nothing reached yet)
    await out.write_eof()
    draft.outcome, draft.reason, draft.status = OUTCOME_OK, REASON_OK, resp.status
    return out
