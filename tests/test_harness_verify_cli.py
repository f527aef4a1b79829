"""`case-harness verify` catches tampering; the CLI's exit codes and outputs; the report
schema file matches the code. One real pass run (scripted TEST FIXTURE backend) is made
once and copied for each tampering test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.report import SCHEMA_PATH, report_schema
from harness.verify import verify_run

from .harness_support import base_env, reference_profile, report_of, run, write_artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pass_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    base = tmp_path_factory.mktemp("passrun")
    arts = write_artifacts(base / "in")
    outcome = run(reference_profile(), base_env(arts), base / "runs")
    assert outcome.status == "pass", report_of(outcome.run_dir).reasons
    yield outcome.run_dir, arts.decision, arts.admission


@pytest.fixture
def copy_of_pass_run(pass_run: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    dest = tmp_path / pass_run[0].name
    shutil.copytree(pass_run[0], dest, symlinks=True)
    return dest


def test_untouched_run_verifies(copy_of_pass_run: Path) -> None:
    assert verify_run(copy_of_pass_run).problems == []


def _rewrite_line(path: Path, index: int, change) -> None:  # type: ignore[no-untyped-def]
    lines = path.read_bytes().splitlines(keepends=True)
    lines[index] = change(lines[index])
    path.write_bytes(b"".join(lines))


def test_editing_an_event_is_caught(copy_of_pass_run: Path) -> None:
    _rewrite_line(copy_of_pass_run / "events.jsonl", 6,
                  lambda line: line.replace(b'"exit_code":0', b'"exit_code":1'))
    problems = verify_run(copy_of_pass_run).problems
    assert any("events.jsonl" in p and "prev_sha256" in p for p in problems), problems


def test_deleting_an_evidence_line_is_caught(copy_of_pass_run: Path) -> None:
    path = copy_of_pass_run / "proxy" / "evidence.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    problems = verify_run(copy_of_pass_run).problems
    assert any("evidence" in p for p in problems), problems


def test_changing_the_status_is_caught(copy_of_pass_run: Path) -> None:
    path = copy_of_pass_run / "report.json"
    data = json.loads(path.read_text())
    data["status"] = "pass"
    data["admitted_requests"] = 99
    path.write_text(json.dumps(data, indent=2) + "\n")
    problems = verify_run(copy_of_pass_run).problems
    assert any("admitted_requests" in p for p in problems), problems
    assert any("digest in the report_written event" in p for p in problems), problems


def test_relabelling_the_status_alone_is_caught(copy_of_pass_run: Path) -> None:
    path = copy_of_pass_run / "report.json"
    path.write_text(path.read_text().replace('"status": "pass"', '"status": "fail"', 1))
    problems = verify_run(copy_of_pass_run).problems
    assert any("'status' differs" in p for p in problems), problems


def test_changed_admission_after_the_run_is_caught(copy_of_pass_run: Path, tmp_path: Path,
                                                   pass_run: tuple[Path, Path, Path]) -> None:
    changed = tmp_path / "admission.json"
    data = json.loads(pass_run[2].read_text())
    data["admission_status"] = "admitted"
    changed.write_text(json.dumps(data))
    problems = verify_run(copy_of_pass_run, admission_path=changed).problems
    assert any("admission JSON has changed" in p for p in problems), problems
    assert verify_run(copy_of_pass_run, decision_path=pass_run[1], admission_path=pass_run[2]).problems == []


def test_report_schema_file_matches_the_code() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == report_schema(), \
        "config/report.schema.json is stale: regenerate it with `python -m harness.report --schema`"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_verify_report_and_html(copy_of_pass_run: Path, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"]}
    ok = _cli("verify", str(copy_of_pass_run), env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr
    rep = _cli("report", str(copy_of_pass_run), "--html", str(tmp_path / "r.html"), env=env)
    assert rep.returncode == 0 and "status: PASS" in rep.stdout and "evidence grade: DEMO" in rep.stdout
    assert "<h1 style='color:#1a7f37'>PASS</h1>" in (tmp_path / "r.html").read_text()
    (copy_of_pass_run / "events.jsonl").write_bytes(b"")
    bad = _cli("verify", str(copy_of_pass_run), env=env)
    assert bad.returncode == 1 and "problem:" in bad.stdout


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"]}
    bad_profile = tmp_path / "p.toml"
    bad_profile.write_text("[case]\ncommand = []\nprovider = 'x'\n")
    r = _cli("preflight", "--profile", str(bad_profile), env=env)
    assert r.returncode == 2
    assert "case.command" in r.stderr and "case.model" in r.stderr and "case.timeout_s" in r.stderr
    r = _cli("preflight", "--fixture", "no-such-fixture", env=env)
    assert r.returncode == 2 and "unknown fixture 'no-such-fixture'" in r.stderr
    r = _cli("verify", str(tmp_path / "missing"), env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cli("report", str(tmp_path), env=env)
    assert r.returncode == 2 and "report.json does not exist" in r.stderr


def test_cli_preflight_exit_codes(tmp_path: Path, pass_run: tuple[Path, Path, Path]) -> None:
    arts = write_artifacts(tmp_path / "in")
    env = {**base_env(arts), "PATH": os.environ["PATH"]}
    blocked = _cli("preflight", env=env)  # no backend URL at all
    assert blocked.returncode == 3 and "blocked: local_adapter_config_missing" in blocked.stdout
    backend = subprocess.Popen([sys.executable, "-m", "harness.scripted_backend", "--host", "127.0.0.1",
                                "--port", "0", "--model", "qwen3.6-35b-a3b"], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert backend.stdout is not None
        line = backend.stdout.readline()
        assert line.startswith("SCRIPTED_BACKEND_READY ")
        env["CTO_HARNESS_CASE_LOCAL_BASE_URL"] = line.split()[1]
        ok = _cli("preflight", env=env)
        assert ok.returncode == 0 and ok.stdout.startswith("ok: every gate holds"), ok.stdout + ok.stderr
        assert line.split()[1] not in ok.stdout + ok.stderr  # the endpoint value is never printed
        # No bubblewrap on the PATH: the sandbox cannot be built, so the run would block.
        no_bwrap = {**env, "PATH": str(tmp_path / "empty-bin")}
        blocked = _cli("preflight", env=no_bwrap)
        assert blocked.returncode == 3, blocked.stdout + blocked.stderr
        assert "blocked: sandbox_unavailable: bubblewrap (bwrap) is not installed" in blocked.stdout
        unsandboxed = _cli("preflight", "--no-sandbox", env=no_bwrap)
        assert unsandboxed.returncode == 0 and unsandboxed.stdout.startswith("ok: every gate holds")
    finally:
        backend.terminate()
        backend.wait(10)
