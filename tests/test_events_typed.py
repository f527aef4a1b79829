"""The typed event log (harness.events): each line read back as its model, and every line
that is not a known, well-formed event named by line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from harness import events as ev
from proxy.hashchain import HashChainWriter


def _chain(path: Path, records: list[dict[str, Any]]) -> bytes:
    """A correctly chained log of ``records`` (what anyone who can write the file makes)."""
    writer = HashChainWriter(path)
    writer.open()
    for record in records:
        writer.append(record)
    writer.close()
    return path.read_bytes()


TESTS_RUN = {"event": "fixture_tests_run", "time": "2026-11-28T10:00:00.000Z", "commit": "a" * 40,
             "committed": True, "passed": True, "total": 90, "failed": 0, "errors": 0, "sandboxed": True,
             "git_controls_reset": []}


def test_each_line_comes_back_as_its_model(tmp_path: Path) -> None:
    log = ev.EventLog(tmp_path / "events.jsonl")
    log.emit(ev.ProxyStarted(pid=42, port=None, listen="unix", chain_mode="hmac-sha256", head_channel="pipe"))
    log.emit(ev.FixtureTestsRun(commit=None, committed=False, passed=False, total=3, failed=1, errors=2,
                                sandboxed=True, git_controls_reset=[".git/config"]))
    log.close()
    parsed = ev.read_typed_events(tmp_path / "events.jsonl")
    assert parsed.verdict.ok and parsed.problems == []
    started, tests = parsed.events
    assert isinstance(started, ev.ProxyStarted) and started.pid == 42 and started.listen == "unix"
    assert isinstance(tests, ev.FixtureTestsRun) and (tests.total, tests.failed, tests.errors) == (3, 1, 2)
    assert tests.git_controls_reset == [".git/config"]
    # On disk each line is the event's fields (keys sorted by the chain writer) plus the chain's.
    first = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0])
    assert first["event"] == "proxy_started" and {"seq", "prev_sha256"} <= set(first)


def test_a_misspelt_or_missing_field_is_refused_when_the_event_is_made() -> None:
    with pytest.raises(ValidationError, match="listn"):
        ev.ProxyStarted(pid=1, port=None, listen="unix", chain_mode="hmac-sha256", head_channel="pipe",
                        listn="unix")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="listen"):
        ev.ProxyStarted(pid=1, port=None)  # type: ignore[call-arg]


def test_the_writer_refuses_an_unchecked_model(tmp_path: Path) -> None:
    """A model built without validation (``model_construct``) is checked as it is written."""
    log = ev.EventLog(tmp_path / "events.jsonl")
    bogus = ev.ProxyStarted.model_construct(pid="not a pid", port=None, listen="unix")
    with pytest.raises(ValidationError, match="pid"):
        log.emit(bogus)
    log.close()
    assert (tmp_path / "events.jsonl").read_bytes() == b""


@pytest.mark.parametrize(("record", "expected"), [
    ({k: v for k, v in TESTS_RUN.items() if k != "passed"}, "line 2 (fixture_tests_run): field 'passed': Field required"),
    ({**TESTS_RUN, "event": "tests_overridden"}, "line 2: unknown event type 'tests_overridden'"),
    ({k: v for k, v in TESTS_RUN.items() if k != "event"}, "line 2: no event name"),
    ({k: v for k, v in TESTS_RUN.items() if k != "time"}, "line 2 (fixture_tests_run): field 'time': Field required"),
    ({**TESTS_RUN, "total": "ninety"}, "line 2 (fixture_tests_run): field 'total': Input should be a valid integer"),
    ({**TESTS_RUN, "passed": "yes"}, "line 2 (fixture_tests_run): field 'passed': Input should be a valid boolean"),
    ({**TESTS_RUN, "verdict": "pass"}, "line 2 (fixture_tests_run): field 'verdict': Extra inputs are not permitted"),
    ({"event": "case_process_started", "time": "t", "pid": 1, "argv_sha256": "0", "env_names": [],
      "isolation": {"kind": "bubblewrap"}}, "field 'isolation.bubblewrap.version': Field required"),
])
def test_a_malformed_event_is_named_by_line_and_field(tmp_path: Path, record: dict[str, Any], expected: str) -> None:
    data = _chain(tmp_path / "events.jsonl", [{"event": "proxy_ready", "time": "t"}, record])
    parsed = ev.parse_events(data)
    assert parsed.verdict.ok, "the chain holds: only the reader can tell"
    assert [type(e) for e in parsed.events] == [ev.ProxyReady]
    assert len(parsed.problems) == 1 and expected in parsed.problems[0], parsed.problems


def test_a_problem_never_quotes_the_value(tmp_path: Path) -> None:
    secret = "sk-ant-api03-" + "x" * 40
    data = _chain(tmp_path / "events.jsonl", [{**TESTS_RUN, "total": secret}, {**TESTS_RUN, "leak": secret}])
    parsed = ev.parse_events(data)
    assert len(parsed.problems) == 2 and not any(secret in p for p in parsed.problems)


def test_garbage_lines_are_problems_too(tmp_path: Path) -> None:
    data = b'{"event": "proxy_ready", "time": "t"}\nnot json\n[1, 2]\n{"event": "proxy_ready", "time": "t"}'
    parsed = ev.parse_events(data)
    assert not parsed.verdict.ok
    assert parsed.problems == ["line 2: not valid JSON", "line 3: not a JSON object"]
    assert len(parsed.events) == 1  # the partial last line is the chain's problem


def test_a_missing_log_is_a_failed_verdict(tmp_path: Path) -> None:
    parsed = ev.read_typed_events(tmp_path / "absent.jsonl")
    assert not parsed.verdict.ok and parsed.events == []
