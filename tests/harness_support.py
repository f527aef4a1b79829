"""Helpers for harness tests: artifacts, environments, profiles and runs.

Runs use the built-in scripted backend (a TEST FIXTURE: no GPU here), the real proxy as a
subprocess, and a real git repository; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.demo import DEMO_ADMISSION, DEMO_DECISION
from harness.events import read_events
from harness.profile import REFERENCE_PROFILE_PATH, RunProfile, load_run_profile
from harness.report import Report, load_report
from harness.run import RunOutcome, run_once
from proxy.settings import ENV_ADMISSION_FILE, ENV_DECISION_FILE

ROGUE_SOURCE = Path(__file__).resolve().parent / "harness_cases"
# Case is sandboxed and never sees the project tree: the hostile programs are copied into a
# directory of their own, which their profile exposes read-only ([case.sandbox].ro_paths).
ROGUE_DIR = Path(tempfile.mkdtemp(prefix="rogue-case-"))
for _src in ROGUE_SOURCE.glob("*.py"):
    shutil.copyfile(_src, ROGUE_DIR / _src.name)
ROGUE = ROGUE_DIR / "rogue_case.py"
atexit.register(shutil.rmtree, ROGUE_DIR, True)
# The same well-formed CTO-WORK-020 artifacts the demo writes.
DECISION: dict[str, Any] = DEMO_DECISION
ADMISSION: dict[str, Any] = DEMO_ADMISSION


@dataclass
class Artifacts:
    decision: Path
    admission: Path

    def snapshot(self) -> tuple[bytes, bytes]:
        return self.decision.read_bytes(), self.admission.read_bytes()


def write_artifacts(directory: Path, decision: dict[str, Any] | None = None,
                    admission: dict[str, Any] | None = None) -> Artifacts:
    directory.mkdir(parents=True, exist_ok=True)
    d, a = directory / "decision.json", directory / "admission.json"
    d.write_text(json.dumps(decision or DECISION))
    a.write_text(json.dumps(admission or ADMISSION))
    return Artifacts(d, a)


def base_env(artifacts: Artifacts) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env[ENV_DECISION_FILE] = str(artifacts.decision)
    env[ENV_ADMISSION_FILE] = str(artifacts.admission)
    return env


def reference_profile(**case_changes: Any) -> RunProfile:
    profile = load_run_profile(REFERENCE_PROFILE_PATH)
    if case_changes:
        profile = profile.model_copy(update={"case": profile.case.model_copy(update=case_changes)})
    return profile


def rogue_profile(mode: str, *extra: str, **case_changes: Any) -> RunProfile:
    from harness.profile import SandboxProfile

    command = [sys.executable, str(ROGUE), mode, "{workdir}", *extra]
    case_changes.setdefault("sandbox", SandboxProfile(ro_paths=[str(ROGUE_DIR)]))
    case_changes.setdefault("timeout_s", 60)
    return reference_profile(command=command, **case_changes)


def run(profile: RunProfile, env: dict[str, str], runs_dir: Path, backend: str = "scripted",
        sandbox: bool = True) -> RunOutcome:
    return run_once(profile, env, runs_dir, backend=backend, sandbox=sandbox)  # type: ignore[arg-type]


def events_of(run_dir: Path) -> list[str]:
    verdict, events = read_events(run_dir / "events.jsonl")
    assert verdict.ok, verdict.problems
    return [e["event"] for e in events]


def report_of(run_dir: Path) -> Report:
    return load_report(run_dir / "report.json")


def reason_codes(report: Report) -> set[str]:
    return {r.code for r in report.reasons}
