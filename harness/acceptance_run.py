"""Drive the acceptance worker: send each case's probe, read its reply, judge it here.

The worker (``harness.acceptance_worker``) runs Case's code; this module runs in the
harness and never sends it an expected value. Framing: each request carries a fresh
random nonce, and the only acceptable stdout line is one JSON object ``{"nonce": <that
nonce>, "result": {...}}``. Anything else on stdout (garbage, a reply to another nonce, an
over-long line), a worker that exits, or one that does not answer within the per-case or
the total time ends the worker: that case and every later one fail as "not run"
(``errors``). No second worker is started for the rest: a fresh worker would run the same
import-time code again, and the verdict is ``fail`` either way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .acceptance_cases import Case, Verdict, judge

MAX_REPLY_BYTES = 16 * 1024 * 1024
EXIT_GRACE_S = 5.0


@dataclass
class WorkerRun:
    """What happened to the cases: a verdict each, in order (None: not run)."""

    verdicts: list[Verdict | None]
    lost: str | None = None  # why the worker was given up, if it was
    timed_out: bool = False
    worker_exit: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for v in self.verdicts if v is not None and not v.passed)

    @property
    def not_run(self) -> int:
        return sum(1 for v in self.verdicts if v is None)


class _Lost(Exception):
    def __init__(self, why: str, timed_out: bool = False) -> None:
        super().__init__(why)
        self.timed_out = timed_out


class _Channel:
    """Line I/O with the worker under deadlines, never blocking past them."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.win, self.rout = proc.stdin.fileno(), proc.stdout.fileno()
        for fd in (self.win, self.rout):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.buf = b""

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost("the worker stopped reading its requests", timed_out=True)
            _, ready, _ = select.select([], [self.win], [], remaining)
            if ready:
                try:
                    view = view[os.write(self.win, view):]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, OSError):
                    raise _Lost("the worker closed its input (it exited)") from None

    def line(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_REPLY_BYTES:
                raise _Lost(f"the worker wrote a line longer than {MAX_REPLY_BYTES} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost("the worker did not answer in time", timed_out=True)
            ready, _, _ = select.select([self.rout], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.rout, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise _Lost("the worker exited before answering")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def parse_reply(line: bytes, nonce: str) -> object:
    """The ``result`` of a reply to ``nonce``; ValueError for anything else (garbage)."""
    try:
        reply = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"not JSON: {line[:80]!r}") from None
    if not isinstance(reply, dict) or set(reply) != {"nonce", "result"}:
        raise ValueError(f"not a reply: {line[:80]!r}")
    if reply["nonce"] != nonce:
        raise ValueError("a reply to a request that was not asked")
    return reply["result"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group (its own session, started by us)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(EXIT_GRACE_S)


def run_cases(cases: Sequence[Case], argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], stderr: Path,
              case_timeout_s: float, total_timeout_s: float) -> WorkerRun:
    """Start the worker (``argv``: already wrapped in the sandbox), judge every case in
    order. Bounded: each case by ``case_timeout_s``, all of them by ``total_timeout_s``."""
    run = WorkerRun(verdicts=[None] * len(cases))
    total_deadline = time.monotonic() + total_timeout_s
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True)
    try:
        chan = _Channel(proc)
        for index, c in enumerate(cases):
            deadline = min(time.monotonic() + case_timeout_s, total_deadline)
            nonce = secrets.token_hex(16)
            request = json.dumps({"nonce": nonce, "probe": c.probe.model_dump(mode="json")}) + "\n"
            try:
                chan.send(request.encode("utf-8"), deadline)
                line = chan.line(deadline)
                try:
                    result = parse_reply(line, nonce)
                except ValueError as exc:
                    raise _Lost(f"garbage on the worker's stdout ({exc})") from None
            except _Lost as lost:
                run.lost = f"case {index + 1} ({c.name}): {lost}"
                run.timed_out = lost.timed_out
                break
            run.verdicts[index] = judge(c, result)
        if run.lost is None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                run.worker_exit = proc.wait(max(0.1, min(EXIT_GRACE_S, total_deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                run.notes.append("the worker did not exit after its input ended")
            if chan.buf or _drain(chan):
                run.lost = "garbage on the worker's stdout after the last reply"
    finally:
        if proc.poll() is None:
            _stop(proc)
        run.worker_exit = proc.poll() if run.worker_exit is None else run.worker_exit
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    return run


def _drain(chan: _Channel) -> bool:
    """Whether anything more is waiting on stdout (the worker has exited)."""
    ready, _, _ = select.select([chan.rout], [], [], 0)
    if not ready:
        return False
    try:
        return bool(os.read(chan.rout, 1))
    except OSError:
        return False


def sandbox_wrap(bwrap: str, masked: Sequence[Path]) -> Callable[[list[str], Path, Path, Path], list[str]]:
    """The acceptance sandbox (``harness.sandbox.isolated_command``): no network, none of
    the machine but the interpreter (with ``masked`` covered: the fixtures, the runs),
    the worker's scratch directory (writable) and the import root. The cases are not in
    it: they stay in the harness."""
    from . import sandbox as sbx

    def wrap(argv: list[str], cwd: Path, scratch: Path, import_root: Path) -> list[str]:
        ro = [*sbx.interpreter_paths(), *([] if import_root.is_relative_to(scratch) else [import_root])]
        return sbx.isolated_command(bwrap, argv, cwd=cwd, writable=[scratch], read_only=ro, system=sbx.host_system(),
                                    masked=masked)

    return wrap
