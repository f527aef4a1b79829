"""The run's event log: hash-chained JSONL, one ``os.write`` per event.

Same chain as the proxy's evidence (``proxy.hashchain``), so one verifier serves both and
an edited, deleted or reordered event is caught by ``case-harness verify``. The names and
the order a pass requires are fixed here and documented in ``docs/harness-contract.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.evidence import utc_now_rfc3339
from proxy.hashchain import ChainVerdict, HashChainWriter, read_chain

RUN_STARTED = "run_started"
PREFLIGHT_PASSED = "preflight_passed"
GATE_BLOCKED = "gate_blocked"
PROXY_STARTED = "proxy_started"
PROXY_READY = "proxy_ready"
IDENTITY_VERIFIED = "identity_verified"
CASE_PROCESS_STARTED = "case_process_started"
CASE_PROCESS_EXITED = "case_process_exited"
FIXTURE_TESTS_RUN = "fixture_tests_run"
PROXY_STOPPED = "proxy_stopped"
SECRET_SCAN_DONE = "secret_scan_done"
REPORT_WRITTEN = "report_written"
RUN_ABORTED = "run_aborted"

# A pass needs each of these exactly once, in this order (``report_written`` follows, and
# ``verify`` checks it is the last line).
REQUIRED_EVENTS: tuple[str, ...] = (
    RUN_STARTED, PREFLIGHT_PASSED, PROXY_STARTED, PROXY_READY, IDENTITY_VERIFIED,
    CASE_PROCESS_STARTED, CASE_PROCESS_EXITED, FIXTURE_TESTS_RUN, PROXY_STOPPED, SECRET_SCAN_DONE,
)
KNOWN_EVENTS = frozenset((*REQUIRED_EVENTS, GATE_BLOCKED, REPORT_WRITTEN, RUN_ABORTED))


class EventLog:
    """Append-only writer; raises ``proxy.hashchain.ChainError`` if an event cannot be
    written (a run whose events cannot be recorded must not go on)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._chain = HashChainWriter(self.path)
        self._chain.open()

    def emit(self, name: str, **fields: Any) -> str:
        if name not in KNOWN_EVENTS:
            raise ValueError(f"unknown event {name!r}")
        return self._chain.append({"event": name, "time": utc_now_rfc3339(), **fields})

    def close(self) -> None:
        self._chain.close()


def read_events(path: Path) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """The chain verdict and the events (without the chain fields); a missing file is a
    failed verdict, not an exception."""
    try:
        verdict, raw = read_chain(path)
    except OSError as exc:
        return ChainVerdict(ok=False, records=0, last_sha256="", problems=[f"cannot read {path}: {exc.strerror}"]), []
    return verdict, [{k: v for k, v in r.items() if k not in ("seq", "prev_sha256")} for r in raw]


def check_required_order(names: list[str]) -> tuple[list[str], list[str]]:
    """(missing, problems) for the required events: each exactly once, in order."""
    missing = [n for n in REQUIRED_EVENTS if n not in names]
    problems: list[str] = []
    for n in REQUIRED_EVENTS:
        if names.count(n) > 1:
            problems.append(f"{n} recorded {names.count(n)} times")
    present = [n for n in names if n in REQUIRED_EVENTS]
    expected = [n for n in REQUIRED_EVENTS if n in present]
    if not problems and present != expected:
        problems.append("required events out of order: " + ", ".join(present))
    return missing, problems
