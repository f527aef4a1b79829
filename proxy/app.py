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

from aiohttp import web

from .admission import Admission
from .auth import authenticate
from .codes import (
    DECISION_ADMITTED,
    OUTCOME_OK,
    OUTCOME_UNAUTHENTICATED,
    REASON_OK,
    Decision,
    ErrorCode,
    Outcome,
    Reason,
)
from .forwarding_handler import forward
from .hashchain import ChainError
from .model_policy import Family, classify_family
from .records import access_line, bound_unauthenticated, finish, request_record_fields
from .replies import error_reply, refuse
from .request_policy import (
    FORWARDED,
    Endpoint,
    Refusal,
    client_request_id,
    external_endpoint,
    provider_header,
    websocket_upgrade,
)
from .state import DRAFT, PUBLIC_PATHS, STATE, Draft, ProxyState
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
