"""The processes the bench starts (all on 127.0.0.1), and what it reads about them.

nginx (the canned-JSON backend), the proxy (``python -m proxy serve``), LiteLLM's proxy
(in its own venv, .cache/litellm-venv) and the canned streaming backend
(``bench.sse_backend``, a bench fixture). Every process writes its output to files in
the bench's temporary directory, is stopped by its own pid, and is killed if it does not
stop in time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from harness.run import http_get, http_request  # loopback HTTP that ignores the environment's proxies

from .stats import proc_cpu_seconds, proc_status_kb

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen3.6-35b-a3b"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LITELLM_VENV = ROOT / ".cache" / "litellm-venv"

# The fast backend's canned answers. The proxy's readiness check needs the model listed.
MODELS_JSON = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 0, "owned_by": "bench-nginx"}]}, separators=(",", ":"))
CHAT_JSON = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1767225600, "model": MODEL,
    "system_fingerprint": "bench-nginx-canned",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the canned bench backend."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}, separators=(",", ":"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until something listens on ``port``; past the deadline ``proc`` is stopped (it
    leads its own session, so nothing else would) and RuntimeError raised."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    if proc is not None:
        stop_process(proc)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline_s:.0f}s")


def http_post_json(url: str, body: bytes, token: str | None, timeout: float = 10.0) -> tuple[int, bytes]:
    assert url.startswith("http://127.0.0.1:"), url
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http_request("POST", url, body=body, headers=headers, timeout_s=timeout)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of one process."""
    return proc_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), CLK_TCK)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out.extend(int(x) for x in text.split())
    except OSError:
        pass
    return out


def tree_pids(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (nginx workers, uvicorn)."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def peak_rss_mb(pid: int) -> float | None:
    kb = proc_status_kb(Path(f"/proc/{pid}/status").read_text(), "VmHWM")
    return None if kb is None else kb / 1024


def rss_mb(pid: int) -> float | None:
    kb = proc_status_kb(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
    return None if kb is None else kb / 1024


@dataclass
class Proc:
    """A started process with its log files; ``stop()`` ends it by its own pid."""

    name: str
    popen: subprocess.Popen
    workdir: Path
    port: int = 0
    url: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.popen, timeout)

    def log_tail(self, n: int = 20) -> str:
        out = []
        for f in sorted(self.workdir.glob(f"{self.name}.*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def stop_process(popen: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process's group, SIGKILL if it has not ended within ``timeout``."""
    if popen.poll() is not None:
        return
    try:
        # Each process leads its own group (start_new_session), so this reaches its
        # workers and nothing else.
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(5)


def _raise_nofile() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    out = open(workdir / f"{name}.stdout.log", "wb")
    err = open(workdir / f"{name}.stderr.log", "wb")
    try:
        return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(cwd or ROOT), start_new_session=True, preexec_fn=_raise_nofile)
    finally:
        out.close()
        err.close()


def _wait_line(path: Path, prefix: str, deadline_s: float, proc: subprocess.Popen) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: process exited with {proc.returncode} before printing {prefix}")
        time.sleep(0.05)
    stop_process(proc)  # it leads its own session: nobody else would stop it
    raise RuntimeError(f"{path.name}: no {prefix} line after {deadline_s:.0f}s")


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not found:
        raise RuntimeError("nginx not found: run scripts/install-bench-deps.sh")
    return found


def _nginx_dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir()
    return d


def _render_nginx(template: str, d: Path, values: dict[str, str]) -> Path:
    """The template with its placeholders (``@@NAME@@``) filled; refuses to leave any behind."""
    text = (Path(__file__).parent / template).read_text()
    # As root, nginx would switch its worker to 'nobody', who cannot use our 0700 temp dir.
    values = {"DIR": str(d), "USER_LINE": "user root;" if os.geteuid() == 0 else "", **values}
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    left = re.search(r"@@[A-Z_]+@@", text)
    if left:
        raise RuntimeError(f"{template}: placeholder {left.group()} left unfilled")
    conf = d / "nginx.conf"
    conf.write_text(text)
    return conf


def _spawn_nginx(name: str, d: Path, conf: Path, tmp: Path) -> subprocess.Popen:
    return _spawn(name, [nginx_binary(), "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")], tmp)


def _require_models(p: Proc) -> None:
    """The admitted model's listing answers at ``p``: a server that only listens, or a
    relay that answers 502 in a hurry, must not be measured as if it served. Otherwise
    ``p`` is stopped (nobody owns it yet) and RuntimeError raised."""
    status, body = http_get(f"{p.url}/models", timeout_s=2.0)
    if status != 200 or MODEL.encode() not in body:
        p.stop()
        raise RuntimeError(f"{p.name} /v1/models answered {status}")


def start_nginx(tmp: Path) -> Proc:
    """nginx with two servers: the fast canned backend and the body-reading one."""
    d = _nginx_dir(tmp, "nginx")
    port, body_port = free_port(), free_port()
    conf = _render_nginx("nginx.conf.template", d, {"PORT": str(port), "BODY_PORT": str(body_port),
                                                    "MODELS_JSON": MODELS_JSON, "CHAT_JSON": CHAT_JSON})
    popen = _spawn_nginx("nginx", d, conf, tmp)
    p = Proc("nginx", popen, tmp, port=port, url=f"http://127.0.0.1:{port}/v1")
    p.extra["body_port"] = body_port
    p.extra["body_url"] = f"http://127.0.0.1:{body_port}/v1"
    wait_port(port, 15, popen)
    wait_port(body_port, 15, popen)
    _require_models(p)
    return p


def start_nginx_proxy(tmp: Path, name: str, upstream: Proc) -> Proc:
    """nginx as a plain reverse proxy (one worker, keep-alive upstream pool, no buffering)
    in front of ``upstream``: the reference for what any proxy adds on this machine. It
    checks nothing and records nothing, so it is a floor, not a competitor."""
    d = _nginx_dir(tmp, name)
    port = free_port()
    conf = _render_nginx("nginx-proxy.conf.template", d, {"PORT": str(port), "UPSTREAM_PORT": str(upstream.port)})
    popen = _spawn_nginx(name, d, conf, tmp)
    wait_port(port, 15, popen)
    p = Proc(name, popen, tmp, port=port, url=f"http://127.0.0.1:{port}/v1")
    _require_models(p)  # relayed to the backend and back
    return p


def proxy_env(code_root: Path, backend_url: str, token: str, evidence_file: Path) -> dict[str, str]:
    """The environment a proxy from ``code_root`` (this tree, or a baseline exported by
    bench.baseline) starts with: the one place where what a version needs is decided.
    Every version from the baseline (1472c50) on reads the same variables and the same
    ``[server]``, ``[limits]`` and ``[proof]`` keys and accepts the same flags; an exported
    tree's ``proxy`` package and example decision/admission files are its own (its
    directory first on ``PYTHONPATH``, checked by bench.baseline.imported_from)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CASE_PROXY_", "CTO_HARNESS_CASE_")) and k != "PYTHONPATH"}
    env.update({
        "CTO_HARNESS_CASE_DECISION_FILE": str(code_root / "config" / "decision.example.json"),
        "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(code_root / "config" / "admission.example.json"),
        "CTO_HARNESS_CASE_LOCAL_BASE_URL": backend_url,
        "CASE_PROXY_TOKEN": token,
        "CASE_PROXY_EVIDENCE_FILE": str(evidence_file),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    if code_root != ROOT:
        env["PYTHONPATH"] = str(code_root)
    return env


def start_proxy(tmp: Path, name: str, backend_url: str, token: str, *, metrics: bool = True,
                evidence: bool = True, max_concurrency: int = 4096, workers: int = 1,
                code_root: Path = ROOT) -> Proc:
    """``python -m proxy serve`` with its own config and its own evidence file (one per
    worker when ``workers`` > 1); ``code_root`` another tree's proxy (a baseline)."""
    d = tmp / name
    d.mkdir()
    cfg = d / "proxy.toml"
    cfg.write_text(
        "# written by the bench\n"
        "[server]\n"
        f"workers = {workers}\n"
        "[limits]\n"
        f"max_concurrency = {max_concurrency}\n"
        "[proof]\n"
        f"metrics_enabled = {'true' if metrics else 'false'}\n"
        f"evidence_enabled = {'true' if evidence else 'false'}\n")
    env = proxy_env(code_root, backend_url, token, d / "evidence.jsonl")
    popen = _spawn(name, [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "0",
                          "--config", str(cfg), "--log-level", "WARNING"], tmp, env=env, cwd=code_root)
    url = _wait_line(tmp / f"{name}.stdout.log", "CASE_PROXY_LISTENING", 30, popen)
    p = Proc(name, popen, tmp, port=int(url.rsplit(":", 1)[1].split("/")[0]), url=url)
    p.extra["evidence_file"] = str(d / "evidence.jsonl")
    root = url[: -len("/v1")]
    end = time.monotonic() + 30
    while time.monotonic() < end:
        status, _ = http_get(f"{root}/readyz", timeout_s=2.0)
        if status == 200:
            return p
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"{name}: /readyz not 200 after 30s\n{p.log_tail()}")


def litellm_available() -> bool:
    return (LITELLM_VENV / "bin" / "litellm").exists()


def litellm_env() -> dict[str, str]:
    """Environment for LiteLLM: no network beyond 127.0.0.1 (no remote price map, no
    telemetry), quiet logging."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_", "DATABASE_"))}
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
        "NO_REDOC": "True",
        "DISABLE_SCHEMA_UPDATE": "True",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
        "USE_DDTRACE": "False",
        "PYTHONDONTWRITEBYTECODE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    return env


def start_litellm(tmp: Path, backend_url: str, master_key: str) -> Proc:
    """LiteLLM's proxy: the same single model on the same backend, one worker, logging
    and callbacks off. Its key comes from the environment, not the config file."""
    d = tmp / "litellm"
    d.mkdir()
    cfg = d / "config.yaml"
    cfg.write_text(f"""# written by the bench: one model, the same backend as the proxy
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {backend_url}
      api_key: bench-not-a-secret
litellm_settings:
  telemetry: false
  set_verbose: false
  json_logs: false
  callbacks: []
  success_callback: []
  failure_callback: []
  service_callback: []
  turn_off_message_logging: true
  drop_params: true
  request_timeout: 60
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
  background_health_checks: false
""")
    port = free_port()
    popen = _spawn("litellm", [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                               "--port", str(port), "--num_workers", "1"], tmp,
                   env={**litellm_env(), "LITELLM_MASTER_KEY": master_key}, cwd=d)
    p = Proc("litellm", popen, tmp, port=port, url=f"http://127.0.0.1:{port}/v1")
    try:
        wait_port(port, 120, popen)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            status, _ = http_get(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=2.0)
            if status == 200:
                break
            time.sleep(0.2)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        status, data = http_post_json(f"{p.url}/chat/completions", body, master_key, timeout=30)
        if status != 200:
            raise RuntimeError(f"LiteLLM chat answered {status}: {data[:300]!r}")
    except Exception:
        tail = p.log_tail()
        p.stop()
        raise RuntimeError(f"LiteLLM did not start\n{tail}") from None
    return p


def start_sse_backend(tmp: Path, chunks: int, delay_ms: float) -> Proc:
    """The canned SSE backend (a BENCH FIXTURE, ``bench.sse_backend``): ``chunks`` content
    events per answer, spaced ``delay_ms`` on an absolute schedule."""
    name = f"sse-{chunks}x{delay_ms:g}ms"
    popen = _spawn(name, [sys.executable, "-m", "bench.sse_backend", "--host", "127.0.0.1", "--port", "0",
                          "--model", MODEL, "--chunks", str(chunks), "--delay-ms", str(delay_ms)], tmp)
    url = _wait_line(tmp / f"{name}.stdout.log", "SSE_BACKEND_READY", 30, popen)
    return Proc(name, popen, tmp, port=int(url.rsplit(":", 1)[1].split("/")[0]), url=url)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, object]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        kb = proc_status_kb(Path("/proc/meminfo").read_text(), "MemTotal")
        mem_gb = round(kb / 1024 / 1024, 1) if kb else None
    except OSError:
        pass
    import aiohttp
    info: dict[str, object] = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": _version([nginx_binary(), "-v"]),
        "wrk": _version(["wrk", "-v"]).split(" Copyright")[0],
    }
    try:
        import uvloop
        info["uvloop"] = uvloop.__version__
    except ImportError:
        info["uvloop"] = None
    if litellm_available():
        info["litellm"] = _version([str(LITELLM_VENV / "bin" / "python"), "-c",
                                    "import importlib.metadata as m; print(m.version('litellm'))"])
    return info


def code_version(root: Path) -> dict[str, object]:
    """Which code a run measured: the commit checked out at ``root`` and whether tracked
    files differ from it (the bench's own results files aside, which a run rewrites).
    ``commit`` is None outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "modified": None}
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "modified": None}
    return {"commit": head.stdout.strip(), "modified": bool(status.stdout.strip()) if status.returncode == 0 else None}


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()
