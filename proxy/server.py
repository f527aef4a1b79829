"""Start-up and shut-down: every gate is checked before the socket opens.

The proxy refuses to start unless the decision record and admission pass their gates,
the backend URL passes the upstream pin and the evidence log can record. On SIGTERM it
stops accepting, lets open streams finish up to the drain deadline, writes a
``proxy_stop`` record and closes the evidence log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from aiohttp import web

from .admission import ArtifactError, evaluate_admission_gates, load_admission, load_decision
from .app import ProxyState, create_app
from .authority import Authority, AuthorityVerdict, info_labels
from .evidence import EvidenceLog, EvidenceRecord, utc_now_rfc3339
from .evidence_channel import HeadChannel
from .hashchain import ChainError, TornChain
from .metrics import ProxyMetrics
from .readiness import Readiness, ReadinessState
from .redact import Redactor, install_log_redaction
from .request_policy import FORWARDED
from .settings import ProxySettings
from .upstream import Upstream
from .upstream_policy import UpstreamRefusal, classify_upstream

log = logging.getLogger("case_proxy")

EXIT_CONFIG = 2
EXIT_BLOCKED = 3
# The evidence log at the configured path is torn (not an intact chain). A restart meets
# the same file, so a service manager must not restart on it (systemd:
# RestartPreventExitStatus=4); an operator keeps the file as evidence and starts anew.
EXIT_TORN_LOG = 4
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
# SIGHUP: seal the evidence log and open a new one at its path (log rotation).
ROTATE_SIGNAL = signal.SIGHUP
# Connections the kernel completes and queues while the loop is busy. aiohttp's default
# (128) overflowed in the benchmark's burst of 1,000 stream openings: the kernel drops the
# SYNs past it and each such client retries after 1 s, then 3 s. The kernel caps this at
# net.core.somaxconn.
LISTEN_BACKLOG = 4096


class StartupError(Exception):
    """Why the proxy will not start: one line per problem and the exit code to use."""

    def __init__(self, problems: list[str], exit_code: int) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.exit_code = exit_code


def check_static(settings: ProxySettings) -> tuple[list[str], list[str]]:
    """(config problems, gate failures) without touching the network; used by
    ``check-config`` and by start-up."""
    problems: list[str] = []
    gates: list[str] = []
    decision = admission = None
    try:
        decision = load_decision(settings.decision_file)
    except ArtifactError as exc:
        problems.extend(f"CTO_HARNESS_CASE_DECISION_FILE: {p}" for p in exc.problems)
    try:
        admission = load_admission(settings.admission_file)
    except ArtifactError as exc:
        problems.extend(f"CTO_HARNESS_CASE_MODEL_ADMISSION_FILE: {p}" for p in exc.problems)
    if decision is not None and admission is not None:
        gates.extend(f"{f.code}: {f.message}" for f in evaluate_admission_gates(decision, admission))
    target = classify_upstream(settings.base_url.get_secret_value(), set(settings.allow_hosts))
    if isinstance(target, UpstreamRefusal):
        line = f"CTO_HARNESS_CASE_LOCAL_BASE_URL: {target.code}: {target.message}"
        (problems if target.code in ("base_url_missing", "base_url_invalid", "base_url_has_credentials") else gates).append(line)
    parent = settings.evidence_file.parent
    if not parent.is_dir():
        problems.append(f"CASE_PROXY_EVIDENCE_FILE: directory {parent} does not exist")
    elif not os.access(parent, os.W_OK):
        problems.append(f"CASE_PROXY_EVIDENCE_FILE: directory {parent} is not writable")
    return problems, gates


async def probe_backend(settings: ProxySettings) -> ReadinessState:
    """One readiness check, as the running proxy makes it: ``GET /v1/models`` through the
    pinned upstream (address re-check, no redirects) must list the admitted model. For
    ``check-config --probe``; call only after check_static found nothing."""
    admission = load_admission(settings.admission_file)
    target = classify_upstream(settings.base_url.get_secret_value(), set(settings.allow_hosts))
    assert not isinstance(target, UpstreamRefusal)
    upstream = Upstream(target, settings)
    await upstream.start()
    try:
        return await Readiness(upstream, admission.model, settings.limits.readiness_interval_s,
                               settings.limits.connect_timeout_s + 5).check_once()
    finally:
        await upstream.close()


@dataclass(frozen=True)
class WorkerRole:
    """What makes a process one of several workers: it shares the port (SO_REUSEPORT)
    and writes its metrics where the others' are summed."""

    index: int
    metrics_dir: Path


@dataclass
class RunningProxy:
    state: ProxyState
    runner: web.AppRunner
    port: int
    host: str
    unix_socket: Path | None = None
    _stopped: bool = field(default=False)

    @property
    def listening(self) -> str:
        """Where clients reach it: ``unix:PATH`` or the base URL."""
        return f"unix:{self.unix_socket}" if self.unix_socket is not None else self.base_url

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.state.draining = True
        await self.runner.cleanup()
        if self.unix_socket is not None:
            try:
                self.unix_socket.unlink()
            except OSError:
                pass


async def start_proxy(settings: ProxySettings, worker: WorkerRole | None = None) -> RunningProxy:
    """Check every gate, open the evidence log, start the server. Raises StartupError."""
    problems, gates = check_static(settings)
    if problems or gates:
        raise StartupError(problems + gates, EXIT_CONFIG if problems else EXIT_BLOCKED)
    admission = load_admission(settings.admission_file)
    target = classify_upstream(settings.base_url.get_secret_value(), set(settings.allow_hosts))
    assert not isinstance(target, UpstreamRefusal)
    redactor = Redactor(settings.secret_values())
    install_log_redaction(redactor)
    # The values most request records repeat, vetted once so the per-request secret
    # pre-check can skip them.
    redactor.vet_clean([admission.model, *admission.aliases, *FORWARDED, "POST", "ok"])
    evidence: EvidenceLog | None = None
    # Keyed evidence: the run key and the harness's head channel (proxy.evidence_channel).
    key = settings.chain_key.get_secret_value() if settings.chain_key is not None else None
    channel = HeadChannel(settings.head_fd, os.getpid()) if settings.head_fd is not None else None
    if settings.evidence_enabled:
        evidence = EvidenceLog(settings.evidence_file, redactor, key=key,
                               on_head=channel.report if channel is not None else None)
        try:
            evidence.open()
            evidence.write(EvidenceRecord(
                kind="proxy_start", time=utc_now_rfc3339(), admission_provider=admission.provider,
                admission_model=admission.model, admission_status=admission.admission_status.value,
                provider_class=admission.provider_class, upstream_class=target.upstream_class.value,
                upstream_fingerprint=target.fingerprint, pid=os.getpid(),
                worker=worker.index if worker is not None else None, chain=evidence.mode))
        except (ChainError, OSError) as exc:
            if channel is not None:
                channel.stop()
            raise StartupError([f"CASE_PROXY_EVIDENCE_FILE: cannot record evidence: {redactor.redact(str(exc))}"],
                               EXIT_TORN_LOG if isinstance(exc, TornChain) else EXIT_CONFIG) from None
    else:
        log.warning("evidence recording is OFF (benchmark setting): this proxy proves nothing")
    state: ProxyState | None = None
    metrics = ProxyMetrics(admission, worker.metrics_dir if worker is not None else None,
                           in_flight=lambda: state.in_flight if state is not None else 0)
    upstream = Upstream(target, settings)
    await upstream.start()
    limits = settings.limits
    readiness = Readiness(upstream, admission.model, limits.readiness_interval_s, limits.connect_timeout_s + 5,
                          busy=lambda: state is not None and state.in_flight > 0)
    readiness.on_change.append(lambda ready: metrics.backend_ready.set(1 if ready else 0))
    authority = Authority(settings.decision_file, settings.admission_file, admission)
    authority.on_change.append(partial(_authority_changed, metrics, evidence, redactor))
    state = ProxyState(settings=settings, admission=admission, target=target, redactor=redactor,
                       evidence=evidence, metrics=metrics, upstream=upstream, readiness=readiness,
                       token=settings.proxy_token.get_secret_value().encode(), authority=authority)
    app = create_app(state)

    async def on_cleanup(_: web.Application) -> None:
        await authority.stop()
        await readiness.stop()
        await upstream.close()
        if evidence is not None and evidence.healthy:
            try:
                evidence.write(EvidenceRecord(kind="proxy_stop", time=utc_now_rfc3339(), pid=os.getpid()))
            except ChainError:
                log.error("could not write the proxy_stop evidence record")
        if evidence is not None:
            evidence.close()
        if channel is not None and not channel.stop():
            log.error("could not report the final evidence head to the harness")

    app.on_cleanup.append(on_cleanup)
    # auto_decompress=False: request bodies are decoded by the proxy (proxy.body_decoding),
    # so every compressed request is recorded and answered in the OpenAI error shape.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=limits.drain_timeout_s, auto_decompress=False)
    await runner.setup()
    site: web.BaseSite
    if settings.unix_socket is not None:
        site = web.UnixSite(runner, str(settings.unix_socket), backlog=LISTEN_BACKLOG)
        where = f"unix:{settings.unix_socket}"
    else:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=worker is not None,
                           backlog=LISTEN_BACKLOG)
        where = f"{settings.host}:{settings.port}"
    try:
        # The socket is created with the umask's mode: owner only from the first moment.
        old_umask = os.umask(0o177) if settings.unix_socket is not None else None
        try:
            await site.start()
        finally:
            if old_umask is not None:
                os.umask(old_umask)
    except OSError as exc:
        await runner.cleanup()
        raise StartupError([f"cannot listen on {where}: {exc.strerror}"], EXIT_CONFIG) from None
    readiness.start()
    authority.start()
    if settings.unix_socket is not None:
        return RunningProxy(state=state, runner=runner, port=0, host="", unix_socket=settings.unix_socket)
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr,attr-defined]
    port = sockets[0].getsockname()[1] if sockets else settings.port
    return RunningProxy(state=state, runner=runner, port=port, host=settings.host)


def _authority_changed(metrics: ProxyMetrics, evidence: EvidenceLog | None, redactor: Redactor,
                       old: AuthorityVerdict, new: AuthorityVerdict) -> None:
    """A new verdict on the artifacts (see proxy.authority): the admission gauge shows
    the admission as it reads now (1 while it is served, 0 once it is not) and the
    evidence says what changed. The refusals themselves follow from ``serving``."""
    before, after = info_labels(old), info_labels(new)
    if before is not None and before != after:
        metrics.admission_info.labels(*before).set(0)
    if after is not None:
        metrics.admission_info.labels(*after).set(1 if new.serving else 0)
    if evidence is None:
        return
    try:
        evidence.write(EvidenceRecord(
            kind="authority_changed", time=utc_now_rfc3339(), serving=new.serving, reason=new.code,
            detail=redactor.redact(new.message)[:1000], admission_provider=new.provider, admission_model=new.model,
            admission_status=new.admission_status, provider_class=new.provider_class, pid=os.getpid()))
    except ChainError:
        log.error("could not write the authority_changed evidence record")


def rotate_evidence(state: ProxyState) -> bool:
    """SIGHUP: seal the evidence log and open a new one at its path, if the path was
    renamed away (see EvidenceLog.rotate). A failure leaves the log failed: everything
    is refused (fail closed) and /readyz says why."""
    if state.evidence is None:
        return False
    try:
        rotated = state.evidence.rotate(os.getpid())
    except (ChainError, OSError) as exc:
        log.error("log rotation failed; the proxy refuses traffic until restarted: %s",
                  state.redactor.redact(str(exc)))
        return False
    if rotated:
        log.info("evidence log rotated: the old file is sealed, a new one is open at %s", state.settings.evidence_file)
    else:
        log.info("SIGHUP: the evidence path still names the open log; nothing to rotate")
    return rotated


GC_THRESHOLD = (10_000, 20, 20)


def _tune_gc() -> None:
    """What start-up built (modules, settings, the app) lives until exit: freeze it out
    of the collector's scans. And collect the young generation every 10,000 allocations
    rather than 700: a request allocates dozens of short-lived objects that reference
    counting frees anyway, so the default cadence runs collections that find little; the
    benchmark measured about 5% of CPU per request saved."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def serve_forever(settings: ProxySettings, worker: WorkerRole | None = None,
                        on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. A worker tells its supervisor it is ready through
    ``on_ready``; a lone proxy prints the line scripts wait for."""
    # Handlers first, so a stop asked for during start-up still ends in a proxy_stop
    # record; a forked worker keeps these signals blocked until here.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    started: list[RunningProxy] = []
    loop.add_signal_handler(ROTATE_SIGNAL, lambda: rotate_evidence(started[0].state) if started else None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS | {ROTATE_SIGNAL})
    try:
        proxy = await start_proxy(settings, worker)
    except StartupError as exc:
        for line in exc.problems:
            print(f"case-proxy: {line}", file=sys.stderr)
        return exc.exit_code
    started.append(proxy)
    _tune_gc()
    if on_ready is not None:
        on_ready()
    else:
        print(f"CASE_PROXY_LISTENING {proxy.listening}", flush=True)
    log.info("listening on %s, admitted model %s%s", proxy.listening, proxy.state.admission.model,
             f" (worker {worker.index})" if worker is not None else "")
    await stop.wait()
    log.info("stopping: draining open requests for up to %.0fs", settings.limits.drain_timeout_s)
    await proxy.stop()
    # Stopped and recorded. A later stop signal (a supervisor and systemd both signal a
    # worker) must not kill the process while the loop closes: that exit would read as a
    # crash (-15), not a clean stop. Ignored process-wide, since a signal may land on any
    # thread (libuv's workers do not block it); set directly rather than through the
    # loop, whose removal would pass through the default action. uvloop keeps it.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return 0


def run(settings: ProxySettings, worker: WorkerRole | None = None, on_ready: Callable[[], None] | None = None) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(serve_forever(settings, worker, on_ready))
    return uvloop.run(serve_forever(settings, worker, on_ready))
