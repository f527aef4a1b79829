"""The aiohttp application: applies the policy functions, forwards, records.

Layering: the policy modules decide (pure), ``Upstream`` talks to the backend, and this
module only wires them together. Every request, refused or forwarded, ends in exactly
one evidence record and one metrics update, written by ``guard`` in a ``finally``. A
request is forwarded only after the evidence log has proven it can still record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import orjson
from aiohttp import web

from .admission import Admission
from .allowlists import check_fields, forwardable_request_headers
from .auth import authenticate
from .backend_errors import client_error
from .body_decoding import DecodeError, decode_body, encoding_label, parse_content_encoding
from .codes import (
    DECISION_ADMITTED,
    OUTCOME_OK,
    OUTCOME_UNAUTHENTICATED,
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
from .model_policy import Family, classify_family, decide_model
from .records import access_line, bound_unauthenticated, finish, request_record_fields
from .replies import error_reply, refuse
from .request_policy import (
    FORWARDED,
    Endpoint,
    Refusal,
    client_request_id,
    external_endpoint,
    forwardable_response_headers,
    provider_header,
    routing_override,
    websocket_upgrade,
)
from .served_model import check_json_body
from .state import DRAFT, PUBLIC_PATHS, STATE, Draft, ProxyState
from .streaming import ClientGone, relay_stream
from .upstream import BackendError, upstream_error_kind
from .upstream_policy import is_known_provider_host, normalize_host

# Imported from here by tests and proxy.server.
__all__ = ["DRAFT", "STATE", "Draft", "ProxyState", "create_app", "guard", "request_record_fields"]

log = logging.getLogger("case_proxy")


def _forward_proxy_target(request: web.Request) -> str | None:
    """The host a client tried to reach by using us as a forward proxy (CONNECT or an
    absolute-form request target), or None for an ordinary request."""
    raw = request.raw_path
    if request.method == "CONNECT":
        return raw.rsplit(":", 1)[0].strip("[]") or "unknown"
    if not raw.startswith("/"):
        rest = raw.split("://", 1)[-1]
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        return host.rsplit(":", 1)[0].strip("[]") if host else "unknown"
    return None


@web.middleware
async def guard(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Every request ends here in one evidence record and one metrics update. A response
    whose record could not be written is withheld (fail closed) unless it already
    started streaming."""
    state = request.app[STATE]
    # The record's id is always the proxy's own; a client's id is kept beside it.
    draft = Draft(state.new_request_id(), time.perf_counter(), request.method, state.redactor.clip(request.path, 200), True)
    if "X-Request-Id" in request.headers:
        draft.client_request_id = client_request_id(request.headers.getall("X-Request-Id"))
    request[DRAFT] = draft
    try:
        response = await _dispatch(request, state, draft, handler)
    except asyncio.CancelledError:
        draft.client_disconnected = True
        if draft.reason == Reason.UNHANDLED:
            draft.reason = Reason.CLIENT_DISCONNECTED
        finish(state, draft)  # no answer left to hold back: the record is not awaited
        access_line(state, draft)
        raise
    except web.HTTPException as exc:  # from the router (404, 405) or a handler
        response = _http_error(request, state, draft, exc)
    except Exception:
        log.exception("internal error handling request %s", draft.request_id)
        draft.outcome, draft.decision = Outcome.UNAVAILABLE, Decision.ERROR
        response = error_reply(state, draft, ErrorCode.INTERNAL_ERROR, "internal error in the proxy; request not completed")
    if not draft.status:
        draft.status = response.status
    if draft.outcome == OUTCOME_UNAUTHENTICATED:
        bound_unauthenticated(state, draft)
    recorded = finish(state, draft)
    if not isinstance(recorded, bool):
        recorded = await recorded  # the batch's write (see proxy.group_commit)
    if not recorded and not response.prepared:
        draft.outcome = Outcome.UNAVAILABLE
        response = error_reply(state, draft, ErrorCode.EVIDENCE_UNAVAILABLE, "the proxy cannot record evidence; request refused")
    access_line(state, draft)
    return response


async def _dispatch(request: web.Request, state: ProxyState, draft: Draft, handler) -> web.StreamResponse:  # type: ignore[no-untyped-def]
    """The order of checks: public endpoints, the token (a request without it is not
    Case's: see proxy.auth), forward-proxy use, other providers' endpoints and
    headers, a WebSocket upgrade, then the route's own handler."""
    target_host = _forward_proxy_target(request)
    if target_host is None and request.path in PUBLIC_PATHS:
        draft.decision, draft.outcome, draft.reason = DECISION_ADMITTED, OUTCOME_OK, REASON_OK
        return await handler(request)
    if target_host is not None:
        draft.target_host = state.redactor.clip(normalize_host(target_host), 255)
    auth = authenticate(request.headers, state.token, forward_proxy=target_host is not None)
    if auth.code is not None:
        draft.outcome = Outcome.UNAUTHENTICATED
        if auth.code == ErrorCode.PROXY_AUTH_REQUIRED:
            return error_reply(state, draft, auth.code,
                          "proxy authentication required: use the proxy URL http://case:<CASE_PROXY_TOKEN>@host:port",
                          headers={"Proxy-Authenticate": 'Basic realm="case-proxy"'})
        message = ("invalid bearer token" if auth.code == ErrorCode.INVALID_TOKEN else
                   "missing bearer token: send 'Authorization: Bearer <CASE_PROXY_TOKEN>'")
        return error_reply(state, draft, auth.code, message, headers={"WWW-Authenticate": "Bearer"})
    if target_host is not None:
        host = draft.target_host or "unknown"
        family = classify_family(host) if is_known_provider_host(host) else Family.OTHER
        return refuse(state, draft, Refusal(
            ErrorCode.FORWARD_PROXY_REFUSED, family,
            "this server is not a forward proxy; outbound traffic from Case is refused and recorded"))
    # The forwarded routes are OpenAI paths by definition: only other paths need the scan.
    ext = None if request.path in FORWARDED else external_endpoint(request.path)
    if ext is not None:
        return refuse(state, draft, ext)
    hdr = provider_header(request.headers.keys())
    if hdr is not None:
        return refuse(state, draft, hdr)
    if websocket_upgrade(request.headers):
        return websocket_refused(request)
    return await handler(request)


def _http_error(request: web.Request, state: ProxyState, draft: Draft, exc: web.HTTPException) -> web.Response:
    """aiohttp's own answers, OpenAI-shaped: the router's 404 (no route for the path) and
    405 (a route for the path, not for the method; ``Allow`` names the methods it takes),
    and a body over the limit (413)."""
    draft.outcome = Outcome.REJECTED
    path = state.redactor.clip(request.path, 200)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = ", ".join(sorted(exc.allowed_methods))
        return error_reply(state, draft, ErrorCode.METHOD_NOT_ALLOWED,
                      f"method {request.method} is not allowed on {path}; use {allow}", headers={"Allow": allow})
    if exc.status == 404:
        return error_reply(state, draft, ErrorCode.UNKNOWN_URL, f"unknown endpoint {request.method} {path}")
    if exc.status == 413:
        return error_reply(state, draft, ErrorCode.REQUEST_TOO_LARGE, "request body exceeds the configured limit")
    return error_reply(state, draft, ErrorCode.INVALID_BODY, exc.reason)


# ---------------------------------------------------------------- public endpoints

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    if not state.readiness.state.ready:
        problems.append(state.readiness.state.reason)
    if state.authority is not None and not state.authority.serving:
        problems.append(f"authority: {state.authority.verdict.code}: {state.authority.verdict.message}")
    if state.evidence is not None:
        try:
            state.evidence.check()
        except ChainError as exc:
            problems.append(f"evidence log cannot record: {exc}")
    if state.draining:
        problems.append("shutting down")
    body = {"status": "not_ready" if problems else "ready", "model": state.admission.model,
            "reasons": problems}
    return web.json_response(body, status=503 if problems else 200)


async def metrics_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.settings.metrics_enabled:
        raise web.HTTPNotFound()
    return web.Response(body=state.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


# ---------------------------------------------------------------- models, from the admission

def _model_object(admission: Admission) -> dict[str, object]:
    return {"id": admission.model, "object": "model", "created": 0, "owned_by": admission.provider}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    draft.endpoint, draft.decision, draft.outcome, draft.reason = Endpoint.MODELS, DECISION_ADMITTED, OUTCOME_OK, REASON_OK
    return web.json_response({"object": "list", "data": [_model_object(state.admission)]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    draft.endpoint = Endpoint.MODEL
    model_id = request.match_info["model_id"]
    draft.requested_model = state.redactor.clip(model_id, 200)
    if model_id == state.admission.model or model_id in state.admission.aliases:
        draft.decision, draft.outcome, draft.reason = DECISION_ADMITTED, OUTCOME_OK, REASON_OK
        return web.json_response(_model_object(state.admission))
    return error_reply(state, draft, ErrorCode.MODEL_NOT_FOUND,
                  f"no such model on this route; the only admitted model is '{state.admission.model}'", param="model")


def websocket_refused(request: web.Request) -> web.Response:
    """A WebSocket upgrade (Codex tries one on GET /v1/responses before HTTP) gets 426
    with a message saying what to use: Codex then falls back to HTTP at once, where a
    405 made it retry five times first. A plain GET on the path is the router's 405."""
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    if request.path in FORWARDED:
        draft.endpoint = FORWARDED[request.path]
    response = error_reply(state, draft, ErrorCode.UPGRADE_REQUIRED,
                      "WebSocket transport is not offered on this route; send the request over HTTP "
                      "(POST /v1/responses, /v1/chat/completions)",
                      headers={"Upgrade": "HTTP/1.1", "Connection": "close"})
    response.force_close()
    return response


# ---------------------------------------------------------------- forwarded endpoints

# Bodies larger than this (raw) are decoded off the event loop.
_DECODE_INLINE_BYTES = 256 * 1024


async def _read_body(request: web.Request, state: ProxyState, draft: Draft) -> bytes | DecodeError:
    """The request body, its content codings undone by the proxy (aiohttp's own
    decompression is off, see proxy.server), within the body limit both as sent and as
    decoded; or why not, as a DecodeError carrying the error code."""
    limit = state.settings.limits.max_body_bytes
    try:
        codings = parse_content_encoding(",".join(request.headers.getall("Content-Encoding", [])))
    except DecodeError as exc:
        _count_decoding(state, exc.encoding, DecodingResult.UNSUPPORTED)
        return exc
    draft.content_encoding = encoding_label(codings)
    too_large = DecodeError(ErrorCode.REQUEST_TOO_LARGE, f"request body exceeds the limit of {limit} bytes",
                            draft.content_encoding or "identity")
    if request.content_length is not None and request.content_length > limit:
        return too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return too_large
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
        return refuse(state, draft, Refusal(ErrorCode.MODEL_NOT_ADMITTED, decision.family, decision.message, param="model"))
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
        return error_reply(state, draft, ErrorCode.ADMISSION_BLOCKS,
                      f"the operators' artifacts no longer allow serving ({state.authority.verdict.code}); see /readyz")
    if state.evidence is not None:
        try:
            state.evidence.check()
        except ChainError:
            draft.outcome = Outcome.UNAVAILABLE
            state.evidence_failed()
            return error_reply(state, draft, ErrorCode.EVIDENCE_UNAVAILABLE, "the proxy cannot record evidence; request refused")
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
    if state.forwarding is not None and await state.forwarding.record(
            draft, state.in_flight <= 1, partial(setattr, draft, "forwarding_sha256")) is None:
        draft.decision, draft.outcome = Decision.REJECTED, Outcome.UNAVAILABLE  # counted once, by its completion record
        return error_reply(state, draft, ErrorCode.EVIDENCE_UNAVAILABLE, "the proxy cannot record evidence; request refused")
    draft.forwarded = True
    try:
        resp = await state.upstream.post(path, body, headers, limits.first_byte_timeout_s)
    except (OSError, ValueError, BackendError) as exc:
        return _upstream_failure(state, draft, exc)
    completed = False
    try:
        if 300 <= resp.status < 400:
            draft.upstream_error, draft.outcome, draft.decision = UpstreamErrorKind.REDIRECT, Outcome.UPSTREAM_ERROR, Decision.ERROR
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
                                headers={**forwardable_response_headers(resp.headers),
                                         "X-Request-Id": draft.request_id})
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
                            headers={**forwardable_response_headers(resp.headers),
                                     "X-Request-Id": draft.request_id})
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


def create_app(state: ProxyState) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=state.settings.limits.max_body_bytes)
    app[STATE] = state
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model_id:.+}", get_model)
    for path in FORWARDED:
        r.add_post(path, forward)
    # No catch-all: the router answers an unknown path (404) and a known path with another
    # method (405), and guard turns both into OpenAI-shaped, recorded errors.
    return app
