"""OpenAI-shaped error bodies and the one table of refusal codes.

Each code maps to the HTTP status that makes the official SDK raise the matching
exception class (403 -> PermissionDeniedError, 401 -> AuthenticationError, ...), so a
client sees the refusal as what it is rather than as a generic failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from .codes import ErrorCode


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    type: str


# code -> (HTTP status, OpenAI error type); every ErrorCode but BACKEND_ERROR (the backend's status)
ERRORS: dict[ErrorCode, ErrorSpec] = {
    # client mistakes
    ErrorCode.INVALID_JSON: ErrorSpec(400, "invalid_request_error"),
    ErrorCode.INVALID_BODY: ErrorSpec(400, "invalid_request_error"),
    ErrorCode.MODEL_MISSING: ErrorSpec(400, "invalid_request_error"),
    ErrorCode.UNSUPPORTED_CONTENT_TYPE: ErrorSpec(415, "invalid_request_error"),
    ErrorCode.REQUEST_TOO_LARGE: ErrorSpec(413, "invalid_request_error"),
    ErrorCode.UNKNOWN_URL: ErrorSpec(404, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: ErrorSpec(404, "invalid_request_error"),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorSpec(405, "invalid_request_error"),
    ErrorCode.REQUEST_FIELD_NOT_ALLOWED: ErrorSpec(400, "invalid_request_error"),
    ErrorCode.UNSUPPORTED_CONTENT_ENCODING: ErrorSpec(415, "invalid_request_error"),
    ErrorCode.INVALID_CONTENT_ENCODING: ErrorSpec(400, "invalid_request_error"),
    ErrorCode.UPGRADE_REQUIRED: ErrorSpec(426, "invalid_request_error"),
    # access
    ErrorCode.MISSING_TOKEN: ErrorSpec(401, "authentication_error"),
    ErrorCode.INVALID_TOKEN: ErrorSpec(401, "authentication_error"),
    ErrorCode.PROXY_AUTH_REQUIRED: ErrorSpec(407, "authentication_error"),
    # policy refusals: fallback attempts
    ErrorCode.MODEL_NOT_ADMITTED: ErrorSpec(403, "permission_error"),
    ErrorCode.ROUTING_OVERRIDE_REFUSED: ErrorSpec(403, "permission_error"),
    ErrorCode.EXTERNAL_PROVIDER_ENDPOINT: ErrorSpec(403, "permission_error"),
    ErrorCode.EXTERNAL_PROVIDER_HEADER: ErrorSpec(403, "permission_error"),
    ErrorCode.FORWARD_PROXY_REFUSED: ErrorSpec(403, "permission_error"),
    ErrorCode.ENGINE_OVERRIDE_REFUSED: ErrorSpec(403, "permission_error"),
    # the operators' artifacts no longer allow serving (proxy.authority)
    ErrorCode.ADMISSION_BLOCKS: ErrorSpec(403, "permission_error"),
    # load
    ErrorCode.TOO_MANY_REQUESTS: ErrorSpec(429, "rate_limit_error"),
    # backend and proof
    ErrorCode.SERVED_MODEL_MISMATCH: ErrorSpec(502, "api_error"),
    ErrorCode.BACKEND_UNREACHABLE: ErrorSpec(502, "api_error"),
    ErrorCode.BACKEND_AUTH_REFUSED: ErrorSpec(502, "api_error"),
    ErrorCode.BACKEND_REDIRECT_REFUSED: ErrorSpec(502, "api_error"),
    ErrorCode.BACKEND_ADDRESS_REFUSED: ErrorSpec(502, "api_error"),
    ErrorCode.BACKEND_PROTOCOL_ERROR: ErrorSpec(502, "api_error"),
    ErrorCode.BACKEND_TIMEOUT: ErrorSpec(504, "api_error"),
    ErrorCode.BACKEND_NOT_READY: ErrorSpec(503, "api_error"),
    ErrorCode.EVIDENCE_UNAVAILABLE: ErrorSpec(503, "api_error"),
    ErrorCode.SHUTTING_DOWN: ErrorSpec(503, "api_error"),
    ErrorCode.INTERNAL_ERROR: ErrorSpec(500, "api_error"),
}


def error_body(code: ErrorCode, message: str, param: str | None = None) -> bytes:
    spec = ERRORS[code]
    return orjson.dumps({"error": {"message": message, "type": spec.type, "param": param, "code": code}})


def error_status(code: ErrorCode) -> int:
    return ERRORS[code].status
