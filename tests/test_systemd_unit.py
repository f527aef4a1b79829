"""deploy/case-proxy.service: systemd's own checker accepts it without a warning, it says
what the service needs (dynamic user, state and runtime directories, credentials, a stop
timeout above the drain deadline, no restart on the configuration and gate exit codes),
and the environment it builds starts a real proxy that reads its token from the
credentials directory.

No systemd runs as PID 1 in this container, so the unit is not started by systemd here:
``systemd-analyze verify`` checks it, and the last test starts the proxy with exactly the
environment the unit defines (specifiers filled in as systemd fills them). The backend is
the scripted test fixture.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.server import EXIT_BLOCKED, EXIT_CONFIG
from proxy.settings import ENV_SETTINGS, Limits, load_settings
from tests.proxy_support import ProxyProcess, write_artifacts

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "case-proxy.service"
INSTALLED_EXEC = "/opt/case-local-route/bin/case-proxy"
# Variables the proxy reads besides ENV_SETTINGS (files, secrets, logging).
KNOWN_VARS = {*ENV_SETTINGS.values(), "CASE_PROXY_TOKEN_FILE", "CASE_PROXY_EVIDENCE_FILE", "CASE_PROXY_CONFIG",
              "CASE_PROXY_LOG_LEVEL", "CTO_HARNESS_CASE_LOCAL_API_KEY_FILE", "TMPDIR"}

pytestmark = pytest.mark.systemd


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys repeat in units)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == section and k == key]


def unit_environment(specifiers: dict[str, str]) -> dict[str, str]:
    """The Environment= assignments with %d, %S, %t filled in."""
    env: dict[str, str] = {}
    for assignment in values("Environment"):
        name, _, value = assignment.partition("=")
        env[name] = re.sub(r"%([dSt])", lambda m: specifiers[m.group(1)], value)
    return env


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: scripts/install-system-deps.sh installs it (package systemd)"
    return subprocess.run([tool, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)


def _runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this environment's case-proxy (verify checks
    that the program exists); nothing else changed."""
    exe = Path(sys.executable).parent / "case-proxy"
    assert exe.is_file(), exe
    text = UNIT.read_text() if text is None else text
    assert text.count(INSTALLED_EXEC) == 1
    path = tmp_path / "case-proxy.service"
    path.write_text(text.replace(INSTALLED_EXEC, str(exe)))
    return path


def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    out = _verify(_runnable_copy(tmp_path))
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


# systemd-analyze security's overall exposure, times ten (the unit measured 1.3; without
# DynamicUser 2.3, without the hardening block 8.4).
EXPOSURE_THRESHOLD = 15


def _security(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool
    return subprocess.run([tool, "security", "--offline=yes", f"--threshold={EXPOSURE_THRESHOLD}", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hardening_keeps_the_exposure_low(tmp_path: Path) -> None:
    good = _security(_runnable_copy(tmp_path))
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr
    assert "Overall exposure level for case-proxy.service: 1." in good.stdout


def test_the_exposure_check_fails_without_the_dynamic_user(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "DynamicUser=yes\n" in text
    assert _security(_runnable_copy(tmp_path, text.replace("DynamicUser=yes\n", ""))).returncode != 0


@pytest.mark.parametrize("edit,complaint", [
    (("Restart=on-failure", "Restrat=on-failure"), "Unknown key"),
    (("TimeoutStopSec=45s", "TimeoutStopSec=forty-five"), "Failed to parse"),
    (("RestartPreventExitStatus=2 3", "RestartPreventExitStatus=two three"), ""),
])
def test_the_check_sees_a_broken_unit(tmp_path: Path, edit: tuple[str, str], complaint: str) -> None:
    """The verify test above would catch a typo: systemd only warns on them (exit 0), so
    the test must also require silence."""
    text = UNIT.read_text()
    assert edit[0] in text
    out = _verify(_runnable_copy(tmp_path, text.replace(edit[0], edit[1])))
    assert out.stdout + out.stderr != "" and complaint in out.stdout + out.stderr


def test_the_unit_declares_what_the_service_needs() -> None:
    assert values("DynamicUser") == ["yes"]
    assert values("StateDirectory") == ["case-proxy"] and values("RuntimeDirectory") == ["case-proxy"]
    assert {int(c) for c in values("RestartPreventExitStatus")[0].split()} == {EXIT_CONFIG, EXIT_BLOCKED}
    assert values("Restart") == ["on-failure"]
    credentials = dict(v.split(":", 1) for v in values("LoadCredential"))
    assert set(credentials) == {"proxy-token", "backend-key"}
    env = unit_environment({"d": "/CRED", "S": "/STATE", "t": "/RUN"})
    assert env["CASE_PROXY_TOKEN_FILE"] == "/CRED/proxy-token"
    assert env["CTO_HARNESS_CASE_LOCAL_API_KEY_FILE"] == "/CRED/backend-key"
    assert env["CASE_PROXY_EVIDENCE_FILE"].startswith("/STATE/case-proxy/")
    assert env["TMPDIR"] == "/RUN/case-proxy"
    # A misspelt variable is silently ignored by the proxy: every one must be real.
    assert set(env) <= KNOWN_VARS, set(env) - KNOWN_VARS
    # No secret as a literal in the unit: only through credentials or the 0600 env file.
    assert not any(k in env for k in ("CASE_PROXY_TOKEN", "CTO_HARNESS_CASE_LOCAL_API_KEY",
                                      "CTO_HARNESS_CASE_LOCAL_BASE_URL"))


def test_stop_timeout_exceeds_the_drain_deadline() -> None:
    """SIGKILL before the drain ends would cut open streams and the proxy_stop record."""
    [timeout] = values("TimeoutStopSec")
    stop_s = float(timeout.removesuffix("s"))
    env = unit_environment({"d": "", "S": "", "t": ""})
    drain_s = float(env.get("CASE_PROXY_DRAIN_TIMEOUT_S", Limits().drain_timeout_s))
    assert stop_s >= drain_s + 10, (stop_s, drain_s)


def test_a_blank_key_file_variable_means_no_backend_key(tmp_path: Path) -> None:
    """What docs/operations.md tells an operator whose backend has no key to put in a
    drop-in (LoadCredential= reset, the variable blanked)."""
    d, a = write_artifacts(tmp_path)
    env = {"CTO_HARNESS_CASE_DECISION_FILE": str(d), "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a),
           "CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:9/v1", "CASE_PROXY_TOKEN": "t" * 32,
           "CASE_PROXY_EVIDENCE_FILE": str(tmp_path / "e.jsonl"), "CTO_HARNESS_CASE_LOCAL_API_KEY_FILE": ""}
    assert load_settings(env=env).backend_api_key is None


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_units_environment_starts_a_proxy_that_reads_its_credentials(
        scripted_backend, tmp_path: Path, workers: str) -> None:
    """The unit's Environment= lines, with the credentials directory, state and runtime
    directories systemd would make, run a real proxy: the token comes from the
    credentials file (requests with it pass, without it 401), the evidence lands in the
    state directory, and with several workers their shared metrics files are in the
    runtime directory (TMPDIR), which systemd removes at stop."""
    cred, state, run = tmp_path / "credentials", tmp_path / "state", tmp_path / "run"
    for directory in (cred, state / "case-proxy", run / "case-proxy"):
        directory.mkdir(parents=True)
    token = "cpt-unit-" + "k" * 24
    (cred / "proxy-token").write_text(token + "\n")
    (cred / "backend-key").write_text("backend-key-for-the-scripted-fixture\n")
    d, a = write_artifacts(tmp_path)
    env = {"PATH": "/usr/bin:/bin", **unit_environment({"d": str(cred), "S": str(state), "t": str(run)}),
           # What /etc/case-proxy/case-proxy.env holds.
           "CTO_HARNESS_CASE_LOCAL_BASE_URL": scripted_backend.base_url,
           "CTO_HARNESS_CASE_DECISION_FILE": str(d), "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a)}
    env["CASE_PROXY_WORKERS"] = workers  # as a drop-in would
    proxy = ProxyProcess(env, tmp_path / "proxy.log")
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.base_url + "/models", headers={"Authorization": f"Bearer {token}"}) as ok:
                assert ok.status == 200, await ok.text()
            async with session.get(proxy.base_url + "/models") as refused:
                assert refused.status == 401
        metrics_dirs = list((run / "case-proxy").glob("case-proxy-metrics-*"))
        assert len(metrics_dirs) == (1 if workers == "2" else 0), metrics_dirs
    finally:
        stopped = proxy.stop()
    assert stopped == 0
    chains = ["evidence.jsonl"] if workers == "1" else ["evidence.worker0.jsonl", "evidence.worker1.jsonl"]
    for name in chains:
        assert (state / "case-proxy" / name).stat().st_size > 0, name
    assert token not in (tmp_path / "proxy.log").read_text()
