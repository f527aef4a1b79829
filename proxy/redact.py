"""One redaction module for logs, evidence, error messages and the harness secret scan.

It removes registered secret values (with their base64 and URL-encoded forms, so an
encoded header or a basic-auth string is caught too) and common token shapes. ``find``
reports where and what kind, never the value, so a scan result can be shown safely.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

REDACTED = "[REDACTED]"
# Shorter values would redact ordinary words; real tokens and keys are far longer.
MIN_SECRET_LEN = 8

_SHAPES: list[tuple[str, str]] = [
    ("pem_private_key", r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----"),
    ("anthropic_key", r"\bsk-ant-[A-Za-z0-9_\-]{16,}"),
    ("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})"),
    ("slack_token", r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"),
    ("aws_access_key", r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    ("aws_secret_key", r"(?i:aws_secret_access_key)\s*[=:]\s*[A-Za-z0-9/+]{40}"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ("bearer", r"(?<=[Bb]earer )[A-Za-z0-9._~+/\-]{12,}=*"),
    ("url_credentials", r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),
]
# Literals that every match of some shape contains (lower-cased text for the last one).
# Text holding none of them, and no registered form, cannot match: the full pattern
# (slow, with its look-behinds) then never runs. Keep in step with _SHAPES.
_SHAPE_ANCHORS = ("-----BEGIN", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "AKIA", "ASIA",
                  "eyJ", "earer ", "://")
_SHAPE_ANCHORS_LOWER = ("aws_secret_access_key",)
assert all("_" in a for a in _SHAPE_ANCHORS_LOWER)  # may_match relies on it
_SHAPE_ANCHORS_LOWER_BYTES = tuple(a.encode() for a in _SHAPE_ANCHORS_LOWER)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    start: int
    end: int


def labelled_encoded_forms(value: str) -> dict[str, str]:
    """The value as it may appear when encoded on the way, each with how it was encoded
    ('' as written, 'url-encoded', 'base64', 'base64url'; base64 with and without
    padding). A form that several encodings produce keeps the first label."""
    raw = value.encode()
    candidates = [("", value), ("url-encoded", urllib.parse.quote(value, safe="")),
                  ("url-encoded", urllib.parse.quote_plus(value))]
    for label, enc in (("base64", base64.b64encode(raw).decode()), ("base64url", base64.urlsafe_b64encode(raw).decode())):
        candidates += [(label, enc), (label, enc.rstrip("="))]
    forms: dict[str, str] = {}
    for label, form in candidates:
        if len(form) >= MIN_SECRET_LEN:
            forms.setdefault(form, label)
    return forms


def encoded_forms(value: str) -> set[str]:
    """The forms of :func:`labelled_encoded_forms`, without their labels."""
    return set(labelled_encoded_forms(value))


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._clean: frozenset[str] = frozenset()
        for s in secrets:
            self.add_secret(s)
        if self._pattern is None:
            self._build()

    @property
    def registered_count(self) -> int:
        return len(self._secrets)

    def add_secret(self, value: str) -> None:
        value = (value or "").strip()
        if len(value) < MIN_SECRET_LEN or value in self._secrets:
            return
        self._secrets.add(value)
        self._build()

    def _build(self) -> None:
        forms = set()
        for s in self._secrets:
            forms |= encoded_forms(s)
        parts = []
        if forms:
            # Longest first so a value is not half-replaced by a shorter form of itself.
            alts = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
            parts.append(f"(?P<registered_secret>{alts})")
        parts.extend(f"(?P<{name}>{rx})" for name, rx in _SHAPES)
        self._pattern = re.compile("|".join(parts))
        self._anchors = tuple(sorted(forms)) + _SHAPE_ANCHORS
        # The same anchors searched in JSON text: sound only while none of them contains
        # a character JSON escapes (a quote, a backslash, a control character).
        self._json_anchors = tuple(a.encode() for a in self._anchors)
        self._json_safe = not any(c in '"\\' or ord(c) < 0x20 for a in self._anchors for c in a)
        self._clean = frozenset()  # vetted against the old secrets only

    def vet_clean(self, values: Iterable[str]) -> None:
        """Remember the values among ``values`` that hold no finding. Meant for strings a
        hot path sees on every call (the admitted model, route paths): checked once here,
        they can be skipped there (see ``clean``). Forgotten when a secret is added."""
        self._clean = self._clean | {v for v in values if not self.may_match(v)}

    @property
    def clean(self) -> frozenset[str]:
        """Values vetted by ``vet_clean``: none of them holds a finding."""
        return self._clean

    def may_match(self, text: str) -> bool:
        """Cheap and sound pre-check: False only when ``text`` cannot contain a finding."""
        for anchor in self._anchors:
            if anchor in text:
                return True
        # Every case-insensitive anchor has underscores, which have no case variants.
        if len(text) >= len(_SHAPE_ANCHORS_LOWER[0]) and "_" in text:
            # casefold, not lower: (?i) also matches folded look-alikes such as 'ſ' for 's'.
            folded = text.casefold()
            return any(anchor in folded for anchor in _SHAPE_ANCHORS_LOWER)
        return False

    def find(self, text: str) -> list[Finding]:
        assert self._pattern is not None
        if not self.may_match(text):
            return []
        return [Finding(m.lastgroup or "secret", m.start(), m.end()) for m in self._pattern.finditer(text)]

    def redact(self, text: str) -> str:
        assert self._pattern is not None
        if not self.may_match(text):
            return text
        return self._pattern.sub(REDACTED, text)

    def redact_bytes(self, data: bytes) -> bytes:
        return self.redact(data.decode("utf-8", "replace")).encode()

    def redact_obj(self, obj: Any) -> Any:
        """A redacted copy of a JSON-like value. One pre-check over all its strings at
        once (an evidence record is some 40 short strings): a clean record, the usual
        case, comes back as it is, without a regex run per string."""
        if self._json_safe:
            try:
                blob = orjson.dumps(obj)
                # Non-ASCII text goes the str way below, where case folding is complete.
                if blob.isascii() and not self._may_match_json(blob):
                    return obj
            except TypeError:
                pass
        if not self.may_match("\x00".join(_strings(obj, []))):
            return obj
        return self._redact_obj(obj)

    def _may_match_json(self, blob: bytes) -> bool:
        for anchor in self._json_anchors:
            if anchor in blob:
                return True
        lowered = blob.lower()
        return any(anchor in lowered for anchor in _SHAPE_ANCHORS_LOWER_BYTES)

    def _redact_obj(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, dict):
            return {self.redact(k) if isinstance(k, str) else k: self._redact_obj(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._redact_obj(v) for v in obj]
        return obj


def _strings(obj: Any, out: list[str]) -> list[str]:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                out.append(k)
            _strings(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _strings(v, out)
    return out


# C0 and C1 controls, DEL and the Unicode line/paragraph separators: in a log message
# they could end the line and forge the next one (a percent-decoded %0A in a path).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a ``\\xNN`` / ``\\uNNNN`` escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)
# What every LogRecord has; anything else on a record came in through ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Every record passing it leaves with its message and traceback redacted, so no
    handler can format the raw values later; the message also has its control
    characters escaped, so one record is one line (tracebacks keep their lines)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must still be logged, redacted
            message = str(record.msg)
        record.msg, record.args = escape_controls(self.redactor.redact(message)), None
        # Fields passed with ``extra=`` (an access line's) reach a JSON formatter as they
        # are: they are redacted here too, after one pre-check over all of them.
        extras = [(k, v) for k, v in record.__dict__.items() if type(v) is str and k not in _RECORD_ATTRS]
        if extras and self.redactor.may_match("\x00".join(v for _, v in extras)):
            for key, value in extras:
                record.__dict__[key] = self.redactor.redact(value)
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redactor.redact(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        return True


def install_log_redaction(redactor: Redactor, logger: logging.Logger | None = None) -> RedactingFilter:
    """Attach the filter to the logger and to each of its handlers (handler filters also
    see records propagated from child loggers, which logger filters do not)."""
    target = logger or logging.getLogger()
    filt = RedactingFilter(redactor)
    target.addFilter(filt)
    for handler in target.handlers:
        handler.addFilter(filt)
    return filt
