"""The check before forwarding: the evidence path must still name the open log. Real
files and directories under tmp_path; each change is made the way an operator or a
log rotator would make it, with the inotify watch on and with plain stats."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.hashchain import ChainError, HashChainWriter, PathMoved
from proxy.path_watch import PathWatch, broken, watched_directories


@pytest.fixture(params=[True, False], ids=["watched", "stat-every-time"])
def writer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HashChainWriter]:
    path = tmp_path / "a" / "b" / "evidence.jsonl"
    path.parent.mkdir(parents=True)
    w = HashChainWriter(path, watch=request.param)
    w.open()
    assert (w._watch is not None) is request.param  # this machine: Linux, a local filesystem
    w.append({"n": 0})
    w.check()
    yield w
    w.close()


def _recreate(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _unlink(p: Path) -> None:
    p.unlink()


def _rename_away(p: Path) -> None:
    p.rename(p.with_name("old.jsonl"))


def _rename_over(p: Path) -> None:
    other = p.with_name("new.jsonl")
    other.write_bytes(b"")
    other.rename(p)


def _move_parent(p: Path) -> None:
    p.parent.rename(p.parent.with_name("b-old"))
    _recreate(p)


def _move_grandparent(p: Path) -> None:
    p.parent.parent.rename(p.parent.parent.with_name("a-old"))
    _recreate(p)


def _parent_becomes_symlink(p: Path) -> None:
    elsewhere = p.parent.parent / "elsewhere"
    _recreate(elsewhere / p.name)
    p.parent.rename(p.parent.with_name("b-old"))
    p.parent.symlink_to(elsewhere)


# The open file is gone (unlinked): its records can no longer be read by anyone.
REMOVALS: list[Callable[[Path], None]] = [_unlink, _rename_over]
# The open file is still linked and whole, somewhere else: a rotation (or a move) that
# waits for SIGHUP. Refused until then, not failed.
MOVES: list[Callable[[Path], None]] = [_rename_away, _move_parent, _move_grandparent, _parent_becomes_symlink]


@pytest.mark.parametrize("change", REMOVALS, ids=[c.__name__.strip("_") for c in REMOVALS])
def test_a_removed_log_fails_the_check_for_good(writer: HashChainWriter, change: Callable[[Path], None]) -> None:
    change(writer.path)
    with pytest.raises(ChainError):
        writer.check()
    with pytest.raises(ChainError):  # and it stays failed: a gap is never papered over
        writer.append({"n": 1})


@pytest.mark.parametrize("change", MOVES, ids=[c.__name__.strip("_") for c in MOVES])
def test_a_log_moved_away_is_refused_until_rotated(writer: HashChainWriter, change: Callable[[Path], None]) -> None:
    change(writer.path)
    with pytest.raises(PathMoved):
        writer.check()
    writer.append({"n": 1})  # a record of a request already under way still lands, in the open file
    with pytest.raises(PathMoved):  # and the check keeps refusing: the path does not lead to it
        writer.check()
    assert writer.rotate({"kind": "log_sealed"}, lambda sha, n: {"kind": "log_continued", "continues_sha256": sha})
    writer.check()
    first = json.loads(writer.path.read_text().splitlines()[0])
    assert first["seq"] == 0 and first["kind"] == "log_continued"


def _truncate(p: Path) -> None:
    os.truncate(p, 0)


def _drop_last_record(p: Path) -> None:
    lines = p.read_bytes().splitlines(keepends=True)
    with open(p, "r+b") as f:  # same inode, rewritten in place, shorter
        f.truncate(0)
        f.write(b"".join(lines[:-1]))


def _append_forged(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b'{"kind":"request","forged":true}\n')


TAMPERS: list[Callable[[Path], None]] = [_truncate, _drop_last_record, _append_forged]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[c.__name__.strip("_") for c in TAMPERS])
def test_a_log_truncated_or_rewritten_in_place_fails_the_check_for_good(writer: HashChainWriter,
                                                                         tamper: Callable[[Path], None]) -> None:
    """Same inode, same path: only the size tells. The watch sees no directory change,
    so this holds only because the size is compared on every check."""
    writer.append({"n": 1})
    writer.check()
    tamper(writer.path)
    with pytest.raises(ChainError, match="changed by someone else"):
        writer.check()
    with pytest.raises(ChainError):
        writer.append({"n": 2})


def test_harmless_changes_near_the_log_pass_the_check(writer: HashChainWriter) -> None:
    d = writer.path.parent
    (d / "other.jsonl").write_bytes(b"x")
    (d / "other.jsonl").rename(d / "other2.jsonl")
    (d / "other2.jsonl").unlink()
    (d / "sub").mkdir()
    os.utime(writer.path)
    os.chmod(writer.path, 0o600)
    os.link(writer.path, d / "hardlink.jsonl")  # a second name; the path still names the log
    for n in range(3):
        writer.check()
        writer.append({"n": n})
    assert writer.count == 4


def test_an_unchanged_path_is_not_stat_ed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = HashChainWriter(tmp_path / "e.jsonl", watch=True)
    w.open()
    calls: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: calls.append(str(p)) or real_stat(p, *a, **k))
    for _ in range(5):
        w.check()
    assert calls == [str(tmp_path / "e.jsonl")]  # the first check proves the path, the rest trust the watch
    (tmp_path / "x").write_bytes(b"")  # any event on the path's directories: prove it again
    w.check()
    w.check()
    assert len(calls) == 2
    w.close()


def test_no_watch_where_it_would_not_see_every_change(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert watched_directories(tmp_path / "link" / "e.jsonl") is None
    assert PathWatch.open(tmp_path / "link" / "e.jsonl") is None
    assert PathWatch.open(Path("/proc/version")) is None  # not a local disk filesystem
    dirs = watched_directories(real / "e.jsonl")
    assert dirs is not None and dirs[0] == "/" and dirs[-1] == str(real) and str(tmp_path) in dirs


def test_a_symlinked_log_path_is_stat_ed_every_time(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    w = HashChainWriter(tmp_path / "link" / "e.jsonl", watch=True)
    w.open()
    assert w._watch is None
    w.check()
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(tmp_path)
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(ChainError):
        w.check()
    w.close()


def _event(mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (-len(name) % 16) if name else b""
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


def test_events_that_end_the_watch_are_recognised_among_others() -> None:
    create, ignored, overflow = 0x100, 0x8000, 0x4000
    assert not broken(_event(create, b"some-long-file-name.jsonl") + _event(create, b"x"))
    assert broken(_event(create, b"some-long-file-name.jsonl") + _event(ignored))
    assert broken(_event(overflow))
    assert not broken(b"")


class _NoPoll:
    """Stands in for the watch's poll object: proves a check made no poll call."""

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        raise AssertionError("the watch polled although the loop reads its events")

    def unregister(self, fd: int) -> None:
        pass


async def _noticed(w: HashChainWriter) -> bool:
    """Whether a check fails within a second of loop iterations (bounded)."""
    for _ in range(200):
        await asyncio.sleep(0.005)
        try:
            w.check()
        except ChainError:
            return True
    return False


async def test_with_the_loop_reading_events_a_check_makes_no_system_call(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    w = HashChainWriter(tmp_path / "e.jsonl", watch=True)
    w.open()
    w.attach_watch(asyncio.get_running_loop())
    w.check()  # the first check proves the path
    assert w._watch is not None
    w._watch._poll = _NoPoll()  # type: ignore[assignment]
    stats: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(str(p)) or real_stat(p, *a, **k))
    for _ in range(5):
        w.check()
    await asyncio.sleep(0.01)
    w.check()
    assert stats == []
    (tmp_path / "e.jsonl").rename(tmp_path / "rotated.jsonl")
    assert await _noticed(w)  # the loop read the rename's event; the next check proved the path gone
    w.close()


async def test_a_watch_the_kernel_dropped_stops_waking_the_loop_and_stats_every_time(tmp_path: Path) -> None:
    path = tmp_path / "d" / "e.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"")
    watch = PathWatch.open(path)
    assert watch is not None
    loop = asyncio.get_running_loop()
    watch.attach(loop)
    assert watch.changed() and not watch.changed()  # the first call, then nothing new
    os.unlink(path)
    os.rmdir(path.parent)  # the kernel drops the directory's watch (IN_IGNORED)
    for _ in range(200):
        await asyncio.sleep(0.005)
        if watch._loop is None:
            break
    assert watch._loop is None and not loop.remove_reader(watch._fd)  # no reader left behind
    assert watch.changed() and watch.changed()  # from now on every check stats
    watch.close()
