"""The model pin: which requested model names may run, as pure functions.

Only the admitted id (or one of the admission's declared aliases) runs; everything else
is refused before a byte goes upstream. The match is exact: a case or whitespace variant
of the admitted id is refused too (with a hint), because the pin must not depend on how
a backend happens to normalise names. Refusals are classified into a small, bounded set
of families so metrics stay low-cardinality and alerts can say who the client tried to
reach. Classification folds Unicode look-alikes so "сlaude" (Cyrillic с) is still
recognised as an Anthropic model.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from .admission import Admission
from .codes import ErrorCode, Reason


class Family(StrEnum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    GOOGLE = "google"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ModelDecision:
    """Outcome of the pin. ``effective_model`` is what goes upstream when admitted."""

    admitted: bool
    code: Reason | ErrorCode  # ok, model_missing or model_not_admitted
    requested: str | None
    effective_model: str | None = None
    alias_rewritten: bool = False
    family: Family | None = None
    message: str = ""


# Cyrillic and Greek letters that render like Latin ones (the usual spoofing set).
_CONFUSABLES = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
    "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "һ": "h", "к": "k",
    "м": "m", "т": "t", "в": "b", "н": "h", "ү": "y",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "ε": "e",
    "υ": "u", "χ": "x", "γ": "y", "μ": "u",
    "ⅼ": "l", "ı": "i", "ℓ": "l",
})

# Zero-width and formatting characters used to hide differences.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)

_ANTHROPIC_MARKERS = ("claude", "anthropic", "sonnet", "opus", "haiku")
_OPENAI_MARKERS = ("gpt", "chatgpt", "davinci", "babbage", "codex", "openai", "text-embedding", "dall-e", "whisper", "tts-1")
_OPENAI_PREFIXES = ("o1", "o3", "o4", "o5", "ft:gpt")
_GOOGLE_MARKERS = ("gemini", "palm", "bison", "vertex", "google", "learnlm")


def fold(name: str) -> str:
    """A skeleton of a model name for classification: NFKC, look-alikes mapped to
    Latin, invisible characters removed, case folded, whitespace stripped."""
    text = unicodedata.normalize("NFKC", name).translate(_INVISIBLE)
    text = text.casefold().translate(_CONFUSABLES)
    return "".join(text.split())


def classify_family(name: str) -> Family:
    """Which provider family a (refused) model name points at.

    Provider prefixes (``anthropic/...``, ``openrouter/anthropic/...``,
    ``bedrock/anthropic.claude...``) are read as part of the name, so any segment that
    names a family counts.
    """
    skeleton = fold(name)
    if any(m in skeleton for m in _ANTHROPIC_MARKERS):
        return Family.ANTHROPIC
    if any(m in skeleton for m in _GOOGLE_MARKERS):
        return Family.GOOGLE
    segments = [s for s in skeleton.replace(":", "/").split("/") if s]
    if any(m in skeleton for m in _OPENAI_MARKERS) or any(
        s.startswith(_OPENAI_PREFIXES) for s in segments
    ):
        return Family.OPENAI
    return Family.OTHER


_OK = Reason.OK  # bound once: read per request (see proxy.codes)


@lru_cache(maxsize=8)
def _admitted(model: str) -> ModelDecision:
    """The decision for a request naming the admitted model exactly: the usual request,
    made once per model, not per request (the decision is frozen)."""
    return ModelDecision(True, _OK, model, effective_model=model)


def decide_model(requested: object, admission: Admission) -> ModelDecision:
    """Apply the pin to the ``model`` field of a request body."""
    if requested is None or (isinstance(requested, str) and requested == ""):
        return ModelDecision(False, ErrorCode.MODEL_MISSING, None, message="the request names no model; "
                             f"the only admitted model is '{admission.model}'")
    if not isinstance(requested, str):
        return ModelDecision(False, ErrorCode.MODEL_MISSING, None,
                             message="'model' must be a string naming the admitted model")
    if requested == admission.model:
        return _admitted(admission.model)
    if requested in admission.aliases:
        return ModelDecision(True, _OK, requested, effective_model=admission.model, alias_rewritten=True)
    family = classify_family(requested)
    hint = ""
    if fold(requested) == fold(admission.model):
        hint = f" (names must match exactly: use '{admission.model}')"
    return ModelDecision(
        False, ErrorCode.MODEL_NOT_ADMITTED, requested, family=family,
        message=f"model is not admitted on this route{hint}; the only admitted model is '{admission.model}'",
    )
