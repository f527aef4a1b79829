"""The report reads typed events: a line that is not a known, well-formed event fails the run.

One real pass run (scripted TEST FIXTURE backend, harness/scripted_backend.py) is made once
and copied for each test. The hostile party can write events.jsonl after the run (a plain
SHA-256 chain can be rebuilt from any line on): it adds an event the report does not know,
drops a field the report needs, or garbles one, and re-chains the file. The report must
fail and name the line and field, never skip the line and carry on.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import events as ev
from harness.report import collect_inputs, compute_report
from harness.verify import verify_run
from proxy.hashchain import HashChainWriter

from .harness_support import base_env, reference_profile, report_of, run, write_artifacts

Change = Callable[[list[dict[str, Any]]], None]


@pytest.fixture(scope="module")
def pass_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("typedevents")
    outcome = run(reference_profile(), base_env(write_artifacts(base / "in")), base / "runs")
    assert outcome.status == "pass", report_of(outcome.run_dir).reasons
    return outcome.run_dir


def _rechained(run_dir: Path, tmp_path: Path, change: Change) -> Path:
    """A copy of the run whose events.jsonl is ``change``d and chained again from scratch."""
    dest = tmp_path / run_dir.name
    shutil.copytree(run_dir, dest, symlinks=True)
    _, events = ev.read_events(dest / "events.jsonl")
    change(events)
    (dest / "events.jsonl").unlink()
    writer = HashChainWriter(dest / "events.jsonl")
    writer.open()
    for event in events:
        writer.append(event)
    writer.close()
    return dest


def _line_of(events: list[dict[str, Any]], name: str) -> int:
    return next(n for n, e in enumerate(events, start=1) if e["event"] == name)


def _report(run_dir: Path) -> Any:
    return compute_report(collect_inputs(run_dir, decision_sha256_after=None, admission_sha256_after=None))


def test_the_untouched_run_reads_back_whole(pass_run: Path, tmp_path: Path) -> None:
    copy = _rechained(pass_run, tmp_path, lambda events: None)
    parsed = ev.read_typed_events(copy / "events.jsonl")
    assert parsed.problems == [] and parsed.verdict.ok
    assert [e.event for e in parsed.events][:len(ev.REQUIRED_EVENTS)] == list(ev.REQUIRED_EVENTS)
    assert _report(copy).status == "pass"


def _insert_unknown(events: list[dict[str, Any]]) -> None:
    # An event the harness never writes, placed where a later reader might trust it.
    at = _line_of(events, ev.FIXTURE_TESTS_RUN) - 1
    events.insert(at, {"event": "acceptance_override", "time": events[at]["time"], "passed": True})


def _drop_field(events: list[dict[str, Any]]) -> None:
    del events[_line_of(events, ev.CASE_PROCESS_EXITED) - 1]["exit_code"]


def _garble_field(events: list[dict[str, Any]]) -> None:
    events[_line_of(events, ev.CASE_PROCESS_STARTED) - 1]["isolation"] = "bubblewrap"


def _extra_field(events: list[dict[str, Any]]) -> None:
    events[_line_of(events, ev.SECRET_SCAN_DONE) - 1]["findings_ignored"] = 3


@pytest.mark.parametrize(("change", "line_event", "named"), [
    (_insert_unknown, ev.FIXTURE_TESTS_RUN, ": unknown event type 'acceptance_override'"),
    (_drop_field, ev.CASE_PROCESS_EXITED, " (case_process_exited): field 'exit_code': Field required"),
    (_garble_field, ev.CASE_PROCESS_STARTED, " (case_process_started): field 'isolation'"),
    (_extra_field, ev.SECRET_SCAN_DONE, " (secret_scan_done): field 'findings_ignored': Extra inputs are not permitted"),
])
def test_a_malformed_or_unknown_event_fails_the_report_naming_line_and_field(
        pass_run: Path, tmp_path: Path, change: Change, line_event: str, named: str) -> None:
    _, original = ev.read_events(pass_run / "events.jsonl")
    line = _line_of(original, line_event)
    copy = _rechained(pass_run, tmp_path, change)
    report = _report(copy)
    assert report.chains.events_ok, "the re-chained log verifies: only the typed reader can tell"
    malformed = [r for r in report.reasons if r.code == "events_malformed"]
    assert report.status == "fail" and len(malformed) == 1, report.reasons
    assert f"line {line}{named}" in malformed[0].message, malformed[0].message
    # verify names the line too, recomputes the same report, and the stored pass no longer matches it.
    problems = verify_run(copy).problems
    assert f"events.jsonl: line {line}{named}" in "\n".join(problems), problems
    assert any("'status' differs" in p for p in problems)


def test_an_unknown_event_alone_would_otherwise_pass(pass_run: Path, tmp_path: Path) -> None:
    """The unknown event changes nothing else the report reads: the typed reader is the only
    thing standing between it and a pass."""
    copy = _rechained(pass_run, tmp_path, _insert_unknown)
    codes = {r.code for r in _report(copy).reasons}
    assert codes == {"events_malformed"}


def test_a_blocked_run_with_a_garbled_event_is_a_fail(tmp_path: Path) -> None:
    """A gate held Case back, and someone added an event after the fact: no longer an honest block."""
    arts = write_artifacts(tmp_path / "in", decision={"work_item": "CTO-WORK-020",
                                                      "decision_status": "local_provider_optional",
                                                      "provider_class": "local_case_compatible",
                                                      "decided_at": "2026-06-01T00:00:00Z"})
    outcome = run(reference_profile(), base_env(arts), tmp_path / "runs")
    assert outcome.status == "blocked"
    copy = _rechained(outcome.run_dir, tmp_path / "copy",
                      lambda events: events.insert(2, {"event": "case_started_elsewhere", "time": events[1]["time"]}))
    report = _report(copy)
    assert report.status == "fail" and "events_malformed" in {r.code for r in report.reasons}


def test_evidence_that_is_present_but_unread_is_not_verified() -> None:
    """Inputs that say the evidence exists but carry no verdict of it (hand-made inputs, a
    reader that failed open) fail like a broken chain."""
    from harness.report import ReportInputs
    from proxy.hashchain import ChainVerdict

    inputs = ReportInputs(events_verdict=ChainVerdict(ok=True, records=0, last_sha256="", problems=[]), events=[],
                          events_sha256=None, evidence_present=True, evidence_verdict=None, evidence=[],
                          evidence_sha256=None, metrics_text="", scan=None, decision_sha256_after=None,
                          admission_sha256_after=None)
    report = compute_report(inputs)
    assert report.status == "fail" and "evidence_chain_broken" in {r.code for r in report.reasons}
