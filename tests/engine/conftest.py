"""The `engine` tier: a REAL llama.cpp server (llama-cpp-python) on a tiny random-weight
model generated at test time. Nothing here is skipped silently: if the engine cannot be
imported or started, the fixture fails and names the fix."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.tiny_model import write_tiny_model

ALIAS = "tiny-engine-model"
# Room for the harness fixtures' task prompts (about 1,900 byte-level tokens for r2).
N_CTX = 4096
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.engine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaEngine:
    """One llama_cpp.server process on 127.0.0.1; restartable on the same port."""

    def __init__(self, model_path: Path, log_path: Path, port: int, n_ctx: int = N_CTX) -> None:
        self.model_path, self.log_path, self.port, self.n_ctx = model_path, log_path, port, n_ctx
        self.model_alias = ALIAS
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, wait: bool = True) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"llama.cpp server not ready in {timeout_s}s: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[str]:
        """Requests the engine itself logged (uvicorn access log): the proof of what reached it."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if '"POST /v1/' in line]


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
