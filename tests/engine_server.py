"""One interface for every real inference engine the suite runs (llama.cpp, vLLM).

An engine tier is a small subclass: the command that serves the tiny generated model,
the environment it needs, and where its access log lives. Everything else (a free port
on 127.0.0.1, its own process group so that stopping it stops every process it forked,
readiness, crash simulation, the access log as proof of what reached it) is here once.
Nothing skips: an engine that cannot start fails the test with its log's tail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` and whose state is not zombie (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


class EngineServer:
    """A real engine process on 127.0.0.1, restartable on the same port."""

    name = "engine"
    # Seconds a start may take before the test fails; a loaded 2-core machine is slow.
    ready_timeout_s: float = 60.0

    def __init__(self, model_id: str, log_path: Path, port: int, api_key: str | None = None) -> None:
        self.model_id, self.log_path, self.port, self.api_key = model_id, log_path, port, api_key
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.root_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    # --- what a subclass provides
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    # --- shared
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, wait: bool = True) -> None:
        """Start in a new session (own process group); the key, if any, travels in the
        environment the subclass builds, never in argv."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(), start_new_session=True)
        if wait:
            self.wait_ready()

    def is_ready(self) -> bool:
        req = urllib.request.Request(self.base_url + "/models", headers=self.auth_headers())
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.ready_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"{self.name} server exited ({self.proc.returncode}): {self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"{self.name} server not ready in {timeout_s:.0f}s: {self.log_tail()}")

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def group_pids(self) -> list[int]:
        """Live (not zombie) processes of the engine's process group, read from /proc:
        orphans that PID 1 has not reaped yet do not count as running."""
        if self.proc is None:
            return []
        return live_group_members(self.proc.pid)

    def group_alive(self) -> bool:
        return bool(self.group_pids())

    def kill(self) -> None:
        """SIGKILL every process of the engine at once: a crash, not a shutdown."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self._reap_group(10)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the group, then SIGKILL whatever is left of it (bounded)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if not self._reap_group(timeout_s):
            self._signal_group(signal.SIGKILL)
            self._reap_group(10)

    def _reap_group(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.group_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:] if self.log_path.exists() else "(no log)"

    def access_lines(self, path: str = "/v1/") -> list[str]:
        """POST requests the engine itself logged (uvicorn's access log): the proof of
        what reached it, independent of anything the proxy says."""
        return [line for line in self.log_text().splitlines() if f'"POST {path}' in line]
