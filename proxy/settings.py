"""Proxy configuration: flags, then the environment, then an optional TOML file, then
defaults (``resolve_server_values`` is the one place that decides, for every setting the
TOML file's ``[server]``, ``[upstream]``, ``[limits]`` and ``[proof]`` tables hold).

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

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr, ValidationError

from .allowlists import parse_extra_fields
from .evidence_channel import head_fd_problem, read_key_fd
from .log_setup import LOG_FORMATS, LogFormat, parse_bool
from .redact import clip
from .request_policy import Endpoint

ENV_DECISION_FILE = "CTO_HARNESS_CASE_DECISION_FILE"
ENV_ADMISSION_FILE = "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE"
ENV_BASE_URL = "CTO_HARNESS_CASE_LOCAL_BASE_URL"
ENV_API_KEY = "CTO_HARNESS_CASE_LOCAL_API_KEY"
ENV_API_KEY_FILE = "CTO_HARNESS_CASE_LOCAL_API_KEY_FILE"
ENV_TOKEN = "CASE_PROXY_TOKEN"
ENV_TOKEN_FILE = "CASE_PROXY_TOKEN_FILE"
ENV_EVIDENCE_FILE = "CASE_PROXY_EVIDENCE_FILE"
ENV_CONFIG_FILE = "CASE_PROXY_CONFIG"
ENV_LOG_FORMAT = "CASE_PROXY_LOG_FORMAT"
ENV_ACCESS_LOG = "CASE_PROXY_ACCESS_LOG"
# More values the proxy must redact (one per line), e.g. other credentials the operator
# knows could pass through a client's bytes. The harness passes its own list on.
ENV_EXTRA_SECRETS_FILE = "CASE_PROXY_EXTRA_SECRETS_FILE"
# The harness's per-run chain key, as hex text on an inherited descriptor (read once,
# then closed), and the pipe the proxy reports its chain head on (proxy.evidence_channel).
ENV_CHAIN_KEY_FD = "CASE_PROXY_CHAIN_KEY_FD"
ENV_HEAD_FD = "CASE_PROXY_CHAIN_HEAD_FD"

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
    # Keyed evidence (proxy.hashchain): the run key, and where heads are reported.
    chain_key: SecretBytes | None = None
    head_fd: int | None = None
    metrics_enabled: bool = True
    evidence_enabled: bool = True
    # Log lines as text or JSON; one access line per request unless turned off.
    log_format: LogFormat = "text"
    access_log: bool = True
    limits: Limits = Limits()
    # Operator additions to the request field allow-list (see proxy.allowlists).
    extra_request_fields: dict[Endpoint, frozenset[str]] = Field(default_factory=dict)

    def secret_values(self) -> list[str]:
        """Every value the redactor must remove from logs, evidence and errors."""
        vals = [self.base_url.get_secret_value(), self.proxy_token.get_secret_value()]
        if self.backend_api_key is not None:
            vals.append(self.backend_api_key.get_secret_value())
        vals.extend(s.get_secret_value() for s in self.extra_secrets)
        if self.chain_key is not None:
            vals.append(self.chain_key.get_secret_value().hex())
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


def read_extra_secrets(path_value: str, label: str, problems: list[str]) -> tuple[str, ...]:
    """The operator's extra secrets: one per line, blank lines ignored. A file named but
    unreadable is an error (fail closed: the proxy would otherwise run without redacting
    values the operator asked it to)."""
    try:
        text = Path(path_value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        problems.append(f"{label}: cannot read the file it names: {why}")
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


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


# Every setting of the TOML file that is not a file or a secret, and the variable that
# sets it: a service manager configures the proxy through the environment alone.
ENV_SETTINGS: dict[tuple[str, str], str] = {
    ("server", "host"): "CASE_PROXY_HOST",
    ("server", "port"): "CASE_PROXY_PORT",
    ("server", "workers"): "CASE_PROXY_WORKERS",
    ("upstream", "allow_hosts"): "CASE_PROXY_ALLOW_HOSTS",
    **{("limits", key): f"CASE_PROXY_{key.upper()}" for key in Limits.model_fields},
    ("proof", "metrics_enabled"): "CASE_PROXY_METRICS_ENABLED",
    ("proof", "evidence_enabled"): "CASE_PROXY_EVIDENCE_ENABLED",
}
# Settings kept as lists: the variable holds comma-separated items.
_LIST_SETTINGS = frozenset({("upstream", "allow_hosts")})


def resolve_server_values(flags: Mapping[tuple[str, str], Any], env: Mapping[str, str],
                          toml: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each ``ENV_SETTINGS`` value from the first source that sets it: a flag (not None),
    then its variable (not blank), then the TOML file; unset ones are left out, so the
    model's default applies. Returns (values shaped as ``ProxySettings`` takes them,
    where each value came from, keyed by its dotted field path) for error messages."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for (section, key), var in ENV_SETTINGS.items():
        table = toml.get(section)
        raw_env = (env.get(var) or "").strip()
        if flags.get((section, key)) is not None:
            value, source = flags[(section, key)], f"flag --{key.replace('_', '-')}"
        elif raw_env:
            value, source = raw_env, var
            if (section, key) in _LIST_SETTINGS:
                value = tuple(item.strip() for item in raw_env.split(",") if item.strip())
        elif isinstance(table, dict) and key in table:
            value, source = table[key], f"config file [{section}].{key}"
        else:
            continue
        if (section, key) in _LIST_SETTINGS and isinstance(value, list):
            value = tuple(value)
        if section in ("server", "upstream", "proof"):
            values[key] = value
            sources[key] = source
        else:
            values.setdefault(section, {})[key] = value
            sources[f"{section}.{key}"] = source
    return values, sources


_TOML_KEYS: dict[str, set[str] | None] = {
    "server": {"host", "port", "workers"},
    "files": {"decision_file", "admission_file", "evidence_file", "token_file", "api_key_file",
              "extra_secrets_file"},
    "upstream": {"base_url", "allow_hosts"},
    "limits": set(Limits.model_fields),
    "proof": {"metrics_enabled", "evidence_enabled"},
    "request_fields": None,  # endpoint -> [field names], checked by proxy.allowlists
    "log": {"format", "access_log"},
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
        keys = _TOML_KEYS.get(section, set())
        if keys is None:
            continue  # checked where it is read
        if section not in _TOML_KEYS or not isinstance(value, dict):
            problems.append(f"config file {path}: unknown section [{section}]")
            continue
        for key in value:
            if key not in keys:
                hint = " (secrets go in environment variables or *_file keys)" if "key" in key or "token" in key else ""
                problems.append(f"config file {path}: unknown key '{section}.{key}'{hint}")
    return data


def _log_values(env: Mapping[str, str], section: dict[str, Any], log_format: str | None,
                access_log: bool | None, problems: list[str]) -> dict[str, Any]:
    """Log format and access line: the command line, else the environment, else [log]."""
    out: dict[str, Any] = {}
    fmt = log_format or (env.get(ENV_LOG_FORMAT) or "").strip() or section.get("format")
    if fmt is not None:
        if fmt not in LOG_FORMATS:
            source = "--log-format" if log_format else ENV_LOG_FORMAT if env.get(ENV_LOG_FORMAT) else "[log].format"
            problems.append(f"{source}: '{clip(str(fmt), 40)}' is not a log format (use one of: {', '.join(LOG_FORMATS)})")
        else:
            out["log_format"] = fmt
    if access_log is not None:
        out["access_log"] = access_log
    elif (env.get(ENV_ACCESS_LOG) or "").strip():
        try:
            out["access_log"] = parse_bool(env[ENV_ACCESS_LOG], ENV_ACCESS_LOG)
        except ValueError as exc:
            problems.append(str(exc))
    elif "access_log" in section:
        out["access_log"] = section["access_log"]
    return out


def load_settings(env: Mapping[str, str] | None = None, config_file: Path | None = None,
                  host: str | None = None, port: int | None = None,
                  workers: int | None = None, log_format: str | None = None,
                  access_log: bool | None = None, unix_socket: Path | None = None) -> ProxySettings:
    """Build settings or raise ConfigError listing every problem found."""
    env = os.environ if env is None else env
    problems: list[str] = []
    if config_file is None and env.get(ENV_CONFIG_FILE):
        config_file = Path(env[ENV_CONFIG_FILE])
    toml = _load_toml(config_file, problems) if config_file else {}
    files, upstream = toml.get("files", {}), toml.get("upstream", {})

    def pick(var: str, section: dict[str, Any], key: str) -> Any:
        return env.get(var) or section.get(key)

    flags = {("server", "host"): host or None, ("server", "port"): port, ("server", "workers"): workers}
    values, sources = resolve_server_values(flags, env, toml)
    values["unix_socket"] = unix_socket
    values.update(_log_values(env, toml.get("log", {}), log_format, access_log, problems))
    if "request_fields" in toml:
        extra, field_problems = parse_extra_fields(toml["request_fields"])
        problems.extend(f"config file {config_file}: {p}" for p in field_problems)
        values["extra_request_fields"] = extra
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
    extra_file = (env.get(ENV_EXTRA_SECRETS_FILE) or "").strip() or files.get("extra_secrets_file")
    if extra_file:
        label = ENV_EXTRA_SECRETS_FILE if env.get(ENV_EXTRA_SECRETS_FILE) else "TOML files.extra_secrets_file"
        values["extra_secrets"] = read_extra_secrets(str(extra_file), label, problems)
    values.update(_chain_values(env, values.get("workers", 1), problems))
    if unix_socket is not None:
        workers_set = values.get("workers", 1)
        problems.extend(unix_socket_problems(unix_socket, host, port,
                                             workers_set if isinstance(workers_set, int) else 1))
    if problems:
        raise ConfigError(problems)
    try:
        return ProxySettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError([_validation_problem(e["loc"], e["msg"], sources) for e in exc.errors()]) from None


def _fd_number(env: Mapping[str, str], var: str, problems: list[str]) -> int | None:
    raw = (env.get(var) or "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        problems.append(f"{var}: {raw!r} is not a file descriptor number")
        return None
    return int(raw)


def _chain_values(env: Mapping[str, str], workers: Any, problems: list[str]) -> dict[str, Any]:
    """The run key (read from its descriptor now, which closes it) and the head
    channel's descriptor, checked; each problem names its variable."""
    out: dict[str, Any] = {}
    key_fd = _fd_number(env, ENV_CHAIN_KEY_FD, problems)
    if key_fd is not None:
        try:
            out["chain_key"] = read_key_fd(key_fd)
        except ValueError as exc:
            problems.append(f"{ENV_CHAIN_KEY_FD}: {exc}")
    head_fd = _fd_number(env, ENV_HEAD_FD, problems)
    if head_fd is not None:
        if key_fd is None:
            problems.append(f"{ENV_HEAD_FD}: head reports need a keyed chain; set {ENV_CHAIN_KEY_FD} too")
        elif str(workers).strip() != "1":
            problems.append(f"{ENV_HEAD_FD}: one worker only (each worker writes its own chain)")
        elif (problem := head_fd_problem(head_fd)) is not None:
            problems.append(f"{ENV_HEAD_FD}: {problem}")
        else:
            out["head_fd"] = head_fd
    return out


def _validation_problem(loc: tuple[int | str, ...], message: str, sources: Mapping[str, str]) -> str:
    """One line naming the setting and where its bad value came from (never the value:
    a mistyped variable may hold a secret)."""
    dotted = ".".join(str(p) for p in loc)
    # A list item's location ends in its index; the list's source is the one to name.
    source = sources.get(dotted) or sources.get(".".join(str(p) for p in loc if not isinstance(p, int)))
    return f"setting '{dotted}'{f' (from {source})' if source else ''}: {message}"
