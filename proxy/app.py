"""The aiohttp application: applies the policy functions, forwards, records.

Layering: the policy modules decide (pure), ``Upstream`` talks to the backend, and this
module only wires them together. Every request, refused or forwarded, ends in exactly
one evidence record and one metrics update, written by ``guard`` in a ``finally``. A
request is forwarded only after the evidence log has proven it can still record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from .admission import Admission
from .allowlists import check_fields, forwardable_request_headers
from .auth import RecordBucket, authenticate
from .authority import Authority
from .backend_errors import client_error
from .body_decoding import DecodeError, decode_body, encoding_label, parse_content_encoding
from .errors import error_body, error_status
from .evidence import EvidenceLog, utc_now_rfc3339
from .fallback import is_fallback_refusal
from .forwarding import ForwardingRecorder
from .group_commit import GroupCommit
from .hashchain import ChainError
from .log_setup import ACCESS_LOG, log_access, text_value
from .metrics import ProxyMetrics
from .model_policy import Family, classify_family, decide_model
from .readiness import Readiness
from .redact import Redactor
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
from .served_model import UsageTotals, check_json_body
from .settings import ProxySettings
from .stream_check import StreamChecker, StreamFault, StreamRefused
from .upstream import BackendError, BackendResponse, Upstream, upstream_error_kind
from .upstream_policy import UpstreamTarget, is_known_provider_host, normalize_host

log = logging.getLogger("case_proxy")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(slots=True)
class Draft:
    """What one request did, filled in as it goes; turned into the evidence record."""

    request_id: str
    started: float
    method: str
    path: str
    own_id: bool  # request_id drawn by the proxy (always, since issue 18)
    endpoint: Endpoint = Endpoint.OTHER
    requested_model: str | None = None
    effective_model: str | None = None
    alias_rewritten: bool = False
    decision: str = "rejected"
    reason: str = "unhandled"
    family: str | None = None
    target_host: str | None = None
    served_model: str | None = None
    status: int = 0
    stream: bool = False
    usage: UsageTotals = field(default_factory=UsageTotals)
    ttft_s: float | None = None
    client_disconnected: bool = False
    outcome: str = "rejected"
    upstream_error: str | None = None
    fallback_reason: str | None = None
    forwarded: bool = False
    param: str | None = None  # the request field a refusal names (proxy.allowlists)
    content_encoding: str | None = None  # the body's outermost coding (proxy.body_decoding)
    client_request_id: str | None = None  # the client's X-Request-Id, if valid (request_policy)
    unrecorded: bool = False  # an unauthenticated request beyond the record bucket (proxy.auth)
    unauthenticated_suppressed: int | None = None  # such requests left out before this record
    forwarding_sha256: str | None = None  # its forwarding record's line (proxy.forwarding)


@dataclass(slots=True)
class ProxyState:
    settings: ProxySettings
    admission: Admission
    target: UpstreamTarget
    redactor: Redactor
    evidence: EvidenceLog | None
    metrics: ProxyMetrics
    upstream: Upstream
    readiness: Readiness
    token: bytes
    authority: Authority | None = None  # the artifacts, watched while serving (proxy.authority)
    in_flight: int = 0
    draining: bool = False
    # Made inside the loop that serves it (each worker makes its own): the loop is kept
    # because on Python 3.11 each asyncio.get_running_loop() is a getpid system call;
    # request ids come from a generator seeded once from the OS, not one getrandom
    # system call per request (ids must be unique, not secret).
    loop: asyncio.AbstractEventLoop = field(init=False)
    _ids: random.Random = field(init=False)
    batch: GroupCommit | None = field(init=False)
    # Bounds the records of unauthenticated traffic (proxy.auth).
    unauthenticated_records: RecordBucket = field(default_factory=RecordBucket)
    forwarding: ForwardingRecorder | None = field(init=False)

    def __post_init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._ids = random.Random(os.urandom(32))
        self.batch = None
        self.forwarding = None
        if self.evidence is not None:
            self.batch = GroupCommit(self.evidence, self.loop, self.evidence_failed)
            self.forwarding = ForwardingRecorder(self.evidence, self.batch, self.target)
            self.evidence.attach(self.loop)

    def evidence_failed(self, n: int = 1) -> None:
        """Count ``n`` requests refused because the evidence log could not record."""
        if self.settings.metrics_enabled:
            self.metrics.evidence_write_failures.inc(n)

    def new_request_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"


STATE: web.AppKey[ProxyState] = web.AppKey("state", ProxyState)
DRAFT: web.RequestKey[Draft] = web.RequestKey("case_proxy_draft", Draft)


def _error(state: ProxyState, draft: Draft, code: str, message: str, *, param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    draft.status = error_status(code)
    draft.reason = code
    return web.Response(
        status=draft.status, body=error_body(code, state.redactor.redact(message), param),
        content_type="application/json", headers={"X-Request-Id": draft.request_id, **(headers or {})},
    )


def _refuse(state: ProxyState, draft: Draft, refusal: Refusal) -> web.Response:
    """A fallback attempt: refused, counted, recorded."""
    draft.decision, draft.outcome = "refused", "refused"
    draft.family = refusal.family.value
    draft.fallback_reason = refusal.code
    return _error(state, draft, refusal.code, refusal.message, param=refusal.param)


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
        if draft.reason == "unhandled":
            draft.reason = "client_disconnected"
        _finish(state, draft)  # no answer left to hold back: the record is not awaited
        _access(state, draft)
        raise
    except Exception:
        log.exception("internal error handling request %s", draft.request_id)
        draft.outcome, draft.decision = "unavailable", "error"
        response = _error(state, draft, "internal_error", "internal error in the proxy; request not completed")
    if not draft.status:
        draft.status = response.status
    if draft.outcome == "unauthenticated":
        _bound_unauthenticated(state, draft)
    recorded = _finish(state, draft)
    if not isinstance(recorded, bool):
        recorded = await recorded  # the batch's write (see proxy.group_commit)
    if not recorded and not response.prepared:
        draft.outcome = "unavailable"
        response = _error(state, draft, "evidence_unavailable", "the proxy cannot record evidence; request refused")
    _access(state, draft)
    return response


def _bound_unauthenticated(state: ProxyState, draft: Draft) -> None:
    """Unauthenticated traffic is recorded within a token bucket; beyond it the request
    is only counted, and the next record written says how many were left out."""
    bucket = state.unauthenticated_records
    if bucket.admit(time.monotonic()):
        draft.unauthenticated_suppressed = bucket.take_suppressed() or None
    else:
        draft.unrecorded = True
        if state.settings.metrics_enabled:
            state.metrics.unauthenticated_suppressed.inc()
def _access(state: ProxyState, draft: Draft) -> None:
    """The access line, written once the answer is on its way (off the client's wait),
    with the draft as final as the client saw it. Public endpoints (probes, scrapes) get none,
    nor does unauthenticated traffic beyond its record bucket (a loop must not fill the log)."""
    if (state.settings.access_log and not draft.unrecorded and draft.path not in PUBLIC_PATHS
            and ACCESS_LOG.isEnabledFor(logging.INFO)):
        state.loop.call_soon(log_access, draft, time.perf_counter() - draft.started)


async def _dispatch(request: web.Request, state: ProxyState, draft: Draft, handler) -> web.StreamResponse:  # type: ignore[no-untyped-def]
    """The order of checks: public endpoints, the token (a request without it is not
    Case's: see proxy.auth), forward-proxy use, other providers' endpoints and
    headers, a WebSocket upgrade, then the route's own handler."""
    target_host = _forward_proxy_target(request)
    if target_host is None and request.path in PUBLIC_PATHS:
        draft.decision, draft.outcome, draft.reason = "admitted", "ok", "ok"
        return await handler(request)
    if target_host is not None:
        draft.target_host = state.redactor.clip(normalize_host(target_host), 255)
    auth = authenticate(request.headers, state.token, forward_proxy=target_host is not None)
    if auth.code is not None:
        draft.outcome = "unauthenticated"
        if auth.code == "proxy_auth_required":
            return _error(state, draft, auth.code,
                          "proxy authentication required: use the proxy URL http://case:<CASE_PROXY_TOKEN>@host:port",
                          headers={"Proxy-Authenticate": 'Basic realm="case-proxy"'})
        message = ("invalid bearer token" if auth.code == "invalid_token" else
                   "missing bearer token: send 'Authorization: Bearer <CASE_PROXY_TOKEN>'")
        return _error(state, draft, auth.code, message, headers={"WWW-Authenticate": "Bearer"})
    if target_host is not None:
        host = draft.target_host or "unknown"
        family = classify_family(host) if is_known_provider_host(host) else Family.OTHER
        return _refuse(state, draft, Refusal(
            "forward_proxy_refused", family,
            "this server is not a forward proxy; outbound traffic from Case is refused and recorded"))
    # The forwarded routes are OpenAI paths by definition: only other paths need the scan.
    ext = None if request.path in FORWARDED else external_endpoint(request.path)
    if ext is not None:
        return _refuse(state, draft, ext)
    hdr = provider_header(request.headers.keys())
    if hdr is not None:
        return _refuse(state, draft, hdr)
    if websocket_upgrade(request.headers):
        return websocket_refused(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "invalid_body")
        msg = {"unknown_url": f"unknown endpoint {request.method} {state.redactor.clip(request.path, 200)}",
               "method_not_allowed": f"method {request.method} is not allowed on {state.redactor.clip(request.path, 200)}",
               "request_too_large": "request body exceeds the configured limit"}.get(code, exc.reason)
        draft.outcome = "rejected"
        return _error(state, draft, code, msg)


def request_record_fields(state: ProxyState, draft: Draft, elapsed: float) -> dict[str, Any]:
    """One request's EvidenceRecord fields (see proxy.evidence.EvidenceRecord), None
    values left out."""
    rec: dict[str, Any] = {
        "kind": "request", "request_id": draft.request_id, "time": utc_now_rfc3339(), "method": draft.method,
        "endpoint": draft.endpoint, "path": draft.path, "alias_rewritten": draft.alias_rewritten,
        "decision": draft.decision, "reason": draft.reason, "status": draft.status, "stream": draft.stream,
        "duration_ms": round(elapsed * 1000, 3), "client_disconnected": draft.client_disconnected,
    }
    for key in ("requested_model", "effective_model", "family", "target_host", "served_model", "param",
                "content_encoding", "unauthenticated_suppressed", "client_request_id"):
        value = getattr(draft, key)
        if value is not None:
            rec[key] = value
    usage = draft.usage
    if usage.present:
        rec["usage"] = {k: v for k, v in (("prompt_tokens", usage.prompt_tokens),
                                          ("completion_tokens", usage.completion_tokens),
                                          ("total_tokens", usage.total_tokens)) if v is not None}
    if draft.ttft_s is not None:
        rec["ttft_ms"] = round(draft.ttft_s * 1000, 3)
    if draft.forwarded:
        rec["upstream_class"] = state.target.upstream_class.value
        rec["upstream_fingerprint"] = state.target.fingerprint
    if draft.forwarding_sha256 is not None:
        rec["forwarding_sha256"] = draft.forwarding_sha256
    return rec


def _finish(state: ProxyState, draft: Draft) -> bool | asyncio.Future[bool]:
    """Metrics and the evidence record for one request: whether the record is written,
    or a future that will say so once its batch is (see proxy.group_commit)."""
    elapsed = time.perf_counter() - draft.started
    counted = state.settings.metrics_enabled and draft.path not in PUBLIC_PATHS
    recorded: bool | asyncio.Future[bool] = True
    if state.evidence is not None and draft.path not in PUBLIC_PATHS and not draft.unrecorded:
        recorded = _record(state, draft, elapsed, counted)
    if counted:
        if recorded is True:
            # Counted right after this task step, once the response is on its way: off the
            # client's wait (some 10 us at one connection, profiled), and before the next
            # event is read, so a scrape never sees the count late. The draft is final
            # here; a failed record is counted at once.
            state.loop.call_soon(_count, state.metrics, draft, elapsed, draft.outcome)
        elif recorded is False:
            _count(state.metrics, draft, elapsed, "unavailable")
        # else: counted once its batch is written (_count_written)
    if draft.decision == "refused" or draft.outcome in ("upstream_error", "unavailable"):
        log.warning("request %s %s %s -> %s %s", draft.request_id, draft.method, text_value(draft.path), draft.status,
                    draft.reason)
    return recorded


def _record(state: ProxyState, draft: Draft, elapsed: float, counted: bool) -> bool | asyncio.Future[bool]:
    """Write the record now when nothing else is in flight to share the write with;
    otherwise chain it into the batch written at the next turn of the loop."""
    assert state.evidence is not None and state.batch is not None
    fields = request_record_fields(state, draft, elapsed)
    try:
        if state.in_flight or state.batch.pending:
            then = partial(_count_written, state.metrics, draft, elapsed) if counted else None
            return state.batch.stage(fields, then, draft.own_id)
        state.evidence.write_fields(fields, draft.own_id)
        return True
    except (ChainError, OSError, ValueError):
        log.error("evidence record could not be written; the proxy refuses traffic until restarted")
        state.evidence_failed()
        return False


def _count_written(m: ProxyMetrics, draft: Draft, elapsed: float, written: bool) -> None:
    _count(m, draft, elapsed, draft.outcome if written else "unavailable")


def _count(m: ProxyMetrics, draft: Draft, elapsed: float, outcome: str) -> None:
    """One request's metrics."""
    m.count_request(draft.endpoint, outcome)
    if is_fallback_refusal(draft.decision, draft.reason):  # the report's definition too (proxy.fallback)
        m.fallback_rejections.labels(draft.reason, draft.family or "other").inc()
    if draft.reason == "served_model_mismatch":
        m.served_model_mismatches.labels(draft.endpoint).inc()
    if draft.upstream_error:
        m.upstream_errors.labels(draft.upstream_error).inc()
    if draft.forwarded:
        m.observe_duration(draft.endpoint, elapsed)
        if draft.ttft_s is not None:
            m.observe_ttft(draft.endpoint, draft.ttft_s)
        if draft.usage.prompt_tokens:
            m.count_tokens("prompt", draft.usage.prompt_tokens)
        if draft.usage.completion_tokens:
            m.count_tokens("completion", draft.usage.completion_tokens)


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
    draft.endpoint, draft.decision, draft.outcome, draft.reason = Endpoint.MODELS, "admitted", "ok", "ok"
    return web.json_response({"object": "list", "data": [_model_object(state.admission)]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    draft.endpoint = Endpoint.MODEL
    model_id = request.match_info["model_id"]
    draft.requested_model = state.redactor.clip(model_id, 200)
    if model_id == state.admission.model or model_id in state.admission.aliases:
        draft.decision, draft.outcome, draft.reason = "admitted", "ok", "ok"
        return web.json_response(_model_object(state.admission))
    return _error(state, draft, "model_not_found",
                  f"no such model on this route; the only admitted model is '{state.admission.model}'", param="model")


def websocket_refused(request: web.Request) -> web.Response:
    """A WebSocket upgrade (Codex tries one on GET /v1/responses before HTTP) gets 426
    with a message saying what to use: Codex then falls back to HTTP at once, where a
    405 made it retry five times first. A plain GET on the path is a 405."""
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    if request.path in FORWARDED:
        draft.endpoint = FORWARDED[request.path]
    if not websocket_upgrade(request.headers):
        return _error(state, draft, "method_not_allowed",
                      f"method {request.method} is not allowed on {state.redactor.clip(request.path, 200)}; use POST",
                      headers={"Allow": "POST"})
    response = _error(state, draft, "upgrade_required",
                      "WebSocket transport is not offered on this route; send the request over HTTP "
                      "(POST /v1/responses, /v1/chat/completions)",
                      headers={"Upgrade": "HTTP/1.1", "Connection": "close"})
    response.force_close()
    return response


async def _websocket_route(request: web.Request) -> web.Response:
    return websocket_refused(request)


def allowed_methods(path: str) -> str | None:
    """The methods a known path takes (for 405 and ``Allow``), None for an unknown path."""
    if path in FORWARDED:
        return "POST"
    if path in PUBLIC_PATHS or path == "/v1/models" or (path.startswith("/v1/models/") and len(path) > 11):
        return "GET, HEAD"
    return None


async def not_found(request: web.Request) -> web.Response:
    """Unknown paths are plain 404s; a known path with the wrong method is a 405 that
    says which method it takes. Neither reaches the backend."""
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    allow = allowed_methods(request.path)
    if allow is not None:
        return _error(state, draft, "method_not_allowed",
                      f"method {request.method} is not allowed on {state.redactor.clip(request.path, 200)}; use {allow}",
                      headers={"Allow": allow})
    return _error(state, draft, "unknown_url", f"unknown endpoint {request.method} {state.redactor.clip(request.path, 200)}")


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
        _count_decoding(state, exc.encoding, "unsupported")
        return exc
    draft.content_encoding = encoding_label(codings)
    too_large = DecodeError("request_too_large", f"request body exceeds the limit of {limit} bytes",
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
                        "too_large" if exc.code == "request_too_large" else "corrupt")
        return exc
    _count_decoding(state, draft.content_encoding or "identity", "decoded")
    return body


def _count_decoding(state: ProxyState, encoding: str, result: str) -> None:
    if state.settings.metrics_enabled:
        state.metrics.body_decodings.labels(encoding, result).inc()


async def forward(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    endpoint = FORWARDED[request.path]
    draft.endpoint = endpoint
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        return _error(state, draft, "unsupported_content_type", "Content-Type must be application/json")
    body = await _read_body(request, state, draft)
    if isinstance(body, DecodeError):
        return _error(state, draft, body.code, body.message)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(state, draft, "invalid_json", "request body is not valid JSON")
    if not isinstance(obj, dict):
        return _error(state, draft, "invalid_body", "request body must be a JSON object")
    requested = obj.get("model")
    draft.requested_model = state.redactor.clip(requested, 200) if isinstance(requested, str) else None
    draft.stream = obj.get("stream") is True
    routing = routing_override(obj)
    if routing is not None:
        draft.param = routing.param
        return _refuse(state, draft, routing)
    problem = check_fields(endpoint, obj, state.settings.extra_request_fields)
    if problem is not None:
        draft.param = problem.param
        if problem.fallback:
            return _refuse(state, draft, Refusal(problem.code, Family.OTHER, problem.message, param=problem.param))
        return _error(state, draft, problem.code, problem.message, param=problem.param)
    decision = decide_model(requested, state.admission)
    if not decision.admitted:
        if decision.code == "model_missing":
            return _error(state, draft, "model_missing", decision.message, param="model")
        assert decision.family is not None
        return _refuse(state, draft, Refusal("model_not_admitted", decision.family, decision.message, param="model"))
    draft.effective_model, draft.alias_rewritten = decision.effective_model, decision.alias_rewritten
    if decision.alias_rewritten:
        obj["model"] = decision.effective_model
    # The engine gets exactly what was checked: the parsed object, not the client's
    # bytes, so a duplicate key an engine might read first-wins ({"model": "other",
    # "model": "<admitted>"}) never reaches it (0.4 us for a small body, measured).
    body = orjson.dumps(obj)
    # Fail closed: never forward what could not be recorded, or to a backend not proven.
    if state.draining:
        draft.outcome = "unavailable"
        return _error(state, draft, "shutting_down", "the proxy is shutting down")
    if state.authority is not None and not state.authority.serving:
        draft.outcome = "unavailable"
        return _error(state, draft, "admission_blocks",
                      f"the operators' artifacts no longer allow serving ({state.authority.verdict.code}); see /readyz")
    if state.evidence is not None:
        try:
            state.evidence.check()
        except ChainError:
            draft.outcome = "unavailable"
            state.evidence_failed()
            return _error(state, draft, "evidence_unavailable", "the proxy cannot record evidence; request refused")
    if not state.readiness.state.ready:
        draft.outcome = "unavailable"
        return _error(state, draft, "backend_not_ready",
                      "the backend does not serve the admitted model (yet); see /readyz")
    if state.in_flight >= state.settings.limits.max_concurrency:
        draft.outcome = "rejected"
        return _error(state, draft, "too_many_requests", "too many concurrent requests; retry shortly",
                      headers={"Retry-After": "1"})
    draft.decision = "admitted"
    state.in_flight += 1
    if state.settings.metrics_enabled:
        state.metrics.request_started()
    try:
        return await _proxy(request, state, draft, body, request.path)
    finally:
        state.in_flight -= 1
        if state.settings.metrics_enabled:
            state.metrics.request_ended()


def _upstream_failure(state: ProxyState, draft: Draft, exc: BaseException) -> web.Response:
    kind, code = upstream_error_kind(exc)
    draft.upstream_error, draft.outcome, draft.decision = kind, "upstream_error", "error"
    messages = {
        "backend_address_refused": "the backend name resolved to an address outside the upstream pin",
        "backend_timeout": "the backend did not answer in time",
        "backend_unreachable": "cannot connect to the backend",
        "backend_protocol_error": "the backend connection failed mid-response",
    }
    return _error(state, draft, code, messages[code])


async def _proxy(request: web.Request, state: ProxyState, draft: Draft, body: bytes, path: str) -> web.StreamResponse:
    limits = state.settings.limits
    headers = forwardable_request_headers(request.headers.items())
    headers["Content-Type"] = "application/json"
    headers["X-Request-Id"] = draft.request_id
    # A durable forwarding record before the backend sees a byte (fail closed).
    if state.forwarding is not None and await state.forwarding.record(
            draft, state.in_flight <= 1, partial(setattr, draft, "forwarding_sha256")) is None:
        draft.decision, draft.outcome = "rejected", "unavailable"  # counted once, by its completion record
        return _error(state, draft, "evidence_unavailable", "the proxy cannot record evidence; request refused")
    draft.forwarded = True
    try:
        resp = await state.upstream.post(path, body, headers, limits.first_byte_timeout_s)
    except (OSError, ValueError, BackendError) as exc:
        return _upstream_failure(state, draft, exc)
    completed = False
    try:
        if 300 <= resp.status < 400:
            draft.upstream_error, draft.outcome, draft.decision = "redirect", "upstream_error", "error"
            return _error(state, draft, "backend_redirect_refused",
                          "the backend answered with a redirect; redirects are never followed")
        ctype = resp.content_type
        if resp.status >= 400:
            data = await resp.read(4 * 1024 * 1024, limits.idle_timeout_s)
            draft.upstream_error = "status_4xx" if resp.status < 500 else "status_5xx"
            draft.outcome, draft.reason = "upstream_error", f"backend_status_{resp.status}"
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
            out = await _relay_stream(request, state, draft, resp)
            completed = draft.outcome == "ok"
            return out
        data = await resp.read(max(limits.max_body_bytes, 64 * 1024 * 1024), limits.idle_timeout_s)
        check = check_json_body(data, state.admission.model, draft.usage)
        draft.served_model = state.redactor.clip(check.served_model, 200) if check.served_model else None
        completed = True
        if not check.ok:
            draft.outcome, draft.decision = "upstream_error", "error"
            return _error(state, draft, "served_model_mismatch", check.message)
        draft.outcome, draft.reason, draft.status = "ok", "ok", resp.status
        return web.Response(status=resp.status, body=data,
                            headers={**forwardable_response_headers(resp.headers),
                                     "X-Request-Id": draft.request_id})
    except _ClientGone as gone:
        draft.reason = "client_disconnected"
        return gone.out
    except (OSError, ValueError, BackendError) as exc:
        return _upstream_failure(state, draft, exc)
    finally:
        if completed:
            resp.release()
        else:
            # Cancelled or failed mid-way: close the connection so the backend stops generating.
            resp.close()


def _stream_error_event(code: str, message: str) -> bytes:
    err = {"message": message, "type": "api_error", "param": None, "code": code}
    return b"data: " + orjson.dumps({"type": "error", "error": err, "code": code, "message": message}) + b"\n\n"


class _ClientGone(Exception):
    """The client went away mid-stream; the upstream request must be cancelled."""

    def __init__(self, out: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.out = out


async def _relay_stream(request: web.Request, state: ProxyState, draft: Draft,
                        resp: BackendResponse) -> web.StreamResponse:
    """Forward the SSE stream as ``StreamChecker`` releases it: every event checked
    (see proxy.stream_check), events held back until one names the admitted model. A
    refused stream ends with an error event and its reason in the record. Raises
    _ClientGone if the client disconnects."""
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
            raise _ClientGone(out) from exc

    async def fail(code: str, message: str, kind: str | None = None, cleared: bytes = b"") -> web.StreamResponse:
        draft.outcome, draft.decision, draft.reason = "upstream_error", "error", code
        draft.upstream_error = kind
        draft.status = draft.status or resp.status
        draft.served_model = checker.served_model
        await write(cleared + _stream_error_event(code, state.redactor.redact(message)))
        await out.write_eof()
        return out

    try:
        async for data in resp.chunks(idle_s):
            send = checker.feed(data)
            if send:
                await write(send)
        checker.finish()
    except StreamRefused as refused:
        kind = "protocol" if refused.fault is StreamFault.PROTOCOL else None
        return await fail(refused.fault.value, refused.message, kind, refused.cleared)
    except TimeoutError:
        return await fail("backend_timeout", "the backend stopped sending in the middle of the stream", "timeout")
    except ValueError as exc:
        return await fail("backend_protocol_error", str(exc), "protocol")
    except (BackendError, OSError):
        return await fail("backend_protocol_error", "the backend connection broke in the middle of the stream",
                          "protocol")
    draft.served_model = checker.served_model
    await write(b"")
    await out.write_eof()
    draft.outcome, draft.reason, draft.status = "ok", "ok", resp.status
    return out


def create_app(state: ProxyState) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=state.settings.limits.max_body_bytes)
    app[STATE] = state
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model_id:.+}", get_model)
    r.add_get("/v1/responses", _websocket_route)
    for path in FORWARDED:
        r.add_post(path, forward)
    r.add_route("*", "/{tail:.*}", not_found)
    return app
