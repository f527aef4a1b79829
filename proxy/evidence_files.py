"""Evidence across files and records: rotation links and forwarding pairs.

A rotation (SIGHUP, proxy.hashchain.HashChainWriter.rotate) ends one log with a
``log_sealed`` record and starts the next with ``log_continued``, which names the sealed
file's last line by its SHA-256. Each file is its own chain; ``link_files`` checks that
the files given join up. A forwarded request is preceded by a ``forwarding`` record
(written before any byte reaches the backend) and followed by its completion record (a
``request`` record whose ``forwarding_sha256`` names the forwarding record's line);
``pair_forwarding`` finds the forwarding records nothing completed: a proxy that crashed
or was killed mid-request, or a request still in flight in a live log. Pure functions
over lines already read; ``read_evidence_file`` does the reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from .evidence import EvidenceRecord, records_from_bytes
from .hashchain import CHAIN_FIELDS, ChainVerdict, line_sha256, unreadable_verdict


class EvidenceLine(BaseModel):
    """One whole line of a log: its hash (what the next line's prev_sha256 and any link
    name) and its record (None if it is not a valid evidence record)."""

    sha256: str
    line: int
    record: EvidenceRecord | None


@dataclass
class EvidenceFile:
    path: Path
    verdict: ChainVerdict
    lines: list[EvidenceLine] = field(default_factory=list)

    @property
    def first(self) -> EvidenceRecord | None:
        return self.lines[0].record if self.lines else None

    @property
    def last(self) -> EvidenceRecord | None:
        return self.lines[-1].record if self.lines else None


def lines_from_bytes(data: bytes, key: bytes | None = None) -> tuple[ChainVerdict, list[EvidenceLine]]:
    """The chain verdict (MACs checked with ``key``) and every whole line with its hash
    and record."""
    verdict, _ = records_from_bytes(data, key)
    whole = data[: data.rfind(b"\n") + 1] if data else b""
    out: list[EvidenceLine] = []
    for n, raw in enumerate(whole.splitlines(), start=1):
        record = None
        try:
            obj = orjson.loads(raw)
            if isinstance(obj, dict):
                record = EvidenceRecord.model_validate({k: v for k, v in obj.items() if k not in CHAIN_FIELDS})
        except (orjson.JSONDecodeError, ValidationError):
            pass
        out.append(EvidenceLine(sha256=line_sha256(raw), line=n, record=record))
    return verdict, out


def read_evidence_file(path: Path, key: bytes | None = None) -> EvidenceFile:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return EvidenceFile(path, unreadable_verdict(path, exc, key))
    verdict, lines = lines_from_bytes(data, key)
    return EvidenceFile(path, verdict, lines)


class Links(BaseModel):
    """How the files given join up: ``order`` lists each run of linked files from its
    first to its last; ``problems`` break the evidence; ``notes`` do not (a predecessor
    or successor that was not given, as after logrotate dropped its oldest file)."""

    order: list[list[str]]
    problems: list[str]
    notes: list[str]


def link_files(files: list[EvidenceFile]) -> Links:
    """Join files whose first record continues another's last line. A continuation must
    follow a file that ends sealed; two files may not continue the same file. Files that
    continue nothing given (a single log, or one log per worker) each start a run."""
    problems: list[str] = []
    notes: list[str] = []
    by_last = {f.verdict.last_sha256: f for f in files if f.lines}
    successor: dict[str, EvidenceFile] = {}
    predecessor: dict[str, EvidenceFile] = {}
    for f in files:
        first = f.first
        if first is None or first.kind != "log_continued":
            continue
        prev = by_last.get(first.continues_sha256 or "")
        if prev is None:
            notes.append(f"{f.path}: continues a log that was not given (its last line has SHA-256 "
                         f"{first.continues_sha256})")
            continue
        if prev.last is None or prev.last.kind != "log_sealed":
            problems.append(f"{f.path}: continues {prev.path}, which does not end in a log_sealed record")
        if prev.last is not None and first.continues_records != len(prev.lines):
            problems.append(f"{f.path}: says {first.continues_records} records precede it, "
                            f"{prev.path} holds {len(prev.lines)}")
        key = str(prev.path)
        if key in successor:
            problems.append(f"{f.path} and {successor[key].path} both continue {prev.path}")
            continue
        successor[key], predecessor[str(f.path)] = f, prev
    order: list[list[str]] = []
    for f in files:
        if str(f.path) in predecessor:
            continue
        run, cur = [str(f.path)], f
        while str(cur.path) in successor and len(run) <= len(files):  # bounded: no cycle runs forever
            cur = successor[str(cur.path)]
            run.append(str(cur.path))
        order.append(run)
        if cur.last is not None and cur.last.kind == "log_sealed":
            notes.append(f"{cur.path}: sealed by a rotation; the log that continues it was not given")
    linked = {p for run in order for p in run}
    for f in files:
        if str(f.path) not in linked:  # only a cycle leaves a file out of every run
            problems.append(f"{f.path}: its continuation links form a cycle")
    return Links(order=order, problems=problems, notes=notes)


class Unpaired(BaseModel):
    path: str
    line: int
    request_id: str | None
    endpoint: str | None


def pair_forwarding(files: list[EvidenceFile]) -> tuple[list[Unpaired], list[str]]:
    """(forwarding records no completion record names, problems). A completion that
    names a forwarding record that is in none of the files is a problem only when the
    files hold the whole history (the first file continues nothing)."""
    forwarding: dict[str, tuple[EvidenceFile, EvidenceLine]] = {}
    completed: set[str] = set()
    problems: list[str] = []
    complete_history = all(f.first is None or f.first.kind != "log_continued" for f in files)
    pending_refs: list[tuple[EvidenceFile, EvidenceLine, str]] = []
    for f in files:
        for entry in f.lines:
            rec = entry.record
            if rec is None:
                continue
            if rec.kind == "forwarding":
                forwarding[entry.sha256] = (f, entry)
            elif rec.kind == "request" and rec.forwarding_sha256 is not None:
                if rec.forwarding_sha256 in completed:
                    problems.append(f"{f.path}: line {entry.line}: a second completion record for one forwarding")
                completed.add(rec.forwarding_sha256)
                pending_refs.append((f, entry, rec.forwarding_sha256))
    for f, entry, ref in pending_refs:
        if ref not in forwarding and complete_history:
            problems.append(f"{f.path}: line {entry.line}: completion record names a forwarding record "
                            "that is not in the log")
    unpaired = [Unpaired(path=str(f.path), line=entry.line,
                         request_id=entry.record.request_id if entry.record else None,
                         endpoint=entry.record.endpoint if entry.record else None)
                for sha, (f, entry) in forwarding.items() if sha not in completed]
    return unpaired, problems


def summary_line(u: Unpaired) -> str:
    return (f"{u.path}: line {u.line}: request {u.request_id} ({u.endpoint}) was forwarded and has no "
            "completion record (in flight, or the proxy stopped mid-request: crash, kill)")


def forwarding_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The ``forwarding`` record for a request about to be forwarded, from its completion
    fields as known so far (no outcome yet)."""
    keep = ("request_id", "method", "endpoint", "path", "requested_model", "effective_model", "alias_rewritten",
            "stream", "upstream_class", "upstream_fingerprint")
    out = {k: rec[k] for k in keep if k in rec}
    out["kind"] = "forwarding"
    out["time"] = rec["time"]
    return out
