"""What the proxy holds while it serves (``ProxyState``) and what one request did so far
(``Draft``, turned into its evidence record by proxy.records).

The state is made inside the event loop that serves it (each worker makes its own) and
reached from a request through ``request.app[STATE]``; the draft through
``request[DRAFT]``, put there by proxy.guard before any handler runs.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field

from aiohttp import web

from .admission import Admission
from .auth import RecordBucket
from .authority import Authority
from .codes import Decision, Outcome, Reason, UpstreamErrorKind
from .evidence import EvidenceLog
from .forwarding import ForwardingRecorder
from .group_commit import GroupCommit
from .metrics import ProxyMetrics
from .readiness import Readiness
from .redact import Redactor
from .request_policy import Endpoint
from .served_model import UsageTotals
from .settings import ProxySettings
from .upstream import Upstream
from .upstream_policy import UpstreamTarget

# Probes and scrapes: answered before the token check, and leave no record, no request
# metric and no access line.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(slots=True)
class Draft:
    """What one request did, filled in as it goes; turned into the evidence record."""

    request_id: str
    started: float
    method: str
    path: str
    own_id: bool  # request_id drawn by the proxy (always, since issue 18)
    endpoint: Endpoint = Endpoint.OTHER
    requested_model: str | None = None
    effective_model: str | None = None
    alias_rewritten: bool = False
    decision: Decision = Decision.REJECTED
    reason: str = Reason.UNHANDLED  # an ErrorCode, a Reason or backend_status_<n>
    family: str | None = None
    target_host: str | None = None
    served_model: str | None = None
    status: int = 0
    stream: bool = False
    usage: UsageTotals = field(default_factory=UsageTotals)
    ttft_s: float | None = None
    client_disconnected: bool = False
    outcome: Outcome = Outcome.REJECTED
    upstream_error: UpstreamErrorKind | None = None
    forwarded: bool = False
    param: str | None = None  # the request field a refusal names (proxy.allowlists)
    content_encoding: str | None = None  # the body's outermost coding (proxy.body_decoding)
    client_request_id: str | None = None  # the client's X-Request-Id, if valid (request_policy)
    unrecorded: bool = False  # an unauthenticated request beyond the record bucket (proxy.auth)
    unauthenticated_suppressed: int | None = None  # such requests left out before this record
    forwarding_sha256: str | None = None  # its forwarding record's line (proxy.forwarding)


@dataclass(slots=True)
class ProxyState:
    """Everything the handlers share: settings, the admission, the backend, the
    evidence log and metrics, and the counters of the one event loop that serves."""

    settings: ProxySettings
    admission: Admission
    target: UpstreamTarget
    redactor: Redactor
    evidence: EvidenceLog | None
    metrics: ProxyMetrics
    upstream: Upstream
    readiness: Readiness
    token: bytes
    authority: Authority | None = None  # the artifacts, watched while serving (proxy.authority)
    in_flight: int = 0
    draining: bool = False
    # Made inside the loop that serves it (each worker makes its own): the loop is kept
    # because on Python 3.11 each asyncio.get_running_loop() is a getpid system call;
    # request ids come from a generator seeded once from the OS, not one getrandom
    # system call per request (ids must be unique, not secret).
    loop: asyncio.AbstractEventLoop = field(init=False)
    _ids: random.Random = field(init=False)
    batch: GroupCommit | None = field(init=False)
    # Bounds the records of unauthenticated traffic (proxy.auth).
    unauthenticated_records: RecordBucket = field(default_factory=RecordBucket)
    forwarding: ForwardingRecorder | None = field(init=False)

    def __post_init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._ids = random.Random(os.urandom(32))
        self.batch = None
        self.forwarding = None
        if self.evidence is not None:
            self.batch = GroupCommit(self.evidence, self.loop, self.evidence_failed)
            self.forwarding = ForwardingRecorder(self.evidence, self.batch, self.target)
            self.evidence.attach(self.loop)

    def evidence_failed(self, n: int = 1) -> None:
        """Count ``n`` requests refused because the evidence log could not record."""
        if self.settings.metrics_enabled:
            self.metrics.evidence_write_failures.inc(n)

    def new_request_id(self) -> str:
        return f"{self._ids.getrandbits(128):032x}"


STATE: web.AppKey[ProxyState] = web.AppKey("state", ProxyState)
DRAFT: web.RequestKey[Draft] = web.RequestKey("case_proxy_draft", Draft)
