"""``case-harness verify RUN_DIR``: recompute the report from the evidence and compare.

The stored report is trusted for nothing: both chains are walked again, the report is
recomputed from the run's files with ``harness.report`` and every field that differs is
a problem, as is a ``report_written`` event that is not last or does not match the
report's bytes. With the artifact paths given, their current digests must still match
what the run recorded after it finished.

``attestation.dsse.json`` (``harness.attestation``) must cover exactly the run's files as
they are now; with ``public_key`` its DSSE signature must verify with that key, which is
the one check a party able to rewrite the whole run directory cannot pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.admission import file_sha256

from . import attestation as att
from . import events as ev
from .report import Report, collect_inputs, compute_report


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [path or "(root)"]


def verify_run(run_dir: Path, *, decision_path: Path | None = None, admission_path: Path | None = None,
               public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    result = VerifyResult()
    run_dir = Path(run_dir)
    parsed = ev.read_typed_events(run_dir / "events.jsonl")
    result.problems += [f"events.jsonl: {p}" for p in (*parsed.verdict.problems, *parsed.problems)]
    events = parsed.events
    report_path = run_dir / "report.json"
    try:
        report_bytes = report_path.read_bytes()
        stored = Report.model_validate_json(report_bytes)
    except OSError:
        result.problems.append("report.json is missing")
        return result
    except ValueError as exc:
        result.problems.append(f"report.json is not a valid report: {str(exc).splitlines()[0]}")
        return result

    written = [e for e in events if isinstance(e, ev.ReportWritten)]
    if len(written) != 1 or not isinstance(events[-1], ev.ReportWritten):
        result.problems.append("events.jsonl: report_written must appear exactly once, as the last event")
    last = written[-1] if written else None
    if last is not None and last.report_sha256 != hashlib.sha256(report_bytes).hexdigest():
        result.problems.append("report.json does not match the digest in the report_written event (edited?)")
    if last is not None and not last.report_secret_scan_clean:
        result.problems.append("the report text itself held a secret when it was written")

    decision_after = last.decision_sha256_after if last else None
    admission_after = last.admission_sha256_after if last else None
    inputs = collect_inputs(run_dir, decision_sha256_after=decision_after, admission_sha256_after=admission_after)
    recomputed = compute_report(inputs)
    stored_json = json.loads(stored.model_dump_json())
    fresh_json = json.loads(recomputed.model_dump_json())
    for where in _diff(stored_json, fresh_json):
        result.problems.append(f"report.json field {where!r} differs from the value recomputed from the evidence")
    if last is not None and last.status != recomputed.status:
        result.problems.append(f"report_written says status {last.status!r}, the evidence gives "
                               f"{recomputed.status!r}")
    for label, path, recorded in (("decision record", decision_path, decision_after),
                                  ("admission JSON", admission_path, admission_after)):
        if path is not None and recorded is not None and file_sha256(path) != recorded:
            result.problems.append(f"the {label} has changed since the run (SHA-256 differs from the run's)")
    result.problems += [f"attestation: {p}" for p in
                        att.verify_attestation(run_dir, public_key=public_key, report=stored_json)]
    if public_key is not None and stored.attestation.key_id not in (None, att.key_id(public_key)):
        result.problems.append(f"the report names signing key {stored.attestation.key_id[:16]}, not the given "
                               f"public key {att.key_id(public_key)[:16]}")
    return result
