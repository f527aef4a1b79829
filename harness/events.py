"""The run's event log: hash-chained JSONL of typed events, one ``os.write`` per event.

Same chain as the proxy's evidence (``proxy.hashchain``), so one verifier serves both and
an edited, deleted or reordered event is caught by ``case-harness verify``. Each event type
is one pydantic model below (``extra="forbid"``, strict types: the writer writes JSON
types exactly, so ``"passed": "yes"`` is garbled, not true): the writer takes a model, so a misspelt
or missing field is a type error (mypy) or a validation error when the event is made,
never a field silently absent from the log. The reader (:func:`parse_events`) turns each
line back into its model and names the line and field of anything that is not a known,
well-formed event; the report fails on any such problem (``events_malformed``). The names
and the order a pass requires are fixed here and documented in ``docs/harness-contract.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from proxy.evidence import utc_now_rfc3339
from proxy.hashchain import ChainVerdict, HashChainWriter, read_chain, read_chain_bytes, unreadable_verdict

RUN_STARTED: Final = "run_started"
PREFLIGHT_PASSED: Final = "preflight_passed"
GATE_BLOCKED: Final = "gate_blocked"
PROXY_STARTED: Final = "proxy_started"
PROXY_READY: Final = "proxy_ready"
IDENTITY_VERIFIED: Final = "identity_verified"
CASE_PROCESS_STARTED: Final = "case_process_started"
CASE_PROCESS_EXITED: Final = "case_process_exited"
FIXTURE_TESTS_RUN: Final = "fixture_tests_run"
PROXY_STOPPED: Final = "proxy_stopped"
SECRET_SCAN_DONE: Final = "secret_scan_done"
REPORT_WRITTEN: Final = "report_written"
RUN_ABORTED: Final = "run_aborted"

# A pass needs each of these exactly once, in this order (``report_written`` follows, and
# ``verify`` checks it is the last line).
REQUIRED_EVENTS: tuple[str, ...] = (
    RUN_STARTED, PREFLIGHT_PASSED, PROXY_STARTED, PROXY_READY, IDENTITY_VERIFIED,
    CASE_PROCESS_STARTED, CASE_PROCESS_EXITED, FIXTURE_TESTS_RUN, PROXY_STOPPED, SECRET_SCAN_DONE,
)
KNOWN_EVENTS = frozenset((*REQUIRED_EVENTS, GATE_BLOCKED, REPORT_WRITTEN, RUN_ABORTED))
# Fields the hash chain adds to every line; not part of any event.
CHAIN_FIELDS = frozenset({"seq", "prev_sha256"})

RunStatus = Literal["pass", "fail", "blocked", "unproven"]


class _Event(BaseModel):
    """Fields every event has. ``time`` is stamped when the event is made (the writer
    writes it at once); the reader requires it on every line."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    time: str = Field(default_factory=utc_now_rfc3339, description="when the harness recorded it (RFC 3339, UTC)")


class RunStarted(_Event):
    event: Literal["run_started"] = RUN_STARTED
    run_id: str
    fixture: str
    stage: str
    profile_sha256: str
    decision_sha256: str | None = Field(description="the decision record's digest BEFORE the run (null: no file)")
    admission_sha256: str | None = Field(description="the admission JSON's digest BEFORE the run (null: no file)")
    backend: Literal["external", "scripted"]
    attestation_key_id: str | None = Field(description="the key that will sign attestation.dsse.json; null: unsigned")


class PreflightIdentity(BaseModel):
    """What the preflight established (never the backend URL): both preflight outcomes
    carry it; a value the preflight could not read (an unusable artifact) is null."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    decision_status: str | None = None
    provider_class: str | None = None
    admission_provider: str | None = None
    admission_model: str | None = None
    admission_status: str | None = None
    upstream_class: str | None = None
    upstream_fingerprint: str | None = None


class PreflightPassed(_Event, PreflightIdentity):
    event: Literal["preflight_passed"] = PREFLIGHT_PASSED
    gates: list[str] = Field(description="the gate codes checked")


class GateReason(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    code: str
    message: str


class GateBlocked(_Event, PreflightIdentity):
    event: Literal["gate_blocked"] = GATE_BLOCKED
    reasons: list[GateReason] = Field(min_length=1)


class ProxyStarted(_Event):
    event: Literal["proxy_started"] = PROXY_STARTED
    pid: int
    port: int | None = Field(description="null when the proxy listens on a unix socket")
    listen: Literal["unix", "tcp"]
    chain_mode: Literal["hmac-sha256"] = Field(description="the evidence chain the proxy was told to write: "
                                               "keyed with the run's key (harness.head_listener)")
    head_channel: Literal["pipe"] = Field(description="how the proxy reports its chain head to the harness")


class ProxyReady(_Event):
    event: Literal["proxy_ready"] = PROXY_READY


class IdentityVerified(_Event):
    event: Literal["identity_verified"] = IDENTITY_VERIFIED
    backend_models: list[str]
    admitted_model: str
    owned_by: str | None
    evidence_grade: Literal["real", "demo"]


class BubblewrapIsolation(BaseModel):
    """Case ran in the bubblewrap sandbox (``harness.sandbox``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["bubblewrap"]
    version: str
    network: Literal["proxy-only", "host"]
    pid: Literal["namespace", "host"]
    home: Literal["fresh", "host"]
    uid: int
    relay_port: int
    dns: Literal["sink", "none"]
    writable: list[str]
    ro_paths: list[str]


class NoIsolation(BaseModel):
    """``--no-sandbox``: Case shared the harness's network, files and processes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["none"]


class CaseProcessStarted(_Event):
    event: Literal["case_process_started"] = CASE_PROCESS_STARTED
    pid: int = Field(description="bubblewrap's outer process when sandboxed")
    argv_sha256: str
    env_names: list[str] = Field(description="the names of Case's environment, never the values")
    isolation: Annotated[BubblewrapIsolation | NoIsolation, Field(discriminator="kind")]


class CaseProcessExited(_Event):
    event: Literal["case_process_exited"] = CASE_PROCESS_EXITED
    exit_code: int
    duration_s: float
    timed_out: bool
    namespace_survivors: int | None = Field(description="processes left in Case's PID namespace after it was "
                                            "killed (0 is the proof); null: not sandboxed")
    dns_queries: int | None = Field(description="lines of dns/queries.jsonl; null: no DNS sink (not sandboxed)")
    dns_queries_sha256: str | None = Field(description="digest of dns/queries.jsonl once the sink stopped")
    proxy_alive: bool = Field(description="the harness's own proxy process was running when Case exited")


class FixtureTestsRun(_Event):
    event: Literal["fixture_tests_run"] = FIXTURE_TESTS_RUN
    commit: str | None = Field(description="Case's final commit; null: Case made none")
    committed: bool
    passed: bool
    total: int
    failed: int
    errors: int
    sandboxed: bool
    git_controls_reset: list[str]


class ChainCheck(BaseModel):
    """The evidence file as the harness verified it, under the run key, once the proxy exited."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["hmac-sha256", "sha256", "none"] = Field(description="none: the file was missing")
    ok: bool
    records: int | None = None
    head_hmac: str | None = Field(default=None, description="the MAC of the file's last line")
    last_sha256: str | None = None
    problems: list[str] = Field(max_length=5)


class HeadReport(BaseModel):
    """What the proxy said of its chain head over its private channel (the last report)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reports: int
    records: int | None
    head: str | None
    pid: int | None
    stop: bool = Field(description="the last report was the proxy's stop report")
    problems: list[str]


class ProxyStopped(_Event):
    event: Literal["proxy_stopped"] = PROXY_STOPPED
    exit_code: int | None
    evidence_sha256: str | None
    metrics_sha256: str | None
    pid: int = Field(description="the pid of the proxy the harness started and stopped")
    chain: ChainCheck
    head_report: HeadReport | None = Field(description="null: the run had no head channel")
    metrics_transport: Literal["unix", "tcp"] | None = Field(
        default=None, description="how /metrics was read; null: the scrape failed")
    metrics_peer_pid: int | None = Field(default=None, description="the pid that answered /metrics (SO_PEERCRED)")


class SecretScanDone(_Event):
    event: Literal["secret_scan_done"] = SECRET_SCAN_DONE
    findings_count: int
    places_scanned: list[str]
    secret_scan_sha256: str | None


class ReportWritten(_Event):
    event: Literal["report_written"] = REPORT_WRITTEN
    report_sha256: str
    status: RunStatus
    decision_sha256_after: str | None
    admission_sha256_after: str | None
    report_secret_scan_clean: bool


class RunAborted(_Event):
    event: Literal["run_aborted"] = RUN_ABORTED
    phase: Literal["backend", "proxy", "proxy_ready", "identity", "sandbox"]
    reason: str


Event = Annotated[
    RunStarted | PreflightPassed | GateBlocked | ProxyStarted | ProxyReady | IdentityVerified
    | CaseProcessStarted | CaseProcessExited | FixtureTestsRun | ProxyStopped | SecretScanDone | ReportWritten
    | RunAborted,
    Field(discriminator="event"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


class EventLog:
    """Append-only writer; raises ``proxy.hashchain.ChainError`` if an event cannot be
    written (a run whose events cannot be recorded must not go on)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._chain = HashChainWriter(self.path)
        self._chain.open()

    def emit(self, event: Event) -> str:
        # Validated again as written: a model built with model_construct (no checks)
        # must not put an unreadable line into the log.
        checked = _EVENT.validate_python(event.model_dump(warnings=False))
        return self._chain.append({"event": checked.event, **checked.model_dump(mode="json", exclude={"event"})})

    def close(self) -> None:
        self._chain.close()


class ParsedEvents(BaseModel):
    """An event log read back: the chain's verdict, every well-formed event in order, and
    a problem naming the line (and field) of each line that is not one."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    verdict: ChainVerdict
    events: list[Event]
    problems: list[str]


def _field_errors(exc: ValidationError, name: str) -> list[str]:
    """Pydantic's errors as ``field 'a.b': message``, without the offending value (a
    line may hold anything, a secret included)."""
    out: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] == name:  # the discriminated union's own level
            loc = loc[1:]
        field = ".".join(loc) or "(event)"
        out.append(f"field '{field}': {err['msg']}")
    return out


def parse_event(record: dict[str, Any], line: int) -> Event | str:
    """One chain record as its event, or a problem naming the line and field."""
    fields = {k: v for k, v in record.items() if k not in CHAIN_FIELDS}
    name = fields.get("event")
    if not isinstance(name, str):
        return f"line {line}: no event name (field 'event' is missing or not a string)"
    if name not in KNOWN_EVENTS:
        return f"line {line}: unknown event type {name[:60]!r}"
    if "time" not in fields:
        return f"line {line} ({name}): field 'time': Field required"
    try:
        return _EVENT.validate_python(fields)
    except ValidationError as exc:
        return f"line {line} ({name}): " + "; ".join(_field_errors(exc, name))


def parse_events(data: bytes) -> ParsedEvents:
    """Typed events from the bytes of an event log. The chain is checked as well; a line
    that is not JSON or not an object is a chain problem and a problem here."""
    verdict, _ = read_chain_bytes(data)
    events: list[Event] = []
    problems: list[str] = []
    whole = data[: data.rfind(b"\n") + 1]  # a partial last line is the chain's problem already
    for n, line in enumerate(whole.splitlines(), start=1):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            problems.append(f"line {n}: not valid JSON")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        parsed = parse_event(record, n)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            events.append(parsed)
    return ParsedEvents(verdict=verdict, events=events, problems=problems)


def read_typed_events(path: Path) -> ParsedEvents:
    """:func:`parse_events` of a file; a missing or unreadable file is a failed verdict."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ParsedEvents(verdict=unreadable_verdict(path, exc), events=[], problems=[])
    return parse_events(data)


def read_events(path: Path) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """The chain verdict and the raw records (without the chain fields), for tools and
    tests that look at or rewrite the log as JSON; the report reads :func:`parse_events`.
    A missing file is a failed verdict, not an exception."""
    try:
        verdict, raw = read_chain(path)
    except OSError as exc:
        return unreadable_verdict(path, exc), []
    return verdict, [{k: v for k, v in r.items() if k not in CHAIN_FIELDS} for r in raw]


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
