"""One redaction module for logs, evidence, error messages and the harness secret scan.

It removes registered secret values (in every encoded form they may take on the way:
base64 and base64url at the three alignments, hex, URL-encoded in upper and lower case)
and common token shapes (gitleaks' prefixed rules, HTTP Basic credentials). ``find``
reports where and what kind, never the value, so a scan result can be shown safely.
``clip``, ``head_lines`` and ``tail_lines`` bound a value without leaving part of a
secret behind: redact first, cut after, or cut only at a line break.
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
    # Shapes of gitleaks' default rules (config/gitleaks.toml), prefix-anchored ones.
    ("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}"),
    ("huggingface_token", r"\bhf_[A-Za-z]{34}"),
    ("groq_key", r"\bgsk_[A-Za-z0-9]{52}"),
    ("xai_key", r"\bxai-[A-Za-z0-9_]{80}"),
    ("gitlab_token", r"\bgl(?:pat|dt|ptt|rt|soat|cbt|imt|agent|oas|ffct)-[A-Za-z0-9_\-]{20,}"),
    ("npm_token", r"(?i:\bnpm_[a-z0-9]{36})"),
    ("stripe_key", r"\b(?:sk|rk)_(?:test|live|prod)_[A-Za-z0-9]{10,99}"),
    ("pypi_token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}"),
    ("digitalocean_token", r"\bdo[por]_v1_[a-f0-9]{64}"),
    ("sendgrid_key", r"\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"),
    ("shopify_token", r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"),
    ("databricks_token", r"\bdapi[a-f0-9]{32}"),
    ("age_secret_key", r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}"),
    ("linear_key", r"\blin_api_[A-Za-z0-9]{40}"),
    ("pulumi_token", r"\bpul-[a-f0-9]{40}"),
    ("rubygems_token", r"\brubygems_[a-f0-9]{48}"),
    ("doppler_token", r"\bdp\.pt\.[A-Za-z0-9]{43}"),
    ("grafana_token", r"\b(?:glc_[A-Za-z0-9+/]{32,400}={0,2}|glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8})"),
    ("sentry_token", r"\bsntry[su]_[A-Za-z0-9+/=_\-]{30,}"),
    ("slack_webhook", r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/]{43,56}"),
    ("telegram_bot_token", r"\b[0-9]{5,16}:AA[A-Za-z0-9_\-]{33}"),
    # HTTP Basic credentials: base64 of "user:password" (checked by decoding, see _valid).
    ("http_basic", r"(?<=[Bb]asic )[A-Za-z0-9+/]{6,}={0,2}"),
]
# Literals every match of a prefix shape above starts with (for may_match below).
_GITLEAKS_ANCHORS = ("AIza", "hf_", "gsk_", "xai-", "glpat-", "gldt-", "glptt-", "glrt-", "glsoat-", "glcbt-",
                     "glimt-", "glagent-", "gloas-", "glffct-", "sk_", "rk_", "pypi-AgEIcHlwaS5vcmc", "_v1_",
                     "SG.", "shp", "dapi", "AGE-SECRET-KEY-1", "lin_api_", "pul-", "rubygems_", "dp.pt.",
                     "glc_", "glsa_", "sntry", "hooks.slack.com", ":AA", "asic ")
# Literals that every match of some shape contains (lower-cased text for the last one).
# Text holding none of them, and no registered form, cannot match: the full pattern
# (slow, with its look-behinds) then never runs. Keep in step with _SHAPES.
_SHAPE_ANCHORS = ("-----BEGIN", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "AKIA", "ASIA",
                  "eyJ", "earer ", "://") + _GITLEAKS_ANCHORS
_SHAPE_ANCHORS_LOWER = ("aws_secret_access_key", "npm_")
_MIN_LOWER_ANCHOR = min(len(a) for a in _SHAPE_ANCHORS_LOWER)
assert all("_" in a for a in _SHAPE_ANCHORS_LOWER)  # may_match relies on it
_SHAPE_ANCHORS_LOWER_BYTES = tuple(a.encode() for a in _SHAPE_ANCHORS_LOWER)


# Characters from the most to the least common in log lines and JSON records (letters,
# digits, the punctuation of paths, numbers and key=value pairs); any other character is
# rarer still. Only a speed heuristic: see _anchor_groups.
_COMMON_CHARS = "etaoinsrhldcumfpgwybvkxjqz 0123456789=_./:-\",{}[]ETAOINSRHLDCUMFPGWYBVKXJQZ"
_RANK = {c: i for i, c in enumerate(_COMMON_CHARS)}


def _anchor_groups(anchors: Iterable[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The anchors grouped under one character each contains (its least common, by
    _COMMON_CHARS). A text holding an anchor holds that character, so a pre-check that
    searches a group only when its character is in the text is exact; most texts lack
    most groups' characters, and one character's search is cheaper than an anchor's."""
    groups: dict[str, list[str]] = {}
    for anchor in anchors:
        groups.setdefault(max(anchor, key=lambda c: _RANK.get(c, len(_RANK))), []).append(anchor)
    return tuple((key, tuple(group)) for key, group in sorted(groups.items()))


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    start: int
    end: int


def _aligned_base64(raw: bytes, urlsafe: bool) -> list[str]:
    """The base64 text the value's bytes produce wherever they sit in a longer encoded
    stream: for each of the three offsets (0, 1, 2 bytes before it modulo 3), the
    characters that depend on the value's bits alone. At offset 0 also the whole
    encoding, with and without padding (the value encoded on its own)."""
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    out = [enc(raw).decode(), enc(raw).decode().rstrip("=")]
    for k in range(3):
        text = enc(b"\0" * k + raw).decode()
        # Character i covers bits [6i, 6i+6); the value's bits are [8k, 8(k+n)).
        first, end = -(-8 * k // 6), (8 * (k + len(raw))) // 6
        out.append(text[first:end])
    return out


def labelled_encoded_forms(value: str) -> dict[str, str]:
    """The value as it may appear when encoded on the way, each with how it was encoded:
    '' as written; 'url-encoded' (reserved characters, or every byte, as %XX in upper and
    lower case; '+' for spaces); 'base64' and 'base64url' (each of the three alignments
    inside a longer encoded text, see :func:`_aligned_base64`); 'hex' (lower and upper
    case). A form that several encodings produce keeps the first label; forms shorter
    than MIN_SECRET_LEN are left out (they would redact ordinary text)."""
    raw = value.encode()
    quoted = urllib.parse.quote(value, safe="")
    every = "".join(f"%{b:02X}" for b in raw)
    candidates = [("", value)]
    candidates += [("url-encoded", f) for f in (quoted, _lower_escapes(quoted), urllib.parse.quote_plus(value),
                                                _lower_escapes(urllib.parse.quote_plus(value)), every, every.lower())]
    candidates += [("base64", f) for f in _aligned_base64(raw, urlsafe=False)]
    candidates += [("base64url", f) for f in _aligned_base64(raw, urlsafe=True)]
    candidates += [("hex", raw.hex()), ("hex", raw.hex().upper())]
    forms: dict[str, str] = {}
    for label, form in candidates:
        if len(form) >= MIN_SECRET_LEN:
            forms.setdefault(form, label)
    return forms


def _lower_escapes(quoted: str) -> str:
    """``%2F`` written ``%2f``: percent-decoding accepts both."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quoted)


def _valid(m: re.Match[str]) -> bool:
    """Whether a shape match is a finding. An ``http_basic`` match must decode to
    ``user:password`` text (so 'Basic configuration' in prose is not one)."""
    if m.lastgroup != "http_basic":
        return True
    try:
        decoded = base64.b64decode(m.group() + "=" * (-len(m.group()) % 4), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return False
    return ":" in decoded and decoded.isprintable()


def encoded_forms(value: str) -> set[str]:
    """The forms of :func:`labelled_encoded_forms`, without their labels."""
    return set(labelled_encoded_forms(value))


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._clean: frozenset[str] = frozenset()
        self._clean_max = -1
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
        self._anchor_groups = _anchor_groups(self._anchors)
        # The same anchors searched in JSON text: sound only while none of them contains
        # a character JSON escapes (a quote, a backslash, a control character).
        self._json_anchor_groups = tuple((key.encode(), tuple(a.encode() for a in group))
                                         for key, group in self._anchor_groups)
        self._json_safe = not any(c in '"\\' or ord(c) < 0x20 for a in self._anchors for c in a)
        self._clean = frozenset()  # vetted against the old secrets only
        self._clean_max = -1  # the longest vetted value's length (a longer text is never one)

    def vet_clean(self, values: Iterable[str]) -> None:
        """Remember the values among ``values`` that hold no finding. Meant for strings a
        hot path sees on every call (the admitted model, route paths): checked once here,
        they can be skipped there (see ``clean``). Forgotten when a secret is added."""
        self._clean = self._clean | {v for v in values if not self.may_match(v)}
        self._clean_max = max((len(v) for v in self._clean), default=-1)

    @property
    def clean(self) -> frozenset[str]:
        """Values vetted by ``vet_clean``: none of them holds a finding."""
        return self._clean

    def may_match(self, text: str) -> bool:
        """Cheap and sound pre-check: False only when ``text`` cannot contain a finding.
        A vetted value (``vet_clean``: the admitted model, the routes, which the proxy
        clips on every request) is answered by a set lookup."""
        if len(text) <= self._clean_max and text in self._clean:
            return False
        for key, group in self._anchor_groups:
            if key in text:
                for anchor in group:
                    if anchor in text:
                        return True
        # Every case-insensitive anchor has underscores, which have no case variants.
        if len(text) >= _MIN_LOWER_ANCHOR and "_" in text:
            # casefold, not lower: (?i) also matches folded look-alikes such as 'ſ' for 's'.
            folded = text.casefold()
            return any(anchor in folded for anchor in _SHAPE_ANCHORS_LOWER)
        return False

    def find(self, text: str) -> list[Finding]:
        assert self._pattern is not None
        if not self.may_match(text):
            return []
        return [Finding(m.lastgroup or "secret", m.start(), m.end()) for m in self._pattern.finditer(text) if _valid(m)]

    def redact(self, text: str) -> str:
        if not self.may_match(text):
            return text
        return self.redact_flagged(text)

    def redact_flagged(self, text: str) -> str:
        """``redact`` for text ``may_match`` has already flagged (no second pre-check)."""
        assert self._pattern is not None
        return self._pattern.sub(lambda m: REDACTED if _valid(m) else m.group(), text)

    def clip(self, text: str, limit: int) -> str:
        """``text`` redacted, then cut to ``limit`` characters. Never the other way round:
        a cut made first can split a secret so that no form of it matches any more, and
        31 of its 32 characters would then pass through unredacted. A vetted value (the
        proxy clips the path and both models on every request) is answered at once."""
        if len(text) <= self._clean_max and len(text) <= limit and text in self._clean:
            return text
        return clip(text, limit, self)

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
        for key, group in self._json_anchor_groups:
            if key in blob:
                for anchor in group:
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


def clip(text: str, limit: int, redactor: Redactor | None = None) -> str:
    """A value bounded to ``limit`` characters without leaking part of a secret: with a
    redactor, redacted first and cut after; without one (code that has none at hand), a
    value too long is dropped whole for a marker, never cut, so the full value (or
    nothing) reaches the redaction downstream."""
    if redactor is not None:
        text = redactor.redact(text)
    if len(text) <= limit:
        return text
    if redactor is not None:
        return text[:limit]
    return f"[{len(text)} characters, too long to record]"


def head_lines(text: str, limit: int) -> str:
    """At most ``limit`` characters from the start of ``text``, ending after a line
    break: a partial last line is dropped, not cut. For output too large to redact in
    one piece later: no secret value holds a line break (the proxy refuses a backend key
    with one, extra secrets are one per line), so whole lines hold whole secrets, which
    redaction then removes, and no prefix of one survives."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[:cut.rfind("\n") + 1]


def tail_lines(text: str, limit: int) -> str:
    """At most ``limit`` characters from the end of ``text``, starting at a line start:
    the mirror of :func:`head_lines`."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    return cut[cut.find("\n") + 1:] if "\n" in cut else ""


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
        flagged = self.redactor.may_match(message)
        record.msg, record.args = escape_controls(self.redactor.redact_flagged(message) if flagged else message), None
        # Fields passed with ``extra=`` (an access line's) reach a JSON formatter as they
        # are: they are redacted here too, after one pre-check over all of them. That
        # check is already done when each of them stands verbatim in a message the
        # pre-check passed (an access line's fields are its message's values): the
        # pre-check looks for anchors, and an anchor in a field is then in the message.
        extras = [(k, v) for k, v in record.__dict__.items() if type(v) is str and k not in _RECORD_ATTRS]
        if extras and (flagged or not all(v in message for _, v in extras)) \
                and self.redactor.may_match("\x00".join(v for _, v in extras)):
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
