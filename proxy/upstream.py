"""The pooled client to the one configured backend.

Every connection goes to the pinned target; names are resolved through a resolver that
re-checks each address (no DNS rebinding onto the cloud), redirects are never followed,
and responses are read without decompression so bytes reach the client as the backend
sent them.
"""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
from yarl import URL
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .settings import ProxySettings
from .upstream_policy import UpstreamTarget, check_resolved_address


# Sent upstream only when the client sent no User-Agent of its own.
USER_AGENT = "case-proxy"


class AddressRefused(OSError):
    """The backend name resolved only to addresses the pin does not allow."""


class PinnedResolver(AbstractResolver):
    def __init__(self, target: UpstreamTarget) -> None:
        self._target = target
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host != self._target.host:
            raise AddressRefused("connection to a host other than the configured backend refused")
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if check_resolved_address(self._target, r["host"])]
        if not allowed:
            raise AddressRefused("the backend name resolved to an address outside the upstream pin")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class Upstream:
    """One ClientSession for the life of the proxy (pooled keep-alive connections)."""

    def __init__(self, target: UpstreamTarget, settings: ProxySettings) -> None:
        self.target = target
        self._settings = settings
        key = settings.backend_api_key.get_secret_value() if settings.backend_api_key else None
        self._auth: dict[str, str] = {"Authorization": f"Bearer {key}"} if key else {}
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        limits = self._settings.limits
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, resolver=PinnedResolver(self.target), ttl_dns_cache=10,
            use_dns_cache=True, keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=limits.connect_timeout_s, sock_read=None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream client not started")
        return self._session

    def url(self, path: str) -> URL:
        """The parsed URL for a path, kept: forwarded paths are a handful, and parsing
        one per request is measurable. Bounded in case that ever stops being true."""
        url = self._urls.get(path)
        if url is None:
            url = URL(self.target.url(path))
            if len(self._urls) < 64:
                self._urls[path] = url
        return url

    def headers(self, extra: dict[str, str]) -> dict[str, str]:
        """Client headers (already filtered) plus the backend key from configuration.
        Setting Accept-Encoding and User-Agent here (rather than ``skip_auto_headers``,
        which aiohttp turns into a header-set copy per request) keeps aiohttp from adding
        its own."""
        out = dict(extra)
        out.update(self._auth)
        out["Accept-Encoding"] = "identity"
        if "User-Agent" not in out:
            out["User-Agent"] = USER_AGENT
        return out

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        return await self.session.post(self.url(path), data=body, headers=self.headers(headers), allow_redirects=False)

    async def get_json(self, path: str, timeout_s: float) -> tuple[int, Any]:
        async with self.session.get(
            self.url(path), headers=self.headers({"Accept": "application/json"}), allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status != 200:
                return resp.status, None
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, None


def upstream_error_kind(exc: BaseException) -> tuple[str, str]:
    """(metric kind, error code) for a failure talking to the backend."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, AddressRefused):
        return "address_refused", "backend_address_refused"
    if isinstance(exc, AddressRefused):
        return "address_refused", "backend_address_refused"
    if isinstance(exc, TimeoutError):
        return "timeout", "backend_timeout"
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return "connect", "backend_unreachable"
    return "protocol", "backend_protocol_error"
