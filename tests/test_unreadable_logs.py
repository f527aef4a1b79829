"""A log that cannot be read gets one failed verdict, whichever reader met it: not ok,
no records, the genesis hash as its last hash (what a chain of no records ends on) and
a problem naming the file. The readers used to disagree (an empty hash from three of
them), so a tool comparing a failed verdict's last hash with a chain head saw two
shapes of "nothing read"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness import events as ev
from harness.report import collect_inputs
from proxy.evidence import verify_evidence
from proxy.evidence_files import read_evidence_file
from proxy.hashchain import GENESIS, ChainVerdict, verify_chain

READERS: dict[str, Callable[[Path], ChainVerdict]] = {
    "verify_chain": verify_chain,
    "verify_evidence": verify_evidence,
    "read_evidence_file": lambda p: read_evidence_file(p).verdict,
    "read_typed_events": lambda p: ev.read_typed_events(p).verdict,
    "read_events": lambda p: ev.read_events(p)[0],
}


def _is_the_failed_verdict(verdict: ChainVerdict, path: Path) -> None:
    assert verdict.ok is False and verdict.records == 0
    assert verdict.last_sha256 == GENESIS
    assert verdict.problems and str(path) in verdict.problems[0] and verdict.problems[0].startswith("cannot read")


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("how", ["missing", "a directory"])
def test_every_reader_gives_an_unreadable_log_the_same_failed_verdict(tmp_path: Path, reader: str, how: str) -> None:
    path = tmp_path / "log.jsonl"
    if how == "a directory":
        path.mkdir()
    _is_the_failed_verdict(READERS[reader](path), path)


def test_the_report_gives_an_unreadable_evidence_log_and_a_missing_event_log_the_same_shape(tmp_path: Path) -> None:
    evidence = tmp_path / "proxy" / "evidence.jsonl"
    evidence.mkdir(parents=True)  # exists, but reading it fails
    inputs = collect_inputs(tmp_path, decision_sha256_after=None, admission_sha256_after=None)
    assert inputs.evidence_verdict is not None
    _is_the_failed_verdict(inputs.evidence_verdict, evidence)
    events = inputs.events_verdict  # no events.jsonl at all
    assert events.ok is False and events.records == 0 and events.last_sha256 == GENESIS
    assert events.problems == ["events.jsonl is missing or unreadable"]
