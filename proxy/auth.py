"""Who is Case: the proxy token, wherever a client may carry it, and the bound on
records of traffic that does not carry it (issue 18).

Any local process can reach the proxy's port. A request without the token is not
Case's: it gets its own outcome (``unauthenticated``), never counts as a fallback
attempt, and its records are rate-limited so a loop cannot fill the disk. Case carries
the token as ``Authorization: Bearer`` (the OpenAI SDK), ``x-api-key`` (the Anthropic
SDK, should Case's Anthropic runtime be pointed here) or, as a forward-proxy client,
``Proxy-Authorization`` (Basic with the token as password, which clients send when the
proxy URL is ``http://case:<token>@host:port``, or Bearer). Pure functions and one small
stateful bucket; no socket.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass

from .codes import ErrorCode

# Unauthenticated records: a burst of this many, then one per second; the rest are
# counted (case_proxy_unauthenticated_records_suppressed_total) and summed into the
# next record written (``unauthenticated_suppressed``).
UNAUTHENTICATED_BURST = 20
UNAUTHENTICATED_PER_S = 1.0


def _scheme_value(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return (scheme.lower(), value) if value else None


def presented_tokens(headers: Mapping[str, str]) -> list[str]:
    """Every credential the request carries that could be the proxy token."""
    out: list[str] = []
    auth = _scheme_value(headers.get("Authorization"))
    if auth is not None and auth[0] == "bearer":
        out.append(auth[1])
    api_key = (headers.get("x-api-key") or "").strip()
    if api_key:
        out.append(api_key)
    proxy = _scheme_value(headers.get("Proxy-Authorization"))
    if proxy is not None:
        if proxy[0] == "bearer":
            out.append(proxy[1])
        elif proxy[0] == "basic":
            try:
                user_pass = b64decode(proxy[1], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                user_pass = ""
            _, sep, password = user_pass.partition(":")
            if sep and password:
                out.append(password)
    return out


@dataclass(frozen=True, slots=True)
class AuthResult:
    """``code`` is None when the token matched, else the error code to answer with."""

    code: ErrorCode | None

    @property
    def ok(self) -> bool:
        return self.code is None


_OK = AuthResult(None)


def authenticate(headers: Mapping[str, str], token: bytes, forward_proxy: bool) -> AuthResult:
    """Whether any credential the request carries is the proxy token (each compared in
    constant time). A forward-proxy request (CONNECT, absolute-form) without it gets
    ``proxy_auth_required`` (407, so a client with credentials in its proxy URL sends
    them); any other gets ``missing_token`` or ``invalid_token`` (401)."""
    auth = _scheme_value(headers.get("Authorization"))
    if auth is not None and auth[0] == "bearer" and hmac.compare_digest(auth[1].encode("utf-8", "surrogateescape"),
                                                                        token):
        return _OK  # the common case, without looking further
    presented = presented_tokens(headers)
    matched = False
    for value in presented:
        matched |= hmac.compare_digest(value.encode("utf-8", "surrogateescape"), token)
    if matched:
        return _OK
    if forward_proxy:
        return AuthResult(ErrorCode.PROXY_AUTH_REQUIRED)
    return AuthResult(ErrorCode.INVALID_TOKEN if presented else ErrorCode.MISSING_TOKEN)


class RecordBucket:
    """A token bucket for unauthenticated records: ``burst`` at once, then ``per_s``
    each second. Bounded state: two floats and a counter."""

    __slots__ = ("burst", "per_s", "_tokens", "_last", "suppressed")

    def __init__(self, burst: int = UNAUTHENTICATED_BURST, per_s: float = UNAUTHENTICATED_PER_S) -> None:
        self.burst, self.per_s = burst, per_s
        self._tokens = float(burst)
        self._last: float | None = None
        self.suppressed = 0  # records left out since the last one written

    def admit(self, now: float) -> bool:
        """Whether a record may be written at ``now`` (a monotonic clock); if not, it is
        counted in ``suppressed``."""
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_s)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """The count of records left out since the last written one, reset to 0."""
        n, self.suppressed = self.suppressed, 0
        return n
