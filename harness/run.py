"""One harness run: gates, proxy, Case, evidence, report.

This module *runs things*; it never judges. It writes exactly the files and events of
``docs/harness-contract.md`` and then hands the run directory to ``harness.report``,
which derives the status from those files alone (so ``case-harness verify`` can
recompute it). Nothing here can set a status: the outcome returned is read back from the
computed report.

Order of a run (issue 3, "A run"):

1. run directory ``<runs>/<UTC>-<fixture>-<short id>``, ``events.jsonl``, digests of the
   decision record and admission JSON *before* anything else happens;
2. (``backend="scripted"`` only) start the scripted test backend on 127.0.0.1; its URL is
   used as ``CTO_HARNESS_CASE_LOCAL_BASE_URL`` for this run only and written nowhere;
3. preflight: every gate, with a bounded probe of the backend's ``/v1/models``. A block
   emits ``gate_blocked``, writes the ``blocked`` report and stops: Case never starts;
4. the proxy as a subprocess with a fresh per-run token passed only by environment, its
   evidence log inside the run directory, listening on a unix socket in a private
   temporary directory (``--no-sandbox``: 127.0.0.1); wait for its LISTENING line and
   ``/readyz``;
5. identity from the backend's ``/v1/models`` (a direct, bounded probe);
6. the fixture repository and the task file (outside the repository);
7. Case in its bubblewrap sandbox (``harness.sandbox``: the proxy through a relay, the
   DNS sink, nothing else of the machine) with a scrubbed environment and a time limit;
   afterwards every process of its PID namespace is killed and the count left recorded;
   its output redacted before it is written; the argv of every process the harness
   started is sampled while Case runs (kept in memory only, handed to the secret scan);
8. the repository's git controls taken back (``harness.repo_guard``), acceptance tests on
   a clean export of Case's final commit (sandboxed too: they import Case's code),
   ``/metrics`` scrape, proxy stop, secret scan, report.

The endpoint value, the run token and the backend key are never written by this module:
files get the upstream class and fingerprint instead, and logs go through the redactor.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from proxy.admission import ArtifactError, file_sha256, load_admission
from proxy.evidence import NON_MODEL_ENDPOINTS, records_from_bytes
from proxy.hashchain import KEYED_MODE
from proxy.redact import Redactor, head_lines
from proxy.settings import (
    ENV_ADMISSION_FILE,
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_BASE_URL,
    ENV_CHAIN_KEY_FD,
    ENV_CONFIG_FILE,
    ENV_DECISION_FILE,
    ENV_EVIDENCE_FILE,
    ENV_HEAD_FD,
    ENV_TOKEN,
    env_path,
)
from proxy.settings import (
    ENV_EXTRA_SECRETS_FILE as ENV_PROXY_EXTRA_SECRETS_FILE,
)

from . import attestation as att
from . import events as ev
from . import git_mirror, repo_guard
from . import sandbox as sbx
from .acceptance_run import sandbox_wrap
from .events import EventLog
from .exit_codes import EXIT_BLOCKED, EXIT_CONFIG, EXIT_FAIL, EXIT_PASS, STATUS_EXIT
from .fixture_catalog import AcceptanceResult, Fixture, load_fixture, materialize, run_acceptance
from .gates import PreflightResult, run_preflight
from .head_listener import RunKey
from .profile import CaseProfile, RunProfile, exposure_problems, static_protected
from .report import Status, collect_inputs, compute_report, render_text, report_json
from .runtime_check import run_problems
from .secret_scan import ENV_EXTRA_SECRETS_FILE, SecretSet, TextScanner, collect_secrets, scan_run_dir
from .unix_http import read_bounded, unix_http_get, unix_http_get_peer

# --------------------------------------------------------------------------- constants


PROBE_TIMEOUT_S = 5.0
PROBE_MAX_BYTES = 4 * 1024 * 1024
PROXY_LISTEN_TIMEOUT_S = 30.0
PROXY_READY_TIMEOUT_S = 30.0
# The proxy drains open streams for up to its drain deadline (30 s by default) on SIGTERM;
# Case has exited by then, so nothing should be open: a short wait, then SIGKILL.
PROXY_STOP_TIMEOUT_S = 15.0
BACKEND_START_TIMEOUT_S = 30.0
KILL_GRACE_S = 5.0
SAMPLE_INTERVAL_S = 0.2
PROGRESS_INTERVAL_S = 2.0
# Case output kept per stream; the rest is dropped (and counted) so a chatty or hostile
# Case cannot exhaust the harness's memory.
CAPTURE_LIMIT_BYTES = 16 * 1024 * 1024
STREAM_JOIN_TIMEOUT_S = 10.0

ENV_NO_PROXY_VALUE = "127.0.0.1,localhost,::1"
PROXY_ENV_NAMES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")
NO_PROXY_NAMES = ("NO_PROXY", "no_proxy")
# What a helper process (proxy, scripted backend) inherits from the harness besides the
# variables it needs: enough to run Python, nothing that could carry a credential.
_BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")
# Variables the proxy needs from the harness environment (artifacts, backend, config).
_PROXY_PASS_THROUGH = (ENV_DECISION_FILE, ENV_ADMISSION_FILE, ENV_BASE_URL, ENV_API_KEY, ENV_API_KEY_FILE,
                       ENV_CONFIG_FILE)

LISTENING_PREFIX = "CASE_PROXY_LISTENING "
DNS_READY_PREFIX = "DNS_SINK_"
DNS_START_TIMEOUT_S = 15.0
BACKEND_READY_PREFIX = "SCRIPTED_BACKEND_READY "
SCRIPTED_OWNER = "scripted-test-fixture"

PROJECT_ROOT = Path(__file__).resolve().parents[1]

Backend = Literal["external", "scripted"]
Progress = Callable[[str], None]


class RunConfigError(ValueError):
    """A usage or configuration problem found before any run directory exists (exit 2):
    an unknown fixture, a profile the harness cannot use. Gate failures are not this:
    they are recorded as a ``blocked`` run."""


class RunOutcome(BaseModel):
    """What ``run_once`` hands back: where the evidence is and what the report says."""

    model_config = ConfigDict(frozen=True)

    run_dir: Path
    status: Literal["pass", "fail", "blocked", "unproven"]
    exit_code: int


def new_run_token() -> str:
    """A fresh per-run proxy token. A function so tests can know the value they must
    then find nowhere."""
    return secrets.token_urlsafe(32)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(path: Path | None) -> str | None:
    return file_sha256(path) if path is not None else None


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------- HTTP (loopback, no env proxies)


def http_get(url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = PROBE_TIMEOUT_S,
             max_bytes: int = PROBE_MAX_BYTES) -> tuple[int, bytes]:
    """GET ``url``; see :func:`http_request`."""
    return http_request("GET", url, headers=headers, timeout_s=timeout_s, max_bytes=max_bytes)


def http_request(method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                 timeout_s: float = PROBE_TIMEOUT_S, max_bytes: int = PROBE_MAX_BYTES) -> tuple[int, bytes]:
    """One request with a total deadline, no redirects and no proxy from the environment.

    ``http.client`` directly: urllib would honour the harness's own HTTP(S)_PROXY, and a
    probe of the backend must reach the backend or nothing. Errors never carry the URL
    (it may be the runtime-only endpoint value): they raise ``OSError`` with a type name.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError("not an http(s) URL")
    deadline = time.monotonic() + timeout_s
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, read_bounded(resp, deadline, max_bytes)
    except (OSError, http.client.HTTPException) as exc:
        raise OSError(f"request failed ({type(exc).__name__})") from None
    finally:
        conn.close()


@dataclass(frozen=True)
class ModelsProbe:
    """The backend's answer to ``GET /v1/models`` (ids and owners), or why there is none."""

    ok: bool
    status: int | None = None
    models: tuple[str, ...] = ()
    owners: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    def owned_by(self, model: str) -> str | None:
        return self.owners.get(model)


def probe_backend_models(base_url: str, api_key: str | None = None,
                         timeout_s: float = PROBE_TIMEOUT_S) -> ModelsProbe:
    """Bounded probe of ``<base_url>/models``; never raises, never echoes the URL."""
    url = base_url.rstrip("/")
    url = url + "/models" if url.endswith("/v1") else url + "/v1/models"
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        status, body = http_get(url, headers=headers, timeout_s=timeout_s)
    except OSError as exc:
        return ModelsProbe(ok=False, error=f"backend /v1/models unreachable: {exc}")
    if status != 200:
        return ModelsProbe(ok=False, status=status, error=f"backend /v1/models answered HTTP {status}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ModelsProbe(ok=False, status=status, error="backend /v1/models answered something other than JSON")
    from proxy.readiness import listed_models

    ids, owners = listed_models(payload)
    return ModelsProbe(ok=True, status=status, models=tuple(ids), owners=owners)


def backend_api_key(env: Mapping[str, str]) -> str | None:
    """The backend key from the environment (or the file it names), for the probe."""
    direct = (env.get(ENV_API_KEY) or "").strip()
    if direct:
        return direct
    path = (env.get(ENV_API_KEY_FILE) or "").strip()
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return None


# --------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgrp) for every process visible in /proc (Linux)."""
    table: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) >= 3:
            try:
                table[int(name)] = (int(rest[1]), int(rest[2]))
            except ValueError:
                continue
    return table


def _read_cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read(1024 * 1024)
    except OSError:
        return None
    if not raw:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", errors="replace")


class ArgvSampler:
    """Collects the argv of every process the harness started, read while they run.

    Roots are the pids the harness spawned (proxy, backend, Case); Case's process group
    and every descendant of a root are included, so a tool Case starts is seen too.
    The text is held in memory only and handed to the secret scan: writing it anywhere
    would itself leak whatever secret it might hold.
    """

    def __init__(self) -> None:
        self.roots: set[int] = set()
        self.groups: set[int] = set()
        self._seen: dict[str, None] = {}
        self.samples = 0

    def sample(self) -> None:
        table = _proc_table()
        wanted = {pid for pid in self.roots if pid in table}
        wanted |= {pid for pid, (_, pgrp) in table.items() if pgrp in self.groups}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(wanted)
        while stack:  # bounded: each pid is visited once
            pid = stack.pop()
            for child in children.get(pid, ()):
                if child not in wanted:
                    wanted.add(child)
                    stack.append(child)
        for pid in wanted:
            text = _read_cmdline(pid)
            if text is not None and text not in self._seen and len(self._seen) < 10_000:
                self._seen[text] = None
        self.samples += 1

    def text(self) -> str:
        return "\n".join(self._seen)


def _group_alive(pgid: int) -> bool:
    return any(pgrp == pgid for _, pgrp in _proc_table().values())


def kill_group(pgid: int, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> int | None:
    """SIGTERM one helper process, wait (bounded), then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                return None
    return proc.returncode


class _LineWatcher:
    """Reads a helper's stdout on a thread so the harness can wait for its ready line
    with a deadline (and the pipe never fills afterwards)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._q.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._q.put(None)

    def wait_for(self, prefix: str, timeout_s: float, proc: subprocess.Popen[Any]) -> str | None:
        """The rest of the first line starting with ``prefix``, or None (timeout or exit)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self._q.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if proc.poll() is not None and self._q.empty():
                    return None
                continue
            if line is None:
                return None
            if line.startswith(prefix):
                return line[len(prefix):].strip()


class _Capture(threading.Thread):
    """Reads one of Case's output streams into memory, up to a limit."""

    def __init__(self, stream: IO[bytes], limit: int = CAPTURE_LIMIT_BYTES) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.dropped = 0

    def run(self) -> None:
        try:
            while True:
                data = self._stream.read1(65536) if hasattr(self._stream, "read1") else self._stream.read(65536)
                if not data:
                    break
                keep = max(0, min(len(data), self._limit - self.size))
                if keep:
                    self.chunks.append(data[:keep])
                    self.size += keep
                self.dropped += len(data) - keep
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        """The kept output; when some was dropped, only whole lines (``head_lines``): a
        line cut at the limit could hold the start of a secret, past redaction."""
        out = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            out = head_lines(out, len(out) - 1) if not out.endswith("\n") else out
            out += f"\n[case-harness] {self.dropped} more bytes of output were dropped (capture limit)\n"
        return out


def _helper_env(env: Mapping[str, str], names: Iterable[str] = ()) -> dict[str, str]:
    out = {k: env[k] for k in _BASE_ENV if env.get(k)}
    if "PATH" not in out and os.environ.get("PATH"):
        out["PATH"] = os.environ["PATH"]
    out.update({k: env[k] for k in names if env.get(k)})
    return out


@dataclass
class _Helper:
    """A helper subprocess the harness owns (proxy or scripted backend)."""

    proc: subprocess.Popen[bytes]
    url: str | None
    log: IO[bytes]

    def stop(self, timeout_s: float) -> int | None:
        code = stop_process(self.proc, timeout_s)
        for stream in (self.proc.stdout,):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self.log.close()
        return code


def _start_helper(argv: list[str], env: dict[str, str], log_path: Path, ready_prefix: str,
                  timeout_s: float, pass_fds: tuple[int, ...] = (),
                  spawned: Callable[[], None] | None = None) -> _Helper:
    """``pass_fds``: descriptors only this helper inherits; ``spawned`` runs right after
    the spawn (the harness drops its copies of them there)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - closed by _Helper.stop
    proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=log, start_new_session=True, pass_fds=pass_fds)
    if spawned is not None:
        spawned()
    assert proc.stdout is not None
    watcher = _LineWatcher(proc.stdout)
    url = watcher.wait_for(ready_prefix, timeout_s, proc)
    return _Helper(proc=proc, url=url, log=log)


def _port_of(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None


# --------------------------------------------------------------------------- preflight (the judging modules decide)


def preflight(env: Mapping[str, str], profile: RunProfile, *, argv: tuple[str, ...] = (),
              extra_secrets: Iterable[str] = (), sandboxed: bool = False) -> PreflightResult:
    """Every gate, with a bounded probe of the backend (only if its URL is admissible).
    ``sandboxed``: Case will run in the bubblewrap sandbox, so the harness's own
    environment and the operator's HOME are out of its reach; what the profile exposes to
    it (``[case.sandbox]``) is checked instead (docs/gates.md)."""
    secrets_ = collect_secrets(env, extra_secrets)
    if not argv:
        argv = tuple(case_argv(list(profile.case.command), Path("task.md"), Path("repo")))
    return run_preflight(env, profile, lambda url, key: probe_backend_models(url, key, PROBE_TIMEOUT_S),
                         argv=argv, secrets=tuple(secrets_.values), api_key=backend_api_key(env),
                         case_isolated=sandboxed,
                         exposed=[path for _, path in profile.case.sandbox.exposed()] if sandboxed else ())


def identity_fields(result: PreflightResult) -> ev.PreflightIdentity:
    """What the preflight established, for the events (never the URL itself)."""
    d, a, u = result.decision, result.admission, result.upstream
    return ev.PreflightIdentity(
        decision_status=d.decision_status if d else None, provider_class=d.provider_class if d else None,
        admission_provider=a.provider if a else None, admission_model=a.model if a else None,
        admission_status=a.admission_status.value if a else None,
        upstream_class=u.upstream_class.value if u else None, upstream_fingerprint=u.fingerprint if u else None)


# --------------------------------------------------------------------------- the run


@dataclass
class _RunState:
    run_dir: Path
    events: EventLog
    say: Progress
    decision_path: Path | None
    admission_path: Path | None
    secrets: SecretSet
    started: float = field(default_factory=time.monotonic)
    backend: _Helper | None = None
    proxy: _Helper | None = None
    sampler: ArgvSampler = field(default_factory=ArgvSampler)
    socket_dir: Path | None = None  # harness-private directory of the proxy's unix socket
    proxy_socket: str | None = None
    proxy_root: str = ""
    sandbox: sbx.SandboxProcess | None = None
    dns: _Helper | None = None  # the DNS sink in the sandbox's network namespace
    git_config: bytes = b""  # the repository's .git/config as the harness wrote it
    # Case's repository copied as data when Case stopped, before its git controls are
    # taken back: the secret scan reads it (Case's own .git/config included).
    git_snapshot: git_mirror.GitSnapshot | None = None
    # The per-run chain key and the proxy's head channel (harness.head_listener); how
    # /metrics was read and who answered (harness.proxy_proof).
    run_key: RunKey | None = None
    metrics_read: dict[str, Any] = field(default_factory=dict)


def case_argv(command: list[str], task_file: Path, workdir: Path) -> list[str]:
    """The profile's argv template with ``{task_file}``/``{workdir}`` filled in; a leading
    ``python``/``python3`` means this interpreter (Case's scrubbed PATH may not find one)."""
    argv = [arg.replace("{task_file}", str(task_file)).replace("{workdir}", str(workdir)) for arg in command]
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def case_environment(env: Mapping[str, str], env_allow: Iterable[str], proxy_base_url: str, token: str,
                     model: str) -> dict[str, str]:
    """Case's whole environment: the allowed variables and the route, nothing else.

    The route variables are set last, so an allowed variable can never redirect Case:
    ``OPENAI_BASE_URL`` is the proxy, ``OPENAI_API_KEY`` the run token, the forward-proxy
    variables point at the proxy with the run token as password (the proxy refuses and
    records every attempt with its target host; without the token an attempt would not
    be counted as Case's) and ``NO_PROXY`` keeps loopback direct.
    """
    out = {name: env[name] for name in env_allow if name in env}
    root = proxy_base_url.removesuffix("/").removesuffix("/v1")
    out.update({"OPENAI_BASE_URL": proxy_base_url, "OPENAI_API_KEY": token,
                "CASE_MODEL": model, "OPENAI_MODEL": model})
    # The run token as the proxy password: clients then send Proxy-Authorization, so the
    # proxy knows a CONNECT is Case's (unauthenticated ones are not counted as Case's).
    scheme, _, hostport = root.partition("://")
    proxy_url = f"{scheme}://case:{quote(token, safe='')}@{hostport}"
    for name in PROXY_ENV_NAMES:
        out[name] = proxy_url
    for name in NO_PROXY_NAMES:
        out[name] = ENV_NO_PROXY_VALUE
    return out


def _count_model_requests(evidence: Path) -> int:
    """Requests the proxy has recorded so far (for progress only; never for the verdict)."""
    try:
        lines = evidence.read_bytes().splitlines()
    except OSError:
        return 0
    count = 0
    for line in lines:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("kind", "request") == "request" \
                and rec.get("endpoint") not in NON_MODEL_ENDPOINTS:
            count += 1
    return count


def _write_report(st: _RunState) -> Status:
    """Compute the report from the run directory alone, write report.json/.txt, emit
    ``report_written``. Returns the computed status."""
    st.say("report: computing from the run's evidence")
    decision_after, admission_after = _digest(st.decision_path), _digest(st.admission_path)
    report = compute_report(collect_inputs(st.run_dir, decision_sha256_after=decision_after,
                                           admission_sha256_after=admission_after))
    data = report_json(report)
    text = render_text(report)
    # The report is built from places already scanned; checking its own text as well
    # means a secret can never leave through it (it would be redacted and flagged).
    scanner = TextScanner(st.secrets)
    clean = not scanner.scan(data) and not scanner.scan(text)
    if not clean:
        redactor = Redactor(st.secrets.values)
        data, text = redactor.redact(data), redactor.redact(text)
    (st.run_dir / "report.json").write_text(data, encoding="utf-8")
    (st.run_dir / "report.txt").write_text(text, encoding="utf-8")
    st.events.emit(ev.ReportWritten(report_sha256=_sha256_bytes(data.encode()), status=report.status,
                                    decision_sha256_after=decision_after, admission_sha256_after=admission_after,
                                    report_secret_scan_clean=clean))
    return report.status


def run_once(profile: RunProfile, env: Mapping[str, str], runs_dir: Path, *, backend: Backend = "external",
             progress: Progress | None = None, sandbox: bool = True) -> RunOutcome:
    """One complete run; returns where its evidence is and the computed status.

    ``env`` is the harness environment (``os.environ`` from the CLI); it is read, never
    modified, and only the profile's ``env_allow`` names from it reach Case. Case runs in
    the bubblewrap sandbox (``harness.sandbox``) unless ``sandbox=False`` (``--no-sandbox``),
    and such a run can at best be ``unproven``. Raises :class:`RunConfigError` for usage
    problems found before a run directory exists.
    """
    if backend not in ("external", "scripted"):
        raise RunConfigError(f"backend must be 'external' or 'scripted', not {backend!r}")
    try:
        fixture = load_fixture(profile.fixture)
    except ValueError as exc:
        raise RunConfigError(str(exc)) from None
    try:
        session = fixture.session_for(profile.scripted_session if backend == "scripted" else None)
    except ValueError as exc:
        raise RunConfigError(str(exc)) from None
    if missing := run_problems(fixture.spec.acceptance_test_command, profile.case.command):
        raise RunConfigError("; ".join(missing))
    say: Progress = progress or (lambda _msg: None)
    runs_dir = Path(runs_dir).absolute()
    key_path, signing_key = signing_key_from_env(env, runs_dir)
    if signing_key is not None and not sandbox:
        raise RunConfigError(f"{att.ENV_SIGNING_KEY_FILE} is set, but --no-sandbox runs Case as this user, where "
                             "it could read the signing key and sign anything; unset it for unsandboxed runs")
    if sandbox:
        _check_exposure(profile.case, runs_dir,
                        [("the attestation signing key", key_path)] if key_path is not None else [])
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{_utc_stamp()}-{fixture.id}-{secrets.token_hex(3)}"
    run_dir = runs_dir / run_id
    run_dir.mkdir()
    for sub in ("proxy", "case"):
        (run_dir / sub).mkdir()

    token = new_run_token()
    decision_path = env_path(env, ENV_DECISION_FILE)
    admission_path = env_path(env, ENV_ADMISSION_FILE)
    st = _RunState(run_dir=run_dir, events=EventLog(run_dir / "events.jsonl"), say=say,
                   decision_path=decision_path, admission_path=admission_path,
                   secrets=collect_secrets(env, [token]))
    if signing_key is not None:  # the scan looks for the key in every place, like any other secret
        for label, value in att.key_secrets(signing_key):
            st.secrets.add(label, value)
    say(f"run {run_id}: started in {run_dir}")
    try:
        st.events.emit(ev.RunStarted(run_id=run_id, fixture=fixture.id, stage=profile.stage,
                                     profile_sha256=profile.sha256(), decision_sha256=_digest(decision_path),
                                     admission_sha256=_digest(admission_path), backend=backend,
                                     attestation_key_id=att.key_id(signing_key.public_key()) if signing_key else None))
        status = _run_body(st, profile, fixture, dict(env), backend, token, sandbox, session)
    finally:
        _cleanup(st)
        st.events.close()
    # After report_written, over the closed event log: the statement covers every line.
    att.write_attestation(run_dir, signing_key)
    say(f"attestation: {att.ATTESTATION_FILE} " + ("signed" if signing_key else
                                                   f"UNSIGNED (no {att.ENV_SIGNING_KEY_FILE})"))
    say(f"run {run_id}: {status}")
    return RunOutcome(run_dir=run_dir, status=status, exit_code=STATUS_EXIT.get(status, EXIT_FAIL))


def signing_key_from_env(env: Mapping[str, str], runs_dir: Path) -> tuple[Path | None, Ed25519PrivateKey | None]:
    """The attestation key named by ``CASE_HARNESS_SIGNING_KEY_FILE``, loaded before any
    run directory exists (Case can never swap it); a key that is unusable, or kept under
    the runs directory (where a run's files are published), is a usage error."""
    path = att.signing_key_path(env)
    if path is None:
        return None, None
    real = Path(os.path.realpath(path))
    if real.is_relative_to(os.path.realpath(runs_dir)):
        raise RunConfigError(f"{att.ENV_SIGNING_KEY_FILE}: the signing key {path} is inside the runs directory "
                             f"{runs_dir}; keep it where no run directory is")
    try:
        return path, att.load_private_key(path)
    except att.AttestationError as exc:
        raise RunConfigError(f"{att.ENV_SIGNING_KEY_FILE}: {exc}") from None


def _check_exposure(case: CaseProfile, runs_dir: Path, protected: list[tuple[str, Path]] | None = None) -> None:
    """What the sandbox would expose must exist and must not reach the run directories
    (known only now), the fixtures or the signing key; the interpreter prefixes are
    checked too."""
    interpreter = [("the harness interpreter prefix", p) for p in sbx.interpreter_paths()]
    exposed = case.sandbox.exposed() + interpreter
    protected = [*static_protected(), ("the run directory", runs_dir), *(protected or [])]
    problems = exposure_problems(case.sandbox.exposed(), protected)
    # A protected directory strictly inside the interpreter prefix (the fixtures of an
    # installed wheel, in its site-packages) is covered by a tmpfs (sbx.masked_paths).
    inside = {p for _, p in protected for _, root in interpreter
              if _real_path(p) != _real_path(root) and _real_path(p).is_relative_to(_real_path(root))}
    problems += exposure_problems(interpreter, [(n, p) for n, p in protected if p not in inside])
    for label, path in case.sandbox.exposed():
        if not path.exists():
            problems.append(f"{label}: {path} does not exist")
    seed = case.sandbox.home_seed
    if seed is not None and Path(seed).exists() and not Path(seed).is_dir():
        problems.append(f"case.sandbox.home_seed: {seed} is not a directory")
    # A host file in Case's command (its program, a script) that the sandbox will not show
    # would fail only once Case runs ("No such file"): say so now. (A directory given as
    # an argument may be data the command never opens: not checked.)
    roots = [Path(e.path) for e in sbx.host_system()] + [p for _, p in exposed]
    for i, arg in enumerate(case_argv(list(case.command), Path("{task_file}"), Path("{workdir}"))):
        if arg.startswith("/") and "{" not in arg and Path(arg).is_file() \
                and not any(Path(os.path.realpath(arg)).is_relative_to(os.path.realpath(r)) for r in roots):
            problems.append(f"case.command[{i}]: {arg} is not visible in Case's sandbox; add its directory "
                            "to [case.sandbox].ro_paths")
    if problems:
        raise RunConfigError("; ".join(problems))


def _cleanup(st: _RunState) -> None:
    """Whatever happened, no helper the harness started outlives the run."""
    if st.sandbox is not None:
        if st.sandbox.survivors():
            st.sandbox.kill_all()
        st.sandbox.release()  # the last look: its namespace number may be reused after this
    if st.dns is not None:
        _stop_dns_sink(st)
    if st.proxy is not None and st.proxy.proc.poll() is None:
        st.proxy.stop(PROXY_STOP_TIMEOUT_S)
    if st.backend is not None and st.backend.proc.poll() is None:
        st.say("backend: stopping")
        st.backend.stop(PROXY_STOP_TIMEOUT_S)
    if st.socket_dir is not None:
        shutil.rmtree(st.socket_dir, ignore_errors=True)
        st.socket_dir = None


def _admitted_model(admission_path: Path | None, fallback: str) -> str:
    if admission_path is None:
        return fallback
    try:
        return load_admission(admission_path).model
    except ArtifactError:
        return fallback


def _run_body(st: _RunState, profile: RunProfile, fixture: Fixture, env: dict[str, str], backend: Backend,
              token: str, sandboxed: bool, session: Path) -> Status:
    run_dir, say, case = st.run_dir, st.say, profile.case
    run_env = dict(env)
    if backend == "scripted":
        say("backend: starting the scripted test backend (demo grade)")
        model = _admitted_model(st.admission_path, case.model)
        (run_dir / "backend").mkdir()
        backend_argv = [sys.executable, "-m", "harness.scripted_backend", "--host", "127.0.0.1", "--port", "0",
                        "--model", model, "--script", str(session),
                        "--access-log", str(run_dir / "backend" / "access.jsonl")]
        st.backend = _start_helper(backend_argv, _helper_env(env), run_dir / "backend" / "backend.log",
                                   BACKEND_READY_PREFIX, BACKEND_START_TIMEOUT_S)
        st.sampler.roots.add(st.backend.proc.pid)
        st.sampler.sample()
        if not st.backend.url:
            st.events.emit(ev.RunAborted(phase="backend", reason="the scripted backend did not report ready in time"))
            return _finish(st)
        run_env[ENV_BASE_URL] = st.backend.url  # this run only; never written
        st.secrets.add("endpoint", st.backend.url)

    repo_dir, task_file = run_dir / "repo", run_dir / "task.md"
    argv = tuple(case_argv(list(case.command), task_file, repo_dir))
    say("preflight: checking every gate")
    result = preflight(run_env, profile, argv=argv, extra_secrets=[token], sandboxed=sandboxed)
    fields = identity_fields(result)
    reasons = [ev.GateReason(code=f.code, message=f.message) for f in result.failures]
    bwrap: sbx.BwrapInfo | None = None
    if sandboxed:
        probed = sbx.probe_bwrap()
        if isinstance(probed, str):
            reasons.append(ev.GateReason(code="sandbox_unavailable", message=probed))
        else:
            bwrap = probed
    if reasons:
        st.events.emit(ev.GateBlocked(reasons=reasons, **fields.model_dump()))
        for r in reasons:
            say(f"blocked: {r.code}: {r.message}")
        return _finish(st)
    st.events.emit(ev.PreflightPassed(gates=result.checked, **fields.model_dump()))
    assert result.admission is not None
    admitted = result.admission.model
    evidence_path = run_dir / "proxy" / "evidence.jsonl"

    say("proxy: starting")
    proxy_env = _helper_env(run_env, _PROXY_PASS_THROUGH)
    proxy_env[ENV_TOKEN] = token
    proxy_env[ENV_EVIDENCE_FILE] = str(evidence_path)
    if run_env.get(ENV_EXTRA_SECRETS_FILE):
        # The operator's listed secrets: the proxy redacts them too, not only the scan finds them.
        proxy_env[ENV_PROXY_EXTRA_SECRETS_FILE] = run_env[ENV_EXTRA_SECRETS_FILE]
    # The run key: to this proxy only, on an inherited descriptor (never argv, env
    # values, files or logs); its heads come back on another (harness.head_listener).
    st.run_key = RunKey()
    st.secrets.add("chain key", st.run_key.key.hex())
    st.run_key.open()
    proxy_env[ENV_CHAIN_KEY_FD], proxy_env[ENV_HEAD_FD] = (str(fd) for fd in st.run_key.proxy_fds)
    # One worker whatever the operator's config says: a run's proof is one evidence chain.
    proxy_argv = [sys.executable, "-m", "proxy", "serve", "--workers", "1"]
    if bwrap is not None:
        # Sandboxed: a unix socket in a directory only the harness (and, bound in, its
        # Case) can reach; no TCP port for any other local user or run.
        st.socket_dir = Path(tempfile.mkdtemp(prefix="case-proxy-"))
        proxy_argv += ["--unix", str(st.socket_dir / "proxy.sock")]
    else:
        proxy_argv += ["--host", "127.0.0.1", "--port", "0"]
    st.proxy = _start_helper(proxy_argv, proxy_env, run_dir / "proxy" / "proxy.log", LISTENING_PREFIX,
                             PROXY_LISTEN_TIMEOUT_S, pass_fds=st.run_key.proxy_fds, spawned=st.run_key.started)
    st.sampler.roots.add(st.proxy.proc.pid)
    st.sampler.sample()
    if not st.proxy.url:
        st.events.emit(ev.RunAborted(phase="proxy", reason=f"the proxy did not start (exit code "
                                     f"{st.proxy.proc.poll()}); see proxy/proxy.log"))
        return _finish(st)
    if st.proxy.url.startswith("unix:"):
        st.proxy_socket = st.proxy.url.removeprefix("unix:")
        proxy_base = f"http://127.0.0.1:{sbx.RELAY_PORT}/v1"  # the relay inside the sandbox
        st.events.emit(ev.ProxyStarted(pid=st.proxy.proc.pid, port=None, listen="unix", chain_mode=KEYED_MODE,
                                       head_channel="pipe"))
    else:
        proxy_base = st.proxy.url
        st.proxy_root = proxy_base.removesuffix("/v1")
        st.events.emit(ev.ProxyStarted(pid=st.proxy.proc.pid, port=_port_of(proxy_base), listen="tcp",
                                       chain_mode=KEYED_MODE, head_channel="pipe"))

    if not _wait_ready(st, st.proxy.proc):
        st.events.emit(ev.RunAborted(phase="proxy_ready",
                                     reason="the proxy did not become ready (backend does not list the admitted model?)"))
        return _finish(st)
    st.events.emit(ev.ProxyReady())
    say("proxy: ready")

    probe = probe_backend_models(run_env[ENV_BASE_URL], backend_api_key(run_env))
    if not probe.ok or admitted not in probe.models:
        st.events.emit(ev.RunAborted(phase="identity",
                                     reason=probe.error or "the backend does not list the admitted model"))
        return _finish(st)
    owned_by = probe.owned_by(admitted)
    grade: Literal["real", "demo"] = "demo" if backend == "scripted" or owned_by == SCRIPTED_OWNER else "real"
    st.events.emit(ev.IdentityVerified(backend_models=list(probe.models), admitted_model=admitted,
                                       owned_by=owned_by, evidence_grade=grade))
    say(f"identity: backend serves {admitted} (evidence grade {grade})")

    initial = materialize(fixture, repo_dir, task_file)
    st.git_config = repo_guard.snapshot_config(repo_dir)
    _generate_config(case, run_dir, proxy_base, admitted)
    _run_case(st, case, run_env, repo_dir, task_file, proxy_base, token, admitted, evidence_path, bwrap)

    say("acceptance: running the hidden tests on a clean export of Case's commit")
    _acceptance(st, fixture, repo_dir, initial, bwrap)
    _scrape_metrics(st)
    _stop_proxy(st, evidence_path)
    return _finish(st)


def _stop_proxy(st: _RunState, evidence_path: Path) -> None:
    """Stop the proxy and record what it left (digests of its evidence and metrics)."""
    assert st.proxy is not None
    st.say("proxy: stopping")
    code = st.proxy.stop(PROXY_STOP_TIMEOUT_S)
    metrics = st.run_dir / "proxy" / "metrics.prom"
    heard = st.run_key.finish(STREAM_JOIN_TIMEOUT_S) if st.run_key is not None else None
    # Verified under the run key now, from the same bytes the digest is taken of.
    try:
        data: bytes | None = evidence_path.read_bytes()
    except OSError:
        data = None
    chain = ev.ChainCheck(mode="none", ok=False, problems=["proxy/evidence.jsonl is missing"])
    if data is not None:
        verdict, _ = records_from_bytes(data, st.run_key.key if st.run_key is not None else None)
        chain = ev.ChainCheck(mode=verdict.mode, ok=verdict.ok, records=verdict.records, head_hmac=verdict.last_hmac,
                              last_sha256=verdict.last_sha256, problems=verdict.problems[:5])
    st.events.emit(ev.ProxyStopped(
        exit_code=code, evidence_sha256=_sha256_bytes(data) if data is not None else None,
        metrics_sha256=_digest(metrics) if metrics.is_file() else None, pid=st.proxy.proc.pid, chain=chain,
        head_report=heard, **st.metrics_read))
    if not chain.ok or (heard is not None and heard.head != chain.head_hmac):
        st.say(f"proxy: evidence does NOT verify under the run key ({'; '.join(chain.problems[:1]) or 'head'})")


def _proxy_get(st: _RunState, path: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int, bytes]:
    """The harness's own GET to the run's proxy: over its unix socket when sandboxed."""
    if st.proxy_socket is not None:
        return unix_http_get(st.proxy_socket, path, timeout_s=timeout_s, max_bytes=PROBE_MAX_BYTES)
    return http_get(st.proxy_root + path, timeout_s=timeout_s)


def _wait_ready(st: _RunState, proc: subprocess.Popen[Any]) -> bool:
    deadline = time.monotonic() + PROXY_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            status, _ = _proxy_get(st, "/readyz", timeout_s=2.0)
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _generate_config(case: CaseProfile, run_dir: Path, proxy_base: str, model: str) -> None:
    """Write the profile's config template for Case, if it has one, into case/generated/.

    Only non-secret values are substituted (``{base_url}`` is the proxy's loopback URL,
    ``{model}`` the admitted model); Case gets its token from the environment.
    """
    template = case.config_template
    if template is None:
        return
    rendered = template.content.replace("{base_url}", proxy_base).replace("{model}", model)
    out = run_dir / "case" / "generated" / template.file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rendered, encoding="utf-8")


def _run_case(st: _RunState, case: CaseProfile, run_env: Mapping[str, str], repo_dir: Path, task_file: Path,
              proxy_base: str, token: str, model: str, evidence_path: Path, bwrap: sbx.BwrapInfo | None) -> None:
    argv = case_argv(list(case.command), task_file, repo_dir)
    case_env = case_environment(run_env, case.env_allow, proxy_base, token, model)
    timeout_s = case.timeout_s
    redactor = Redactor(st.secrets.values)
    st.say(f"case: starting ({Path(argv[0]).name} ..., time limit {timeout_s:g}s, "
           f"{'sandboxed by bubblewrap ' + bwrap.version if bwrap else 'NOT sandboxed'})")
    started = time.monotonic()
    isolation: ev.BubblewrapIsolation | ev.NoIsolation
    if bwrap is not None:
        spec = _sandbox_spec(st, case, bwrap, repo_dir, task_file)
        try:
            st.sandbox = sbx.start(spec, argv, sbx.sandbox_environment(case_env, spec.ro_paths), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, before_case=lambda box: _start_dns_sink(st, box))
        except sbx.SandboxError as exc:
            _stop_dns_sink(st)
            st.events.emit(ev.RunAborted(phase="sandbox", reason=str(exc)))
            return
        proc = st.sandbox.proc
        isolation = _isolation(bwrap, spec)
    else:
        proc = subprocess.Popen(argv, cwd=repo_dir, env=case_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        isolation = ev.NoIsolation(kind="none")
    pgid = proc.pid  # start_new_session: the child leads its own session and group
    st.sampler.roots.add(proc.pid)
    st.sampler.groups.add(pgid)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(proc.stdout), _Capture(proc.stderr)
    out.start()
    err.start()
    st.events.emit(ev.CaseProcessStarted(pid=proc.pid, argv_sha256=_sha256_bytes("\0".join(argv).encode()),
                                         env_names=sorted(case_env), isolation=isolation))
    timed_out = False
    deadline = started + timeout_s
    next_progress = started + PROGRESS_INTERVAL_S
    while proc.poll() is None:  # bounded by the deadline below
        st.sampler.sample()
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            st.say(f"case: time limit of {timeout_s:g}s reached; stopping "
                   f"{'its sandbox' if st.sandbox else 'its process group'}")
            if st.sandbox is not None:
                st.sandbox.kill_all()
            kill_group(pgid)
            break
        if now >= next_progress:
            st.say(f"case: running {now - started:.0f}s, model requests so far: "
                   f"{_count_model_requests(evidence_path)}")
            next_progress = now + PROGRESS_INTERVAL_S
        time.sleep(SAMPLE_INTERVAL_S)
    try:
        exit_code = proc.wait(KILL_GRACE_S * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = proc.wait(KILL_GRACE_S)
    duration = time.monotonic() - started
    # Whatever Case left behind (daemons, setsid() children) goes now, before the
    # acceptance tests: the sandbox's whole PID namespace, proven empty.
    survivors: int | None = None
    dns: tuple[int | None, str | None] = (None, None)
    if st.sandbox is not None:
        survivors = len(st.sandbox.kill_all())
        st.say(f"case: sandbox emptied ({survivors} process(es) left in its PID namespace)")
        dns = _stop_dns_sink(st)
    if _group_alive(pgid):
        kill_group(pgid)
    for cap in (out, err):
        cap.join(STREAM_JOIN_TIMEOUT_S)
    (st.run_dir / "case" / "stdout.log").write_text(redactor.redact(out.text()), encoding="utf-8")
    (st.run_dir / "case" / "stderr.log").write_text(redactor.redact(err.text()), encoding="utf-8")
    for stream in (proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass
    # The proxy must still be the run's own when Case is done with it (harness.proxy_proof).
    proxy_alive = st.proxy is not None and st.proxy.proc.poll() is None
    st.events.emit(ev.CaseProcessExited(exit_code=exit_code, duration_s=round(duration, 3), timed_out=timed_out,
                                        namespace_survivors=survivors, dns_queries=dns[0], dns_queries_sha256=dns[1],
                                        proxy_alive=proxy_alive))
    st.say(f"case: exited with {exit_code} after {duration:.1f}s; model requests: "
           f"{_count_model_requests(evidence_path)}")


def _start_dns_sink(st: _RunState, box: sbx.SandboxProcess) -> None:
    """The DNS sink on the sandbox's loopback port 53, started in its network namespace
    only, before Case runs. Fail closed: without it, a name Case tried would go unseen."""
    out = st.run_dir / "dns"
    out.mkdir(exist_ok=True)
    argv = sbx.netns_command(box.child_pid, [sys.executable, "-m", "harness.dns_sink",
                                             "--log", str(out / "queries.jsonl")])
    try:
        st.dns = _start_helper(argv, _helper_env(os.environ), out / "sink.log", DNS_READY_PREFIX,
                               DNS_START_TIMEOUT_S)
    except OSError as exc:
        raise sbx.SandboxError(f"cannot start the DNS sink: {exc.strerror or type(exc).__name__}") from None
    st.sampler.roots.add(st.dns.proc.pid)
    if st.dns.url != "READY":
        raise sbx.SandboxError("the DNS sink did not start in the sandbox's network namespace; see dns/sink.log")


def _stop_dns_sink(st: _RunState) -> tuple[int | None, str | None]:
    """Stop the sink; the lines it recorded and their digest (for ``case_process_exited``)."""
    if st.dns is None:
        return None, None
    st.dns.stop(KILL_GRACE_S)
    st.dns = None
    log = st.run_dir / "dns" / "queries.jsonl"
    data = log.read_bytes() if log.is_file() else b""
    return len(data.splitlines()), _sha256_bytes(data)


def _sandbox_spec(st: _RunState, case: CaseProfile, bwrap: sbx.BwrapInfo, repo_dir: Path,
                  task_file: Path) -> sbx.SandboxSpec:
    """What Case may see: the run's tools (the relay and a copy of the reference agent,
    nothing else of the project), a generated /etc, the interpreter and the profile's
    read-only paths, the generated config (read-only), the repository (writable)."""
    assert st.proxy_socket is not None
    box = st.run_dir / "sandbox"
    agent = (PROJECT_ROOT / "harness" / "reference_agent.py").read_bytes()
    sbx.prepare_tools(box / "tools", {"harness/__init__.py": b"", "harness/reference_agent.py": agent})
    sbx.prepare_etc(box / "etc")
    ro = [*sbx.interpreter_paths(), *(Path(p) for p in case.sandbox.ro_paths)]
    generated = st.run_dir / "case" / "generated"
    if generated.is_dir():
        ro.append(generated)
    return sbx.SandboxSpec(bwrap=bwrap.path, python=sys.executable, repo_dir=repo_dir, task_file=task_file,
                           tools_dir=box / "tools", etc_dir=box / "etc", socket_path=Path(st.proxy_socket),
                           ro_paths=tuple(ro), system=sbx.host_system(), masked=_masked(st.run_dir.parent),
                           home_seed=Path(case.sandbox.home_seed) if case.sandbox.home_seed else None)


def _real_path(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _masked(runs_dir: Path) -> tuple[Path, ...]:
    """What the sandboxes cover with a tmpfs inside the interpreter prefix they expose."""
    return sbx.masked_paths(sbx.interpreter_paths(), [*(p for _, p in static_protected()), runs_dir])


def _isolation(bwrap: sbx.BwrapInfo, spec: sbx.SandboxSpec) -> ev.BubblewrapIsolation:
    """What isolated Case, for ``case_process_started`` and the report."""
    return ev.BubblewrapIsolation(kind="bubblewrap", version=bwrap.version, network="proxy-only", pid="namespace",
                                  home="fresh", uid=sbx.SANDBOX_UID, relay_port=spec.relay_port, dns="sink",
                                  writable=[str(spec.repo_dir)], ro_paths=[str(p) for p in spec.ro_paths])


def _acceptance(st: _RunState, fixture: Fixture, repo_dir: Path, initial: str, bwrap: sbx.BwrapInfo | None) -> None:
    """Acceptance cases on a clean export of Case's final commit (never the work tree).
    Case's code runs only in the acceptance worker, which a sandboxed run isolates too
    (no network, none of the machine but the interpreter and the worker's temporary
    directory); the verdict is computed here (``harness.acceptance_run``)."""
    # Copied first, as data (no git runs in it), so the scan sees what Case wrote.
    st.git_snapshot = git_mirror.take(repo_dir)
    # Case could write .git/config and friends; git would obey them outside the sandbox.
    reset = repo_guard.reclaim(repo_dir, st.git_config)
    if reset:
        st.say(f"acceptance: took back Case's repository git controls: {', '.join(reset)}")
    wrap = sandbox_wrap(bwrap.path, _masked(st.run_dir.parent)) if bwrap is not None else None
    # Case's commit is read from the harness's copy, with plumbing, ignoring every
    # .gitattributes (no smudge filter, no export-subst or export-ignore).
    head = git_mirror.resolve_commit(st.git_snapshot)
    committed = head is not None and head != initial
    if committed:
        assert head is not None
        with tempfile.TemporaryDirectory(prefix=f"checkout-{fixture.id}-") as tmp:
            try:
                checkout = Path(tmp) / "checkout"
                left_out = git_mirror.export_tree(st.git_snapshot, head, checkout)
                if left_out:
                    st.say(f"acceptance: {len(left_out)} entries of Case's commit not exported "
                           "(links, submodules or paths leaving the checkout)")
                result = run_acceptance(fixture, checkout, wrap=wrap)
            except (RuntimeError, ValueError, OSError) as exc:
                result = AcceptanceResult(passed=False, total=0, failed=0, errors=1, exit_code=-1,
                                          output_tail=f"[case-harness] could not check out Case's commit: "
                                                      f"{type(exc).__name__}")
    else:
        result = AcceptanceResult(passed=False, total=0, failed=0, errors=0, exit_code=-1,
                                  output_tail="[case-harness] Case made no commit; acceptance tests not run\n")
    # Case's code wrote that output: redacted like its logs (the tail is whole lines).
    result = result.model_copy(update={"output_tail": Redactor(st.secrets.values).redact(result.output_tail)})
    (st.run_dir / "acceptance.json").write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    st.events.emit(ev.FixtureTestsRun(commit=head if committed else None, committed=committed,
                                      passed=result.passed, total=result.total, failed=result.failed,
                                      errors=result.errors, sandboxed=wrap is not None, git_controls_reset=reset))
    st.say(f"acceptance: {'passed' if result.passed else 'FAILED'} ({result.total} tests, "
           f"{result.failed} failed, {result.errors} errors)")


def _scrape_metrics(st: _RunState) -> None:
    """``/metrics`` from the run's proxy: over its private unix socket when sandboxed,
    with the answering pid taken from the kernel (SO_PEERCRED) for the report."""
    peer: int | None = None
    try:
        if st.proxy_socket is not None:
            status, body, peer = unix_http_get_peer(st.proxy_socket, "/metrics", timeout_s=PROBE_TIMEOUT_S,
                                                    max_bytes=PROBE_MAX_BYTES)
        else:
            status, body = http_get(st.proxy_root + "/metrics")
    except OSError:
        return
    st.metrics_read = {"metrics_transport": "unix" if st.proxy_socket is not None else "tcp",
                       "metrics_peer_pid": peer}
    if status == 200:
        (st.run_dir / "proxy" / "metrics.prom").write_bytes(body)


def _finish(st: _RunState) -> Status:
    """Stop helpers, scan for secrets, write the report. Every path after the run
    directory exists ends here, so every run has a scan and a report."""
    _cleanup(st)
    st.say("secret scan: every place the seed names")
    try:
        result = scan_run_dir(st.run_dir, st.secrets, argv_text=st.sampler.text(), git_snapshot=st.git_snapshot)
    finally:
        if st.git_snapshot is not None:
            st.git_snapshot.remove()
    (st.run_dir / "secret_scan.json").write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    st.events.emit(ev.SecretScanDone(findings_count=len(result.findings), places_scanned=result.places_scanned,
                                     secret_scan_sha256=_digest(st.run_dir / "secret_scan.json")))
    return _write_report(st)


__all__ = [
    "EXIT_BLOCKED",
    "EXIT_CONFIG",
    "EXIT_FAIL",
    "EXIT_PASS",
    "ArgvSampler",
    "ModelsProbe",
    "RunConfigError",
    "RunOutcome",
    "case_argv",
    "case_environment",
    "http_get",
    "new_run_token",
    "probe_backend_models",
    "run_once",
]
