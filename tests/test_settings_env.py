"""Every server setting from flags, the environment, the TOML file or the default, in that
order, decided in one place (``proxy.settings.resolve_server_values``); a bad value names
where it came from; the service exit codes for a configuration error and a refused gate."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import ENV_LOG_LEVEL, log_level
from proxy.settings import ENV_SETTINGS, ConfigError, Limits, ProxySettings, load_settings, resolve_server_values
from tests.proxy_support import ADMITTED, cli, proxy_env

BASE_ENV = {"CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:8000/v1", "CASE_PROXY_TOKEN": "t" * 32,
            "CTO_HARNESS_CASE_DECISION_FILE": "/d.json", "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": "/a.json",
            "CASE_PROXY_EVIDENCE_FILE": "/e.jsonl"}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path


# (setting, flag keyword, env value, toml value, expected from flag, env, toml, default)
PRECEDENCE = [
    ("host", "host", "::1", '"10.0.0.5"', "192.168.1.1", "::1", "10.0.0.5", "127.0.0.1"),
    ("port", "port", "9001", "9002", 9000, 9001, 9002, 8787),
    ("workers", "workers", "3", "4", 2, 3, 4, 1),
]


@pytest.mark.parametrize("field,flag,env_value,toml_value,from_flag,from_env,from_toml,default", PRECEDENCE)
def test_flags_beat_env_beat_toml_beat_default(tmp_path: Path, field: str, flag: str, env_value: str,
                                               toml_value: str, from_flag: Any, from_env: Any, from_toml: Any,
                                               default: Any) -> None:
    var = ENV_SETTINGS[("server", field)]
    config = _toml(tmp_path, f"[server]\n{field} = {toml_value}\n")
    env = {**BASE_ENV, var: env_value}
    assert getattr(load_settings(env=env, config_file=config, **{flag: from_flag}), field) == from_flag
    assert getattr(load_settings(env=env, config_file=config), field) == from_env
    assert getattr(load_settings(env=BASE_ENV, config_file=config), field) == from_toml
    assert getattr(load_settings(env=BASE_ENV), field) == default
    # A blank variable is unset, not an empty value: the TOML file's value stands.
    assert getattr(load_settings(env={**BASE_ENV, var: "  "}, config_file=config), field) == from_toml


def test_every_toml_setting_has_a_variable_and_it_is_read() -> None:
    """Each [server]/[upstream]/[limits]/[proof] key but the secret-bearing base_url is in
    ENV_SETTINGS, and setting its variable alone changes the setting."""
    expected_keys = {("server", k) for k in ("host", "port", "workers")} | {("upstream", "allow_hosts")} \
        | {("limits", k) for k in Limits.model_fields} | {("proof", k) for k in ("metrics_enabled", "evidence_enabled")}
    assert set(ENV_SETTINGS) == expected_keys
    values = {"host": ("0.0.0.0", "0.0.0.0"), "port": ("1234", 1234), "workers": ("5", 5),
              "allow_hosts": ("gpu1.lan, gpu2.lan,", ("gpu1.lan", "gpu2.lan")),
              "metrics_enabled": ("false", False), "evidence_enabled": ("0", False)}
    defaults = Limits()
    for (section, key), var in ENV_SETTINGS.items():
        if section == "limits":
            default = getattr(defaults, key)
            raw, want = (str(default * 2), default * 2)
        else:
            raw, want = values[key]
        settings = load_settings(env={**BASE_ENV, var: raw})
        got = getattr(settings.limits, key) if section == "limits" else getattr(settings, key)
        assert got == want, f"{var}={raw!r} gave {got!r}"


def test_resolve_reports_where_each_value_came_from() -> None:
    values, sources = resolve_server_values(
        {("server", "port"): 1}, {"CASE_PROXY_PORT": "2", "CASE_PROXY_HOST": "::1", "CASE_PROXY_IDLE_TIMEOUT_S": "7"},
        {"server": {"port": 3, "host": "h", "workers": 4}, "limits": {"idle_timeout_s": 9, "max_concurrency": 8}})
    assert values == {"port": 1, "host": "::1", "workers": 4, "limits": {"idle_timeout_s": "7", "max_concurrency": 8}}
    assert sources == {"port": "flag --port", "host": "CASE_PROXY_HOST", "workers": "config file [server].workers",
                       "limits.idle_timeout_s": "CASE_PROXY_IDLE_TIMEOUT_S",
                       "limits.max_concurrency": "config file [limits].max_concurrency"}


@pytest.mark.parametrize("var,section", [("CASE_PROXY_PORT", "port"), ("CASE_PROXY_WORKERS", "workers"),
                                         ("CASE_PROXY_MAX_CONCURRENCY", "limits.max_concurrency"),
                                         ("CASE_PROXY_EVIDENCE_ENABLED", "evidence_enabled")])
def test_a_bad_variable_is_named_and_its_value_is_not_echoed(var: str, section: str) -> None:
    """Hostile operator input: a secret pasted into the wrong variable must not reach the
    error (which goes to the journal)."""
    secret = "sk-ant-api03-" + "x" * 40
    with pytest.raises(ConfigError) as info:
        load_settings(env={**BASE_ENV, var: secret})
    assert len(info.value.problems) == 1
    line = info.value.problems[0]
    assert f"'{section}'" in line and f"(from {var})" in line
    assert secret not in line and "x" * 10 not in line


def test_a_bad_toml_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=BASE_ENV, config_file=_toml(tmp_path, "[server]\nport = 70000\n"))
    assert info.value.problems[0].startswith("setting 'port' (from config file [server].port):")


def test_toml_allow_hosts_must_be_a_list(tmp_path: Path) -> None:
    """A string would otherwise become a tuple of its characters: 'gpu.lan' allowlisting
    single letters."""
    with pytest.raises(ConfigError) as info:
        load_settings(env=BASE_ENV, config_file=_toml(tmp_path, '[upstream]\nallow_hosts = "gpu.lan"\n'))
    assert "allow_hosts" in info.value.problems[0]


def test_settings_model_is_the_one_the_resolver_feeds() -> None:
    """Every field the resolver can set is a ProxySettings field (or a Limits one)."""
    for section, key in ENV_SETTINGS:
        assert key in (Limits.model_fields if section == "limits" else ProxySettings.model_fields)


def test_log_level_flag_then_env_then_info() -> None:
    assert log_level("ERROR", {ENV_LOG_LEVEL: "debug"}) == "ERROR"
    assert log_level(None, {ENV_LOG_LEVEL: "debug"}) == "DEBUG"
    assert log_level(None, {ENV_LOG_LEVEL: " "}) == "INFO"
    assert log_level(None, {}) == "INFO"
    with pytest.raises(ConfigError) as info:
        log_level(None, {ENV_LOG_LEVEL: "loud"})
    assert ENV_LOG_LEVEL in info.value.problems[0]


def test_serve_exit_codes_config_2_gate_3_env_read(tmp_path: Path) -> None:
    """What the unit's RestartPreventExitStatus relies on: a configuration error exits 2,
    a refused gate 3, and the port comes from CASE_PROXY_PORT when no flag names one."""
    env = proxy_env(tmp_path, "http://127.0.0.1:8000/v1", CASE_PROXY_PORT="not-a-port")
    bad = cli("serve", env=env)
    assert bad.returncode == 2 and "(from CASE_PROXY_PORT)" in bad.stderr, bad.stderr
    bad_level = cli("serve", env={**env, "CASE_PROXY_PORT": "0", ENV_LOG_LEVEL: "loud"})
    assert bad_level.returncode == 2 and ENV_LOG_LEVEL in bad_level.stderr
    revoked = dict(env)
    Path(revoked["CTO_HARNESS_CASE_MODEL_ADMISSION_FILE"]).write_text(json.dumps({
        "schema_version": 1, "work_item": "CTO-WORK-020", "provider": "qwen-local",
        "provider_class": "local_case_compatible", "model": ADMITTED, "admission_status": "revoked"}))
    # A port that is in use proves the variable was read: the gate is checked first, so
    # the refusal must still be 3; with the admission fixed, the listen fails (2) naming it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        blocked = cli("serve", env={**revoked, "CASE_PROXY_PORT": port})
        assert blocked.returncode == 3 and "admission_status_blocks" in blocked.stderr, blocked.stderr
        ok_dir = tmp_path / "ok"
        ok_dir.mkdir()
        fixed = proxy_env(ok_dir, "http://127.0.0.1:8000/v1", CASE_PROXY_PORT=port)
        in_use = cli("serve", env=fixed)
        assert in_use.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in in_use.stderr, in_use.stderr


def test_operations_doc_lists_every_variable() -> None:
    """docs/operations.md's settings table is the operator's reference: a new setting
    without a line there breaks the build."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    missing = [var for var in (*ENV_SETTINGS.values(), ENV_LOG_LEVEL) if f"`{var}`" not in doc]
    assert missing == []
