"""Several worker processes on one port, so the proxy can use more than one core.

A supervisor checks every gate, reserves the port, and forks N copies of the proxy that
each bind it with SO_REUSEPORT; the kernel spreads connections across them. Processes,
not threads: the per-request work is Python, and only processes run it in parallel.

Each worker enforces the same pins on its own (no shared state to get wrong) and writes
its own hash-chained evidence log, ``<stem>.worker<N><suffix>`` beside the configured
file: one chain cannot take appends from several processes without a cross-process lock
on every request. Metrics are summed over the workers (prometheus-client's multiprocess
mode), so a scrape answered by any worker shows the whole proxy.

Fail closed: if a worker fails to start, or dies while serving, the supervisor stops
every worker and exits non-zero. The proxy is either up with every worker enforcing and
recording, or not up at all; restarting it is the service manager's job.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

from .server import EXIT_BLOCKED, EXIT_CONFIG, EXIT_TORN_LOG, ROTATE_SIGNAL, STOP_SIGNALS, WorkerRole, check_static, run
from .settings import ProxySettings

EXIT_WORKER_FAILED = 1
STARTUP_DEADLINE_S = 60.0
POLL_S = 0.2
_READY = b"ready"


def worker_evidence_path(path: Path, index: int) -> Path:
    """Worker ``index``'s evidence log: ``evidence.jsonl`` -> ``evidence.worker0.jsonl``."""
    return path.with_name(f"{path.stem}.worker{index}{path.suffix}")


def worker_settings(settings: ProxySettings, index: int, port: int) -> ProxySettings:
    """The settings one worker runs with: the reserved port and its own evidence chain."""
    return settings.model_copy(update={"port": port, "workers": 1,
                                       "evidence_file": worker_evidence_path(settings.evidence_file, index)})


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen on) an SO_REUSEPORT socket, so that port 0 becomes one concrete
    port every worker shares and no unrelated process can take it meanwhile. A socket
    that does not listen is not in the kernel's reuseport group: it takes no connections."""
    family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _worker_main(settings: ProxySettings, role: WorkerRole, ready: Connection) -> None:
    """Entry point of a forked worker: its own metrics files, then the ordinary proxy."""
    # The supervisor's handlers are not ours; a stop that arrives before the event loop
    # handles it stays pending (serve_forever unblocks), so even an early stop is clean.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {ROTATE_SIGNAL})
    for sig in (*STOP_SIGNALS, ROTATE_SIGNAL):
        signal.signal(sig, signal.SIG_DFL)
    from prometheus_client import values

    # Chosen per metric at construction; this process builds its metrics after this line.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(role.metrics_dir)
    values.ValueClass = values.get_value_class()

    def on_ready() -> None:
        try:
            ready.send_bytes(_READY)
        except OSError:
            pass  # the supervisor is gone or stopping; its signal will stop us
        ready.close()

    sys.exit(run(settings, role, on_ready))


@dataclass
class _Worker:
    index: int
    proc: multiprocessing.process.BaseProcess
    ready_conn: Connection
    ready: bool = False


def _say(line: str) -> None:
    print(f"case-proxy: {line}", file=sys.stderr, flush=True)


class Supervisor:
    """Starts the workers, watches them, stops them all (on a signal or on any failure)."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.workers: list[_Worker] = []
        self._stop_requested = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = True

    def _on_rotate(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP (logrotate's postrotate): each worker rotates its own log."""
        for w in self.workers:
            if w.proc.exitcode is None and w.proc.pid is not None:
                os.kill(w.proc.pid, ROTATE_SIGNAL)

    def run(self) -> int:
        s = self.settings
        problems, gates = check_static(s)
        if problems or gates:
            for line in problems + gates:
                _say(line)
            return EXIT_CONFIG if problems else EXIT_BLOCKED
        try:
            reservation = reserve_port(s.host, s.port)
        except OSError as exc:
            _say(f"cannot listen on {s.host}:{s.port}: {exc.strerror}")
            return EXIT_CONFIG
        metrics_dir = Path(tempfile.mkdtemp(prefix="case-proxy-metrics-"))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        previous[ROTATE_SIGNAL] = signal.signal(ROTATE_SIGNAL, self._on_rotate)
        try:
            port = reservation.getsockname()[1]
            self._spawn(port, metrics_dir)
            code = self._await_ready()
            if code is None:
                host = f"[{s.host}]" if ":" in s.host else s.host
                print(f"CASE_PROXY_LISTENING http://{host}:{port}/v1", flush=True)
                code = self._watch()
            stopped_cleanly = self._stop_all()
            if code == 0 and not stopped_cleanly:
                code = EXIT_WORKER_FAILED
            return code
        finally:
            self._stop_all()  # idempotent; covers an exception on the way
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            reservation.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _spawn(self, port: int, metrics_dir: Path) -> None:
        ctx = multiprocessing.get_context("fork")  # before any event loop or thread exists here
        for i in range(self.settings.workers):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"case-proxy-worker-{i}",
                               args=(worker_settings(self.settings, i, port), WorkerRole(i, metrics_dir), send))
            proc.start()
            send.close()
            self.workers.append(_Worker(i, proc, recv))

    def _await_ready(self) -> int | None:
        """None once every worker listens; else the exit code (a worker failed, a signal
        arrived, or the deadline passed)."""
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not all(w.ready for w in self.workers):
            if self._stop_requested:
                return 0
            if time.monotonic() > deadline:
                _say(f"workers not ready after {STARTUP_DEADLINE_S:.0f}s; stopping all")
                return EXIT_WORKER_FAILED
            pending = [w for w in self.workers if not w.ready]
            multiprocessing.connection.wait([w.ready_conn for w in pending] + [w.proc.sentinel for w in pending],
                                            timeout=POLL_S)
            for w in pending:
                if w.ready_conn.poll():
                    try:
                        w.ready = w.ready_conn.recv_bytes() == _READY
                    except EOFError:
                        pass  # it exited without saying ready: the check below reports it
                if not w.ready and w.proc.exitcode is not None:
                    _say(f"worker {w.index} failed to start (exit {w.proc.exitcode}); stopping all workers")
                    return w.proc.exitcode if w.proc.exitcode in (EXIT_CONFIG, EXIT_BLOCKED, EXIT_TORN_LOG) \
                        else EXIT_WORKER_FAILED
        return None

    def _watch(self) -> int:
        """Serve until a signal, or until any worker exits. A worker that exits 0 was
        signalled itself (Ctrl-C reaches the whole process group, systemd signals the
        whole cgroup) and drained: stop the rest, 0. Any other exit is a failure: stop
        the rest, 1 (fail closed)."""
        while not self._stop_requested:
            multiprocessing.connection.wait([w.proc.sentinel for w in self.workers], timeout=POLL_S)
            for w in self.workers:
                code = w.proc.exitcode  # read once: each read polls, and may change between two
                if code == 0:
                    return 0
                if code is not None:
                    _say(f"worker {w.index} (pid {w.proc.pid}) exited with {code} while serving; "
                         "stopping every worker")
                    return EXIT_WORKER_FAILED
        return 0

    def _stop_all(self) -> bool:
        """SIGTERM every live worker (each drains like a lone proxy), SIGKILL what is
        still alive after the drain deadline. True if every worker exited 0."""
        for w in self.workers:
            if w.proc.exitcode is None and w.proc.pid is not None:
                os.kill(w.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.limits.drain_timeout_s + 5
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.exitcode is None:
                _say(f"worker {w.index} did not stop within the drain deadline; killing it")
                w.proc.kill()
                w.proc.join(5)
            w.ready_conn.close()
        return all(w.proc.exitcode == 0 for w in self.workers)


def supervise(settings: ProxySettings) -> int:
    return Supervisor(settings).run()
