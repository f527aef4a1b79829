"""A harness run whose backend is the REAL llama.cpp engine (tiny random-weight model).

The admission names the tiny model, never qwen3.6-35b-a3b: a report must not claim a
model that did not serve the run. Random weights cannot solve the fixture, so the
expected verdict is `fail` on the work itself while every proof field holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.verify import verify_run
from proxy.settings import ENV_BASE_URL
from tests.engine.conftest import ALIAS, LlamaEngine
from tests.harness_support import ADMISSION, base_env, reason_codes, reference_profile, report_of, run, write_artifacts

PROVIDER = "llama-cpp-engine-test"
# What may fail when a model with random weights does the work; nothing about proof.
WORK_FAILURES = {"case_exit_nonzero", "case_made_no_commit", "acceptance_tests_failed", "acceptance_tests_not_run"}


def test_harness_run_on_the_real_engine_fails_on_the_work_with_every_proof_field_true(
        tmp_path: Path, llama_engine: LlamaEngine) -> None:
    arts = write_artifacts(tmp_path / "in", admission={**ADMISSION, "provider": PROVIDER, "model": ALIAS})
    env = {**base_env(arts), ENV_BASE_URL: llama_engine.base_url}
    command = [sys.executable, "-m", "harness.reference_agent", "--task-file", "{task_file}", "--workdir",
               "{workdir}", "--max-tokens", "32", "--max-steps", "3", "--request-timeout", "60"]
    profile = reference_profile(command=command, provider=PROVIDER, model=ALIAS, timeout_s=120)
    before = len(llama_engine.access_lines())
    outcome = run(profile.model_copy(update={"fixture": "r2-bugfix-pagination"}), env, tmp_path / "runs",
                  backend="external")

    report = report_of(outcome.run_dir)
    assert report.status == "fail" and outcome.status == "fail"
    assert reason_codes(report) and reason_codes(report) <= WORK_FAILURES, report.reasons
    assert report.tests_passed is False
    # Every proof field: the provider and model that served, through admitted requests only.
    assert report.evidence_grade == "real"
    assert (report.case_model_provider, report.case_model, report.case_model_admission_status) == (
        PROVIDER, ALIAS, "candidate")
    assert report.case_runtime_bridge_provider == "openai"
    assert report.admitted_requests >= 1
    assert report.external_fallback.used is False and report.served_model_mismatches == 0
    assert report.required_events_passed and report.chains.events_ok and report.chains.evidence_ok
    assert report.secret_scan.clean
    assert report.digests.admission_sha256_before == report.digests.admission_sha256_after
    # The engine's own access log saw the run's model requests.
    assert len(llama_engine.access_lines()) >= before + report.admitted_requests
    assert verify_run(outcome.run_dir, admission_path=arts.admission).ok
