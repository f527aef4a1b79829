"""The routes and the small handlers the proxy answers itself: the probes (``/healthz``,
``/readyz``), ``/metrics``, and the model list and lookup, both from the admission.
The forwarded routes are in proxy.forwarding_handler."""

from __future__ import annotations

from aiohttp import web

from .admission import Admission
from .codes import DECISION_ADMITTED, OUTCOME_OK, REASON_OK, ErrorCode
from .forwarding_handler import forward
from .guard import guard
from .hashchain import ChainError
from .replies import error_reply
from .request_policy import FORWARDED, Endpoint
from .state import DRAFT, STATE, Draft, ProxyState


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


def _model_object(admission: Admission) -> dict[str, object]:
    return {"id": admission.model, "object": "model", "created": 0, "owned_by": admission.provider}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    draft: Draft = request[DRAFT]
    draft.endpoint = Endpoint.MODELS
    draft.decision, draft.outcome, draft.reason = DECISION_ADMITTED, OUTCOME_OK, REASON_OK
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
                       f"no such model on this route; the only admitted model is '{state.admission.model}'",
                       param="model")


def create_app(state: ProxyState) -> web.Application:
    """The application: ``guard`` around every route, the body limit from the settings."""
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
