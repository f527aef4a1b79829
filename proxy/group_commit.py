"""Evidence records of concurrent requests, written together (group commit).

An answer is released only after its record is in the log, so the write sits on every
request's path. The records of the requests that finish in one turn of the event loop
are chained and serialized as each request finishes, then written by one ``os.write`` at
the start of the next turn, and only then are their answers released. Measured on the
benchmark's 64 connections (paired A/B): the proxy's CPU per request fell by 15 to 19%,
several times what timers put on the write call itself, so a write per request also
slowed the rest of the request. A request that finishes with nothing else in flight
gains nothing from waiting, so the caller writes it at once (``EvidenceLog.write_fields``).

If that one write fails, the log refuses everything after, as for a single record, and
every answer whose record is not whole in the file is withheld. A short write (a disk
filling up mid-batch) can complete some records and not others: exactly the requests
whose records made it are answered, so no record on disk speaks for an answer that was
withheld.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .evidence import EvidenceLog
from .hashchain import ChainError

log = logging.getLogger("case_proxy.evidence")


class GroupCommit:
    def __init__(self, evidence: EvidenceLog, loop: asyncio.AbstractEventLoop,
                 on_failure: Callable[[int], None]) -> None:
        """``on_failure(n)``: called once per failed write with the number of records
        it held (each a request refused)."""
        self._evidence = evidence
        self._loop = loop
        self._on_failure = on_failure
        # (seq of the record, its waiter, its callback), in chain order.
        self._waiters: list[tuple[int, asyncio.Future[bool], Callable[[bool], None] | None]] = []

    @property
    def pending(self) -> bool:
        return bool(self._waiters)

    def stage(self, fields: dict[str, Any], then: Callable[[bool], None] | None = None,
              own_id: bool = False) -> asyncio.Future[bool]:
        """Chain ``fields`` into the next write. The returned future (one per record, so
        a waiter cancelled by its client disturbs no other) and ``then`` both learn
        whether the record reached the file whole. Raises ChainError when the log cannot
        take a record at all. ``own_id``: see ``EvidenceLog.stage_fields``."""
        return self.stage_with_sha(fields, then, own_id)[1]

    def stage_with_sha(self, fields: dict[str, Any], then: Callable[[bool], None] | None = None,
                       own_id: bool = False) -> tuple[str, asyncio.Future[bool]]:
        """``stage``, and the SHA-256 the record's line will have (what a later record
        names it by, see proxy.forwarding)."""
        seq = self._evidence.count
        sha = self._evidence.stage_fields(fields, own_id)
        if not self._waiters:
            self._loop.call_soon(self._flush)
        done: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append((seq, done, then))
        return sha, done

    def _flush(self) -> None:
        waiters, self._waiters = self._waiters, []
        try:
            self._evidence.flush()
        except (ChainError, OSError) as exc:
            log.error("evidence records could not be written (%s); the proxy refuses traffic until restarted",
                      type(exc).__name__)
        # Judged by the file, not by who flushed: a record written whole (by this write,
        # a part of it, or an earlier write of the log) releases its answer.
        written = self._evidence.written
        outcomes = [seq < written for seq, _, _ in waiters]
        # Every waiter learns its outcome first, so a failing callback below cannot
        # leave a request waiting; the callbacks still run before any waiter resumes.
        for ok, (_, done, _) in zip(outcomes, waiters, strict=True):
            if not done.done():
                done.set_result(ok)
        lost = outcomes.count(False)
        if lost:
            self._on_failure(lost)
        for ok, (_, _, then) in zip(outcomes, waiters, strict=True):
            if then is not None:
                then(ok)
