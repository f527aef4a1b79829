"""A backend test fixture that sends chosen bytes: no model behind it, so nothing it
sends is evidence about a real model. Stream tests use it to feed the proxy exactly the
events (and the reads) a hostile or broken backend would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.proxy_support import ADMITTED, serve_app


class HostileBackend:
    """Serves the admitted model on /v1/models (so the proxy is ready) and answers every
    generation with ``body`` as an event stream, byte for byte, then with ``parts``, each
    written on its own ``gap_s`` after the last (so each reaches the proxy as its own read)."""

    def __init__(self) -> None:
        self.body = b""
        self.parts: list[bytes] = []
        self.gap_s = 0.05
        self.content_type = "text/event-stream"
        self.headers: dict[str, str] = {}  # more response headers
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def models(request: web.Request) -> web.Response:
            models = [{"id": ADMITTED, "object": "model", "owned_by": "t"}]
            return web.json_response({"object": "list", "data": models})

        async def generate(request: web.Request) -> web.StreamResponse:
            await request.read()
            resp = web.StreamResponse(headers={"Content-Type": self.content_type, **self.headers})
            await resp.prepare(request)
            await resp.write(self.body)
            for part in self.parts:
                await asyncio.sleep(self.gap_s)
                await resp.write(part)
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", generate)
        app.router.add_post("/v1/responses", generate)
        self._runner, port = await serve_app(app)
        self.url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def hostile() -> AsyncIterator[HostileBackend]:
    backend = HostileBackend()
    await backend.start()
    yield backend
    await backend.stop()
