"""A harness run whose backend is the REAL llama.cpp engine (tiny random-weight model).

The admission names the tiny model, never qwen3.6-35b-a3b: a report must not claim a
model that did not serve the run. Random weights cannot solve the fixture, so the
expected verdict is `fail` on the work itself while every proof field holds.
"""

from __future__ import annotations

from pathlib import Path

from tests.engine.conftest import LlamaEngine
from tests.engine_harness import run_on_engine_and_check_proof


def test_harness_run_on_the_real_engine_fails_on_the_work_with_every_proof_field_true(
        tmp_path: Path, llama_engine: LlamaEngine) -> None:
    report, new_lines = run_on_engine_and_check_proof(
        tmp_path, llama_engine, provider="llama-cpp-engine-test", fixture="r2-bugfix-pagination",
        request_timeout_s=60, timeout_s=120)
    # The engine's own access log saw the run's model requests.
    assert len(new_lines) >= report.admitted_requests
