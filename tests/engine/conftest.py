"""The `engine` tier: a REAL llama.cpp server (llama-cpp-python) on a tiny random-weight
model generated at test time. Nothing here is skipped silently: if the engine cannot be
imported or started, the fixture fails and names the fix."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.tiny_model import write_tiny_model
from tests.engine_server import EngineServer, free_port

__all__ = ["ALIAS", "LlamaEngine", "free_port"]

ALIAS = "tiny-engine-model"
# Room for the harness fixtures' task prompts (about 1,900 byte-level tokens for r2).
N_CTX = 4096
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.engine)


class LlamaEngine(EngineServer):
    """One llama_cpp.server process on 127.0.0.1 (see tests.engine_server for the rest)."""

    name = "llama.cpp"

    def __init__(self, model_path: Path, log_path: Path, port: int, n_ctx: int = N_CTX) -> None:
        super().__init__(ALIAS, log_path, port)
        self.model_path, self.n_ctx = model_path, n_ctx
        self.model_alias = ALIAS

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--model_alias", ALIAS,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", "1"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("gguf") is None:
        pytest.fail("the gguf package is missing: run `make engine-deps`")
    return write_tiny_model(tmp_path_factory.mktemp("engine") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_engine(tiny_model: Path) -> Iterator[LlamaEngine]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is missing: run `make engine-deps` (the engine tier never skips)")
    engine = LlamaEngine(tiny_model, tiny_model.parent / "engine.log", free_port())
    engine.start()
    yield engine
    engine.stop()
