"""mini-swe-agent (PyPI, unmodified) as Case: it solves r1-string-slugify inside the
bubblewrap sandbox through the proxy, the scripted backend (a TEST FIXTURE) playing the
model in mini-swe-agent's own text-based action format
(harness/fixtures/r1-string-slugify/session.mini-swe-agent.json)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.events import read_events
from harness.fixture_catalog import FIXTURES_DIR
from harness.verify import verify_run
from tests.harness_support import base_env, report_of, run, write_artifacts

from .conftest import agent_profile

SESSION = FIXTURES_DIR / "r1-string-slugify" / "session.mini-swe-agent.json"
PRICE_LIST_HOST = "raw.githubusercontent.com"  # LiteLLM's model_prices_and_context_window.json


def test_mini_swe_agent_solves_the_fixture_in_the_sandbox(tmp_path: Path) -> None:
    profile = agent_profile("mini-swe-agent")
    arts = write_artifacts(tmp_path / "in")
    outcome = run(profile, base_env(arts), tmp_path / "runs")
    report = report_of(outcome.run_dir)
    stderr = (outcome.run_dir / "case" / "stderr.log").read_text()[-3000:]
    assert outcome.status == "pass", (report.reasons, stderr)
    assert report.evidence_grade == "demo"
    assert report.tests_passed and report.tests.total > 0
    iso = report.isolation
    assert iso is not None and iso.kind == "bubblewrap" and iso.namespace_survivors == 0
    assert any(p.endswith("/mini-swe-agent") for p in iso.ro_paths)
    # Every turn of the session went through the proxy as an admitted request, one per step.
    steps = json.loads(SESSION.read_text())["steps"]
    assert report.admitted_requests == len(steps)
    assert report.external_fallback.used is False
    # What the agent reached for besides the proxy is in the report and did not fail the
    # run: LiteLLM (inside mini-swe-agent) fetches its model price list at import, through
    # HTTPS_PROXY, which the proxy refuses and records.
    assert report.egress.hosts.get(PRICE_LIST_HOST, 0) >= 1, report.egress
    assert report.egress.provider_hosts == [] and report.egress.dns_provider_names == []
    # The commit is mini-swe-agent's: the session's last command is the documented
    # completion command, and the commit the acceptance tests ran on is the session's.
    _, events = read_events(outcome.run_dir / "events.jsonl")
    tests_run = next(e for e in events if e["event"] == "fixture_tests_run")
    assert tests_run["committed"] and tests_run["passed"]
    assert verify_run(outcome.run_dir).ok
