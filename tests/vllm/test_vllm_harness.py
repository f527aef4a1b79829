"""A harness run whose backend is REAL vLLM (tiny random-weight model, CPU).

The admission names the tiny model, never qwen3.6-35b-a3b: a report must not claim a
model that did not serve the run. Random weights cannot solve the fixture, so the
expected verdict is `fail` on the work itself while every proof field holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.verify import verify_run
from proxy.settings import ENV_API_KEY, ENV_BASE_URL
from tests.harness_support import ADMISSION, base_env, reason_codes, reference_profile, report_of, run, write_artifacts
from tests.vllm.conftest import SERVED, VllmEngine

PROVIDER = "vllm-engine-test"
# What may fail when a model with random weights does the work; nothing about proof.
WORK_FAILURES = {"case_exit_nonzero", "case_made_no_commit", "acceptance_tests_failed", "acceptance_tests_not_run"}


def test_harness_run_on_real_vllm_fails_on_the_work_with_every_proof_field_true(
        tmp_path: Path, vllm_engine: VllmEngine) -> None:
    arts = write_artifacts(tmp_path / "in", admission={**ADMISSION, "provider": PROVIDER, "model": SERVED})
    env = {**base_env(arts), ENV_BASE_URL: vllm_engine.base_url, ENV_API_KEY: vllm_engine.api_key or ""}
    command = [sys.executable, "-m", "harness.reference_agent", "--task-file", "{task_file}", "--workdir",
               "{workdir}", "--max-tokens", "32", "--max-steps", "3", "--request-timeout", "120"]
    profile = reference_profile(command=command, provider=PROVIDER, model=SERVED, timeout_s=300)
    before = len(vllm_engine.access_lines())
    outcome = run(profile, env, tmp_path / "runs", backend="external")

    report = report_of(outcome.run_dir)
    assert report.status == "fail" and outcome.status == "fail"
    assert reason_codes(report) and reason_codes(report) <= WORK_FAILURES, report.reasons
    assert report.tests_passed is False
    # Every proof field: the provider and model that served, through admitted requests only.
    assert report.evidence_grade == "real"
    assert (report.case_model_provider, report.case_model, report.case_model_admission_status) == (
        PROVIDER, SERVED, "candidate")
    assert report.case_runtime_bridge_provider == "openai"
    assert report.admitted_requests >= 1
    assert report.external_fallback.used is False and report.served_model_mismatches == 0
    assert report.required_events_passed and report.chains.events_ok and report.chains.evidence_ok
    assert report.secret_scan.clean  # vLLM's key among the secrets scanned for
    assert report.digests.admission_sha256_before == report.digests.admission_sha256_after
    # vLLM's own access log saw the run's model requests, each answered 200.
    new = vllm_engine.access_lines()[before:]
    assert len([line for line in new if " 200" in line]) >= report.admitted_requests
    assert verify_run(outcome.run_dir, admission_path=arts.admission).ok
