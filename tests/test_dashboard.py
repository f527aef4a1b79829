"""The Grafana dashboard (config/grafana/case-proxy.json): every panel's query returns data
from a real Prometheus scraping a running proxy, so a renamed metric breaks the build.

The proxy runs in front of the scripted backend (harness.scripted_backend, a test
fixture, not a model). Prometheus is the Debian package (`make system-deps`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.proxy_support import ADMITTED, make_proxy  # noqa: F401

pytestmark = pytest.mark.prometheus
CONFIG = Path(__file__).resolve().parent.parent / "config"
DASHBOARD = CONFIG / "grafana" / "case-proxy.json"
JOB = "case-proxy"
# What Grafana would put in place of the dashboard's variables for this test's Prometheus.
VARIABLES = {"$__rate_interval": "10s", "$__range": "5m", "$job": JOB}


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL with the variables filled in) for every target."""
    out = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def test_dashboard_is_well_formed() -> None:
    """Valid JSON, unique panel ids, every panel on the data-source variable with at least
    one query, and no variable the test would not fill in (it would hide a query)."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] == "case-proxy" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job"}
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for title, expr in panel_queries():
        assert "$" not in expr, f"{title}: unfilled variable in {expr}"
    # The list of what the dashboard shows, each by the metric behind it.
    text = DASHBOARD.read_text(encoding="utf-8")
    for metric in ("case_proxy_requests_total", "case_proxy_fallback_rejections_total",
                   "case_proxy_served_model_mismatches_total", "case_proxy_backend_ready",
                   "case_proxy_request_duration_seconds_bucket", "case_proxy_time_to_first_token_seconds_bucket",
                   "case_proxy_tokens_total", "case_proxy_in_flight_requests",
                   "case_proxy_evidence_write_failures_total", "case_proxy_admission_info"):
        assert metric in text, metric


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian package prometheus)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _traffic(client: openai.AsyncOpenAI) -> None:
    """One round of what the panels show: an answer, a stream (time to first token), a refusal."""
    messages = [{"role": "user", "content": "x"}]
    await client.chat.completions.create(model=ADMITTED, messages=messages)
    stream = await client.chat.completions.create(model=ADMITTED, messages=messages, stream=True)
    async for _ in stream:
        pass
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="claude-sonnet-4-6", messages=messages)


async def _query(s: aiohttp.ClientSession, api: str, expr: str) -> list[dict[str, Any]] | None:
    """The instant-query result, or None if Prometheus is not answering yet. A query
    Prometheus rejects (bad PromQL) fails the test at once."""
    try:
        async with s.get(api + "/query", params={"query": expr}) as r:
            body = await r.json()
    except (aiohttp.ClientError, ValueError):
        return None
    assert body.get("status") == "success", f"Prometheus rejected {expr}: {body.get('error')}"
    return body["data"]["result"]


def _has_data(result: list[dict[str, Any]] | None) -> bool:
    """At least one series with a number (a quantile over no traffic is NaN: no data)."""
    return bool(result) and any(not math.isnan(float(series["value"][1])) for series in result)


async def test_every_panel_returns_data_from_real_prometheus(make_proxy, tmp_path: Path) -> None:  # noqa: F811
    proxy = await make_proxy()
    client = proxy.client()
    await _traffic(client)
    config = (CONFIG / "prometheus.yml").read_text()
    assert f"job_name: {JOB}" in config  # the dashboard's job variable finds the shipped scrape job
    config = config.replace("127.0.0.1:8787", f"127.0.0.1:{proxy.running.port}").replace(
        "scrape_interval: 15s", "scrape_interval: 1s").replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    config = re.sub(r"rule_files:\n(  - .*\n)+", "", config)  # the rules are test_prometheus's business
    (tmp_path / "prometheus.yml").write_text(config)
    port = _free_port()
    with open(tmp_path / "prometheus.log", "w") as log:
        server = subprocess.Popen([
            _tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
        ], stdout=log, stderr=log)  # the child keeps its own descriptor
    api = f"http://127.0.0.1:{port}/api/v1"
    queries = panel_queries()
    empty: list[str] = [title for title, _ in queries]
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(120):  # bounded: about 60 s of traffic and scrapes
                await _traffic(client)
                await asyncio.sleep(0.5)
                empty = [title for title, expr in queries if not _has_data(await _query(s, api, expr))]
                if not empty:
                    break
            # Negative control: the same check on a renamed metric finds no data.
            original = next(expr for _, expr in queries if "case_proxy_requests_total" in expr)
            renamed = original.replace("case_proxy_requests_total", "case_proxy_requests_renamed_total")
            assert not _has_data(await _query(s, api, renamed))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    assert empty == [], f"panels without data: {empty}; " + (tmp_path / "prometheus.log").read_text()[-1500:]
