"""Proxy configuration: environment first, then an optional TOML file, then defaults.

Secrets (the proxy token, the backend key) come only from environment variables or
files named by them, never from argv and never as literal values in the TOML file. The
backend URL is runtime-only: it is held as a secret so it never appears in a repr, a log
line or an error message.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

ENV_DECISION_FILE = "CTO_HARNESS_CASE_DECISION_FILE"
ENV_ADMISSION_FILE = "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE"
ENV_BASE_URL = "CTO_HARNESS_CASE_LOCAL_BASE_URL"
ENV_API_KEY = "CTO_HARNESS_CASE_LOCAL_API_KEY"
ENV_API_KEY_FILE = "CTO_HARNESS_CASE_LOCAL_API_KEY_FILE"
ENV_TOKEN = "CASE_PROXY_TOKEN"
ENV_TOKEN_FILE = "CASE_PROXY_TOKEN_FILE"
ENV_EVIDENCE_FILE = "CASE_PROXY_EVIDENCE_FILE"
ENV_CONFIG_FILE = "CASE_PROXY_CONFIG"

MiB = 1024 * 1024


class Limits(BaseModel):
    """Bounds that keep one client from starving the rest or the proxy's memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 1M-token prompts are ~4 MB of text; JSON escaping and tool schemas can double it.
    max_body_bytes: int = Field(default=64 * MiB, ge=1024)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Local prefill of a very long prompt can take minutes before the first byte.
    first_byte_timeout_s: float = Field(default=600.0, gt=0)
    idle_timeout_s: float = Field(default=300.0, gt=0)
    max_concurrency: int = Field(default=256, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    readiness_interval_s: float = Field(default=2.0, gt=0)


class ProxySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    # Worker processes sharing the port (SO_REUSEPORT). One evidence chain per worker.
    workers: int = Field(default=1, ge=1, le=64)
    # Listen on this unix socket instead of host:port (``serve --unix``): the harness's
    # per-run proxy, reachable only by whoever can reach the socket's directory.
    unix_socket: Path | None = None
    decision_file: Path
    admission_file: Path
    base_url: SecretStr
    backend_api_key: SecretStr | None = None
    proxy_token: SecretStr
    evidence_file: Path
    allow_hosts: tuple[str, ...] = ()
    extra_secrets: tuple[SecretStr, ...] = ()
    metrics_enabled: bool = True
    evidence_enabled: bool = True
    limits: Limits = Limits()

    def secret_values(self) -> list[str]:
        """Every value the redactor must remove from logs, evidence and errors."""
        vals = [self.base_url.get_secret_value(), self.proxy_token.get_secret_value()]
        if self.backend_api_key is not None:
            vals.append(self.backend_api_key.get_secret_value())
        vals.extend(s.get_secret_value() for s in self.extra_secrets)
        return [v for v in vals if v]


def env_path(env: Mapping[str, str], name: str) -> Path | None:
    """The path a variable names, or None when it is unset or blank."""
    value = (env.get(name) or "").strip()
    return Path(value) if value else None


# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


def unix_socket_problems(path: Path, host: str | None, port: int | None, workers: int) -> list[str]:
    """Why ``--unix PATH`` cannot be used, one line each (empty: it can)."""
    problems: list[str] = []
    if host is not None or port is not None:
        problems.append("--unix: give either --unix or --host/--port, not both")
    if workers != 1:
        problems.append("--unix: one worker only (workers share a TCP port, not a socket path)")
    if not path.is_absolute():
        problems.append(f"--unix: {path} is not an absolute path")
    if len(os.fsencode(str(path))) > UNIX_PATH_MAX:
        problems.append(f"--unix: {path} is longer than {UNIX_PATH_MAX} bytes (the kernel's limit)")
    if path.exists() or path.is_symlink():
        problems.append(f"--unix: {path} already exists (a stale socket? remove it first)")
    elif not path.parent.is_dir():
        problems.append(f"--unix: directory {path.parent} does not exist")
    return problems


class ConfigError(ValueError):
    """Configuration problems, one line each, naming the variable or field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _read_secret_file(path_value: str, label: str, problems: list[str]) -> str | None:
    try:
        value = Path(path_value).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{label}: cannot read the file it names: {exc.strerror}")
        return None
    if not value:
        problems.append(f"{label}: the file it names is empty")
        return None
    return value


def _secret(env: Mapping[str, str], var: str, file_var: str, file_from_toml: str | None,
            problems: list[str], required: bool) -> str | None:
    direct = env.get(var)
    path = env.get(file_var) or file_from_toml
    if direct and env.get(file_var):
        problems.append(f"{var} and {file_var} are both set; set only one")
        return None
    if direct:
        return direct.strip() or None
    if path:
        return _read_secret_file(path, file_var if env.get(file_var) else f"TOML {file_var.lower()}", problems)
    if required:
        problems.append(f"{var} (or {file_var}) is not set")
    return None


_TOML_KEYS = {
    "server": {"host", "port", "workers"},
    "files": {"decision_file", "admission_file", "evidence_file", "token_file", "api_key_file"},
    "upstream": {"base_url", "allow_hosts"},
    "limits": set(Limits.model_fields),
    "proof": {"metrics_enabled", "evidence_enabled"},
}


def _load_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: cannot read: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: invalid TOML: {exc}")
        return {}
    for section, value in data.items():
        if section not in _TOML_KEYS or not isinstance(value, dict):
            problems.append(f"config file {path}: unknown section [{section}]")
            continue
        for key in value:
            if key not in _TOML_KEYS[section]:
                hint = " (secrets go in environment variables or *_file keys)" if "key" in key or "token" in key else ""
                problems.append(f"config file {path}: unknown key '{section}.{key}'{hint}")
    return data


def load_settings(env: Mapping[str, str] | None = None, config_file: Path | None = None,
                  host: str | None = None, port: int | None = None,
                  workers: int | None = None, unix_socket: Path | None = None) -> ProxySettings:
    """Build settings or raise ConfigError listing every problem found."""
    env = os.environ if env is None else env
    problems: list[str] = []
    if config_file is None and env.get(ENV_CONFIG_FILE):
        config_file = Path(env[ENV_CONFIG_FILE])
    toml = _load_toml(config_file, problems) if config_file else {}
    server, files, upstream = toml.get("server", {}), toml.get("files", {}), toml.get("upstream", {})

    def pick(var: str, section: dict[str, Any], key: str) -> Any:
        return env.get(var) or section.get(key)

    values: dict[str, Any] = {
        "host": host or server.get("host", "127.0.0.1"),
        "port": port if port is not None else server.get("port", 8787),
        "workers": workers if workers is not None else server.get("workers", 1),
        "unix_socket": unix_socket,
        "allow_hosts": tuple(upstream.get("allow_hosts", ())),
        "limits": toml.get("limits", {}),
        **toml.get("proof", {}),
    }
    for var, section, key, field in (
        (ENV_DECISION_FILE, files, "decision_file", "decision_file"),
        (ENV_ADMISSION_FILE, files, "admission_file", "admission_file"),
        (ENV_EVIDENCE_FILE, files, "evidence_file", "evidence_file"),
        (ENV_BASE_URL, upstream, "base_url", "base_url"),
    ):
        value = pick(var, section, key)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"{var} is not set (nor [{'files' if section is files else 'upstream'}].{key} in the config file)")
        else:
            values[field] = value.strip() if isinstance(value, str) else value
    token = _secret(env, ENV_TOKEN, ENV_TOKEN_FILE, files.get("token_file"), problems, required=True)
    if token is not None:
        values["proxy_token"] = token
        if len(token) < 16:
            problems.append(f"{ENV_TOKEN}: the proxy token must be at least 16 characters")
    api_key = _secret(env, ENV_API_KEY, ENV_API_KEY_FILE, files.get("api_key_file"), problems, required=False)
    if api_key is not None:
        if any(c in api_key for c in "\r\n\x00"):
            # It becomes a header value: a line break there would split the request.
            problems.append(f"{ENV_API_KEY}: the backend API key holds a line break or NUL character")
        values["backend_api_key"] = api_key
    if unix_socket is not None:
        problems.extend(unix_socket_problems(unix_socket, host, port, values["workers"]))
    if problems:
        raise ConfigError(problems)
    try:
        return ProxySettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError([
            f"setting '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors()
        ]) from None
