"""Pure parts of the harness, without sockets: gate decisions, the secret scanner, the
report's pass rule, event order."""

from __future__ import annotations

import base64
import subprocess
import urllib.parse
from pathlib import Path

from harness.events import REQUIRED_EVENTS, check_required_order
from harness.gates import GateInputs, evaluate_gates
from harness.secret_scan import SecretSet, TextScanner, collect_secrets, scan_run_dir
from proxy.admission import Admission, DecisionRecord
from proxy.settings import ENV_ADMISSION_FILE, ENV_API_KEY, ENV_BASE_URL, ENV_DECISION_FILE

from .harness_support import ADMISSION, DECISION, reference_profile

ENV = {ENV_DECISION_FILE: "/d.json", ENV_ADMISSION_FILE: "/a.json", ENV_BASE_URL: "http://127.0.0.1:8000/v1"}


def _inputs(**changes) -> GateInputs:  # type: ignore[no-untyped-def]
    base = dict(profile=reference_profile(), env=dict(ENV), decision=DecisionRecord.model_validate(DECISION),
                admission=Admission.model_validate(ADMISSION), backend_models=("qwen3.6-35b-a3b",))
    base.update(changes)
    return GateInputs(**base)


def _codes(inputs: GateInputs) -> set[str]:
    return {f.code for f in evaluate_gates(inputs).failures}


def test_all_gates_hold_for_the_reference_setup() -> None:
    result = evaluate_gates(_inputs())
    assert result.ok and result.upstream is not None and result.upstream.upstream_class.value == "loopback"


def test_private_and_allowlisted_backends_pass_external_ones_block() -> None:
    assert _codes(_inputs(env={**ENV, ENV_BASE_URL: "http://10.1.2.3:8000/v1"})) == set()
    assert _codes(_inputs(env={**ENV, ENV_BASE_URL: "http://gpu-box.lan:8000/v1"})) == {"external_upstream"}
    assert _codes(_inputs(env={**ENV, ENV_BASE_URL: "http://gpu-box.lan:8000/v1"},
                          allow_hosts=frozenset({"gpu-box.lan"}))) == set()
    # A provider host stays external even when listed.
    assert _codes(_inputs(env={**ENV, ENV_BASE_URL: "https://api.openai.com/v1"},
                          allow_hosts=frozenset({"api.openai.com"}))) == {"external_upstream"}
    assert _codes(_inputs(env={**ENV, ENV_BASE_URL: "http://user:pw@127.0.0.1:8000/v1"})) == {
        "local_adapter_config_invalid"}


def test_backend_identity() -> None:
    assert _codes(_inputs(backend_models=("other",))) == {"admission_mismatch_backend"}
    assert _codes(_inputs(backend_models=None, backend_error="refused")) == {"backend_unreachable"}


def test_fallback_forms_in_profile_and_environment() -> None:
    prof = reference_profile()
    cases = {
        "fallback claude": (prof.model_copy(update={"case": prof.case.model_copy(
            update={"fallback_models": ["anthropic/claude-sonnet-4-6"]})}), "unadmitted_model_configured"),
        "provider anthropic": (prof.model_copy(update={"case": prof.case.model_copy(update={"provider": "Anthropic"})}),
                               "external_fallback_configured"),
        "host in command": (prof.model_copy(update={"case": prof.case.model_copy(
            update={"command": ["agent", "--api", "https://api.anthropic.com"]})}), "external_fallback_configured"),
    }
    for name, (profile, code) in cases.items():
        assert code in _codes(_inputs(profile=profile)), name
    # The admitted model as its own fallback is harmless.
    same = prof.model_copy(update={"case": prof.case.model_copy(update={"fallback_models": ["qwen3.6-35b-a3b"]})})
    assert _codes(_inputs(profile=same)) == set()
    for var in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_USE_BEDROCK", "OPENROUTER_API_KEY", "GEMINI_API_KEY"):
        assert _codes(_inputs(env={**ENV, var: "x" * 12})) == {"external_fallback_configured"}, var
    # An empty variable configures nothing; a local OPENAI_BASE_URL is not a fallback.
    assert _codes(_inputs(env={**ENV, "ANTHROPIC_API_KEY": ""})) == set()
    assert _codes(_inputs(env={**ENV, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})) == set()


def test_argv_secrets_are_found_by_value_and_by_shape() -> None:
    assert _codes(_inputs(argv=("agent", "--key", "backend-secret-123456"), secrets=("backend-secret-123456",))) == {
        "secret_in_argv"}
    assert _codes(_inputs(argv=("agent", "sk-ant-api03-" + "a" * 30))) == {"secret_in_argv"}
    assert _codes(_inputs(argv=("agent", "--task", "/tmp/task.md"))) == set()


def test_scanner_finds_encoded_forms_and_reports_no_value(tmp_path: Path) -> None:
    secret = "tok-ABCDEFGH12345678/+="
    found = SecretSet()
    found.add("run_token", secret)
    scanner = TextScanner(found)
    texts = {
        "plain": f"x {secret} y",
        "base64": "auth " + base64.b64encode(secret.encode()).decode(),
        "url": "q=" + urllib.parse.quote(secret, safe=""),
    }
    for name, text in texts.items():
        kinds = [k for k, _ in scanner.scan(text)]
        assert kinds and kinds[0].startswith("run_token"), (name, kinds)
    assert scanner.scan("nothing secret here") == []
    run_dir = tmp_path / "run"
    (run_dir / "case").mkdir(parents=True)
    (run_dir / "case" / "stdout.log").write_text(f"line1\nkey {secret}\n")
    result = scan_run_dir(run_dir, found, argv_text=f"agent {secret}")
    places = {(f.place, f.location) for f in result.findings}
    assert ("case_logs", "case/stdout.log:2") in places and ("argv", "process argv, line 1") in places
    assert secret not in result.model_dump_json()


def test_scanner_reads_commits(tmp_path: Path) -> None:
    repo = tmp_path / "run" / "repo"
    repo.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("hello\n")
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "leak backend-secret-123456"], check=True)
    result = scan_run_dir(tmp_path / "run", collect_secrets({ENV_API_KEY: "backend-secret-123456"}))
    # The commit, and the copies git itself keeps of its message (reflog, COMMIT_EDITMSG).
    assert {(f.place, f.kind) for f in result.findings} == {
        ("commits", "backend_key"), ("git_reflog", "backend_key"), ("git_files", "backend_key")}
    assert result.findings[0].location.startswith("commit ") and "(message)" in result.findings[0].location


def test_collect_secrets_covers_the_endpoint_and_url_credentials(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.write_text("operator-value-1\n\n")
    found = collect_secrets({ENV_BASE_URL: "http://gpu-7.internal:8000/v1/", "CTO_HARNESS_OTHER_TOKEN": "tok-999999999",
                             "CASE_HARNESS_EXTRA_SECRETS_FILE": str(extra)}, ["run-token-value"])
    values = set(found.values)
    assert {"http://gpu-7.internal:8000/v1/", "http://gpu-7.internal:8000/v1", "gpu-7.internal:8000",
            "tok-999999999", "operator-value-1", "run-token-value"} <= values


def test_required_event_order() -> None:
    assert check_required_order(list(REQUIRED_EVENTS)) == ([], [])
    swapped = list(REQUIRED_EVENTS)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    assert check_required_order(swapped)[1]
    missing, _ = check_required_order([e for e in REQUIRED_EVENTS if e != "identity_verified"])
    assert missing == ["identity_verified"]
    assert check_required_order([*REQUIRED_EVENTS, "case_process_started"])[1]
