"""Shared fixtures. The scripted backend is a TEST FIXTURE standing in for an
OpenAI-compatible engine (no GPU here); nothing it returns is evidence about a model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from harness.scripted_backend import ScriptedBackend


@pytest.fixture
async def scripted_backend() -> AsyncIterator[ScriptedBackend]:
    backend = ScriptedBackend()
    await backend.start()
    yield backend
    await backend.stop()
