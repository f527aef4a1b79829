"""The served-model check and usage accounting on backend responses.

Streams are checked event by event in ``proxy.stream_check`` (SSE read as the
specification reads it, each event's data parsed as JSON); non-streaming bodies here.
Both refuse a JSON object that repeats a key: JSON clients differ on which duplicate
wins (and ``"mod\\u0065l"`` is the key ``model``), so such a body proves nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import orjson

from .redact import clip


@dataclass(slots=True)
class UsageTotals:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    def take(self, usage: object) -> None:
        """Read an OpenAI ``usage`` object (chat/completions names or Responses names)."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        total = usage.get("total_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
        if isinstance(total, int):
            self.total_tokens = total

    @property
    def present(self) -> bool:
        return self.prompt_tokens is not None or self.completion_tokens is not None


def find_usage(obj: object) -> object:
    """The ``usage`` object of a chat/completions body or chunk, or of a Responses
    event's ``response``; None if there is none."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("usage"), dict):
        return obj["usage"]
    response = obj.get("response")
    if isinstance(response, dict) and isinstance(response.get("usage"), dict):
        return response["usage"]
    return None


@dataclass(frozen=True, slots=True)
class ServedCheck:
    ok: bool
    served_model: str | None
    message: str = ""


_SERVED_OK: dict[str, ServedCheck] = {}


def check_served(served: str | None, admitted: str) -> ServedCheck:
    if served is None:
        return ServedCheck(False, None, "the backend response does not name the model that served it")
    if served != admitted:
        return ServedCheck(False, served, "the backend reports a model other than the admitted one; response withheld")
    ok = _SERVED_OK.get(admitted)
    if ok is None:  # one admitted model per proxy: built once, not per response
        ok = _SERVED_OK[admitted] = ServedCheck(True, admitted)
    return ok


class _RepeatedKey(Exception):
    pass


def _pairs_without_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _RepeatedKey
    return out


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_without_repeats)


def has_duplicate_key(body: bytes) -> bool:
    """Whether any object in this JSON text names a key twice, escapes decoded (the
    parse that sees every key: used only when the cheap test cannot rule it out). Fails
    closed: a text this parse cannot read counts as repeating."""
    try:
        _PAIRS_DECODER.decode(body.decode("utf-8"))
    except _RepeatedKey:
        return True
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return True
    return False


_ABSENT = object()


def check_json_body(body: bytes, admitted: str, totals: UsageTotals) -> ServedCheck:
    """Non-streaming bodies: parse once (usage is needed anyway), refuse a repeated key,
    and compare every ``model`` the body names (top level and ``response.model``)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ServedCheck(False, None, "the backend returned a body that is not JSON")
    if not isinstance(obj, dict):
        return ServedCheck(False, None, "the backend returned a JSON body that is not an object")
    # Exact: a body equal to the serialization of its parse has no repeated key.
    if orjson.dumps(obj) != body and has_duplicate_key(body):
        return ServedCheck(False, None, "the backend returned a JSON body that repeats a key; response withheld")
    totals.take(find_usage(obj))
    response = obj.get("response")
    named = (obj.get("model", _ABSENT), response.get("model", _ABSENT) if isinstance(response, dict) else _ABSENT)
    if named[0] is _ABSENT and named[1] is _ABSENT:
        return check_served(None, admitted)
    for model in named:
        if model is _ABSENT:
            continue
        if not isinstance(model, str):
            return ServedCheck(False, clip(orjson.dumps(model).decode(), 200),
                               "the backend names its model with a value that is not a string; response withheld")
        if model != admitted:
            return check_served(model, admitted)
    return check_served(admitted, admitted)
