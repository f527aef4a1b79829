"""What may reach the engine: the request body fields of each forwarded endpoint and the
request headers, as allow-lists (issue 18).

A deny-list cannot keep up with engines: llama.cpp's ``lora``, SGLang's ``lora_path`` and
``bootstrap_*``, vLLM's ``kv_transfer_params``/``vllm_xargs``/``logits_processors`` and
LiteLLM's ``user_config``/``tags`` each run weights or routes nobody admitted, and every
release adds more. So a field travels only if it is in the OpenAI schema of its endpoint
(the official SDK's ``*CreateParams``; ``tests/test_allowlists.py`` compares) or in the
short list of engine extras below, which tune sampling of the same weights and nothing
else. Operators may add names in the TOML config (``[request_fields]``), never a name
from the steering list. Everything here is data plus pure functions: proxy.forwarding_handler
applies them and records the refusals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from .codes import ErrorCode
from .redact import clip
from .request_policy import ROUTING_FIELDS, Endpoint

# The OpenAI API schema per endpoint (openai SDK 3.57 types; ``stream`` lives in the
# SDK's streaming/non-streaming variants, not in the base class).
OPENAI_FIELDS: dict[Endpoint, frozenset[str]] = {
    Endpoint.CHAT: frozenset({
        "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model", "moderation", "n",
        "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options",
        "prompt_cache_retention", "reasoning_effort", "response_format", "safety_identifier", "seed",
        "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
        "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    }),
    Endpoint.COMPLETIONS: frozenset({
        "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model", "n",
        "presence_penalty", "prompt", "seed", "stop", "stream", "stream_options", "suffix", "temperature",
        "top_p", "user",
    }),
    Endpoint.RESPONSES: frozenset({
        "access_programs", "background", "background_options", "context_management", "conversation", "image",
        "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata", "model",
        "moderation", "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
        "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier",
        "store", "stream", "stream_options", "temperature", "text", "tool_choice", "tools", "top_logprobs",
        "top_p", "truncation", "user",
    }),
    Endpoint.EMBEDDINGS: frozenset({"dimensions", "encoding_format", "input", "model", "user"}),
}

# Engine extras (vLLM, SGLang, llama.cpp) that change how the admitted weights sample or
# stop, never which weights run, which engine runs them or what code the engine loads.
GENERATION_EXTRAS: frozenset[str] = frozenset({
    "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "ignore_eos", "chat_template_kwargs",
})
ENGINE_EXTRAS: dict[Endpoint, frozenset[str]] = {
    Endpoint.CHAT: GENERATION_EXTRAS,
    Endpoint.COMPLETIONS: GENERATION_EXTRAS - {"chat_template_kwargs"},
    Endpoint.RESPONSES: frozenset({"top_k", "min_p", "repetition_penalty"}),
    Endpoint.EMBEDDINGS: frozenset(),
}

# Fields well-known clients send beyond the SDK schema: Codex CLI's Responses requests
# carry ``client_metadata`` (a map of strings, vetted like ``metadata``).
CLIENT_EXTRAS: dict[Endpoint, frozenset[str]] = {
    Endpoint.CHAT: frozenset(),
    Endpoint.COMPLETIONS: frozenset(),
    Endpoint.RESPONSES: frozenset({"client_metadata"}),
    Endpoint.EMBEDDINGS: frozenset(),
}

# ``chat_template_kwargs`` reaches the Jinja chat template (and, in some vLLM releases,
# could replace the template itself): only these keys, each with a boolean value.
CHAT_TEMPLATE_KWARGS: frozenset[str] = frozenset({"enable_thinking"})

# Fields that pick weights, adapters, a remote or disaggregated engine, engine plugins or
# a gateway's routing: a request naming one is a fallback attempt (refused, counted,
# recorded as ``engine_override_refused``), not merely an unknown field. Names and
# prefixes; an operator can never allow them.
STEERING_FIELDS: frozenset[str] = frozenset({
    "lora", "lora_path", "lora_request", "lora_name", "lora_id", "lora_int_id", "lora_adapter", "adapter",
    "adapters", "adapter_id", "adapter_name", "adapter_path", "kv_transfer_params", "vllm_xargs",
    "logits_processors", "custom_logit_processor", "custom_params", "user_config", "tags", "default_fallbacks",
    "mock_response", "model_group", "model_info", "deployment", "data_parallel_rank", "control_vectors",
    "draft_model", "speculative_config", "chat_template", "mm_processor_kwargs",
})
STEERING_PREFIXES: tuple[str, ...] = ("lora_", "bootstrap_", "adapter_", "kv_transfer", "vllm_", "sglang_",
                                      "litellm_", "disagg")

# Keys of ``metadata`` / ``client_metadata`` that a gateway reads as routing (LiteLLM's
# tag-based routing reads ``metadata.tags``): narrower than STEERING_FIELDS, since
# metadata is free-form client text ("region": "eu" routes nothing on a local engine).
METADATA_STEERING: frozenset[str] = frozenset({
    "tags", "fallbacks", "default_fallbacks", "user_config", "model_list", "model_group", "deployment",
})

# Request headers that may travel upstream; everything else is dropped (the backend key
# and Content-Type/X-Request-Id are set by the proxy itself).
# Codex CLI sends originator, version, session_id/session-id, conversation_id,
# thread-id, x-openai-subagent and x-codex-*; the OpenAI SDKs x-stainless-*.
FORWARDED_HEADERS: frozenset[str] = frozenset({
    "accept", "user-agent", "idempotency-key", "openai-beta", "originator", "version", "session_id",
    "session-id", "conversation_id", "thread-id", "x-openai-subagent", "traceparent", "tracestate",
})
FORWARDED_HEADER_PREFIXES: tuple[str, ...] = ("x-stainless-", "x-codex-")

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# The TOML spelling of each endpoint (``[request_fields]`` keys); ``all`` means every one.
CONFIG_ENDPOINTS: dict[str, tuple[Endpoint, ...]] = {
    "chat_completions": (Endpoint.CHAT,), "completions": (Endpoint.COMPLETIONS,),
    "responses": (Endpoint.RESPONSES,), "embeddings": (Endpoint.EMBEDDINGS,),
    "all": (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES, Endpoint.EMBEDDINGS),
}


def is_steering(name: str) -> bool:
    """Whether a field name picks weights, engines or routes (see STEERING_FIELDS)."""
    low = name.lower()
    return low in STEERING_FIELDS or low in ROUTING_FIELDS or low.startswith(STEERING_PREFIXES)


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """Why a body may not travel: the error code, the offending field (``param``), a
    message that names the field and not its value, and whether it is a fallback
    attempt (a steering field) or just a field this route does not take."""

    code: ErrorCode
    param: str
    message: str
    fallback: bool


_BASE_ALLOWED: dict[Endpoint, frozenset[str]] = {
    e: OPENAI_FIELDS[e] | ENGINE_EXTRAS[e] | CLIENT_EXTRAS[e] for e in OPENAI_FIELDS
}


@lru_cache(maxsize=64)
def _with_additions(endpoint: Endpoint, added: frozenset[str]) -> frozenset[str]:
    return _BASE_ALLOWED.get(endpoint, frozenset()) | added


def allowed_fields(endpoint: Endpoint, extra: Mapping[Endpoint, frozenset[str]] | None = None) -> frozenset[str]:
    """Every top-level field ``endpoint`` forwards, operator additions included (the
    union is made once, not per request)."""
    added = extra.get(endpoint) if extra else None
    return _with_additions(endpoint, added) if added else _BASE_ALLOWED.get(endpoint, frozenset())


def _shown(name: str) -> str:
    """A client's field name, safe to put in a message: printable ASCII, bounded (a name
    too long is dropped, not cut: a cut could leave most of a secret unrecognisable)."""
    return clip("".join(c if " " < c < "\x7f" else "?" for c in name), 64)


def check_fields(endpoint: Endpoint, body: Mapping[str, object],
                 extra: Mapping[Endpoint, frozenset[str]] | None = None) -> FieldProblem | None:
    """The first reason ``body`` may not reach the engine, or None when every field is
    allowed. Steering fields are reported before unknown ones, wherever they stand."""
    allowed = allowed_fields(endpoint, extra)
    if allowed.issuperset(body):  # the usual case, answered in C; the loop names what is left
        return _check_nested(body)
    unknown: str | None = None
    for key in body:
        if key in allowed:
            continue
        if is_steering(key):
            return FieldProblem(
                ErrorCode.ENGINE_OVERRIDE_REFUSED, _shown(key),
                f"request field '{_shown(key)}' selects weights, an adapter, another engine or a route; "
                "this route runs only the admitted model as admitted", fallback=True)
        if unknown is None:
            unknown = key
    if unknown is not None:
        return FieldProblem(
            ErrorCode.REQUEST_FIELD_NOT_ALLOWED, _shown(unknown),
            f"request field '{_shown(unknown)}' is not accepted on {endpoint.value}: only the OpenAI API's fields "
            "and the documented engine extras are forwarded (operators may allow more: [request_fields] in the "
            "proxy config)", fallback=False)
    return _check_nested(body)


def _check_nested(body: Mapping[str, object]) -> FieldProblem | None:
    """Values that are maps and reach an engine or gateway: ``chat_template_kwargs``
    (vetted keys, boolean values), ``metadata`` and ``client_metadata`` (the OpenAI
    shape: string values, and no key a gateway reads as routing, such as LiteLLM's
    ``tags``)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            return FieldProblem(ErrorCode.REQUEST_FIELD_NOT_ALLOWED, "chat_template_kwargs",
                                "request field 'chat_template_kwargs' must be an object", fallback=False)
        for key, value in kwargs.items():
            if is_steering(key):
                return FieldProblem(
                    ErrorCode.ENGINE_OVERRIDE_REFUSED, f"chat_template_kwargs.{_shown(key)}",
                    f"chat_template_kwargs key '{_shown(key)}' selects a template or engine behaviour; "
                    "this route runs only the admitted model as admitted", fallback=True)
            if key not in CHAT_TEMPLATE_KWARGS or not isinstance(value, bool):
                return FieldProblem(
                    ErrorCode.REQUEST_FIELD_NOT_ALLOWED, f"chat_template_kwargs.{_shown(key)}",
                    f"chat_template_kwargs key '{_shown(key)}' is not accepted: allowed are "
                    f"{', '.join(sorted(CHAT_TEMPLATE_KWARGS))}, each true or false", fallback=False)
    for name in ("metadata", "client_metadata"):
        value = body.get(name)
        if value is not None:  # most bodies carry neither: no call
            problem = _check_string_map(name, value)
            if problem is not None:
                return problem
    return None


def _check_string_map(name: str, value: object) -> FieldProblem | None:
    """A metadata-like map: string values only, no key a gateway reads as routing."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return FieldProblem(ErrorCode.REQUEST_FIELD_NOT_ALLOWED, name,
                            f"request field '{name}' must be an object of strings", fallback=False)
    for key, item in value.items():
        if key.lower() in METADATA_STEERING or key.lower().startswith("litellm_"):
            return FieldProblem(
                ErrorCode.ENGINE_OVERRIDE_REFUSED, f"{name}.{_shown(key)}",
                f"{name} key '{_shown(key)}' is read by gateways as routing; "
                "this route runs only the admitted model as admitted", fallback=True)
        if not isinstance(item, str):
            return FieldProblem(ErrorCode.REQUEST_FIELD_NOT_ALLOWED, f"{name}.{_shown(key)}",
                                f"{name} value '{_shown(key)}' must be a string", fallback=False)
    return None


def forwardable_request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client headers that may travel upstream: the allow-list only."""
    out: dict[str, str] = {}
    for name, value in headers:
        low = name.lower()
        if low in FORWARDED_HEADERS or low.startswith(FORWARDED_HEADER_PREFIXES):
            # One spelling, so Upstream.headers can tell whether the client sent one.
            out["User-Agent" if low == "user-agent" else name] = value
    return out


def parse_extra_fields(table: object) -> tuple[dict[Endpoint, frozenset[str]], list[str]]:
    """The ``[request_fields]`` TOML table (endpoint -> list of field names) as
    additions per endpoint, and one problem line per bad entry."""
    problems: list[str] = []
    out: dict[Endpoint, set[str]] = {}
    if not isinstance(table, Mapping):
        return {}, ["[request_fields] must be a table of endpoint = [field names]"]
    for key, names in table.items():
        endpoints = CONFIG_ENDPOINTS.get(key)
        if endpoints is None:
            problems.append(f"[request_fields] unknown endpoint '{key}' "
                            f"(one of: {', '.join(CONFIG_ENDPOINTS)})")
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"request_fields.{key}: must be a list of field names (strings)")
            continue
        for name in names:
            if not _FIELD_NAME.fullmatch(name):
                problems.append(f"request_fields.{key}: '{_shown(name)}' is not a field name "
                                "(letters, digits and '_', at most 64)")
            elif is_steering(name):
                problems.append(f"request_fields.{key}: '{name}' selects weights, adapters, engines or routes "
                                "and can never be allowed")
            else:
                for endpoint in endpoints:
                    out.setdefault(endpoint, set()).add(name)
    return {e: frozenset(s) for e, s in out.items()}, problems
