"""One harness run against a REAL engine (llama.cpp or vLLM, tiny random-weight model).

Both engine tiers ask the same question: with a real engine behind the proxy, does every
proof field of the report hold even though random weights cannot do the work? The run
and the proof assertions live here once; each tier adds what its engine's own log shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.report import Report
from harness.verify import verify_run
from proxy.settings import ENV_API_KEY, ENV_BASE_URL
from tests.engine_server import EngineServer
from tests.harness_support import ADMISSION, base_env, reason_codes, reference_profile, report_of, run, write_artifacts

# What may fail when a model with random weights does the work; nothing about proof.
WORK_FAILURES = {"case_exit_nonzero", "case_made_no_commit", "acceptance_tests_failed", "acceptance_tests_not_run"}


def run_on_engine_and_check_proof(tmp_path: Path, engine: EngineServer, *, provider: str, fixture: str | None = None,
                                  request_timeout_s: int, timeout_s: int) -> tuple[Report, list[str]]:
    """Run the reference agent as Case through the proxy to ``engine``; assert the verdict
    is `fail` on the work alone with every proof field true. Returns the report and the
    engine's access-log lines written during the run."""
    model = engine.model_id
    arts = write_artifacts(tmp_path / "in", admission={**ADMISSION, "provider": provider, "model": model})
    env = {**base_env(arts), ENV_BASE_URL: engine.base_url}
    if engine.api_key:
        env[ENV_API_KEY] = engine.api_key
    command = [sys.executable, "-m", "harness.reference_agent", "--task-file", "{task_file}", "--workdir",
               "{workdir}", "--max-tokens", "32", "--max-steps", "3", "--request-timeout", str(request_timeout_s)]
    profile = reference_profile(command=command, provider=provider, model=model, timeout_s=timeout_s)
    if fixture:
        profile = profile.model_copy(update={"fixture": fixture})
    before = len(engine.access_lines())
    outcome = run(profile, env, tmp_path / "runs", backend="external")

    report = report_of(outcome.run_dir)
    assert report.status == "fail" and outcome.status == "fail"
    assert reason_codes(report) and reason_codes(report) <= WORK_FAILURES, report.reasons
    assert report.tests_passed is False
    # Every proof field: the provider and model that served, through admitted requests only.
    assert report.evidence_grade == "real"
    assert (report.case_model_provider, report.case_model, report.case_model_admission_status) == (
        provider, model, "candidate")
    assert report.case_runtime_bridge_provider == "openai"
    assert report.admitted_requests >= 1
    assert report.external_fallback.used is False and report.served_model_mismatches == 0
    assert report.required_events_passed and report.chains.events_ok and report.chains.evidence_ok
    assert report.secret_scan.clean  # the engine's key, if any, among the secrets scanned for
    assert report.digests.admission_sha256_before == report.digests.admission_sha256_after
    assert verify_run(outcome.run_dir, admission_path=arts.admission).ok
    return report, engine.access_lines()[before:]
