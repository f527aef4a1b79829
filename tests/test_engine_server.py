"""tests.engine_server's process handling, without a real engine: a hostile "engine"
forks a helper that ignores SIGTERM (as vLLM's engine core outlives a SIGKILL of its
API server) and both must be gone after stop() or kill()."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.engine_server import EngineServer, free_port, live_group_members

# The parent forks a child that ignores SIGTERM, then both sleep (bounded: 120 s).
HOSTILE = """
import os, signal, sys, time
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(120)
    sys.exit(0)
time.sleep(120)
"""


class HostileEngine(EngineServer):
    name = "hostile"

    def __init__(self, tmp: Path) -> None:
        super().__init__("m", tmp / "hostile.log", free_port())
        self.script, self.child_file = tmp / "hostile.py", tmp / "child.pid"
        self.script.write_text(HOSTILE)

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.child_file)]


def _started(tmp_path: Path) -> tuple[HostileEngine, int]:
    engine = HostileEngine(tmp_path)
    engine.start(wait=False)
    for _ in range(200):
        if engine.child_file.exists() and engine.child_file.read_text():
            break
        time.sleep(0.05)
    child = int(engine.child_file.read_text())
    assert engine.pid is not None and sorted(live_group_members(engine.pid)) == sorted([engine.pid, child])
    return engine, child


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_leaves_no_process_of_the_group_even_one_ignoring_sigterm(tmp_path: Path) -> None:
    engine, child = _started(tmp_path)
    engine.stop(timeout_s=2)
    assert not _alive(child) and not engine.group_alive()


def test_kill_takes_the_whole_group_at_once(tmp_path: Path) -> None:
    engine, child = _started(tmp_path)
    engine.kill()
    assert not _alive(child) and not engine.group_alive()
