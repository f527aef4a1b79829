"""A harness run whose backend is REAL vLLM (tiny random-weight model, CPU).

The admission names the tiny model, never qwen3.6-35b-a3b: a report must not claim a
model that did not serve the run. Random weights cannot solve the fixture, so the
expected verdict is `fail` on the work itself while every proof field holds.
"""

from __future__ import annotations

from pathlib import Path

from tests.engine_harness import run_on_engine_and_check_proof
from tests.vllm.conftest import VllmEngine


def test_harness_run_on_real_vllm_fails_on_the_work_with_every_proof_field_true(
        tmp_path: Path, vllm_engine: VllmEngine) -> None:
    report, new_lines = run_on_engine_and_check_proof(
        tmp_path, vllm_engine, provider="vllm-engine-test", request_timeout_s=120, timeout_s=300)
    # vLLM's own access log saw the run's model requests, each answered 200.
    assert len([line for line in new_lines if " 200" in line]) >= report.admitted_requests
