"""The proxy's side of the backend: one pool of keep-alive connections to the pinned
target (``proxy.backend_http``), the backend key from configuration, and the mapping of
failures to error codes.

Every connection goes to the pinned target, each resolved address checked again (no DNS
rebinding); redirects are never followed, and bodies are passed on without decoding so
bytes reach the client as the backend sent them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from .backend_http import (
    AddressRefused,
    BackendError,
    BackendPool,
    BackendResponse,
    BackendUnreachable,
    BodyTooLarge,
)
from .codes import ErrorCode, UpstreamErrorKind
from .settings import ProxySettings
from .upstream_policy import UpstreamTarget

__all__ = ["AddressRefused", "BackendError", "BackendResponse", "BodyTooLarge", "Upstream", "upstream_error_kind"]

# Sent upstream only when the client sent no User-Agent of its own.
USER_AGENT = "case-proxy"


class Upstream:
    """One connection pool for the life of the proxy."""

    def __init__(self, target: UpstreamTarget, settings: ProxySettings) -> None:
        self.target = target
        self._settings = settings
        key = settings.backend_api_key.get_secret_value() if settings.backend_api_key else None
        self._auth: dict[str, str] = {"Authorization": f"Bearer {key}"} if key else {}
        self._pool: BackendPool | None = None

    async def start(self) -> None:
        self._pool = BackendPool(self.target, self._settings.limits.connect_timeout_s)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> BackendPool:
        if self._pool is None:
            raise RuntimeError("upstream client not started")
        return self._pool

    def headers(self, extra: dict[str, str]) -> dict[str, str]:
        """Client headers (already filtered, see ``forwardable_request_headers``) plus the
        backend key from configuration, identity encoding, and a User-Agent when the
        client sent none."""
        out = dict(extra)
        out.update(self._auth)
        out["Accept-Encoding"] = "identity"
        if "User-Agent" not in out:
            out["User-Agent"] = USER_AGENT
        return out

    async def post(self, path: str, body: bytes, headers: dict[str, str], head_timeout_s: float) -> BackendResponse:
        return await self.pool.request("POST", path, self.headers(headers).items(), body, head_timeout_s)

    async def get_json(self, path: str, timeout_s: float, limit: int) -> tuple[int, Any]:
        """(status, parsed JSON or None) of a GET, all of it within ``timeout_s``;
        BodyTooLarge for a body over ``limit`` bytes."""
        async with asyncio.timeout(timeout_s):
            resp = await self.pool.request("GET", path, self.headers({"Accept": "application/json"}).items())
            try:
                body = await resp.read(limit)
            except BaseException:
                resp.close()
                raise
            resp.release()
        if resp.status != 200:
            return resp.status, None
        try:
            return resp.status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return resp.status, None


def upstream_error_kind(exc: BaseException) -> tuple[UpstreamErrorKind, ErrorCode]:
    """(metric kind, error code) for a failure talking to the backend."""
    if isinstance(exc, AddressRefused):
        return UpstreamErrorKind.ADDRESS_REFUSED, ErrorCode.BACKEND_ADDRESS_REFUSED
    if isinstance(exc, TimeoutError):
        return UpstreamErrorKind.TIMEOUT, ErrorCode.BACKEND_TIMEOUT
    if isinstance(exc, (BackendUnreachable, ConnectionRefusedError)):
        return UpstreamErrorKind.CONNECT, ErrorCode.BACKEND_UNREACHABLE
    return UpstreamErrorKind.PROTOCOL, ErrorCode.BACKEND_PROTOCOL_ERROR
