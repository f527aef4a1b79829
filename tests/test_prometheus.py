"""A real Prometheus server and promtool (Debian package, installed by `make system-deps`).

The proxy runs in front of the scripted backend (a test fixture, not a model).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.proxy_support import ADMITTED, make_proxy  # noqa: F401

pytestmark = pytest.mark.prometheus
CONFIG = Path(__file__).resolve().parent.parent / "config"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian package prometheus)")
    return path


def promtool(*args: str, cwd: Path = CONFIG, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60)


def test_shipped_config_and_rules_pass_promtool() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                 ("test", "rules", "alerts.test.yml")):
        out = promtool(*args)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_checks_can_fail(tmp_path: Path) -> None:
    """Negative controls: the same checks reject broken copies, so a pass above means something."""
    (tmp_path / "alerts.yml").write_text((CONFIG / "alerts.yml").read_text().replace(
        "increase(case_proxy_fallback_rejections_total[5m]) > 0", "increase(case_proxy_fallback_rejections_total[5m] > 0"))
    assert promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode != 0
    # A rule that never fires makes the shipped unit tests fail.
    (tmp_path / "alerts.yml").write_text((CONFIG / "alerts.yml").read_text().replace(
        "increase(case_proxy_fallback_rejections_total[5m]) > 0", "increase(case_proxy_fallback_rejections_total[5m]) > 100"))
    shutil.copy(CONFIG / "alerts.test.yml", tmp_path / "alerts.test.yml")
    assert promtool("test", "rules", "alerts.test.yml", cwd=tmp_path).returncode != 0
    (tmp_path / "prometheus.yml").write_text("scrape_configs:\n  - job_name: x\n    scrape_interval: soon\n")
    assert promtool("check", "config", "prometheus.yml", cwd=tmp_path).returncode != 0
    assert promtool("check", "metrics", stdin="case_proxy_bad{le=\"x\" 1\n").returncode != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_real_prometheus_scrapes_the_fallback_counter(make_proxy, tmp_path: Path) -> None:  # noqa: F811
    proxy = await make_proxy()
    client = proxy.client()
    await client.chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])

    target = f"127.0.0.1:{proxy.running.port}"
    config = (CONFIG / "prometheus.yml").read_text().replace("127.0.0.1:8787", target).replace(
        "scrape_interval: 15s", "scrape_interval: 1s").replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(CONFIG / "alerts.yml", tmp_path / "alerts.yml")
    port = _free_port()
    log = open(tmp_path / "prometheus.log", "w")
    server = subprocess.Popen([
        tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
    ], stdout=log, stderr=log)
    api = f"http://127.0.0.1:{port}/api/v1"
    query = 'case_proxy_fallback_rejections_total{reason="model_not_admitted",family="anthropic"}'
    try:
        value = None
        alerts: list[dict] = []
        rules: list[str] = []
        async with aiohttp.ClientSession() as s:
            # The series exists at 0 before any refusal (pre-created), as in production.
            for _ in range(120):  # bounded: about 30 s
                await asyncio.sleep(0.25)
                try:
                    async with s.get(api + "/query", params={"query": query}) as r:
                        result = (await r.json())["data"]["result"]
                except (aiohttp.ClientError, KeyError):
                    continue
                if result:
                    assert float(result[0]["value"][1]) == 0
                    break
            else:
                pytest.fail("Prometheus never scraped the proxy: " + (tmp_path / "prometheus.log").read_text()[-2000:])
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="claude-sonnet-4-6",
                                                     messages=[{"role": "user", "content": "x"}])
            async with s.get(proxy.root_url + "/metrics") as r:
                exposition = await r.text()
            check = promtool("check", "metrics", stdin=exposition)
            assert check.returncode == 0, check.stdout + check.stderr
            for _ in range(120):  # bounded: about 30 s
                await asyncio.sleep(0.25)
                try:
                    async with s.get(api + "/query", params={"query": query}) as r:
                        result = (await r.json())["data"]["result"]
                    async with s.get(api + "/alerts") as r:
                        alerts = (await r.json())["data"]["alerts"]
                    async with s.get(api + "/rules") as r:
                        rules = [rule["name"] for g in (await r.json())["data"]["groups"] for rule in g["rules"]]
                except (aiohttp.ClientError, KeyError):
                    continue
                if result:
                    value = float(result[0]["value"][1])
                if value == 1 and any(a["labels"]["alertname"] == "CaseProxyFallbackRejected" for a in alerts):
                    break
        assert value == 1, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert "CaseProxyFallbackRejected" in rules and "CaseProxyServedModelMismatch" in rules
        fired = [a for a in alerts if a["labels"]["alertname"] == "CaseProxyFallbackRejected"]
        assert fired and fired[0]["labels"]["family"] == "anthropic"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
