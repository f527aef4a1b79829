"""The harness's end of the proxy's private channel (see proxy.evidence_channel).

``RunKey`` draws the per-run key and the two pipes: the key goes to the proxy on one
(written, then closed, before the proxy starts), the proxy's head reports come back on
the other, read here on a thread. Nothing of the key is written anywhere; only the
harness and the proxy it starts hold the descriptors (they are not inheritable, and
``pass_fds`` gives them to the proxy alone).
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field

from proxy.evidence_channel import HeadReport, parse_report

from . import events as ev

KEY_BYTES = 32
MAX_REPORTS = 1_000_000  # bounded: a flood from a broken proxy stops being read
MAX_PROBLEMS = 10


class HeadListener(threading.Thread):
    """Reads head reports until the pipe closes (the proxy exited)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True, name="proxy-head-listener")
        self.fd = fd
        self.last: HeadReport | None = None
        self.reports = 0
        self.problems: list[str] = []

    def run(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as stream:
            buffered = b""
            while self.reports < MAX_REPORTS:
                try:
                    data = stream.read(65536)
                except OSError:
                    break
                if not data:
                    break
                buffered += data
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    self._take(line)
                if len(buffered) > 4096:
                    self._problem("an over-long line on the head channel")
                    buffered = b""

    def _take(self, line: bytes) -> None:
        parsed = parse_report(line)
        if isinstance(parsed, str):
            self._problem(parsed)
            return
        if self.last is not None and self.last.stop:
            self._problem("a report after the stop report")
        self.last = parsed
        self.reports += 1

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def summary(self) -> ev.HeadReport:
        """What ``proxy_stopped`` records of the channel (no secret: MACs and counts)."""
        last = self.last
        return ev.HeadReport(reports=self.reports, records=last.records if last else None,
                             head=last.head if last else None, pid=last.pid if last else None,
                             stop=bool(last and last.stop), problems=list(self.problems))


@dataclass
class RunKey:
    """The run's chain key and the descriptors that carry it and the heads."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES))
    key_fd: int = -1  # the proxy's end: the key, as hex text, then EOF
    head_fd: int = -1  # the proxy's end: where it writes head reports
    listener: HeadListener | None = None

    def open(self) -> None:
        key_r, key_w = os.pipe()
        try:
            os.write(key_w, self.key.hex().encode())  # far below a pipe's capacity: never blocks
        finally:
            os.close(key_w)
        head_r, head_w = os.pipe()
        self.key_fd, self.head_fd = key_r, head_w
        self.listener = HeadListener(head_r)

    @property
    def proxy_fds(self) -> tuple[int, int]:
        return self.key_fd, self.head_fd

    def started(self) -> None:
        """After the proxy was spawned: drop the harness's copies of its ends (so the
        channel reads EOF when the proxy exits) and start listening."""
        for fd in self.proxy_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.key_fd = self.head_fd = -1
        if self.listener is not None:
            self.listener.start()

    def finish(self, timeout_s: float) -> ev.HeadReport:
        """After the proxy exited: the channel's summary."""
        if self.listener is None:
            return ev.HeadReport(reports=0, records=None, head=None, pid=None, stop=False,
                                 problems=["the head channel was never opened"])
        if self.listener.is_alive():
            self.listener.join(timeout_s)
        out = self.listener.summary()
        if self.listener.is_alive():
            out = out.model_copy(update={"problems": [*out.problems,
                                                      "the head channel was still open after the proxy stopped"]})
        return out
