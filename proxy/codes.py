"""The values a request's record, metrics and error bodies carry, as StrEnums: one name
per value, so a typo is a NameError instead of a new label.

The values are part of the project's interface: evidence records, metric labels,
alert rules and the harness's report read them, and docs/http-api.md and
docs/reference.md list them (tests/test_codes.py pins each set against those pages).
A StrEnum member is its value (``Outcome.OK == "ok"``, serialised as ``"ok"``), so
records and labels are byte-identical to the string literals these replace.

Python 3.11 reads ``Enum.MEMBER`` through ``EnumType.__getattr__`` (about 0.26 us, a
module global 0.01 us, measured): code that runs per request imports the members it
needs as the module-level names at the end of this file.
"""

from __future__ import annotations

from enum import StrEnum


class Decision(StrEnum):
    """What the proxy decided about a request (the record's ``decision``)."""

    ADMITTED = "admitted"  # forwarded, or answered by the proxy itself (models, probes)
    REFUSED = "refused"  # a fallback attempt, refused by policy
    REJECTED = "rejected"  # not a fallback attempt, and not served (a malformed request, no token)
    ERROR = "error"  # admitted, then the backend or the proxy failed


class Outcome(StrEnum):
    """How a request ended (``case_proxy_requests_total{outcome}``)."""

    OK = "ok"
    REFUSED = "refused"
    REJECTED = "rejected"
    UPSTREAM_ERROR = "upstream_error"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"


class ErrorCode(StrEnum):
    """The ``code`` of an OpenAI-shaped error body; also the record's ``reason`` of a
    request answered with it. Statuses and types: proxy.errors.ERRORS."""

    # client mistakes
    INVALID_JSON = "invalid_json"
    INVALID_BODY = "invalid_body"
    MODEL_MISSING = "model_missing"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    REQUEST_TOO_LARGE = "request_too_large"
    UNKNOWN_URL = "unknown_url"
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_FIELD_NOT_ALLOWED = "request_field_not_allowed"
    UNSUPPORTED_CONTENT_ENCODING = "unsupported_content_encoding"
    INVALID_CONTENT_ENCODING = "invalid_content_encoding"
    UPGRADE_REQUIRED = "upgrade_required"
    # access
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    PROXY_AUTH_REQUIRED = "proxy_auth_required"
    # policy refusals: fallback attempts
    MODEL_NOT_ADMITTED = "model_not_admitted"
    ROUTING_OVERRIDE_REFUSED = "routing_override_refused"
    EXTERNAL_PROVIDER_ENDPOINT = "external_provider_endpoint"
    EXTERNAL_PROVIDER_HEADER = "external_provider_header"
    FORWARD_PROXY_REFUSED = "forward_proxy_refused"
    ENGINE_OVERRIDE_REFUSED = "engine_override_refused"
    # the operators' artifacts no longer allow serving (proxy.authority)
    ADMISSION_BLOCKS = "admission_blocks"
    # load
    TOO_MANY_REQUESTS = "too_many_requests"
    # backend and proof
    SERVED_MODEL_MISMATCH = "served_model_mismatch"
    BACKEND_UNREACHABLE = "backend_unreachable"
    BACKEND_AUTH_REFUSED = "backend_auth_refused"
    BACKEND_REDIRECT_REFUSED = "backend_redirect_refused"
    BACKEND_ADDRESS_REFUSED = "backend_address_refused"
    BACKEND_PROTOCOL_ERROR = "backend_protocol_error"
    BACKEND_TIMEOUT = "backend_timeout"
    BACKEND_NOT_READY = "backend_not_ready"
    EVIDENCE_UNAVAILABLE = "evidence_unavailable"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"
    # a backend's own error answer that is not OpenAI-shaped, relayed with the backend's
    # status (proxy.backend_errors): the one code without an entry in ERRORS
    BACKEND_ERROR = "backend_error"


class Reason(StrEnum):
    """A record's ``reason`` when it is not an error code (nor ``backend_status_<n>``,
    see ``backend_status_reason``)."""

    OK = "ok"
    CLIENT_DISCONNECTED = "client_disconnected"
    UNHANDLED = "unhandled"  # the default; every path sets another before the record


def backend_status_reason(status: int) -> str:
    """The reason of a request the backend answered with an error status."""
    return f"backend_status_{status}"


class UpstreamErrorKind(StrEnum):
    """``case_proxy_upstream_errors_total{kind}`` and the record's ``upstream_error``."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    STATUS_4XX = "status_4xx"
    STATUS_5XX = "status_5xx"
    PROTOCOL = "protocol"
    REDIRECT = "redirect"
    ADDRESS_REFUSED = "address_refused"


class DecodingResult(StrEnum):
    """``case_proxy_request_body_decodings_total{result}`` (proxy.body_decoding)."""

    DECODED = "decoded"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"


# The codes of fallback attempts: refused with Decision.REFUSED, counted in
# case_proxy_fallback_rejections_total{reason}, and what the report calls fallback
# (proxy.fallback decides with this set, for the metrics and the report alike).
FALLBACK_CODES: frozenset[ErrorCode] = frozenset({
    ErrorCode.MODEL_NOT_ADMITTED, ErrorCode.ROUTING_OVERRIDE_REFUSED, ErrorCode.EXTERNAL_PROVIDER_ENDPOINT,
    ErrorCode.EXTERNAL_PROVIDER_HEADER, ErrorCode.FORWARD_PROXY_REFUSED, ErrorCode.ENGINE_OVERRIDE_REFUSED,
})


# The members read on every request, as plain module-level names (see the docstring).
DECISION_ADMITTED, DECISION_REFUSED = Decision.ADMITTED, Decision.REFUSED
OUTCOME_OK, OUTCOME_UNAUTHENTICATED = Outcome.OK, Outcome.UNAUTHENTICATED
REASON_OK = Reason.OK
SERVED_MODEL_MISMATCH = ErrorCode.SERVED_MODEL_MISMATCH
