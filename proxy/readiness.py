"""Identity at start-up and after: the backend must list the admitted model.

Until it does, /readyz answers 503 and requests are refused with ``backend_not_ready``.
The check repeats for the life of the proxy, so a backend that swaps its model (or goes
away) stops receiving traffic instead of silently serving something else. It pauses
while requests are in flight: single-slot engines (llama-cpp-python's server by default)
abort a running stream when any other request arrives, so a probe would cut the very
traffic it vouches for; meanwhile every response's own model is checked anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .upstream import BodyTooLarge, Upstream


async def cancel_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background watch (readiness, authority) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

log = logging.getLogger("case_proxy.readiness")


@dataclass(slots=True)
class ReadinessState:
    ready: bool = False
    reason: str = "not checked yet"
    backend_models: tuple[str, ...] = ()
    owned_by: str | None = None
    checks: int = 0


def listed_models(payload: object) -> tuple[list[str], dict[str, str]]:
    """Model ids (and their owners) from an OpenAI `/v1/models` list; pure for tests."""
    ids: list[str] = []
    owners: dict[str, str] = {}
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        for item in payload["data"]:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                ids.append(item["id"])
                if isinstance(item.get("owned_by"), str):
                    owners[item["id"]] = item["owned_by"]
    return ids, owners


# A model listing is a few kilobytes even with many adapters; the probe never holds more.
MAX_LISTING_BYTES = 4 * 1024 * 1024


class Readiness:
    def __init__(self, upstream: Upstream, admitted_model: str, interval_s: float, timeout_s: float,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.state = ReadinessState()
        self._busy = busy
        self._upstream = upstream
        self._model = admitted_model
        self._interval = interval_s
        self._timeout = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.on_change: list = []

    async def check_once(self) -> ReadinessState:
        was = self.state.ready
        try:
            status, payload = await self._upstream.get_json("/v1/models", self._timeout, MAX_LISTING_BYTES)
        except BodyTooLarge:
            self._set(False, f"backend /v1/models answer is larger than {MAX_LISTING_BYTES} bytes", (), None)
        except (TimeoutError, OSError, Exception) as exc:  # noqa: BLE001 - any failure means not ready
            self._set(False, f"backend /v1/models unreachable ({type(exc).__name__})", (), None)
        else:
            if status != 200:
                self._set(False, f"backend /v1/models answered HTTP {status}", (), None)
            else:
                ids, owners = listed_models(payload)
                if self._model in ids:
                    self._set(True, "backend lists the admitted model", tuple(ids), owners.get(self._model))
                else:
                    self._set(False, "backend does not list the admitted model", tuple(ids), None)
        self.state.checks += 1
        if was != self.state.ready:
            log.info("backend readiness changed: ready=%s (%s)", self.state.ready, self.state.reason)
            for cb in self.on_change:
                cb(self.state.ready)
        return self.state

    def _set(self, ready: bool, reason: str, models: tuple[str, ...], owner: str | None) -> None:
        self.state.ready, self.state.reason = ready, reason
        self.state.backend_models, self.state.owned_by = models, owner

    async def _loop(self) -> None:
        while True:
            if not (self.state.ready and self._busy()):
                await self.check_once()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="case-proxy-readiness")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
