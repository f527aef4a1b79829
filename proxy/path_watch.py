"""Tell cheaply whether a path may have stopped naming the file opened from it (inotify).

Before forwarding, the proxy proves that its evidence path still names the log it writes
to. Two stat calls per request cost more than the rest of the record. What a path names
depends only on the entries of the directories along it, so an inotify watch on each of
them makes the usual answer ("nothing changed since the last proof") one poll that does
not wait. Any event at all, relevant or not, only means "prove it again": the caller
then does the full stat comparison, so no event needs to be understood to be safe.

The watch is used only where it sees every change a stat would: on Linux, on local
filesystems (a network filesystem does not report other hosts' changes), for a path
without symlinks (a link's target directories are not on the path to watch). Anywhere
else ``PathWatch.open`` returns None and the caller stats every time. Once the kernel
drops a watch (its directory deleted, its filesystem unmounted) or the event queue
overflows, the watch reports a possible change on every call. Not seen, as by any
inotify user: a filesystem mounted over a directory of the path or over the file (root
only).

In the proxy the event loop reads the events (``attach``) as it polls its descriptors,
once per iteration, so the usual answer is a flag test with no system call at all (the
poll per request was a quarter of the proof's cost in py-spy). A change made while the
current iteration runs is then seen at the next one: the same window as a change made
between a check and the write after it, which no check closes. Such a record lands in
the file the descriptor still names, and the next check fails the log.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import select
import struct
import sys
from pathlib import Path

_IN_MODIFY = 0x02
_IN_ATTRIB = 0x04
_IN_CLOSE_WRITE = 0x08
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_UNMOUNT = 0x2000
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000

_DIR_MASK = (_IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF
             | _IN_ONLYDIR | _IN_DONT_FOLLOW)
# With ``content``: the file's own changes, made in place (a write, a truncation, a chmod).
_FILE_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_ATTRIB | _IN_DONT_FOLLOW
# The watch can no longer vouch for the path: a watch was dropped or events were lost.
_BROKEN = _IN_IGNORED | _IN_Q_OVERFLOW | _IN_UNMOUNT

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

# statfs f_type of filesystems whose changes all happen in this kernel, so inotify sees them.
LOCAL_FILESYSTEMS = frozenset({
    0xEF53,      # ext2/3/4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0x01021994,  # tmpfs
    0x794C7630,  # overlayfs
    0xF2F52010,  # f2fs
    0x2FC12FC1,  # zfs
})


def watched_directories(path: Path) -> list[str] | None:
    """Every directory from the root down to the file's own: whose entries must stay put
    for ``path`` to keep naming the same file. None if the path runs through a symlink
    (or a ``..`` that a symlink would resolve differently)."""
    absolute = os.path.abspath(path)
    if os.path.realpath(absolute) != absolute:
        return None
    parts = Path(absolute).parts
    return [str(Path(*parts[:n])) for n in range(1, len(parts))]


def broken(events: bytes, file_wds: frozenset[int] = frozenset()) -> bool:
    """True if the events read from an inotify descriptor include one after which the
    watch no longer covers the path. ``file_wds``: the watches on the file itself (see
    ``PathWatch.open(content=True)``), whose end only means the file was replaced or
    removed (its directory's events say so too); it is watched again afterwards."""
    offset = 0
    while offset + _EVENT.size <= len(events):
        wd, mask, _cookie, name_len = _EVENT.unpack_from(events, offset)
        if mask & _BROKEN and not (mask == _IN_IGNORED and wd in file_wds):
            return True
        offset += _EVENT.size + name_len
    return False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("inotify_init1", "inotify_add_watch", "statfs"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return libc


def _filesystem_type(libc: ctypes.CDLL, path: str) -> int | None:
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.statfs(path.encode(), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type is the first field


class PathWatch:
    """An inotify watch on the directories of one file's path. ``changed()`` is True
    when anything may have changed since its previous call (and on the first call)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._libc: ctypes.CDLL | None = None
        self._file: bytes | None = None  # the file itself, watched for content changes
        self._file_wds: frozenset[int] = frozenset()  # every watch it ever had
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._changed = True
        self._broken = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, path: Path, content: bool = False) -> PathWatch | None:
        """A watch on ``path``, or None where a watch would not see every change.
        ``content``: also report changes made to the file in place (a write, a
        truncation, a chmod), for files read rather than written by this process (the
        decision record and the admission JSON, see proxy.authority). Not for the
        evidence log: every record written would wake it."""
        dirs = watched_directories(path)
        libc = _libc()
        if dirs is None or libc is None:
            return None
        if any(_filesystem_type(libc, d) not in LOCAL_FILESYSTEMS for d in dirs):
            return None
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None
        watch = cls(fd)
        for d in dirs:
            if libc.inotify_add_watch(fd, d.encode(), _DIR_MASK) < 0:  # e.g. out of watches
                watch.close()
                return None
        if content:
            watch._libc, watch._file = libc, os.path.abspath(path).encode()
            watch._watch_file()
        return watch

    def _watch_file(self) -> None:
        """(Re)watch whatever file the path names now: after a rename over it, the old
        watch follows the old inode. Watching the same inode again returns the same
        watch; a missing file is no error (its directory's watch reports its return)."""
        if self._libc is None or self._file is None or self._fd < 0:
            return
        wd = self._libc.inotify_add_watch(self._fd, self._file, _FILE_MASK)
        if wd >= 0 and wd not in self._file_wds:
            self._file_wds = self._file_wds | {wd}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` read the events as they come (see the module docstring)."""
        if self._fd >= 0 and not self._broken:
            loop.add_reader(self._fd, self._read_events)
            self._loop = loop

    def _read_events(self) -> None:
        self._changed = True
        self._drain()
        if self._broken:
            self._detach()  # it answers True from now on; a dead watch must not wake the loop

    def changed(self) -> bool:
        if self._broken:
            return True
        if self._loop is None and self._poll.poll(0):
            self._changed = True
            self._drain()
        changed, self._changed = self._changed, False
        if changed and self._file is not None:
            self._watch_file()
        return changed

    def _drain(self) -> None:
        for _ in range(64):  # bounded; an event storm leaves the rest for the next call
            try:
                events = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            if broken(events, self._file_wds):
                self._broken = True
                return

    def _detach(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._fd)
            except RuntimeError:  # the loop is already closed
                pass
            self._loop = None

    def close(self) -> None:
        self._detach()
        if self._fd >= 0:
            self._poll.unregister(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._broken = True
