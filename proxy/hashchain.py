"""Append-only, hash-chained JSONL: the proxy's evidence and the harness's events.

Each line carries ``seq`` and ``prev_sha256`` (the SHA-256 of the previous line's bytes),
so an edited, reordered, truncated or deleted line breaks the chain. Each record is one
``os.write`` on an O_APPEND descriptor: flushed to the OS as written, never half-buffered
in the process. After any failed write the writer refuses every later append (fail
closed): a gap in the evidence must never be papered over.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from .path_watch import PathWatch

GENESIS = "0" * 64


class ChainError(Exception):
    """The chain cannot be extended or read."""


def line_sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class ChainVerdict(BaseModel):
    ok: bool
    records: int
    last_sha256: str
    problems: list[str]


def _walk(data: bytes) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    prev = GENESIS
    if data and not data.endswith(b"\n"):
        lines_before = data.count(b"\n")
        problems.append(f"line {lines_before + 1}: partial last line (no newline): truncated or still being written")
        data = data[: data.rfind(b"\n") + 1]
    for n, line in enumerate(data.splitlines(), start=1):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            problems.append(f"line {n}: not valid JSON")
            prev = line_sha256(line)
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: not a JSON object")
        else:
            if obj.get("seq") != n - 1:
                problems.append(f"line {n}: seq is {obj.get('seq')!r}, expected {n - 1} (a line was deleted, added or moved)")
            if obj.get("prev_sha256") != prev:
                problems.append(f"line {n}: prev_sha256 does not match the previous line (edited, deleted or reordered)")
            records.append(obj)
        prev = line_sha256(line)
    return ChainVerdict(ok=not problems, records=len(records), last_sha256=prev, problems=problems), records


def verify_chain(path: Path) -> ChainVerdict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ChainVerdict(ok=False, records=0, last_sha256=GENESIS, problems=[f"cannot read {path}: {exc.strerror}"])
    return _walk(data)[0]


def read_chain(path: Path) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """The verdict plus the parsed records (for callers that also need the content)."""
    return _walk(Path(path).read_bytes())


def read_chain_bytes(data: bytes) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """The same for bytes already read (e.g. a log without its trailing summary line)."""
    return _walk(data)


class HashChainWriter:
    def __init__(self, path: Path, *, watch: bool = False) -> None:
        """``watch``: keep an inotify watch on the path so that ``check`` stats only
        after something may have changed (see proxy.path_watch)."""
        self.path = Path(path)
        self._want_watch = watch
        self._watch: PathWatch | None = None
        self._path_str = str(self.path)  # for the per-request stat: no __fspath__ call
        self._fd: int | None = None
        self._prev = GENESIS
        self._seq = 0
        self._written = 0  # records whole in the file: seq below this (see flush)
        self._failed = False
        self._closed = False
        self._ident: tuple[int, int] | None = None
        self._staged: list[bytes] = []  # chained, not yet written (see flush)

    def open(self) -> None:
        if self.path.exists():
            verdict = verify_chain(self.path)
            if not verdict.ok:
                raise ChainError(f"{self.path} is not an intact chain; refusing to extend it: {verdict.problems[0]}. "
                                 "Keep it as evidence (verify-evidence lists every problem) and start a new "
                                 "log under another name")
            self._prev, self._seq = verdict.last_sha256, verdict.records
            self._written = verdict.records
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            st = os.fstat(self._fd)
        except OSError as exc:
            raise ChainError(f"cannot open {self.path}: {exc.strerror}") from None
        self._ident = (st.st_dev, st.st_ino)
        if self._want_watch:
            self._watch = PathWatch.open(self.path)  # its first changed() is True: stat once

    def attach_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` read the path watch's events (see proxy.path_watch)."""
        if self._watch is not None:
            self._watch.attach(loop)

    @property
    def healthy(self) -> bool:
        return self._fd is not None and not self._failed and not self._closed

    @property
    def last_sha256(self) -> str:
        return self._prev

    @property
    def count(self) -> int:
        """Records chained so far, staged ones included."""
        return self._seq

    @property
    def written(self) -> int:
        """Records whole in the file: every record whose seq is below this. A short
        write counts the records it completed, so a caller can release exactly the
        answers whose records made it."""
        return self._written

    def check(self) -> None:
        """Raise ChainError unless the next append can land in the file we opened: the
        descriptor and the path must both still name that (dev, inode), still linked.
        With a watch, that comparison runs only once something on the path may have
        changed since it last passed (a descriptor swapped inside this process then shows
        only when a write fails)."""
        if not self.healthy or self._fd is None:
            raise ChainError("evidence writer is not open or a previous write failed")
        if self._watch is not None and not self._watch.changed():
            return
        try:
            st = os.fstat(self._fd)
            on_disk = os.stat(self._path_str)
        except OSError as exc:
            self._failed = True
            raise ChainError(f"evidence file unavailable: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self._ident or (on_disk.st_dev, on_disk.st_ino) != self._ident or st.st_nlink == 0:
            self._failed = True
            raise ChainError("evidence file was removed or replaced since it was opened")

    def append(self, record: Mapping[str, Any]) -> str:
        """Write one record now (after any staged ones)."""
        body = dict(record)
        body["seq"] = self._seq
        body["prev_sha256"] = self._prev
        sha = self._stage(orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE))
        self.flush()
        return sha

    def stage_fields(self, fields: dict[str, Any]) -> str:
        """Chain one record into the next ``flush``: it takes its place (seq, previous
        hash) now, reaches the file with the flush. The chain fields are set in
        ``fields`` itself, so it must not carry its own ``seq`` or ``prev_sha256``."""
        if "seq" in fields or "prev_sha256" in fields:
            raise ChainError("a record must not carry its own seq or prev_sha256")
        fields["seq"] = self._seq
        fields["prev_sha256"] = self._prev
        return self._stage(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))

    def _stage(self, data: bytes) -> str:
        """One serialized record that ends in its newline; the hash covers the line
        without it."""
        if not self.healthy or self._fd is None:
            raise ChainError("evidence writer is not open or a previous write failed")
        self._staged.append(data)
        sha = hashlib.sha256(memoryview(data)[:-1]).hexdigest()
        self._prev, self._seq = sha, self._seq + 1
        return sha

    def flush(self) -> None:
        """Write every staged record in one system call. A failure (or a short write)
        leaves the writer failed: the chain on disk may now end in a partial line, and
        ``written`` says which records are whole."""
        if not self._staged:
            if self._failed:
                raise ChainError("a previous write failed")
            return
        staged, self._staged = self._staged, []
        data = staged[0] if len(staged) == 1 else b"".join(staged)
        if not self.healthy or self._fd is None:
            self._failed = True
            raise ChainError("evidence writer is not open or a previous write failed")
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._failed = True
            raise ChainError(f"write failed: {exc.strerror}") from None
        if written == len(data):
            self._written = self._seq
            return
        self._failed = True
        for line in staged:  # the staged records are the last len(staged) of the chain
            written -= len(line)
            if written < 0:
                break
            self._written += 1
        raise ChainError("short write: the chain is now broken")

    def close(self) -> None:
        if self._fd is None or self._closed:
            return
        if self._staged and not self._failed:
            try:
                self.flush()
            except ChainError:
                pass
        self._closed = True
        if self._watch is not None:
            self._watch.close()
        try:
            os.fsync(self._fd)
        except OSError:
            pass
        finally:
            os.close(self._fd)
