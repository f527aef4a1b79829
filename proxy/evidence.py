"""The proxy's per-request evidence record and log (a hash chain of EvidenceRecords).

Records never hold the backend URL or request/response bodies; every string passes the
redactor before it is written.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .codes import Decision, ErrorCode
from .fallback import is_fallback_refusal
from .hashchain import (
    CHAIN_FIELDS,
    ChainMode,
    ChainVerdict,
    HashChainWriter,
    HeadCallback,
    read_chain_bytes,
    unreadable_verdict,
)
from .redact import Redactor

# Request records on these endpoints are not model calls (model listings, lookups, side
# doors); they never count as admitted model requests.
NON_MODEL_ENDPOINTS = frozenset({None, "models", "model", "other"})


# Fields whose values the proxy makes itself: fixed vocabularies (kind, endpoint,
# decision, family, upstream class), numbers, booleans, its clock, a hash. Nothing a
# client or backend sends can reach them, so the per-request secret pre-check skips
# them; every other field, including any added later, is checked.
PROXY_GENERATED_FIELDS = frozenset({
    "kind", "time", "endpoint", "alias_rewritten", "decision", "family", "status", "stream", "usage",
    "duration_ms", "ttft_ms", "upstream_class", "upstream_fingerprint", "client_disconnected", "pid", "worker",
    "forwarding_sha256",
})
# The same plus the request id, for a record whose id the proxy drew itself (see
# ``stage_fields``): a client may send its own id, which is free text like any other.
_PROXY_GENERATED_WITH_ID = PROXY_GENERATED_FIELDS | {"request_id"}


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class EvidenceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["request", "proxy_start", "proxy_stop", "authority_changed", "log_sealed", "log_continued",
                  "forwarding"] = "request"
    request_id: str | None = None
    client_request_id: str | None = None  # the client's X-Request-Id, validated (the proxy draws request_id)
    time: str
    method: str | None = None
    endpoint: str | None = None
    path: str | None = None
    requested_model: str | None = None
    effective_model: str | None = None
    alias_rewritten: bool = False
    decision: Literal["admitted", "refused", "rejected", "error"] | None = None
    reason: str | None = None
    family: str | None = None
    target_host: str | None = None
    param: str | None = None  # the request field a refusal names
    content_encoding: str | None = None  # the request body's coding, undone by the proxy
    unauthenticated_suppressed: int | None = None  # unauthenticated requests left out before this one
    served_model: str | None = None
    status: int | None = None
    stream: bool = False
    usage: Usage | None = None
    duration_ms: float | None = None
    ttft_ms: float | None = None
    upstream_class: str | None = None
    upstream_fingerprint: str | None = None
    client_disconnected: bool = False
    admission_provider: str | None = None
    admission_model: str | None = None
    admission_status: str | None = None
    provider_class: str | None = None
    pid: int | None = None
    worker: int | None = None
    # proxy_start: the chain this proxy writes (hmac-sha256: keyed by the run key, see
    # proxy.hashchain); a reader holding the key checks it, any other the plain chain.
    chain: ChainMode | None = None
    # authority_changed (see proxy.authority): whether forwarding goes on, and why.
    serving: bool | None = None
    detail: str | None = None
    # log_continued: the first record of a log opened by a rotation names the sealed
    # file's last line (its SHA-256) and how many records that file holds.
    continues_sha256: str | None = None
    continues_records: int | None = None
    # request: the line of the ``forwarding`` record written before the request was
    # forwarded (see proxy.evidence_files), so the two pair up.
    forwarding_sha256: str | None = None


_second: tuple[int, str] = (-1, "")
# ".000Z" to ".999Z": the millisecond suffix looked up, not formatted (two per request).
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def utc_now_rfc3339() -> str:
    """UTC now as ``2026-11-25T07:10:00.123Z`` (milliseconds, truncated). The date part
    is formatted once per second (one tuple, swapped whole), off the per-request path."""
    global _second
    now = time.time()
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    # min(): a float a hair under the next second must not index past the table.
    return cached[1] + _MILLIS[min(int((now - sec) * 1000), 999)]


class EvidenceLog:
    def __init__(self, path: Path, redactor: Redactor, key: bytes | None = None,
                 on_head: HeadCallback | None = None) -> None:
        self._chain = HashChainWriter(path, watch=True, key=key, on_head=on_head)
        self._redactor = redactor

    @property
    def mode(self) -> ChainMode:
        return self._chain.mode

    def open(self) -> None:
        self._chain.open()

    def check(self) -> None:
        self._chain.check()

    @property
    def moved(self) -> bool:
        """The path no longer names the open log (a rotation waiting for its SIGHUP)."""
        return self._chain.moved

    def rotate(self, pid: int | None = None) -> bool:
        """SIGHUP: seal the open log with a ``log_sealed`` record and open a new one at the
        path whose first record, ``log_continued``, names the sealed file's last hash
        (see HashChainWriter.rotate). False while the path still names the open log."""
        seal = EvidenceRecord(kind="log_sealed", time=utc_now_rfc3339(), reason="rotation", pid=pid)

        def opening(sha: str, records: int) -> dict[str, Any]:
            return EvidenceRecord(kind="log_continued", time=utc_now_rfc3339(), continues_sha256=sha,
                                  continues_records=records, pid=pid).model_dump(exclude_none=True)

        return self._chain.rotate(seal.model_dump(exclude_none=True), opening)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the serving loop read the path watch's events (see proxy.path_watch)."""
        self._chain.attach_watch(loop)

    @property
    def healthy(self) -> bool:
        return self._chain.healthy

    @property
    def count(self) -> int:
        """Records chained so far: the next record's seq."""
        return self._chain.count

    @property
    def written(self) -> int:
        """Records whole in the file (see HashChainWriter.written)."""
        return self._chain.written

    def write(self, record: EvidenceRecord) -> str:
        return self.write_redacted(record.model_dump(exclude_none=True))

    def write_fields(self, fields: dict[str, Any], own_id: bool = False) -> str:
        """``stage_fields``, then written at once (with anything staged before it)."""
        sha = self.stage_fields(fields, own_id)
        self._chain.flush()
        return sha

    def stage_fields(self, fields: dict[str, Any], own_id: bool = False) -> str:
        """The per-request hot path: the fields of an EvidenceRecord as a plain dict
        without None values, no model built; chained now, written by the next ``flush``
        (see proxy.group_commit); the dict is extended with the chain fields.
        The secret pre-check reads only the fields a client or backend can influence (see
        PROXY_GENERATED_FIELDS) and skips values the redactor has vetted (``vet_clean``:
        the admitted model, the routes); a record that might hold a secret takes the
        full redaction. ``own_id``: the request id is one the proxy drew itself (random
        hex), so it is skipped too; most records then leave nothing to scan. Readers still
        validate every line against EvidenceRecord; a test pins that they agree."""
        clean = self._redactor.clean
        skip = _PROXY_GENERATED_WITH_ID if own_id else PROXY_GENERATED_FIELDS
        texts: list[str] = []
        for key, value in fields.items():
            if key in skip:
                continue
            if value.__class__ is not str:
                return self._chain.stage_fields(self._redacted(fields))
            if value not in clean:
                texts.append(value)
        if texts and self._redactor.may_match("\x00".join(texts)):
            return self._chain.stage_fields(self._redacted(fields))
        return self._chain.stage_fields(fields)

    def flush(self) -> None:
        self._chain.flush()

    def write_redacted(self, fields: dict[str, Any]) -> str:
        return self._chain.append(self._redacted(fields))

    def _redacted(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self._redactor.redact_obj({k: v for k, v in fields.items() if v is not None})

    def close(self) -> None:
        self._chain.close()


def _records(path: Path) -> tuple[ChainVerdict, list[EvidenceRecord]]:
    return records_from_bytes(Path(path).read_bytes())


def records_from_bytes(data: bytes, key: bytes | None = None) -> tuple[ChainVerdict, list[EvidenceRecord]]:
    """The chain verdict (including records that are not valid EvidenceRecords) and the
    valid records, from one read of the log. With ``key`` the MACs are checked too."""
    verdict, raw = read_chain_bytes(data, key)
    records: list[EvidenceRecord] = []
    problems = list(verdict.problems)
    for n, obj in enumerate(raw, start=1):
        body = {k: v for k, v in obj.items() if k not in CHAIN_FIELDS}
        try:
            records.append(EvidenceRecord.model_validate(body))
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
            problems.append(f"record {n}: not a valid evidence record ({fields})")
    return verdict.model_copy(update={"ok": not problems, "problems": problems}), records


def verify_evidence(path: Path) -> ChainVerdict:
    try:
        return _records(path)[0]
    except OSError as exc:
        return unreadable_verdict(path, exc)


class EvidenceSummary(BaseModel):
    records: int
    requests: int
    admitted: int
    refused_by_reason: dict[str, int]
    fallback_attempts: int
    fallback_by_family: dict[str, int]
    served_model_mismatches: int
    served_models: dict[str, int]
    target_hosts: dict[str, int]
    prompt_tokens: int
    completion_tokens: int


def summarize_evidence(path: Path) -> EvidenceSummary:
    _, records = _records(path)
    reqs = [r for r in records if r.kind == "request"]
    refused = [r for r in reqs if r.decision == Decision.REFUSED]
    fallbacks = [r for r in refused if is_fallback_refusal(r.decision, r.reason)]
    return EvidenceSummary(
        records=len(records),
        requests=len(reqs),
        admitted=sum(1 for r in reqs if r.decision == Decision.ADMITTED and r.endpoint not in NON_MODEL_ENDPOINTS),
        refused_by_reason=dict(Counter(r.reason or "" for r in refused)),
        fallback_attempts=len(fallbacks),
        fallback_by_family=dict(Counter(r.family or "other" for r in fallbacks)),
        served_model_mismatches=sum(1 for r in reqs if r.reason == ErrorCode.SERVED_MODEL_MISMATCH),
        served_models=dict(Counter(r.served_model for r in reqs if r.served_model)),
        target_hosts=dict(Counter(r.target_host for r in reqs if r.target_host)),
        prompt_tokens=sum(r.usage.prompt_tokens or 0 for r in reqs if r.usage),
        completion_tokens=sum(r.usage.completion_tokens or 0 for r in reqs if r.usage),
    )
