"""Append-only, hash-chained JSONL: the proxy's evidence and the harness's events.

Each line carries ``seq`` and ``prev_sha256`` (the SHA-256 of the previous line's bytes),
so an edited, reordered, truncated or deleted line breaks the chain. Plain SHA-256 only
proves consistency: whoever can write the file can re-hash it from any line on. Given a
key (``key=``: the harness's per-run key, held only by it and its proxy), every line also
carries ``prev_hmac``, the HMAC-SHA256 of the previous line under that key: a rewrite by
anyone without the key breaks it, and only a reader holding the key can check it (a
reader without it still checks the plain chain, and says which mode it checked). Each record is one
``os.write`` on an O_APPEND descriptor: flushed to the OS as written, never half-buffered
in the process. After any failed write the writer refuses every later append (fail
closed): a gap in the evidence must never be papered over.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel

from .path_watch import PathWatch

GENESIS = "0" * 64
# The chain fields a writer adds to each record; readers strip them before validating.
CHAIN_FIELDS = ("seq", "prev_sha256", "prev_hmac")
ChainMode = Literal["sha256", "hmac-sha256"]
KEYED_MODE: Final = "hmac-sha256"


def chain_mode(key: bytes | None) -> ChainMode:
    """The chain a key makes: HMAC-SHA256 with one, plain SHA-256 without."""
    return KEYED_MODE if key is not None else "sha256"

# A key shorter than this is refused: HMAC-SHA256's security rests on it.
MIN_KEY_BYTES = 16


class ChainError(Exception):
    """The chain cannot be extended or read."""


class TornChain(ChainError):
    """The file at the log's path is not an intact chain (a partial last line after a
    crash or a full disk, an edited line): it must not be extended."""


class PathMoved(ChainError):
    """The log's path no longer names the open file, which is still linked and whole:
    a rotation (a rename) waits for its SIGHUP. Records still land in the open file;
    nothing is forwarded until the path names the log again or a new log is opened."""


def line_sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def line_hmac(key: bytes, line: bytes) -> str:
    """The keyed link: HMAC-SHA256 of one line's bytes (without its newline)."""
    return hmac.new(key, line, hashlib.sha256).hexdigest()


class LineMac:
    """HMAC-SHA256 (RFC 2104) under one key with the padded key's two hash states made
    once and copied per line: 2.6 us a line against 5.9 us for ``hmac.new`` (measured
    on this machine, 400-byte lines). Readers use ``line_hmac``; the tests hold the two
    equal."""

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        padded = (hashlib.sha256(key).digest() if len(key) > block else key).ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def hexdigest(self, line: bytes | memoryview) -> str:
        inner = self._inner.copy()
        inner.update(line)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class ChainVerdict(BaseModel):
    ok: bool
    records: int
    last_sha256: str
    problems: list[str]
    mode: ChainMode = "sha256"  # what was checked: the plain chain, or the plain chain and the MACs under a key
    last_hmac: str | None = None  # keyed: the MAC of the last line (the head a keyed writer reports)
    hmac_lines: int = 0  # lines that carry a prev_hmac (a keyed writer's), checked or not


def _walk(data: bytes, key: bytes | None = None) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """Walk the chain. With ``key``, every line must also carry the right ``prev_hmac``
    (the first line of a file: GENESIS); without it MACs are counted, not checked."""
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    prev = GENESIS
    prev_mac = GENESIS
    hmac_lines = 0
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
            prev_mac = line_hmac(key, line) if key is not None else prev_mac
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: not a JSON object")
        else:
            if obj.get("seq") != n - 1:
                problems.append(f"line {n}: seq is {obj.get('seq')!r}, expected {n - 1} (a line was deleted, added or moved)")
            if obj.get("prev_sha256") != prev:
                problems.append(f"line {n}: prev_sha256 does not match the previous line (edited, deleted or reordered)")
            mac = obj.get("prev_hmac")
            hmac_lines += mac is not None
            if key is not None:
                if mac is None:
                    problems.append(f"line {n}: no prev_hmac: not written by the proxy holding the run key")
                elif not isinstance(mac, str) or not hmac.compare_digest(mac, prev_mac):
                    problems.append(f"line {n}: prev_hmac is not the HMAC-SHA256 of the previous line under the "
                                    "run key (written or rewritten by someone without the key)")
            records.append(obj)
        prev = line_sha256(line)
        if key is not None:
            prev_mac = line_hmac(key, line)
    return ChainVerdict(ok=not problems, records=len(records), last_sha256=prev, problems=problems,
                        mode=chain_mode(key),
                        last_hmac=prev_mac if key is not None else None, hmac_lines=hmac_lines), records


def unreadable_verdict(path: Path, exc: OSError, key: bytes | None = None) -> ChainVerdict:
    """The failed verdict of a log that could not be read (in the mode ``key`` asks for)."""
    return ChainVerdict(ok=False, records=0, last_sha256=GENESIS, problems=[f"cannot read {path}: {exc.strerror}"],
                        mode=chain_mode(key))


def verify_chain(path: Path, key: bytes | None = None) -> ChainVerdict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return unreadable_verdict(path, exc, key)
    return _walk(data, key)[0]


def read_chain(path: Path) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """The verdict plus the parsed records (for callers that also need the content)."""
    return _walk(Path(path).read_bytes())


def read_chain_bytes(data: bytes, key: bytes | None = None) -> tuple[ChainVerdict, list[dict[str, Any]]]:
    """The same for bytes already read (e.g. a log without its trailing summary line)."""
    return _walk(data, key)


def check_key(key: bytes) -> bytes:
    """The key, or ChainError if it is too short to key a MAC chain."""
    if len(key) < MIN_KEY_BYTES:
        raise ChainError(f"the chain key must be at least {MIN_KEY_BYTES} bytes, not {len(key)}")
    return key


# Called after each successful write with (records whole in the current file, records
# over every file, the MAC of the file's last line): a keyed writer's head, for its owner.
HeadCallback = Callable[[int, int, str], None]


class HashChainWriter:
    def __init__(self, path: Path, *, watch: bool = False, key: bytes | None = None,
                 on_head: HeadCallback | None = None) -> None:
        """``watch``: keep an inotify watch on the path so that ``check`` stats only
        after something may have changed (see proxy.path_watch). ``key``: the keyed
        mode (each record also carries ``prev_hmac``); ``on_head`` then hears the head
        after every write that landed whole."""
        self.path = Path(path)
        self._key = check_key(key) if key is not None else None
        self._mac = LineMac(self._key) if self._key is not None else None
        self._on_head = on_head if key is not None else None
        self._prev_mac = GENESIS
        self._head_mac = GENESIS  # the MAC of the last line whole in the file (keyed)
        self._want_watch = watch
        self._watch: PathWatch | None = None
        self._path_str = str(self.path)  # for the per-request stat: no __fspath__ call
        self._fd: int | None = None
        self._prev = GENESIS
        self._seq = 0
        self._written = 0  # records whole in the file: seq below this (see flush)
        self._base = 0  # records in the files sealed before this one (see rotate)
        self._size = 0  # bytes this writer has put in the file: what fstat must say
        self._moved = False  # the path named another file (or none) at the last check
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed = False
        self._closed = False
        self._ident: tuple[int, int] | None = None
        self._staged: list[bytes] = []  # chained, not yet written (see flush)

    def open(self) -> None:
        if self.path.exists():
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise ChainError(f"cannot read {self.path}: {exc.strerror}") from None
            verdict = _walk(data, self._key)[0]
            if not verdict.ok:
                raise TornChain(f"{self.path} is not an intact chain; refusing to extend it: {verdict.problems[0]}. "
                                 "Keep it as evidence (verify-evidence lists every problem) and start a new "
                                 "log under another name")
            self._prev, self._seq = verdict.last_sha256, verdict.records
            self._prev_mac = self._head_mac = verdict.last_hmac or GENESIS
            self._written = verdict.records
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            st = os.fstat(self._fd)
        except OSError as exc:
            raise ChainError(f"cannot open {self.path}: {exc.strerror}") from None
        self._ident = (st.st_dev, st.st_ino)
        self._size = st.st_size
        if self._want_watch:
            self._watch = PathWatch.open(self.path)  # its first changed() is True: stat once

    def attach_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` read the path watch's events (see proxy.path_watch)."""
        self._loop = loop
        if self._watch is not None:
            self._watch.attach(loop)

    @property
    def healthy(self) -> bool:
        return self._fd is not None and not self._failed and not self._closed

    @property
    def last_sha256(self) -> str:
        return self._prev

    @property
    def mode(self) -> ChainMode:
        return chain_mode(self._key)

    @property
    def head(self) -> tuple[int, str] | None:
        """Keyed: (records whole in the current file, MAC of its last whole line), as
        last reported to ``on_head``; None for a plain chain."""
        return (self._written, self._head_mac) if self._key is not None else None

    @property
    def count(self) -> int:
        """Records chained so far, staged ones included, counted over every file this
        writer has written (see rotate): a position that only grows."""
        return self._base + self._seq

    @property
    def written(self) -> int:
        """Records whole in the file: every record whose seq is below this. A short
        write counts the records it completed, so a caller can release exactly the
        answers whose records made it. Counted like ``count``."""
        return self._base + self._written

    def check(self) -> None:
        """Raise ChainError unless the next append can land, whole and in order, in the
        file we opened, and the path still names it.

        Every call: the file must hold exactly the bytes this writer put there (one
        ``lseek`` to its end, cheaper than a stat): a truncation, a rewrite to another
        length or an append by anyone else changes it, and fails the log for good. A
        rewrite of the same length is not seen here (the chain and the digests a run
        records catch that).

        The descriptor and the path: with a watch, stat-ed only once something on the
        path may have changed since they last passed. A removed file fails the log for
        good. A path that names another file, or none, while the open file is still
        linked and whole is a rotation in progress (PathMoved): refused, not failed;
        ``rotate`` (SIGHUP) opens a new log at the path, or the path's return clears it."""
        if not self.healthy or self._fd is None:
            raise ChainError("evidence writer is not open or a previous write failed")
        try:
            size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            self._failed = True
            raise ChainError(f"evidence file unavailable: {exc.strerror}") from None
        if size != self._size:
            self._failed = True
            raise ChainError(f"evidence file was changed by someone else: {size} bytes on disk, "
                             f"{self._size} written by this proxy (truncated or rewritten)")
        if not self._moved and self._watch is not None and not self._watch.changed():
            return
        try:
            st = os.fstat(self._fd)
        except OSError as exc:
            self._failed = True
            raise ChainError(f"evidence file unavailable: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self._ident or st.st_nlink == 0:
            self._failed = True
            raise ChainError("evidence file was removed or replaced since it was opened")
        try:
            on_disk: os.stat_result | None = os.stat(self._path_str)
        except OSError:
            on_disk = None
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != self._ident:
            self._moved = True
            raise PathMoved("the evidence path no longer names the open log (rotated or moved); "
                            "send SIGHUP to seal it and open a new log at the path")
        self._moved = False

    @property
    def moved(self) -> bool:
        """The path named another file, or none, at the last check (see PathMoved)."""
        return self._moved

    def rotate(self, seal: Mapping[str, Any], opening: Callable[[str, int], Mapping[str, Any]]) -> bool:
        """After the log was renamed away (logrotate's default): append ``seal`` to the
        open file as its last record, close it, open a new file at the path and make
        ``opening(last_sha256, records)`` of the sealed file its first record, so the new
        chain names the end of the old one. False, and nothing done, while the path still
        names the open file. The new file must not exist or be empty (logrotate's
        ``create``): a file someone else filled is never extended. Any failure leaves
        the writer failed (fail closed)."""
        if not self.healthy or self._fd is None:
            raise ChainError("evidence writer is not open or a previous write failed")
        try:
            on_disk: os.stat_result | None = os.stat(self._path_str)
        except OSError:
            on_disk = None
        if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == self._ident:
            return False
        self.append(seal)
        sealed_sha, sealed_records = self._prev, self._seq
        self._base += self._seq
        self._release_file()
        self._fd = None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            self._failed = True
            raise ChainError(f"cannot open a new log at {self.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if st.st_size:
            os.close(fd)
            self._failed = True
            raise ChainError(f"{self.path} already holds {st.st_size} bytes that are not this proxy's; "
                             "refusing to extend it")
        self._fd, self._ident, self._size = fd, (st.st_dev, st.st_ino), 0
        self._prev, self._seq, self._written, self._moved = GENESIS, 0, 0, False
        self._prev_mac = self._head_mac = GENESIS
        if self._want_watch:
            self._watch = PathWatch.open(self.path)
            if self._watch is not None and self._loop is not None:
                self._watch.attach(self._loop)
        self.append(opening(sealed_sha, sealed_records))
        return True

    def append(self, record: Mapping[str, Any]) -> str:
        """Write one record now (after any staged ones)."""
        body = dict(record)
        body["seq"] = self._seq
        body["prev_sha256"] = self._prev
        if self._key is not None:
            body["prev_hmac"] = self._prev_mac
        sha = self._stage(orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE))
        self.flush()
        return sha

    def stage_fields(self, fields: dict[str, Any]) -> str:
        """Chain one record into the next ``flush``: it takes its place (seq, previous
        hash) now, reaches the file with the flush. The chain fields are set in
        ``fields`` itself, so it must not carry its own ``seq`` or ``prev_sha256``."""
        if "seq" in fields or "prev_sha256" in fields or "prev_hmac" in fields:
            raise ChainError("a record must not carry its own seq, prev_sha256 or prev_hmac")
        fields["seq"] = self._seq
        fields["prev_sha256"] = self._prev
        if self._key is not None:
            fields["prev_hmac"] = self._prev_mac
        return self._stage(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))

    def _stage(self, data: bytes) -> str:
        """One serialized record that ends in its newline; the hash covers the line
        without it."""
        if not self.healthy or self._fd is None:
            raise ChainError("evidence writer is not open or a previous write failed")
        self._staged.append(data)
        line = memoryview(data)[:-1]
        sha = hashlib.sha256(line).hexdigest()
        self._prev, self._seq = sha, self._seq + 1
        if self._mac is not None:
            self._prev_mac = self._mac.hexdigest(line)
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
        self._size += max(written, 0)
        if written == len(data):
            self._written = self._seq
            if self._key is not None:
                self._head_mac = self._prev_mac
                if self._on_head is not None:
                    self._on_head(self._written, self._base + self._written, self._head_mac)
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
        self._release_file()

    def _release_file(self) -> None:
        """Stop watching the path; sync and close the descriptor."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError:
            pass
        finally:
            os.close(self._fd)
