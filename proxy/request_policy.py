"""Request-level rules besides the model pin, as pure functions: which paths exist,
which are fallback attempts, which body fields and headers could steer routing (what
may travel upstream is in proxy.allowlists).

Only a fixed set of canonical paths is ever forwarded; the proxy sends the canonical
path, never the client's spelling, so encoding tricks cannot reach another backend route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import orjson

from .codes import ErrorCode
from .model_policy import Family, classify_family


class Endpoint(StrEnum):
    CHAT = "chat_completions"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"
    MODELS = "models"
    MODEL = "model"
    OTHER = "other"


# Forwarded POST routes: client path -> canonical upstream path.
FORWARDED: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/responses": Endpoint.RESPONSES,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
}

_ANTHROPIC_PATH = re.compile(r"(^|/)v1/(messages|complete)(/|$)|(^|/)anthropic(/|$)", re.IGNORECASE)
_GOOGLE_PATH = re.compile(r":(stream)?generatecontent$|(^|/)v1beta(\d)?/models(/|$)|:embedcontent$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A fallback attempt refused by policy: the error code, its metric reason and
    family, and a message that never echoes client-supplied values."""

    code: ErrorCode
    family: Family
    message: str
    param: str | None = None


def external_endpoint(path: str) -> Refusal | None:
    """Anthropic- or Gemini-format endpoints are fallback attempts, also under prefixes."""
    p = re.sub(r"/{2,}", "/", path).rstrip("/")
    if _ANTHROPIC_PATH.search(p):
        return Refusal(ErrorCode.EXTERNAL_PROVIDER_ENDPOINT, Family.ANTHROPIC,
                       "Anthropic-format endpoints are not served: this route runs only the admitted local model "
                       "through the OpenAI API")
    if _GOOGLE_PATH.search(p):
        return Refusal(ErrorCode.EXTERNAL_PROVIDER_ENDPOINT, Family.GOOGLE,
                       "Gemini-format endpoints are not served: this route runs only the admitted local model "
                       "through the OpenAI API")
    return None


# Body fields that pick a provider, upstream or fallback list in other gateways
# (LiteLLM, OpenRouter, Portkey, Azure-style clients). Checked on the top level, where
# SDKs put `extra_body` fields.
ROUTING_FIELDS: frozenset[str] = frozenset({
    "base_url", "api_base", "api_key", "api_version", "api_type", "azure_endpoint",
    "provider", "providers", "custom_llm_provider", "litellm_params", "model_list",
    "fallbacks", "fallback", "fallback_models", "context_window_fallbacks", "models",
    "route", "routing", "router", "upstream", "endpoint", "target_url", "proxy",
    "deployment_id", "engine", "api_endpoint", "vertex_project", "vertex_location",
    "aws_region_name", "region",
})


def routing_override(body: Mapping[str, object]) -> Refusal | None:
    """First routing-steering field in the body, if any; the family is read from its
    value so an `anthropic` fallback list is counted as such."""
    for key in body:
        if key in ROUTING_FIELDS:
            try:
                value_text = orjson.dumps(body[key]).decode()
            except TypeError:
                value_text = ""
            return Refusal(
                ErrorCode.ROUTING_OVERRIDE_REFUSED, classify_family(value_text) if value_text else Family.OTHER,
                f"request field '{key}' steers routing to another provider or upstream; "
                "this route pins every request to the admitted local model",
                param=key,
            )
    return None


# Headers that exist only to talk to another provider: refused and counted.
_PROVIDER_HEADER_FAMILY: dict[str, Family] = {
    "anthropic-version": Family.ANTHROPIC,
    "anthropic-beta": Family.ANTHROPIC,
    "anthropic-dangerous-direct-browser-access": Family.ANTHROPIC,
    "x-goog-api-key": Family.GOOGLE,
    "x-goog-user-project": Family.GOOGLE,
}


# Every name above, and every ``anthropic-*`` name, holds one of these (lower case).
_PROVIDER_HEADER_MARKS = ("anthropic-", "x-goog-")


def provider_header(headers: Iterable[str]) -> Refusal | None:
    """The refusal for the first header that only another provider's API reads, or
    None. Most requests name none: the names are joined and searched once (in C) for
    the marks every such name holds, and only a hit walks them one by one."""
    names = list(headers)
    joined = "\n".join(names).lower()
    if _PROVIDER_HEADER_MARKS[0] not in joined and _PROVIDER_HEADER_MARKS[1] not in joined:
        return None
    return _provider_header_walk(names)


def _provider_header_walk(headers: Iterable[str]) -> Refusal | None:
    for name in headers:
        low = name.lower()
        family = _PROVIDER_HEADER_FAMILY.get(low)
        if family is None and low.startswith("anthropic-"):
            family = Family.ANTHROPIC
        if family is not None:
            return Refusal(ErrorCode.EXTERNAL_PROVIDER_HEADER, family,
                           f"header '{low}' is for another provider's API; it is not accepted on this route")
    return None


# Request headers travel by allow-list: see proxy.allowlists.forwardable_request_headers.

_RESPONSE_DROP: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade",
    "content-length", "content-encoding", "set-cookie", "server", "date", "location", "x-request-id",
})


def forwardable_response_headers(headers: Iterable[tuple[str, str]], request_id: str) -> dict[str, str]:
    """Backend headers that may travel back to the client, and the proxy's request id
    (the record's). A backend's own ``X-Request-Id``, in any case, is dropped: the client
    would otherwise see two, one of them naming no record."""
    out = {n: v for n, v in headers if n.lower() not in _RESPONSE_DROP}
    out["X-Request-Id"] = request_id
    return out


_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def client_request_id(values: list[str]) -> str | None:
    """A client's ``X-Request-Id``, kept beside the proxy's own id when it is exactly one
    header of 1-64 ASCII letters, digits and ``._:-``; anything else (non-ASCII, Unicode
    digits, control characters, several headers) is not recorded."""
    if len(values) != 1:
        return None
    value = values[0]
    return value if value.isascii() and _CLIENT_REQUEST_ID.fullmatch(value) else None


def websocket_upgrade(headers: Mapping[str, str]) -> bool:
    """Whether a request asks to switch to WebSocket (Codex tries this on
    ``GET /v1/responses`` first). It gets a 426, on which Codex falls back to HTTP at
    once; a 405 made it retry five times first."""
    return "websocket" in headers.get("Upgrade", "").lower()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
