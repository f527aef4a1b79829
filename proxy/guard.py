"""The one middleware every request passes (``guard``): it opens the request's draft,
runs the checks that come before any route, and makes sure every request ends in
exactly one evidence record and one metrics update (proxy.records), withholding an
answer whose record could not be written (fail closed) unless it is already streaming.

The order of checks: public endpoints; the token (a request without it is not Case's,
see proxy.auth); forward-proxy use; other providers' endpoints and headers; a WebSocket
upgrade; then the route's handler. aiohttp's own answers (the router's 404 and 405, a
body over the limit) become OpenAI-shaped errors here.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

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
from .model_policy import Family, classify_family
from .records import access_line, bound_unauthenticated, finish
from .replies import NO_EVIDENCE, error_reply, refuse
from .request_policy import (
    FORWARDED,
    Refusal,
    client_request_id,
    external_endpoint,
    provider_header,
    websocket_upgrade,
)
from .state import DRAFT, PUBLIC_PATHS, STATE, Draft, ProxyState
from .upstream_policy import is_known_provider_host, normalize_host

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
        response = error_reply(state, draft, ErrorCode.INTERNAL_ERROR,
                               "internal error in the proxy; request not completed")
    if not draft.status:
        draft.status = response.status
    if draft.outcome == OUTCOME_UNAUTHENTICATED:
        bound_unauthenticated(state, draft)
    recorded = finish(state, draft)
    if not isinstance(recorded, bool):
        recorded = await recorded  # the batch's write (see proxy.group_commit)
    if not recorded and not response.prepared:
        draft.outcome = Outcome.UNAVAILABLE
        response = error_reply(state, draft, ErrorCode.EVIDENCE_UNAVAILABLE, NO_EVIDENCE)
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
            return error_reply(state, draft, auth.code, "proxy authentication required: use the proxy URL "
                               "http://case:<CASE_PROXY_TOKEN>@host:port",
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
