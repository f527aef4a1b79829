"""The Harness Evidence Interface: ``report.json``, computed only from a run directory.

``collect_inputs`` reads the run's files (events, proxy evidence, metrics, secret scan);
``compute_report`` is a pure function of them. Nothing can set a status: a pass is the
absence of every failure reason below, and ``case-harness verify`` recomputes the report
from the same files and compares.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from proxy.codes import Decision, ErrorCode
from proxy.evidence import NON_MODEL_ENDPOINTS, EvidenceRecord, records_from_bytes
from proxy.evidence_files import EvidenceFile, lines_from_bytes, pair_forwarding
from proxy.fallback import is_fallback_attempt, is_fallback_refusal
from proxy.hashchain import GENESIS, ChainVerdict, unreadable_verdict
from proxy.upstream_policy import is_known_provider_host

from . import events as ev
from .attestation import PREDICATE_TYPE
from .dns_sink import read_queries
from .proxy_proof import ProxyProof, judge_proxy_proof, proof_line
from .reasons import Reason, fail
from .secret_scan import ScanResult

REPORT_SCHEMA_VERSION: Literal[1] = 1
BRIDGE_PROVIDER = "openai"
# The schema ships as package data (``case-harness schema`` prints it from an installed
# wheel); config/ keeps a copy for readers of the source tree, held identical by a test.
PACKAGED_SCHEMA: Traversable = files("harness") / "data" / "report.schema.json"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "report.schema.json"

# unproven: every check held, but Case did not run in the sandbox (--no-sandbox), so
# nothing shows it could not have gone around the proxy: never a pass.
Status = ev.RunStatus


class ExternalFallback(BaseModel):
    used: bool = Field(description="true if any attempt to reach another model, provider or upstream was seen")
    attempts: int
    by_reason: dict[str, int]
    by_family: dict[str, int]
    attempted_models: list[str]
    metrics_fallback_rejections: float | None = Field(
        description="sum of case_proxy_fallback_rejections_total in the last /metrics scrape (null: no scrape)")
    dns_attempts: int = Field(default=0, description="queries for known model-API hosts seen by the sandbox's DNS sink")


class Egress(BaseModel):
    attempts: int = Field(description="forward-proxy attempts (CONNECT / absolute-form), all refused by the proxy")
    hosts: dict[str, int] = Field(description="attempts by target host")
    provider_hosts: list[str] = Field(description="target hosts that belong to a model provider (fallback attempts)")
    dns_names: dict[str, int] = Field(
        default={}, description="names Case tried to resolve in its sandbox (the DNS sink answered NXDOMAIN), "
        "with the number of queries; telemetry, update checks and the like land here without failing the run")
    dns_provider_names: list[str] = Field(
        default=[], description="resolved names of known model-API hosts: fallback attempts")


class TestsResult(BaseModel):
    ran: bool
    passed: bool
    total: int = 0
    failed: int = 0
    errors: int = 0
    committed: bool = False
    commit: str | None = None


class CaseProcess(BaseModel):
    started: bool
    exit_code: int | None = None
    duration_s: float | None = None
    timed_out: bool = False


class Isolation(BaseModel):
    """What isolated Case (from ``case_process_started`` and ``case_process_exited``)."""

    kind: Literal["bubblewrap", "none"] = Field(description="none: --no-sandbox; such a run is never a pass")
    version: str | None = Field(default=None, description="bubblewrap's version")
    network: Literal["proxy-only", "host"] = Field(
        description="proxy-only: a network namespace with loopback only, the proxy reached through a relay")
    pid: Literal["namespace", "host"] = Field(description="namespace: Case and its children in their own PID namespace")
    home: Literal["fresh", "host"] = Field(description="fresh: a tmpfs HOME made for this run")
    uid: int | None = None
    dns: Literal["sink", "none"] = Field(default="none", description="sink: names Case resolves are recorded")
    writable: list[str] = Field(default=[], description="the only host paths Case could write (the repository)")
    ro_paths: list[str] = Field(default=[], description="host paths exposed read-only beyond the minimal system")
    namespace_survivors: int | None = Field(
        default=None, description="processes of Case's PID namespace left after it was killed (0 is the proof; "
        "null: not proven)")


class RequiredEvents(BaseModel):
    passed: bool
    missing: list[str]
    problems: list[str]


class SecretScanSummary(BaseModel):
    ran: bool
    clean: bool
    secrets_known: int = 0
    places_scanned: list[str] = []
    findings: list[dict[str, str]] = Field(default=[], description="place, kind, location; never the value")


class Digests(BaseModel):
    events_sha256: str | None = Field(description="events.jsonl up to (not including) report_written")
    evidence_sha256: str | None
    decision_sha256_before: str | None
    decision_sha256_after: str | None
    admission_sha256_before: str | None
    admission_sha256_after: str | None
    profile_sha256: str | None


class Chains(BaseModel):
    events_ok: bool
    evidence_ok: bool | None = Field(description="null when the run never started the proxy")
    problems: list[str]


class Endpoint(BaseModel):
    upstream_class: str | None = Field(description="loopback | private | allowlisted; never the URL")
    fingerprint: str | None


class Timings(BaseModel):
    started_at: str | None
    finished_at: str | None
    case_duration_s: float | None


class AttestationSummary(BaseModel):
    """How the run is attested (``attestation.dsse.json``; ``docs/attestation.md``), from
    ``run_started``, which records the key the harness loaded before anything ran."""

    file: Literal["attestation.dsse.json"] = "attestation.dsse.json"
    signed: bool = Field(description="false: no signing key was given (CASE_HARNESS_SIGNING_KEY_FILE); the "
                         "statement is written in an envelope with no signatures")
    key_id: str | None = Field(default=None, description="the Ed25519 key id the envelope is signed with "
                               "(securesystemslib's default key id)")
    predicate_type: str = PREDICATE_TYPE


class Report(BaseModel):
    """Schema version 1 of the Harness Evidence Interface (documented in
    ``config/report.schema.json`` and the README)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = REPORT_SCHEMA_VERSION
    status: Status
    reasons: list[Reason]
    run_id: str | None
    stage: str | None
    fixture: str | None
    evidence_grade: Literal["real", "demo", "none"] = Field(
        description="real: a backend the harness did not script served the run; demo: the built-in scripted "
        "test backend (never evidence about a real model); none: no backend served it")
    case_model_provider: str | None
    case_model: str | None
    case_model_admission_status: str | None
    case_runtime_bridge_provider: str = BRIDGE_PROVIDER
    decision_status: str | None
    provider_class: str | None
    admitted_requests: int
    external_fallback: ExternalFallback
    egress: Egress
    served_model_mismatches: int
    tests_passed: bool
    tests: TestsResult
    case_process: CaseProcess
    isolation: Isolation | None = Field(description="null when Case never started")
    required_events_passed: bool
    required_events: RequiredEvents
    secret_scan: SecretScanSummary
    digests: Digests
    chains: Chains
    endpoint: Endpoint
    timings: Timings
    attestation: AttestationSummary = Field(
        default_factory=lambda: AttestationSummary(signed=False),
        description="whether attestation.dsse.json is signed; a run that says nothing here was not signed")
    proxy_proof: ProxyProof | None = Field(
        default=None, description="that the run's own proxy wrote the evidence (harness.proxy_proof); null: no "
        "proxy was started")


class ReportInputs(BaseModel):
    """What the report is computed from (all read from the run directory)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    events_verdict: ChainVerdict
    events: list[ev.Event]
    # Lines of events.jsonl that are not a known, well-formed event (harness.events).
    event_problems: list[str] = []
    events_sha256: str | None
    evidence_present: bool
    evidence_verdict: ChainVerdict | None
    evidence: list[EvidenceRecord]
    evidence_sha256: str | None
    metrics_text: str | None
    scan: ScanResult | None
    scan_problem: str | None = None
    dns_queries: list[dict[str, str]] = []
    dns_sha256: str | None = None
    decision_sha256_after: str | None
    admission_sha256_after: str | None
    # Forwarded requests whose completion record is missing (proxy.evidence_files), as
    # "line N: request ID (endpoint)".
    unpaired_forwarding: list[str] = []


def unpaired_in(path: Path, data: bytes) -> list[str]:
    """The forwarding records of one log that no completion record names."""
    verdict, lines = lines_from_bytes(data)
    unpaired, _ = pair_forwarding([EvidenceFile(path, verdict, lines)])
    return [f"line {u.line}: request {u.request_id} ({u.endpoint})" for u in unpaired]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def events_bytes_before_report(data: bytes) -> bytes:
    """The event log without a trailing ``report_written`` line (what the report covers)."""
    lines = data.splitlines(keepends=True)
    if lines:
        try:
            last = json.loads(lines[-1])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
        if isinstance(last, dict) and last.get("event") == ev.REPORT_WRITTEN:
            return b"".join(lines[:-1])
    return data


def collect_inputs(run_dir: Path, *, decision_sha256_after: str | None,
                   admission_sha256_after: str | None) -> ReportInputs:
    run_dir = Path(run_dir)
    events_path = run_dir / "events.jsonl"
    try:
        raw_events = events_bytes_before_report(events_path.read_bytes())
    except OSError:
        raw_events = None
    if raw_events is None:
        parsed = ev.ParsedEvents(verdict=ChainVerdict(ok=False, records=0, last_sha256=GENESIS,
                                                      problems=["events.jsonl is missing or unreadable"]),
                                 events=[], problems=[])
    else:
        parsed = ev.parse_events(raw_events)
    evidence_path = run_dir / "proxy" / "evidence.jsonl"
    evidence: list[EvidenceRecord] = []
    evidence_verdict = None
    evidence_sha = None
    unpaired: list[str] = []
    if evidence_path.exists():
        try:
            data = evidence_path.read_bytes()
        except OSError as exc:
            evidence_verdict = unreadable_verdict(evidence_path, exc)
        else:
            evidence_sha = _sha(data)
            evidence_verdict, evidence = records_from_bytes(data)
            unpaired = unpaired_in(evidence_path, data)
    metrics_path = run_dir / "proxy" / "metrics.prom"
    metrics_text = metrics_path.read_text(encoding="utf-8", errors="replace") if metrics_path.is_file() else None
    scan = None
    scan_problem = None
    scan_path = run_dir / "secret_scan.json"
    if scan_path.is_file():
        try:
            scan = ScanResult.model_validate_json(scan_path.read_bytes())
        except ValueError:
            scan_problem = "secret_scan.json is not a valid scan result"
    dns_path = run_dir / "dns" / "queries.jsonl"
    dns_sha = _sha(dns_path.read_bytes()) if dns_path.is_file() else None
    return ReportInputs(events_verdict=parsed.verdict, events=parsed.events, event_problems=parsed.problems,
                        dns_queries=read_queries(dns_path), dns_sha256=dns_sha,
                        events_sha256=_sha(raw_events) if raw_events is not None else None,
                        evidence_present=evidence_path.exists(), evidence_verdict=evidence_verdict,
                        evidence=evidence, evidence_sha256=evidence_sha, metrics_text=metrics_text, scan=scan,
                        scan_problem=scan_problem, decision_sha256_after=decision_sha256_after,
                        admission_sha256_after=admission_sha256_after, unpaired_forwarding=unpaired)


def metric_sum(text: str | None, name: str) -> float | None:
    """Sum of every sample of ``name`` (any labels) in Prometheus text format."""
    if text is None:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest and rest[0] not in "{ ":
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
    return total


_E = TypeVar("_E", bound=BaseModel)


def _first(events: list[ev.Event], kind: type[_E]) -> _E | None:
    return next((e for e in events if isinstance(e, kind)), None)


@dataclass(frozen=True)
class RunEvents:
    """The events a report reads, typed: the first of each kind (a repeated required
    event is a required-events problem, not a second value)."""

    names: list[str]
    last_time: str | None
    started: ev.RunStarted | None
    preflight: ev.PreflightPassed | None
    blocked: ev.GateBlocked | None
    identity: ev.IdentityVerified | None
    proxy_started: ev.ProxyStarted | None
    case_started: ev.CaseProcessStarted | None
    case_exited: ev.CaseProcessExited | None
    tests: ev.FixtureTestsRun | None
    stopped: ev.ProxyStopped | None
    scan: ev.SecretScanDone | None
    aborted: list[ev.RunAborted]

    @classmethod
    def of(cls, events: list[ev.Event]) -> RunEvents:
        return cls(names=[e.event for e in events], last_time=events[-1].time if events else None,
                   started=_first(events, ev.RunStarted), preflight=_first(events, ev.PreflightPassed),
                   blocked=_first(events, ev.GateBlocked), identity=_first(events, ev.IdentityVerified),
                   proxy_started=_first(events, ev.ProxyStarted),
                   case_started=_first(events, ev.CaseProcessStarted), case_exited=_first(events, ev.CaseProcessExited),
                   tests=_first(events, ev.FixtureTestsRun), stopped=_first(events, ev.ProxyStopped),
                   scan=_first(events, ev.SecretScanDone), aborted=[e for e in events if isinstance(e, ev.RunAborted)])

    @property
    def preflight_identity(self) -> ev.PreflightIdentity:
        """What the preflight established, whichever way it ended (all null: no preflight)."""
        return self.preflight or self.blocked or ev.PreflightIdentity()


def _is_fallback(rec: EvidenceRecord) -> bool:
    """A request record that was an attempt to reach another model, provider or upstream
    (``proxy.fallback``: the definition the proxy's metric uses too)."""
    return rec.kind == "request" and is_fallback_attempt(rec.decision, rec.reason, rec.target_host)


_BLOCK_BREAKERS = frozenset({"artifact_changed", "secret_found", "secret_scan_changed", "events_chain_broken",
                             "events_malformed", "case_started_after_block"})


# --------------------------------------------------------------------------- sections
# Each takes the inputs (and the typed events) and returns its part of the report and
# the failure reasons it found; compute_report adds them up in a fixed order.


def chains_section(inp: ReportInputs) -> tuple[Chains, list[Reason]]:
    """Both hash chains, and every line of the event log that is not a known, well-formed
    event (an unknown or garbled event fails the run: it is never skipped)."""
    problems = [f"events: {p}" for p in inp.events_verdict.problems]
    evidence_ok: bool | None = None
    if inp.evidence_verdict is not None:
        evidence_ok = inp.evidence_verdict.ok
        problems += [f"evidence: {p}" for p in inp.evidence_verdict.problems]
    reasons: list[Reason] = []
    if not inp.events_verdict.ok:
        reasons.append(fail("events_chain_broken",
                               "events.jsonl does not verify: " + "; ".join(inp.events_verdict.problems[:3])))
    if inp.event_problems:
        reasons.append(fail("events_malformed", f"events.jsonl holds {len(inp.event_problems)} line(s) that are "
                               "not a known, well-formed event: " + "; ".join(inp.event_problems[:3])))
    return Chains(events_ok=inp.events_verdict.ok, evidence_ok=evidence_ok, problems=problems), reasons


def block_section(run: RunEvents) -> list[Reason]:
    """A blocked run: the gates' own reasons, and Case must not have started after them."""
    assert run.blocked is not None
    reasons = [fail(r.code, r.message) for r in run.blocked.reasons]
    if run.case_started is not None:
        reasons.append(fail("case_started_after_block", "case_process_started appears after gate_blocked"))
    return reasons


def evidence_section(inp: ReportInputs, run: RunEvents) -> list[Reason]:
    """The proxy's evidence log: there, whole, paired, and what the proxy left at stop."""
    reasons = [fail("run_aborted", f"{a.phase}: {a.reason}") for a in run.aborted]
    if not inp.evidence_present:
        reasons.append(fail("evidence_missing", "the proxy's evidence log (proxy/evidence.jsonl) is missing"))
    elif inp.evidence_verdict is None or not inp.evidence_verdict.ok:  # present but unread: not verified
        reasons.append(fail("evidence_chain_broken", "proxy/evidence.jsonl does not verify: "
                            + "; ".join((inp.evidence_verdict.problems if inp.evidence_verdict else [])[:3])))
    if inp.unpaired_forwarding:
        # A request forwarded and never completed: the proxy crashed or was killed
        # mid-request, so what that request was answered with is not in the evidence.
        reasons.append(fail(
            "evidence_unpaired_forwarding",
            f"{len(inp.unpaired_forwarding)} forwarded request(s) have no completion record (the proxy "
            "stopped mid-request): " + "; ".join(inp.unpaired_forwarding[:3])))
    recorded = run.stopped.evidence_sha256 if run.stopped is not None else None
    if inp.evidence_present and recorded not in (None, inp.evidence_sha256):
        reasons.append(fail("evidence_changed",
                               "proxy/evidence.jsonl differs from the digest recorded when the proxy stopped"))
    return reasons


@dataclass(frozen=True)
class ModelRoute:
    """Which model served Case, and under which admission, from the evidence."""

    admitted_requests: int
    served_model_mismatches: int
    grade: Literal["real", "demo", "none"]
    case_model: str | None
    provider: str | None
    admission_status: str | None


def model_section(inp: ReportInputs, run: RunEvents, blocked: bool) -> tuple[ModelRoute, list[Reason]]:
    """The admitted model requests, the identity the proxy enforced, the upstream it used
    and the model the backend said it served."""
    reqs = [r for r in inp.evidence if r.kind == "request"]
    admitted = [r for r in reqs if r.decision == Decision.ADMITTED and r.endpoint not in NON_MODEL_ENDPOINTS]
    mismatches = sum(1 for r in reqs if r.reason == ErrorCode.SERVED_MODEL_MISMATCH)
    served = Counter(r.served_model for r in admitted if r.served_model)
    # The proxy states what it enforced in its start record; one identity per run.
    starts = [r for r in inp.evidence if r.kind == "proxy_start"]
    identities = {(r.admission_provider, r.admission_model, r.admission_status) for r in starts}
    proxy_identity = next(iter(identities)) if len(identities) == 1 else (None, None, None)
    upstreams = {r.upstream_fingerprint for r in starts} | {r.upstream_fingerprint for r in admitted}
    pre = run.preflight_identity
    admitted_model = (run.identity.admitted_model if run.identity else None) or pre.admission_model
    reasons: list[Reason] = []
    if not blocked:
        if not admitted:
            reasons.append(fail("no_admitted_requests", "the proxy recorded no admitted model request"))
        if inp.evidence_present and len(identities) != 1:
            reasons.append(fail("proxy_identity_unclear",
                                   f"the evidence holds {len(identities)} different proxy admissions"))
        elif inp.evidence_present and proxy_identity[1] != admitted_model:
            reasons.append(fail("proxy_identity_mismatch",
                                   "the proxy enforced a different model than the preflight admitted"))
        if inp.evidence_present and upstreams - {pre.upstream_fingerprint}:
            reasons.append(fail("upstream_mismatch",
                                   "the proxy forwarded to a backend other than the one the preflight checked"))
        if mismatches:
            reasons.append(fail("served_model_mismatch",
                                   f"{mismatches} response(s) named a model other than the admitted one"))
        if admitted_model and set(served) - {admitted_model}:
            reasons.append(fail("served_model_mismatch",
                                   "the backend reported serving: " + ", ".join(sorted(served))))
    case_model = next(iter(served)) if len(served) == 1 else None
    provider, proxy_model, admission_status = proxy_identity
    if case_model is None or case_model != proxy_model:
        provider = admission_status = None
    return ModelRoute(admitted_requests=len(admitted), served_model_mismatches=mismatches,
                      grade=run.identity.evidence_grade if run.identity else "none", case_model=case_model,
                      provider=provider, admission_status=admission_status), reasons


def fallback_section(inp: ReportInputs, run: RunEvents, blocked: bool) -> tuple[ExternalFallback, Egress, list[Reason]]:
    """Every attempt to reach another model, provider or upstream (refused requests, the
    forward-proxy and DNS attempts at providers' hosts), the proxy's own count of them in
    /metrics, and the DNS log's integrity."""
    reqs = [r for r in inp.evidence if r.kind == "request"]
    fallbacks = [r for r in reqs if _is_fallback(r)]
    egress = [r for r in reqs if r.reason == ErrorCode.FORWARD_PROXY_REFUSED]
    metrics_fallbacks = metric_sum(inp.metrics_text, "case_proxy_fallback_rejections_total")
    all_fallback_refusals = sum(1 for r in reqs if is_fallback_refusal(r.decision, r.reason))
    dns_names = Counter(q["name"] for q in inp.dns_queries if q.get("name"))
    dns_provider = {n: c for n, c in dns_names.items() if is_known_provider_host(n)}
    reasons: list[Reason] = []
    if not blocked:
        if fallbacks:
            by = Counter(r.reason or "" for r in fallbacks)
            reasons.append(fail("external_fallback_attempted",
                                   f"{len(fallbacks)} attempt(s) to reach another model, provider or upstream: "
                                   + ", ".join(f"{k}={v}" for k, v in sorted(by.items()))))
        if inp.metrics_text is None:
            reasons.append(fail("metrics_missing", "no /metrics scrape of the proxy (proxy/metrics.prom)"))
        elif metrics_fallbacks != all_fallback_refusals:
            reasons.append(fail("metrics_evidence_disagree", f"/metrics counts {metrics_fallbacks:g} fallback "
                                   f"rejections, the evidence {all_fallback_refusals}"))
        if dns_provider:
            reasons.append(fail("external_fallback_attempted",
                                   f"Case tried to resolve {sum(dns_provider.values())} time(s) a model "
                                   f"provider's host: {', '.join(sorted(dns_provider))}"))
    recorded_dns = run.case_exited.dns_queries_sha256 if run.case_exited else None
    if recorded_dns is not None and recorded_dns != (inp.dns_sha256 or _sha(b"")):
        reasons.append(fail("dns_log_changed",
                               "dns/queries.jsonl differs from the digest recorded when the DNS sink stopped"))
    egress_hosts = Counter(r.target_host or "?" for r in egress)
    fallback = ExternalFallback(
        used=bool(fallbacks) or bool(dns_provider), attempts=len(fallbacks), dns_attempts=sum(dns_provider.values()),
        by_reason=dict(Counter(r.reason or "" for r in fallbacks)),
        by_family=dict(Counter(r.family or "other" for r in fallbacks)),
        attempted_models=sorted({r.requested_model for r in fallbacks if r.requested_model}),
        metrics_fallback_rejections=metrics_fallbacks)
    out = Egress(attempts=len(egress), hosts=dict(egress_hosts),
                 provider_hosts=sorted(h for h in egress_hosts if is_known_provider_host(h)),
                 dns_names=dict(dns_names), dns_provider_names=sorted(dns_provider))
    return fallback, out, reasons


def process_section(run: RunEvents, blocked: bool) -> tuple[CaseProcess, list[Reason]]:
    """Case's process: started, not timed out, exit code 0."""
    started, exited = run.case_started, run.case_exited
    exit_code = exited.exit_code if exited else None
    reasons: list[Reason] = []
    if not blocked:
        if started is None:
            reasons.append(fail("case_not_started", "Case was never started"))
        elif exited is not None and exited.timed_out:
            reasons.append(fail("case_timed_out", "Case hit its time limit and was killed"))
        elif exit_code != 0:
            reasons.append(fail("case_exit_nonzero", f"Case exited with {exit_code}"))
    return CaseProcess(started=started is not None, exit_code=exit_code,
                       duration_s=exited.duration_s if exited else None,
                       timed_out=bool(exited and exited.timed_out)), reasons


def tests_section(run: RunEvents, blocked: bool) -> tuple[TestsResult, list[Reason]]:
    """The acceptance tests, on Case's commit."""
    t = run.tests
    reasons: list[Reason] = []
    if not blocked:
        if t is None:
            reasons.append(fail("acceptance_tests_not_run", "the acceptance tests were not run"))
        elif not t.committed:
            reasons.append(fail("case_made_no_commit",
                                   "Case did not commit; acceptance tests need a committed tree"))
        elif not t.passed:
            reasons.append(fail("acceptance_tests_failed", f"acceptance tests on Case's commit: {t.failed} failed, "
                                   f"{t.errors} errors of {t.total}"))
    if t is None:
        return TestsResult(ran=False, passed=False), reasons
    return TestsResult(ran=True, passed=t.passed, total=t.total, failed=t.failed, errors=t.errors,
                       committed=t.committed, commit=t.commit), reasons


def required_events_section(run: RunEvents, blocked: bool) -> tuple[RequiredEvents, list[Reason]]:
    """Each required event exactly once, in order."""
    missing, problems = ev.check_required_order(run.names)
    reasons: list[Reason] = []
    if not blocked and (missing or problems):
        reasons.append(fail("required_events_missing", "; ".join(
            ([f"missing: {', '.join(missing)}"] if missing else []) + problems)))
    return RequiredEvents(passed=not missing and not problems, missing=missing, problems=problems), reasons


def secret_scan_section(inp: ReportInputs, run: RunEvents, blocked: bool) -> tuple[SecretScanSummary, list[Reason]]:
    """The secret scan (also for blocked runs, when one ran), as the event recorded it."""
    scan = inp.scan
    reasons: list[Reason] = []
    if scan is None:
        if not blocked:
            reasons.append(fail("secret_scan_missing",
                                   inp.scan_problem or "no secret scan result (secret_scan.json)"))
        return SecretScanSummary(ran=False, clean=False), reasons
    if run.scan is not None and run.scan.findings_count != len(scan.findings):
        reasons.append(fail("secret_scan_changed", "secret_scan.json does not match the secret_scan_done event"))
    if not scan.clean:
        kinds = Counter(f.place for f in scan.findings)
        reasons.append(fail("secret_found", "secret found in: "
                               + ", ".join(f"{p} ({n})" for p, n in sorted(kinds.items()))))
    return SecretScanSummary(ran=True, clean=scan.clean, secrets_known=scan.secrets_known,
                             places_scanned=list(scan.places_scanned),
                             findings=[f.model_dump() for f in scan.findings]), reasons


def artifacts_section(inp: ReportInputs, run: RunEvents) -> tuple[Digests, list[Reason]]:
    """The operators' artifacts unchanged by the run, and the digests the report covers."""
    s = run.started
    decision_before = s.decision_sha256 if s else None
    admission_before = s.admission_sha256 if s else None
    reasons: list[Reason] = []
    for label, before, after in (("decision record", decision_before, inp.decision_sha256_after),
                                 ("admission JSON", admission_before, inp.admission_sha256_after)):
        if before is not None and after is not None and before != after:
            reasons.append(fail("artifact_changed", f"the {label} changed during the run (SHA-256 before != after)"))
    return Digests(events_sha256=inp.events_sha256, evidence_sha256=inp.evidence_sha256,
                   decision_sha256_before=decision_before, decision_sha256_after=inp.decision_sha256_after,
                   admission_sha256_before=admission_before, admission_sha256_after=inp.admission_sha256_after,
                   profile_sha256=s.profile_sha256 if s else None), reasons


def isolation_section(run: RunEvents, blocked: bool) -> tuple[Isolation | None, list[Reason]]:
    """What isolated Case, and that nothing it started outlived it."""
    isolation = _isolation(run.case_started, run.case_exited)
    reasons: list[Reason] = []
    if not blocked and run.case_started is not None:
        if isolation is None or isolation.kind == "none":
            reasons.append(fail("not_sandboxed", "Case ran without the sandbox (--no-sandbox): it could have "
                                   "reached the network, the harness's secrets or the acceptance tests; at best "
                                   "unproven"))
        elif isolation.namespace_survivors != 0:
            left = isolation.namespace_survivors if isolation.namespace_survivors is not None else "not proven"
            reasons.append(fail("sandbox_not_emptied",
                                   f"processes Case started were still alive after it was killed ({left})"))
    return isolation, reasons


def _status(blocked: bool, reasons: list[Reason]) -> Status:
    if not blocked:
        return "fail" if any(r.code != "not_sandboxed" for r in reasons) else "unproven" if reasons else "pass"
    # blocked stays blocked unless the block itself was not honoured or not recorded honestly
    return "fail" if any(r.code in _BLOCK_BREAKERS for r in reasons) else "blocked"


def compute_report(inp: ReportInputs) -> Report:
    """The report, from its inputs alone: one section function per part of it."""
    run = RunEvents.of(inp.events)
    blocked = run.blocked is not None
    chains, chain_reasons = chains_section(inp)
    route, route_reasons = model_section(inp, run, blocked)
    fallback, egress, fallback_reasons = fallback_section(inp, run, blocked)
    process, process_reasons = process_section(run, blocked)
    tests, tests_reasons = tests_section(run, blocked)
    required, required_reasons = required_events_section(run, blocked)
    scan, scan_reasons = secret_scan_section(inp, run, blocked)
    digests, artifact_reasons = artifacts_section(inp, run)
    isolation, isolation_reasons = isolation_section(run, blocked)
    proof, proof_reasons = judge_proxy_proof(run.proxy_started, run.case_exited, run.stopped, inp.evidence,
                                             sandboxed=isolation is not None and isolation.kind == "bubblewrap")
    # Every section's reasons, in report order; a new section adds its own here.
    reasons = [
        *chain_reasons,
        *(block_section(run) if blocked else evidence_section(inp, run)),
        *route_reasons,
        *fallback_reasons,
        *process_reasons,
        *tests_reasons,
        *required_reasons,
        *scan_reasons,
        *artifact_reasons,
        *isolation_reasons,
        *([] if blocked else proof_reasons),
    ]
    pre, s = run.preflight_identity, run.started
    return Report(
        status=_status(blocked, reasons),
        reasons=reasons,
        run_id=s.run_id if s else None,
        stage=s.stage if s else None,
        fixture=s.fixture if s else None,
        evidence_grade=route.grade,
        case_model_provider=route.provider,
        case_model=route.case_model,
        case_model_admission_status=route.admission_status,
        decision_status=pre.decision_status,
        provider_class=pre.provider_class,
        admitted_requests=route.admitted_requests,
        external_fallback=fallback,
        egress=egress,
        served_model_mismatches=route.served_model_mismatches,
        tests_passed=tests.passed and tests.committed,
        tests=tests,
        case_process=process,
        isolation=isolation,
        required_events_passed=required.passed,
        required_events=required,
        secret_scan=scan,
        digests=digests,
        chains=chains,
        endpoint=Endpoint(upstream_class=pre.upstream_class, fingerprint=pre.upstream_fingerprint),
        timings=Timings(started_at=s.time if s else None, finished_at=run.last_time,
                        case_duration_s=process.duration_s),
        attestation=AttestationSummary(signed=bool(s and s.attestation_key_id),
                                       key_id=s.attestation_key_id if s and s.attestation_key_id else None),
        proxy_proof=proof,
    )


def _isolation(started: ev.CaseProcessStarted | None, exited: ev.CaseProcessExited | None) -> Isolation | None:
    """The isolation Case ran under, from its two events."""
    if started is None:
        return None
    iso = started.isolation
    if isinstance(iso, ev.BubblewrapIsolation):
        return Isolation(kind="bubblewrap", version=iso.version, network=iso.network, pid=iso.pid, home=iso.home,
                         uid=iso.uid, dns=iso.dns, writable=iso.writable, ro_paths=iso.ro_paths,
                         namespace_survivors=exited.namespace_survivors if exited else None)
    return Isolation(kind="none", network="host", pid="host", home="host")


def report_json(report: Report) -> str:
    return report.model_dump_json(indent=2) + "\n"


def load_report(path: Path) -> Report:
    return Report.model_validate_json(Path(path).read_bytes())


def report_schema() -> dict[str, Any]:
    return Report.model_json_schema()


def render_text(report: Report) -> str:
    """The short human summary (``report.txt`` and ``case-harness report``)."""
    r = report
    lines = [f"status: {r.status.upper()}   run {r.run_id}   fixture {r.fixture}   stage {r.stage}"]
    if r.evidence_grade == "demo":
        lines.append("evidence grade: DEMO (the built-in scripted test backend served this run; "
                     "it is not evidence about a real model)")
    else:
        lines.append(f"evidence grade: {r.evidence_grade}")
    for reason in r.reasons:
        lines.append(f"  - {reason.code}: {reason.message}")
    lines += [
        f"case model: {r.case_model_provider or '-'} / {r.case_model or '-'} (admission status "
        f"{r.case_model_admission_status or '-'}, bridge {r.case_runtime_bridge_provider})",
        f"decision: {r.decision_status or '-'}, provider class {r.provider_class or '-'}",
        f"admitted model requests: {r.admitted_requests}; served-model mismatches: {r.served_model_mismatches}",
        f"external fallback used: {str(r.external_fallback.used).lower()} ({r.external_fallback.attempts} attempts"
        + (f", {r.external_fallback.dns_attempts} lookups of provider hosts"
           if r.external_fallback.dns_attempts else "")
        + (f": {', '.join(f'{k}={v}' for k, v in sorted(r.external_fallback.by_reason.items()))}"
           if r.external_fallback.by_reason else "") + ")",
        f"egress attempts: {r.egress.attempts}"
        + (f" ({', '.join(f'{h}={n}' for h, n in sorted(r.egress.hosts.items()))})" if r.egress.hosts else ""),
        f"names resolved in the sandbox: {sum(r.egress.dns_names.values())}"
        + (f" ({', '.join(f'{h}={n}' for h, n in sorted(r.egress.dns_names.items()))})" if r.egress.dns_names
           else ""),
        f"tests passed: {str(r.tests_passed).lower()} ({r.tests.total} acceptance cases, {r.tests.failed} failed, "
        f"{r.tests.errors} errors; committed: {str(r.tests.committed).lower()})",
        (f"case process: exit {r.case_process.exit_code}, {r.case_process.duration_s}s"
         + (" (timed out)" if r.case_process.timed_out else "")) if r.case_process.started
        else "case process: never started",
        _isolation_line(r.isolation),
        f"required events passed: {str(r.required_events_passed).lower()}"
        + (f" (missing: {', '.join(r.required_events.missing)})" if r.required_events.missing else ""),
        f"secret scan: {'clean' if r.secret_scan.clean else 'FINDINGS' if r.secret_scan.ran else 'not run'}"
        f" ({len(r.secret_scan.places_scanned)} places, {r.secret_scan.secrets_known} known secrets)",
    ]
    lines += [f"  finding: {f['place']}: {f['kind']} at {f['location']}" for f in r.secret_scan.findings]
    lines += [
        f"chains: events {'ok' if r.chains.events_ok else 'BROKEN'}, evidence "
        f"{'ok' if r.chains.evidence_ok else 'n/a' if r.chains.evidence_ok is None else 'BROKEN'}",
        proof_line(r.proxy_proof),
        f"endpoint: {r.endpoint.upstream_class or '-'} {r.endpoint.fingerprint or '-'} (the URL is never recorded)",
        f"decision sha256 before/after: {_short(r.digests.decision_sha256_before)} / "
        f"{_short(r.digests.decision_sha256_after)}; admission: {_short(r.digests.admission_sha256_before)} / "
        f"{_short(r.digests.admission_sha256_after)}",
        f"attestation: {r.attestation.file} signed by Ed25519 key {r.attestation.key_id[:16]}"
        if r.attestation.signed and r.attestation.key_id else
        f"attestation: {r.attestation.file} UNSIGNED (no signing key: CASE_HARNESS_SIGNING_KEY_FILE was not set)",
    ]
    return "\n".join(lines) + "\n"


def _isolation_line(iso: Isolation | None) -> str:
    if iso is None:
        return "isolation: - (Case never started)"
    if iso.kind == "none":
        return "isolation: NONE (--no-sandbox: Case shared the harness's network, files and processes)"
    left = "not proven" if iso.namespace_survivors is None else str(iso.namespace_survivors)
    return (f"isolation: bubblewrap {iso.version or '?'}, network {iso.network}, pid {iso.pid}, home {iso.home}, "
            f"uid {iso.uid}; processes left after Case: {left}")


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def render_html(report: Report) -> str:
    """A single self-contained page (no scripts, no external resources)."""
    colour = {"pass": "#1a7f37", "fail": "#cf222e", "blocked": "#9a6700", "unproven": "#9a6700"}[report.status]
    body = html.escape(render_text(report))
    data = html.escape(report_json(report))
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        f"<title>case-harness report {html.escape(report.run_id or '')}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "pre{background:#f6f8fa;padding:1rem;overflow:auto}</style>"
        f"<h1 style='color:{colour}'>{report.status.upper()}</h1>"
        f"<pre>{body}</pre><details><summary>report.json</summary><pre>{data}</pre></details></html>\n"
    )


def schema_text() -> str:
    """The report schema as the files hold it (sorted keys, two-space indent)."""
    return json.dumps(report_schema(), indent=2, sort_keys=True) + "\n"


def packaged_schema_text() -> str:
    """The schema file shipped in the package (what an installed wheel has)."""
    return PACKAGED_SCHEMA.read_text(encoding="utf-8")


def write_schema(paths: tuple[Path, ...] | None = None) -> list[Path]:
    """Regenerate the packaged schema and config/'s copy (a source tree's files)."""
    targets = paths if paths is not None else (Path(str(PACKAGED_SCHEMA)), SCHEMA_PATH)
    for path in targets:
        path.write_text(schema_text(), encoding="utf-8")
    return list(targets)


if __name__ == "__main__":  # `python -m harness.report --schema` regenerates both schema files
    import sys

    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m harness.report --schema")
    for written in write_schema():
        print(f"wrote {written}")
