"""The private channel between a keyed proxy and the harness that started it.

The harness draws a per-run key and hands it to its proxy on an inherited file
descriptor (``CASE_PROXY_CHAIN_KEY_FD``): never argv, never a file, never the environment
block that ``/proc/PID/environ`` shows. The proxy keys its evidence chain with it (see
proxy.hashchain) and reports the chain's head (records, MAC of the last line) on a second
inherited descriptor (``CASE_PROXY_CHAIN_HEAD_FD``, a pipe the harness reads) after every
write and once more, marked ``stop``, when it has written ``proxy_stop`` and closed the
log. A process that replaced the proxy holds neither descriptor nor key: it can neither
extend the chain nor report a head.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("case_proxy")

# The key as hex text, at most this many bytes on the descriptor (a 64-byte key).
MAX_KEY_TEXT = 128
# One report line is far below PIPE_BUF (4096), so each write is atomic on a pipe.
MAX_REPORT_LINE = 1024
STOP_WRITE_TIMEOUT_S = 5.0


class HeadReport(BaseModel):
    """One line on the head channel (JSON, newline-terminated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    records: int = Field(ge=0, description="records whole in the current evidence file")
    total: int = Field(ge=0, description="records over every file this proxy wrote (rotations)")
    head: str = Field(pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256 of the file's last line under the run key")
    pid: int
    stop: bool = Field(default=False, description="the last report: proxy_stop written, log closed")


def read_key_fd(fd: int) -> bytes:
    """The key from an inherited descriptor (hex text), which is then closed. ValueError
    names what is wrong (never the value)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= MAX_KEY_TEXT:  # bounded: a longer text is refused below
            data = os.read(fd, MAX_KEY_TEXT + 1 - size)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    except OSError as exc:
        raise ValueError(f"cannot read descriptor {fd}: {exc.strerror}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    text = b"".join(chunks).strip()
    if size > MAX_KEY_TEXT:
        raise ValueError(f"descriptor {fd} holds more than {MAX_KEY_TEXT} bytes; expected a hex key")
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"descriptor {fd} does not hold a hex key") from None
    if len(key) < 16:
        raise ValueError(f"the key on descriptor {fd} is {len(key)} bytes; at least 16 are needed")
    return key


def head_fd_problem(fd: int) -> str | None:
    """Why ``fd`` cannot carry head reports (None: it can): it must be an open pipe or
    socket, and not one of the standard streams."""
    if fd < 3:
        return f"descriptor {fd} is a standard stream; give the pipe the harness passed"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"descriptor {fd} is not open ({exc.strerror})"
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return f"descriptor {fd} is not a pipe or socket"
    return None


class HeadChannel:
    """The writing end, in the proxy. Reports never block the serving loop: a report
    the pipe cannot take now is kept and the next write supersedes it (the newest head
    is the one that matters); only ``stop`` waits, boundedly, until it is delivered."""

    def __init__(self, fd: int, pid: int) -> None:
        self._fd: int | None = fd
        self._pid = pid
        self._pending: bytes | None = None
        self._last: dict[str, Any] | None = None
        os.set_blocking(fd, False)

    @property
    def last(self) -> HeadReport | None:
        return HeadReport.model_validate(self._last) if self._last is not None else None

    def report(self, records: int, total: int, head: str) -> None:
        """The chain's head after a write (a HashChainWriter ``on_head`` callback). On
        the serving path: a plain dict in HeadReport's shape (the reader validates)."""
        self._last = {"records": records, "total": total, "head": head, "pid": self._pid, "stop": False}
        self._pending = orjson.dumps(self._last, option=orjson.OPT_APPEND_NEWLINE)
        self._try_write()

    def _try_write(self) -> bool:
        if self._fd is None or self._pending is None:
            return self._pending is None
        try:
            os.write(self._fd, self._pending)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.error("the head channel to the harness failed (%s); the harness will see no more heads", exc.strerror)
            self._close()
            return False
        self._pending = None
        return True

    def stop(self) -> bool:
        """The final report (the last head, marked ``stop``), then close. True if it was
        delivered."""
        if self._fd is None or self._last is None:
            self._close()
            return False
        self._last = {**self._last, "stop": True}
        self._pending = orjson.dumps(self._last, option=orjson.OPT_APPEND_NEWLINE)
        deadline = time.monotonic() + STOP_WRITE_TIMEOUT_S
        delivered = self._try_write()
        while not delivered and self._fd is not None and time.monotonic() < deadline:
            time.sleep(0.01)
            delivered = self._try_write()
        self._close()
        return delivered

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def parse_report(line: bytes) -> HeadReport | str:
    """One line read from the channel, or why it is not a report."""
    if len(line) > MAX_REPORT_LINE:
        return f"a head report of {len(line)} bytes (limit {MAX_REPORT_LINE})"
    try:
        return HeadReport.model_validate_json(line)
    except ValueError:
        return "a line on the head channel that is not a head report"
