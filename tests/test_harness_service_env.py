"""The proxy's service variables (CASE_PROXY_*) must not reach the proxy a harness run
starts: an operator's shell or a service environment that switches evidence off, shrinks
the limits or asks for workers would otherwise weaken, or fake, a run's proof.

Runs use the scripted backend (a TEST FIXTURE), the real proxy and the reference agent.
"""

from __future__ import annotations

import json
from pathlib import Path

from proxy.settings import ENV_SETTINGS
from tests.harness_support import base_env, reference_profile, report_of, run, write_artifacts

HOSTILE = {
    "CASE_PROXY_EVIDENCE_ENABLED": "false",
    "CASE_PROXY_METRICS_ENABLED": "false",
    "CASE_PROXY_WORKERS": "3",
    "CASE_PROXY_MAX_BODY_BYTES": "1024",
    "CASE_PROXY_ALLOW_HOSTS": "models.example.com",
    "CASE_PROXY_HOST": "0.0.0.0",
    "CASE_PROXY_LOG_LEVEL": "ERROR",
}


def test_service_variables_do_not_reach_a_runs_proxy(tmp_path: Path) -> None:
    assert set(HOSTILE) - {"CASE_PROXY_LOG_LEVEL"} <= set(ENV_SETTINGS.values())
    env = {**base_env(write_artifacts(tmp_path / "artifacts")), **HOSTILE}
    outcome = run(reference_profile(), env, tmp_path / "runs")
    report = report_of(outcome.run_dir)
    assert outcome.status == "pass", [r.model_dump() for r in report.reasons]
    proxy_dir = outcome.run_dir / "proxy"
    # One chain, recording every model request: evidence was on, one worker.
    assert sorted(p.name for p in proxy_dir.glob("evidence*.jsonl")) == ["evidence.jsonl"]
    records = [json.loads(line) for line in (proxy_dir / "evidence.jsonl").read_text().splitlines()]
    assert report.admitted_requests > 0
    assert sum(1 for r in records if r.get("kind", "request") == "request") >= report.admitted_requests
    assert "case_proxy_requests_total" in (proxy_dir / "metrics.prom").read_text()
