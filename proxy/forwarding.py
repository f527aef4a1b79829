"""The ``forwarding`` record: written before a request's first byte goes to the backend.

The completion record (kind ``request``) is written when the request ends, and an answer
is held back until it is in the file; a stream, though, reaches the client while it
runs, and a crash, an OOM kill or a SIGKILL mid-stream would leave what was delivered
with no record at all. So every forwarded request is first recorded as ``forwarding``
(what is sent where, no outcome yet), written to the file (one ``os.write``: it survives
the process being killed; it is not fsync-ed, like every record) before the backend sees
a byte, and the completion record names it by its line's SHA-256
(``forwarding_sha256``). A forwarding record nothing names is a request that never
finished (proxy.evidence_files pairs them). A forwarding record that cannot be written
refuses the request (fail closed).

Concurrent requests share one write (proxy.group_commit), as completion records do; a
request alone writes at once, so one connection pays one ``os.write`` and no wait.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from .evidence import EvidenceLog, utc_now_rfc3339
from .group_commit import GroupCommit
from .hashchain import ChainError
from .request_policy import Endpoint
from .upstream_policy import UpstreamTarget


class Forwarded(Protocol):
    """What the record needs of a request (proxy.state.Draft)."""

    request_id: str
    method: str
    path: str
    endpoint: Endpoint
    requested_model: str | None
    effective_model: str | None
    alias_rewritten: bool
    stream: bool
    own_id: bool
    forwarding_sha256: str | None


def forwarding_fields(draft: Forwarded, target: UpstreamTarget) -> dict[str, Any]:
    """The record's fields (an EvidenceRecord of kind ``forwarding``), None left out."""
    return _fields(_template(target), draft)


def _template(target: UpstreamTarget) -> dict[str, Any]:
    """The fields every forwarding record of one proxy shares."""
    return {"kind": "forwarding", "upstream_class": target.upstream_class.value,
            "upstream_fingerprint": target.fingerprint}


def _fields(template: dict[str, Any], draft: Forwarded) -> dict[str, Any]:
    fields = template.copy()
    fields["request_id"] = draft.request_id
    fields["time"] = utc_now_rfc3339()
    fields["method"] = draft.method
    fields["endpoint"] = draft.endpoint
    fields["path"] = draft.path
    fields["alias_rewritten"] = draft.alias_rewritten
    fields["stream"] = draft.stream
    if draft.requested_model is not None:
        fields["requested_model"] = draft.requested_model
    if draft.effective_model is not None:
        fields["effective_model"] = draft.effective_model
    return fields


class ForwardingRecorder:
    """Writes forwarding records, alone or in the shared batch."""

    def __init__(self, evidence: EvidenceLog, batch: GroupCommit, target: UpstreamTarget) -> None:
        self._evidence = evidence
        self._batch = batch
        self._template = _template(target)  # built once: a few microseconds per request saved

    def record(self, draft: Forwarded, alone: bool) -> bool | asyncio.Future[bool]:
        """Whether the record is in the file (False: it could not be written, the caller
        refuses the request), or a future that says so once the shared write is done.
        ``alone``: no other request is in flight to share the write with. Not a
        coroutine: the usual request, written at once, awaits nothing. The record's line
        (``draft.forwarding_sha256``) is set as soon as it has its place in the chain,
        before any wait for the write: a request cancelled during that wait still names
        its forwarding record in its completion."""
        fields = _fields(self._template, draft)
        try:
            if alone and not self._batch.pending:
                draft.forwarding_sha256 = self._evidence.write_fields(fields, draft.own_id)
                return True
            draft.forwarding_sha256, done = self._batch.stage_with_sha(fields, None, draft.own_id)
        except (ChainError, OSError, ValueError):
            return False
        return done
