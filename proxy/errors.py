"""OpenAI-shaped error bodies and the one table of refusal codes.

Each code maps to the HTTP status that makes the official SDK raise the matching
exception class (403 -> PermissionDeniedError, 401 -> AuthenticationError, ...), so a
client sees the refusal as what it is rather than as a generic failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    type: str


# code -> (HTTP status, OpenAI error type)
ERRORS: dict[str, ErrorSpec] = {
    # client mistakes
    "invalid_json": ErrorSpec(400, "invalid_request_error"),
    "invalid_body": ErrorSpec(400, "invalid_request_error"),
    "model_missing": ErrorSpec(400, "invalid_request_error"),
    "unsupported_content_type": ErrorSpec(415, "invalid_request_error"),
    "request_too_large": ErrorSpec(413, "invalid_request_error"),
    "unknown_url": ErrorSpec(404, "invalid_request_error"),
    "model_not_found": ErrorSpec(404, "invalid_request_error"),
    "method_not_allowed": ErrorSpec(405, "invalid_request_error"),
    "request_field_not_allowed": ErrorSpec(400, "invalid_request_error"),
    "unsupported_content_encoding": ErrorSpec(415, "invalid_request_error"),
    "invalid_content_encoding": ErrorSpec(400, "invalid_request_error"),
    "upgrade_required": ErrorSpec(426, "invalid_request_error"),
    # access
    "missing_token": ErrorSpec(401, "authentication_error"),
    "invalid_token": ErrorSpec(401, "authentication_error"),
    "proxy_auth_required": ErrorSpec(407, "authentication_error"),
    # policy refusals: fallback attempts
    "model_not_admitted": ErrorSpec(403, "permission_error"),
    "routing_override_refused": ErrorSpec(403, "permission_error"),
    "external_provider_endpoint": ErrorSpec(403, "permission_error"),
    "external_provider_header": ErrorSpec(403, "permission_error"),
    "forward_proxy_refused": ErrorSpec(403, "permission_error"),
    "engine_override_refused": ErrorSpec(403, "permission_error"),
    # the operators' artifacts no longer allow serving (proxy.authority)
    "admission_blocks": ErrorSpec(403, "permission_error"),
    # load
    "too_many_requests": ErrorSpec(429, "rate_limit_error"),
    # backend and proof
    "served_model_mismatch": ErrorSpec(502, "api_error"),
    "backend_unreachable": ErrorSpec(502, "api_error"),
    "backend_auth_refused": ErrorSpec(502, "api_error"),
    "backend_redirect_refused": ErrorSpec(502, "api_error"),
    "backend_address_refused": ErrorSpec(502, "api_error"),
    "backend_protocol_error": ErrorSpec(502, "api_error"),
    "backend_timeout": ErrorSpec(504, "api_error"),
    "backend_not_ready": ErrorSpec(503, "api_error"),
    "evidence_unavailable": ErrorSpec(503, "api_error"),
    "shutting_down": ErrorSpec(503, "api_error"),
    "internal_error": ErrorSpec(500, "api_error"),
}


def error_body(code: str, message: str, param: str | None = None) -> bytes:
    spec = ERRORS[code]
    return orjson.dumps({"error": {"message": message, "type": spec.type, "param": param, "code": code}})


def error_status(code: str) -> int:
    return ERRORS[code].status
