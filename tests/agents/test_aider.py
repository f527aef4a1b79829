"""aider (PyPI `aider-chat`, unmodified) as Case: one message (the task file) inside the
bubblewrap sandbox through the proxy; the scripted backend (a TEST FIXTURE) answers in
aider's `whole` edit format (harness/fixtures/r1-string-slugify/session.aider.json) and
aider commits the edit itself."""

from __future__ import annotations

from pathlib import Path

from harness.verify import verify_run
from tests.harness_support import base_env, report_of, run, write_artifacts

from .conftest import agent_profile

# What aider reached for besides the proxy, measured: its update check (pypi.org) and
# LiteLLM's model price list (raw.githubusercontent.com), both through HTTPS_PROXY.
UPDATE_CHECK_HOST = "pypi.org"
PRICE_LIST_HOST = "raw.githubusercontent.com"


def test_aider_reaches_the_proxy_and_solves_the_fixture_in_the_sandbox(tmp_path: Path) -> None:
    profile = agent_profile("aider")
    outcome = run(profile, base_env(write_artifacts(tmp_path / "in")), tmp_path / "runs")
    report = report_of(outcome.run_dir)
    stdout = (outcome.run_dir / "case" / "stdout.log").read_text()[-3000:]
    assert verify_run(outcome.run_dir).ok  # a valid report, whatever the status
    assert report.admitted_requests >= 1 and report.external_fallback.used is False, (report.reasons, stdout)
    assert report.isolation is not None and report.isolation.kind == "bubblewrap"
    assert report.isolation.namespace_survivors == 0
    assert report.egress.hosts.get(UPDATE_CHECK_HOST, 0) >= 1, report.egress
    assert report.egress.hosts.get(PRICE_LIST_HOST, 0) >= 1, report.egress
    assert report.egress.provider_hosts == [] and report.egress.dns_provider_names == []
    # More than the issue asks of the second agent (measured): aider's own commit passes.
    assert outcome.status == "pass", (report.reasons, stdout)
    assert report.evidence_grade == "demo" and report.tests.committed and report.tests.passed
