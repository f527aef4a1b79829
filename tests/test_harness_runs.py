"""Whole harness runs: gates that block before Case starts, reports only evidence can
make pass, secrets, egress. The backend is the scripted TEST FIXTURE (no GPU here); the
proxy, git, the acceptance tests and Case-like programs are real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import harness.run as run_mod
from harness.demo import run_demo
from harness.profile import ConfigTemplate
from harness.report import Report, collect_inputs, compute_report
from proxy.settings import ENV_ADMISSION_FILE, ENV_API_KEY, ENV_BASE_URL, ENV_DECISION_FILE

from .harness_support import (
    ADMISSION,
    DECISION,
    base_env,
    events_of,
    reason_codes,
    reference_profile,
    report_of,
    rogue_profile,
    run,
    write_artifacts,
)

KNOWN_TOKEN = "run-token-for-tests-0123456789abcdefABCDEF"


class _Sentinel:
    """The file the sentinel Case writes into its repository (the only place a sandboxed
    Case can write that outlives it), in any run under ``runs``."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs

    def exists(self) -> bool:
        return any(self.runs.glob("*/repo/SENTINEL"))


def _sentinel_profile(tmp_path: Path, **changes):  # type: ignore[no-untyped-def]
    return rogue_profile("sentinel", "{workdir}/SENTINEL", **changes), _Sentinel(tmp_path / "runs")


NEGATIVE = [
    # (name, expected code, backend, env change, profile change, artifact change)
    ("base URL unset", "local_adapter_config_missing", "external", lambda e: e.pop(ENV_BASE_URL, None), {}, None),
    ("base URL not a URL", "local_adapter_config_missing", "external",
     lambda e: e.__setitem__(ENV_BASE_URL, "not a url"), {}, None),
    ("external upstream", "external_upstream", "external",
     lambda e: e.__setitem__(ENV_BASE_URL, "https://api.anthropic.com/v1"), {}, None),
    ("admission unset", "admission_missing", "scripted", lambda e: e.pop(ENV_ADMISSION_FILE), {}, None),
    ("decision unset", "decision_record_missing", "scripted", lambda e: e.pop(ENV_DECISION_FILE), {}, None),
    ("admission revoked", "admission_status_blocks", "scripted", None, {},
     ({}, {"admission_status": "revoked"})),
    ("decision not local_provider_required", "decision_not_local_provider_required", "scripted", None, {},
     ({"decision_status": "external_provider_allowed"}, {})),
    ("provider class", "provider_class_not_local_case_compatible", "scripted", None, {},
     ({"provider_class": "external_api"}, {"provider_class": "external_api"})),
    ("decision and admission disagree", "admission_mismatch", "scripted", None, {},
     ({}, {"work_item": "CTO-WORK-999"})),
    ("profile asks claude", "admission_mismatch_model", "scripted", None, {"model": "claude-sonnet-4-6"}, None),
    ("profile provider differs", "admission_mismatch_provider", "scripted", None, {"provider": "anthropic"}, None),
    ("claude as fallback", "unadmitted_model_configured", "scripted", None,
     {"fallback_models": ["claude-sonnet-4-6"]}, None),
    # "unsandboxed": only a Case that could read the harness's environment is blocked by
    # what is there (docs/gates.md); the sandboxed counterpart is the test after this one.
    ("anthropic key in env, unsandboxed", "external_fallback_configured", "scripted",
     lambda e: e.__setitem__("ANTHROPIC_API_KEY", "sk-ant-not-real-000000000000000000"), {}, None),
    ("env_allow passes ANTHROPIC_BASE_URL", "external_fallback_configured", "scripted", None,
     {"env_allow": ["PATH", "ANTHROPIC_BASE_URL"]}, None),
    ("OPENAI_BASE_URL elsewhere, unsandboxed", "external_fallback_configured", "scripted",
     lambda e: e.__setitem__("OPENAI_BASE_URL", "https://api.openai.com/v1"), {}, None),
    ("env_allow passes the backend URL variable", "env_allow_harness_variable", "scripted", None,
     {"env_allow": ["PATH", ENV_BASE_URL]}, None),
    ("env_allow passes a copy of the backend key", "env_allow_secret_value", "scripted",
     lambda e: e.update({ENV_API_KEY: "backend-key-value-0123456789", "TOOL_SETTING": "backend-key-value-0123456789"}),
     {"env_allow": ["PATH", "TOOL_SETTING"]}, None),
    ("env_allow passes an endpoint variable", "endpoint_variable_to_case", "scripted",
     lambda e: e.__setitem__("MY_LLM_BASE_URL", "http://127.0.0.1:9/v1"), {"env_allow": ["PATH", "MY_LLM_BASE_URL"]},
     None),
    ("env_allow passes an AWS key", "external_fallback_configured", "scripted",
     lambda e: e.__setitem__("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000"), {"env_allow": ["PATH", "AWS_ACCESS_KEY_ID"]},
     None),
    ("config template names gpt-4o", "unadmitted_model_configured", "scripted", None,
     {"config_template": ConfigTemplate(file="agent.toml", content='model = "gpt-4o"\n')}, None),
    ("admission alias claude", "admission_alias_external", "scripted", None, {},
     ({}, {"aliases": ["claude-sonnet-4-6"]})),
]


@pytest.mark.parametrize("name,code,backend,env_change,profile_change,artifact_change", NEGATIVE,
                         ids=[n[0] for n in NEGATIVE])
def test_each_gate_blocks_before_case_starts(tmp_path: Path, name, code, backend, env_change, profile_change,  # type: ignore[no-untyped-def]
                                             artifact_change) -> None:
    decision, admission = artifact_change or ({}, {})
    arts = write_artifacts(tmp_path / "in", {**DECISION, **decision}, {**ADMISSION, **admission})
    before = arts.snapshot()
    env = base_env(arts)
    if env_change:
        env_change(env)
    profile, sentinel = _sentinel_profile(tmp_path, **profile_change)
    outcome = run(profile, env, tmp_path / "runs", backend=backend, sandbox="unsandboxed" not in name)
    assert outcome.status == "blocked" and outcome.exit_code == 3
    names = events_of(outcome.run_dir)
    assert "case_process_started" not in names and "gate_blocked" in names
    assert names[-1] == "report_written"
    assert not sentinel.exists(), "the Case command ran although a gate blocked"
    report = report_of(outcome.run_dir)
    assert report.status == "blocked" and code in reason_codes(report)
    assert arts.snapshot() == before
    assert report.digests.decision_sha256_before == report.digests.decision_sha256_after


def test_a_provider_key_in_the_operators_shell_does_not_reach_a_sandboxed_case(tmp_path: Path) -> None:
    """The other half of docs/gates.md's rule: a sandboxed Case cannot read the
    harness's environment or the operator's HOME, so a provider key and a credential file
    there do not block; Case starts and its environment holds neither."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_access_key_id = NOTAREALKEY\n")
    arts = write_artifacts(tmp_path / "in")
    env = {**base_env(arts), "HOME": str(home), "ANTHROPIC_API_KEY": "sk-ant-not-real-000000000000000000",
           "OPENAI_BASE_URL": "https://api.openai.com/v1"}
    profile = rogue_profile("read-environ")
    outcome = run(profile, env, tmp_path / "runs")
    names = events_of(outcome.run_dir)
    assert "gate_blocked" not in names and "case_process_started" in names
    report = report_of(outcome.run_dir)
    assert not {"external_fallback_configured", "external_credential_file"} & reason_codes(report)
    # rogue_case's read-environ prints FOUND for ANTHROPIC_API_KEY= in any /proc/*/environ
    # it can read, its own included.
    assert "FOUND" not in (outcome.run_dir / "case" / "stdout.log").read_text()


def test_the_sentinel_does_appear_when_no_gate_blocks(tmp_path: Path) -> None:
    """The negative control: the same command does run (and leaves its sentinel) when
    every gate holds, so its absence above means something."""
    arts = write_artifacts(tmp_path / "in")
    profile, sentinel = _sentinel_profile(tmp_path)
    outcome = run(profile, base_env(arts), tmp_path / "runs")
    assert sentinel.exists()
    assert "case_process_started" in events_of(outcome.run_dir)
    # It made no model request and no commit: evidence, not the exit code, decides.
    assert outcome.status == "fail"
    assert {"no_admitted_requests", "case_made_no_commit"} <= reason_codes(report_of(outcome.run_dir))


def test_every_gate_failure_is_reported_not_only_the_first(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in", {**DECISION, "decision_status": "nope"},
                           {**ADMISSION, "admission_status": "rejected"})
    env = base_env(arts)
    env["ANTHROPIC_API_KEY"] = "sk-ant-not-real-000000000000000000"
    profile, _ = _sentinel_profile(tmp_path, model="claude-sonnet-4-6")
    report = report_of(run(profile, env, tmp_path / "runs", sandbox=False).run_dir)
    assert {"decision_not_local_provider_required", "admission_status_blocks", "admission_mismatch_model",
            "external_fallback_configured"} <= reason_codes(report)


def test_secret_in_case_argv_blocks(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in")
    env = base_env(arts)
    env[ENV_API_KEY] = "backend-key-value-0123456789"
    profile, sentinel = _sentinel_profile(tmp_path)
    profile = profile.model_copy(update={"case": profile.case.model_copy(
        update={"command": [*profile.case.command, "--key=backend-key-value-0123456789"]})})
    outcome = run(profile, env, tmp_path / "runs")
    assert outcome.status == "blocked" and "secret_in_argv" in reason_codes(report_of(outcome.run_dir))
    assert not sentinel.exists()
    # The blocked run's files do not carry the value either.
    for path in outcome.run_dir.rglob("*"):
        if path.is_file():
            assert b"backend-key-value-0123456789" not in path.read_bytes(), path


async def test_backend_not_serving_the_admitted_model_blocks(tmp_path: Path, scripted_backend) -> None:  # type: ignore[no-untyped-def]
    scripted_backend.model = "some-other-model"
    arts = write_artifacts(tmp_path / "in")
    env = base_env(arts)
    env[ENV_BASE_URL] = scripted_backend.base_url
    profile, sentinel = _sentinel_profile(tmp_path)
    # The in-process backend needs this event loop free while the (blocking) run goes on.
    outcome = await asyncio.to_thread(run, profile, env, tmp_path / "runs", "external")
    assert outcome.status == "blocked"
    assert "admission_mismatch_backend" in reason_codes(report_of(outcome.run_dir))
    assert not sentinel.exists()


async def test_backend_listing_an_external_model_blocks(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        scripted_backend) -> None:
    """The backend (the scripted TEST FIXTURE) lists claude beside the admitted model, as
    a LiteLLM-style router would: the run blocks before Case starts."""
    scripted_backend.also_list = ("claude-sonnet-4-6",)
    arts = write_artifacts(tmp_path / "in")
    env = base_env(arts)
    env[ENV_BASE_URL] = scripted_backend.base_url
    profile, sentinel = _sentinel_profile(tmp_path)
    outcome = await asyncio.to_thread(run, profile, env, tmp_path / "runs", "external")
    assert outcome.status == "blocked"
    assert reason_codes(report_of(outcome.run_dir)) == {"backend_serves_external_model"}
    assert "case_process_started" not in events_of(outcome.run_dir) and not sentinel.exists()


def test_credential_file_in_the_operator_home_blocks_an_unsandboxed_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_access_key_id = NOTAREALKEY\n")
    arts = write_artifacts(tmp_path / "in")
    env = {**base_env(arts), "HOME": str(home)}
    profile, sentinel = _sentinel_profile(tmp_path)
    outcome = run(profile, env, tmp_path / "runs", sandbox=False)
    report = report_of(outcome.run_dir)
    assert outcome.status == "blocked" and reason_codes(report) == {"external_credential_file"}
    assert str(home / ".aws" / "credentials") in " ".join(r.message for r in report.reasons)
    assert not sentinel.exists()


def test_case_asking_claude_is_refused_counted_and_fails_the_report(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in")
    outcome = run(rogue_profile("other-model"), base_env(arts), tmp_path / "runs")
    stdout = (outcome.run_dir / "case" / "stdout.log").read_text()
    assert "claude: refused 403 PermissionDeniedError" in stdout
    report = report_of(outcome.run_dir)
    assert outcome.status == "fail" and "external_fallback_attempted" in reason_codes(report)
    assert report.external_fallback.used is True
    assert report.external_fallback.attempted_models == ["claude-sonnet-4-6"]
    assert report.external_fallback.by_family == {"anthropic": 1}
    assert report.external_fallback.metrics_fallback_rejections == 1
    assert report.admitted_requests == 1


def test_editing_the_visible_tests_does_not_pass_acceptance(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in")
    outcome = run(rogue_profile("edit-tests"), base_env(arts), tmp_path / "runs")
    report = report_of(outcome.run_dir)
    assert report.tests.committed is True
    assert report.tests_passed is False and report.tests.failed + report.tests.errors > 0
    assert "acceptance_tests_failed" in reason_codes(report) and outcome.status == "fail"


def test_printed_token_is_redacted_in_case_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_mod, "new_run_token", lambda: KNOWN_TOKEN)
    arts = write_artifacts(tmp_path / "in")
    outcome = run(rogue_profile("print-token"), base_env(arts), tmp_path / "runs")
    out = (outcome.run_dir / "case" / "stdout.log").read_text()
    err = (outcome.run_dir / "case" / "stderr.log").read_text()
    assert "my key is [REDACTED]" in out and "again on stderr: [REDACTED]" in err
    for path in outcome.run_dir.rglob("*"):
        if path.is_file():
            assert KNOWN_TOKEN.encode() not in path.read_bytes(), path
    assert report_of(outcome.run_dir).secret_scan.clean is True


def test_committed_token_fails_the_run_with_a_commit_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_mod, "new_run_token", lambda: KNOWN_TOKEN)
    arts = write_artifacts(tmp_path / "in")
    outcome = run(rogue_profile("commit-token"), base_env(arts), tmp_path / "runs")
    report = report_of(outcome.run_dir)
    assert outcome.status == "fail" and "secret_found" in reason_codes(report)
    places = {(f["place"], f["kind"]) for f in report.secret_scan.findings}
    assert ("commits", "run_token") in places
    # Shown nowhere the harness writes (the repository itself holds the leak).
    for path in outcome.run_dir.rglob("*"):
        if path.is_file() and "repo" not in path.relative_to(outcome.run_dir).parts:
            assert KNOWN_TOKEN.encode() not in path.read_bytes(), path


def test_egress_through_https_proxy_is_refused_and_listed_by_host(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in")
    outcome = run(rogue_profile("egress"), base_env(arts), tmp_path / "runs")
    stdout = (outcome.run_dir / "case" / "stdout.log").read_text()
    assert "reached (should not happen)" not in stdout
    report = report_of(outcome.run_dir)
    assert report.egress.hosts == {"api.openai.com": 1, "telemetry.example.com": 1}
    assert report.egress.provider_hosts == ["api.openai.com"]
    # Reaching for a model provider's host is a fallback attempt; telemetry is listed only.
    assert report.external_fallback.attempts == 1 and report.external_fallback.by_reason == {
        "forward_proxy_refused": 1}
    assert outcome.status == "fail"


def test_demo_passes_with_demo_grade_and_verifies(tmp_path: Path) -> None:
    """The README's main command, end to end (scripted backend: demo grade only)."""
    lines: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    assert run_demo(tmp_path / "runs", source_env={k: v for k, v in os.environ.items()
                                                  if k in ("PATH", "HOME", "LANG")}, out=Out()) == 0
    text = "".join(lines)
    assert "demo OK" in text
    assert "ok  Case sandboxed (pass run)" in text and "bubblewrap, proxy-only, 0 processes left" in text
    row = [line for line in text.splitlines() if "attestation (pass run)" in line and not line.startswith(" ")]
    assert len(row) == 1 and row[0].startswith("ok ") and row[0].rstrip().endswith("unsigned"), row
    pass_runs = [d for d in (tmp_path / "runs").iterdir() if (d / "report.json").is_file()
                 and report_of(d).status == "pass"]
    assert len(pass_runs) == 1
    report = report_of(pass_runs[0])
    assert report.evidence_grade == "demo"
    assert (report.case_model_provider, report.case_model, report.case_model_admission_status) == (
        "qwen-local", "qwen3.6-35b-a3b", "candidate")
    assert report.external_fallback.used is False and report.tests_passed and report.secret_scan.clean
    assert report.required_events_passed and report.chains.events_ok and report.chains.evidence_ok


@pytest.mark.parametrize("fixture", ["r1-string-slugify", "r2-bugfix-pagination", "r3-multifile-unitconv"])
def test_each_fixture_passes_and_its_report_recomputes(tmp_path: Path, fixture: str) -> None:
    arts = write_artifacts(tmp_path / "in")
    outcome = run(reference_profile().model_copy(update={"fixture": fixture}), base_env(arts), tmp_path / "runs")
    assert outcome.status == "pass", report_of(outcome.run_dir).reasons
    stored = report_of(outcome.run_dir)
    fresh = compute_report(collect_inputs(outcome.run_dir,
                                          decision_sha256_after=stored.digests.decision_sha256_after,
                                          admission_sha256_after=stored.digests.admission_sha256_after))
    assert fresh == stored
    assert json.loads((outcome.run_dir / "report.json").read_text())["schema_version"] == 1
    assert Report.model_validate_json((outcome.run_dir / "report.json").read_bytes()).status == "pass"


def test_an_operator_config_with_several_workers_still_gives_the_run_one_chain(tmp_path: Path) -> None:
    """The harness's own proxy runs one worker whatever the operator's config says: a
    run's proof is one evidence chain."""
    arts = write_artifacts(tmp_path / "in")
    config = tmp_path / "in" / "proxy.toml"
    config.write_text("[server]\nworkers = 2\n")
    env = {**base_env(arts), "CASE_PROXY_CONFIG": str(config)}
    outcome = run(reference_profile(), env, tmp_path / "runs")
    assert outcome.status == "pass", report_of(outcome.run_dir).reasons
    assert report_of(outcome.run_dir).chains.evidence_ok
    assert not list(outcome.run_dir.rglob("*.worker*.jsonl"))
