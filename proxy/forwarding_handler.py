"""The forwarded routes (``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/embeddings``): read and decode the body, apply the request
policies (routing fields, the field allow-list, the model pin), check that the proxy may
forward now (not draining, the artifacts still allow it, the evidence log can record,
the backend is ready, a slot is free), write the forwarding record, then relay the
backend's answer: an error mapped for the client, a JSON body checked for the served
model, or a stream through proxy.streaming.

The engine gets the parsed and checked object re-serialised, never the client's bytes.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from .allowlists import check_fields, forwardable_request_headers
from .backend_errors import client_error
from .body_decoding import DecodeError, decode_body, encoding_label, parse_content_encoding
from .codes import (
    DECISION_ADMITTED,
    OUTCOME_OK,
    REASON_OK,
    Decision,
    DecodingResult,
    ErrorCode,
    Outcome,
    Reason,
    UpstreamErrorKind,
    backend_status_reason,
)
from .hashchain import ChainError
from .model_policy import Family, decide_model
from .replies import NO_EVIDENCE, error_reply, refuse
from .request_policy import FORWARDED, Refusal, forwardable_response_headers, routing_override
from .served_model import check_json_body
from .state import DRAFT, STATE, Draft, ProxyState
from .streaming import ClientGone, relay_stream
from .upstream import BackendError, upstream_error_kind

# Bodies larger than this (raw) are decoded off the event loop.
_DECODE_INLINE_BYTES = 256 * 1024


async def _read_body(request: web.Request, state: ProxyState, draft: Draft) -> bytes | DecodeError:
    """The request body, its content codings undone by the proxy (aiohttp's own
    decompression is off, see proxy.server), within the body limit both as sent and as
    decoded; or why not, as a DecodeError carrying the error code."""
    limit = state.settings.limits.max_body_bytes
    # Most requests carry no Content-Encoding: no join, no parse (0.85 us, measured).
    declared = request.headers.getall("Content-Encoding", ())
    codings: list[str] = []
    if declared:
        try:
            codings = parse_content_encoding(",".join(declared))
        except DecodeError as exc:
            _count_decoding(state, exc.encoding, DecodingResult.UNSUPPORTED)
            return exc
        draft.content_encoding = encoding_label(codings)
    if request.content_length is not None and request.content_length > limit:
        return _too_large(limit, draft)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit, draft)
    if not codings:
        return raw
    try:
        if len(raw) > _DECODE_INLINE_BYTES:
            body = await state.loop.run_in_executor(None, decode_body, raw, codings, limit)
        else:
            body = decode_body(raw, codings, limit)
    except DecodeError as exc:
        _count_decoding(state, exc.encoding,
                        DecodingResult.TOO_LARGE if exc.code == ErrorCode.REQUEST_TOO_LARGE else DecodingResult.CORRUPT)
        return exc
    _count_decoding(state, draft.content_encoding or "identity", DecodingResult.DECODED)
    return body


def _too_large(limit: int, draft: Draft) -> DecodeError:
    """The refusal of a body over the limit as sent (built only when it is returned)."""
    return DecodeError(ErrorCode.REQUEST_TOO_LARGE, f"request body exceeds the limit of {limit} bytes",
                       draft.content_encoding or "identity")


def _count_decoding(state: ProxyState, encoding: str, result: DecodingResult) -> None:
    if state.settings.metrics_enabled:
        state.metrics.body_decodings.labels(encoding, result).inc()


async def forward(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    endpoint = FORWARDED[request.path]
    draft.endpoint = endpoint
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        return error_reply(state, draft, ErrorCode.UNSUPPORTED_CONTENT_TYPE, "Content-Type must be application/json")
    body = await _read_body(request, state, draft)
    if isinstance(body, DecodeError):
        return error_reply(state, draft, body.code, body.message)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return error_reply(state, draft, ErrorCode.INVALID_JSON, "request body is not valid JSON")
    if not isinstance(obj, dict):
        return error_reply(state, draft, ErrorCode.INVALID_BODY, "request body must be a JSON object")
    requested = obj.get("model")
    draft.requested_model = state.redactor.clip(requested, 200) if isinstance(requested, str) else None
    draft.stream = obj.get("stream") is True
    routing = routing_override(obj)
    if routing is not None:
        draft.param = routing.param
        return refuse(state, draft, routing)
    problem = check_fields(endpoint, obj, state.settings.extra_request_fields)
    if problem is not None:
        draft.param = problem.param
        if problem.fallback:
            return refuse(state, draft, Refusal(problem.code, Family.OTHER, problem.message, param=problem.param))
        return error_reply(state, draft, problem.code, problem.message, param=problem.param)
    decision = decide_model(requested, state.admission)
    if not decision.admitted:
        if decision.code == ErrorCode.MODEL_MISSING:
            return error_reply(state, draft, ErrorCode.MODEL_MISSING, decision.message, param="model")
        assert decision.family is not None
        return refuse(state, draft, Refusal(ErrorCode.MODEL_NOT_ADMITTED, decision.family, decision.message,
                                            param="model"))
    draft.effective_model, draft.alias_rewritten = decision.effective_model, decision.alias_rewritten
    if decision.alias_rewritten:
        obj["model"] = decision.effective_model
    # The engine gets exactly what was checked: the parsed object, not the client's
    # bytes, so a duplicate key an engine might read first-wins ({"model": "other",
    # "model": "<admitted>"}) never reaches it (0.4 us for a small body, measured).
    body = orjson.dumps(obj)
    # Fail closed: never forward what could not be recorded, or to a backend not proven.
    if state.draining:
        draft.outcome = Outcome.UNAVAILABLE
        return error_reply(state, draft, ErrorCode.SHUTTING_DOWN, "the proxy is shutting down")
    if state.authority is not None and not state.authority.serving:
        draft.outcome = Outcome.UNAVAILABLE
        return error_reply(state, draft, ErrorCode.ADMISSION_BLOCKS, "the operators' artifacts no longer allow "
                           f"serving ({state.authority.verdict.code}); see /readyz")
    if state.evidence is not None:
        try:
            state.evidence.check()
        except ChainError:
            draft.outcome = Outcome.UNAVAILABLE
            state.evidence_failed()
            return error_reply(state, draft, ErrorCode.EVIDENCE_UNAVAILABLE, NO_EVIDENCE)
    if not state.readiness.state.ready:
        draft.outcome = Outcome.UNAVAILABLE
        return error_reply(state, draft, ErrorCode.BACKEND_NOT_READY,
                           "the backend does not serve the admitted model (yet); see /readyz")
    if state.in_flight >= state.settings.limits.max_concurrency:
        draft.outcome = Outcome.REJECTED
        return error_reply(state, draft, ErrorCode.TOO_MANY_REQUESTS, "too many concurrent requests; retry shortly",
                           headers={"Retry-After": "1"})
    draft.decision = DECISION_ADMITTED
    state.in_flight += 1
    if state.settings.metrics_enabled:
        state.metrics.request_started()
    try:
        return await _proxy(request, state, draft, body, request.path)
    finally:
        state.in_flight -= 1
        if state.settings.metrics_enabled:
            state.metrics.request_ended()


_UPSTREAM_FAILURE_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.BACKEND_ADDRESS_REFUSED: "the backend name resolved to an address outside the upstream pin",
    ErrorCode.BACKEND_TIMEOUT: "the backend did not answer in time",
    ErrorCode.BACKEND_UNREACHABLE: "cannot connect to the backend",
    ErrorCode.BACKEND_PROTOCOL_ERROR: "the backend connection failed mid-response",
}


def _upstream_failure(state: ProxyState, draft: Draft, exc: BaseException) -> web.Response:
    kind, code = upstream_error_kind(exc)
    draft.upstream_error, draft.outcome, draft.decision = kind, Outcome.UPSTREAM_ERROR, Decision.ERROR
    return error_reply(state, draft, code, _UPSTREAM_FAILURE_MESSAGES[code])


async def _proxy(request: web.Request, state: ProxyState, draft: Draft, body: bytes, path: str) -> web.StreamResponse:
    limits = state.settings.limits
    headers = forwardable_request_headers(request.headers.items())
    headers["Content-Type"] = "application/json"
    headers["X-Request-Id"] = draft.request_id
    # A durable forwarding record before the backend sees a byte (fail closed).
    if state.forwarding is not None:
        written = state.forwarding.record(draft, state.in_flight <= 1)
        if not isinstance(written, bool):
            written = await written  # the shared write (proxy.group_commit)
        if not written:
            draft.decision, draft.outcome = Decision.REJECTED, Outcome.UNAVAILABLE  # counted once, by its completion
            return error_reply(state, draft, ErrorCode.EVIDENCE_UNAVAILABLE, NO_EVIDENCE)
    draft.forwarded = True
    try:
        resp = await state.upstream.post(path, body, headers, limits.first_byte_timeout_s)
    except (OSError, ValueError, BackendError) as exc:
        return _upstream_failure(state, draft, exc)
    completed = False
    try:
        if 300 <= resp.status < 400:
            draft.upstream_error = UpstreamErrorKind.REDIRECT
            draft.outcome, draft.decision = Outcome.UPSTREAM_ERROR, Decision.ERROR
            return error_reply(state, draft, ErrorCode.BACKEND_REDIRECT_REFUSED,
                               "the backend answered with a redirect; redirects are never followed")
        ctype = resp.content_type
        if resp.status >= 400:
            data = await resp.read(4 * 1024 * 1024, limits.idle_timeout_s)
            draft.upstream_error = UpstreamErrorKind.STATUS_4XX if resp.status < 500 else UpstreamErrorKind.STATUS_5XX
            draft.outcome, draft.reason = Outcome.UPSTREAM_ERROR, backend_status_reason(resp.status)
            completed = True
            mapped = client_error(resp.status, data)
            if mapped is not None:  # not the OpenAI shape, or the backend refused the proxy's key
                draft.status, data = mapped
                return web.Response(status=draft.status, body=data, content_type="application/json",
                                    headers={"X-Request-Id": draft.request_id})
            draft.status = resp.status
            return web.Response(status=resp.status, body=state.redactor.redact_bytes(data),
                                headers=forwardable_response_headers(resp.headers, draft.request_id))
        if ctype.startswith("text/event-stream"):
            out = await relay_stream(request, state, draft, resp)
            completed = draft.outcome == OUTCOME_OK
            return out
        data = await resp.read(max(limits.max_body_bytes, 64 * 1024 * 1024), limits.idle_timeout_s)
        check = check_json_body(data, state.admission.model, draft.usage)
        draft.served_model = state.redactor.clip(check.served_model, 200) if check.served_model else None
        completed = True
        if not check.ok:
            draft.outcome, draft.decision = Outcome.UPSTREAM_ERROR, Decision.ERROR
            return error_reply(state, draft, ErrorCode.SERVED_MODEL_MISMATCH, check.message)
        draft.outcome, draft.reason, draft.status = OUTCOME_OK, REASON_OK, resp.status
        return web.Response(status=resp.status, body=data,
                            headers=forwardable_response_headers(resp.headers, draft.request_id))
    except ClientGone as gone:
        draft.reason = Reason.CLIENT_DISCONNECTED
        return gone.out
    except (OSError, ValueError, BackendError) as exc:
        return _upstream_failure(state, draft, exc)
    finally:
        if completed:
            resp.release()
        else:
            # Cancelled or failed mid-way: close the connection so the backend stops generating.
            resp.close()
