"""The OpenAI-shaped error answer, with the request's draft filled in to match: one
function for every refusal and failure the proxy answers itself."""

from __future__ import annotations

from aiohttp import web

from .codes import Decision, ErrorCode, Outcome
from .errors import error_body, error_status
from .request_policy import Refusal
from .state import Draft, ProxyState

# The message of every evidence_unavailable answer.
NO_EVIDENCE = "the proxy cannot record evidence; request refused"


def error_reply(state: ProxyState, draft: Draft, code: ErrorCode, message: str, *, param: str | None = None,
                headers: dict[str, str] | None = None) -> web.Response:
    """The error answer for ``code`` (its status from proxy.errors), the message passed
    through the redactor; the draft takes the same status and the code as its reason, so
    the record says what the client was told."""
    draft.status = error_status(code)
    draft.reason = code
    return web.Response(
        status=draft.status, body=error_body(code, state.redactor.redact(message), param),
        content_type="application/json", headers={"X-Request-Id": draft.request_id, **(headers or {})},
    )


def refuse(state: ProxyState, draft: Draft, refusal: Refusal) -> web.Response:
    """A fallback attempt: refused, counted, recorded."""
    draft.decision, draft.outcome = Decision.REFUSED, Outcome.REFUSED
    draft.family = refusal.family.value
    return error_reply(state, draft, refusal.code, refusal.message, param=refusal.param)
