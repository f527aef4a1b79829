"""The benchmark's pure parts: parsing wrk and /proc, summaries, targets, the written
results. Nothing here times anything (speed lives in `python -m bench`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from bench.procs import _render_nginx, _wait_line, code_version, free_port, wait_port
from bench.report import evaluate_targets, json_clean, render_markdown, write_results
from bench.stats import (
    added,
    parse_wrk,
    parse_wrk_text,
    percentile,
    proc_cpu_seconds,
    proc_status_kb,
    ratio,
    stream_stretch,
    summarize,
)

WRK_TEXT = """Running 2s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   9.50ms   90.00%
  Latency Distribution
     50%    1.10ms
     75%    1.30ms
     90%  650.00us
     99%    2.50ms
  8000 requests in 2.00s, 1.20MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:   4000.00
"""


def test_parse_wrk_prefers_the_exact_json_line() -> None:
    line = ('WRK_JSON {"requests":100,"duration_us":2000000,"bytes":1,"errors":{"connect":0,"read":0,"write":0,'
            '"status":2,"timeout":0},"latency_us":{"min":10,"max":900,"mean":50.5,"stdev":3.0,"p50":40,"p75":45,'
            '"p90":60,"p99":300,"p999":800}}')
    res = parse_wrk(WRK_TEXT + line + "\n")
    assert (res.requests, res.rps, res.p50_us, res.p99_us, res.errors) == (100, 50.0, 40.0, 300.0, {"status": 2})


def test_parse_wrk_text_units_and_errors() -> None:
    res = parse_wrk_text(WRK_TEXT)
    assert (res.p50_us, res.p90_us, res.p99_us) == (1100.0, 650.0, 2500.0)
    assert (res.requests, res.duration_s, res.rps, res.max_us) == (8000, 2.0, 4000.0, 9500.0)
    assert res.errors == {"read": 3, "timeout": 1} and res.error_count == 4
    with pytest.raises(ValueError):
        parse_wrk_text("wrk: connection refused")


def test_summaries_ratios_and_missing_values() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5 and percentile([7], 99) == 7.0 and math.isnan(percentile([], 50))
    s = summarize([3.0, None, float("nan"), 1.0, 2.0])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert summarize([]).to_dict() == {"median": None, "min": None, "max": None, "rounds": 0}
    assert ratio(10, 4) == 2.5 and math.isnan(ratio(1, 0)) and math.isnan(ratio(None, 1))
    assert added(5, 3) == 2 and math.isnan(added(float("nan"), 1))


def test_proc_parsing_survives_odd_command_names() -> None:
    stat = "4242 (python -m (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0"
    assert proc_cpu_seconds(stat, 100) == 3.0
    assert proc_status_kb("Name:\tx\nVmHWM:\t  51200 kB\nVmRSS:\t 1024 kB\n", "VmHWM") == 51200
    assert proc_status_kb("Name:\tx\n", "VmHWM") is None


def _same(v: float, rounds: int = 1) -> dict:
    """A summary (see bench.stats.summarize) of rounds that all measured ``v``."""
    return {"median": v, "min": v, "max": v, "rounds": rounds}


def _results(c1_added: float, rps64: float, litellm_ratio: float | None) -> dict:
    c64: dict = {"summary": {"proxy": {"rps": {"median": rps64}}}}
    if litellm_ratio is not None:
        c64["proxy_rps_over_litellm"] = _same(litellm_ratio)
    return {
        "schema_version": 1,
        "machine": {"date_utc": "2026-11-24 00:00 UTC", "nproc": 2, "cpu_model": "test", "memory_gb": 1,
                    "os": "test", "kernel": "0", "python": "3.11", "aiohttp": "3", "nginx": "nginx", "wrk": "wrk"},
        "settings": {"quick": True, "rounds": 1, "duration_s": 1.0},
        "scenario1": {"notes": [], "by_concurrency": {
            "1": {"proxy_added_p50_us": {"median": c1_added}, "proxy_added_p99_us": {"median": float("nan")}},
            "64": c64}},
        "scenario4": {"proof_share_of_proxy_cpu": {"median": 0.25}},
        "scenario5": {"measured": False, "reason": "no multi-worker mode"},
    }


def test_targets_are_judged_on_this_runs_figures_only() -> None:
    by_name = {t["target"].split(":")[-1].strip(): t for t in evaluate_targets(_results(250.0, 3000.0, 45.0))}
    assert by_name["added latency p50 <= 0.3 ms"]["met"] is True
    assert by_name["added latency p99 <= 1.5 ms"]["met"] is None  # NaN: not measured, never "met"
    assert by_name["throughput >= 40x LiteLLM's"]["met"] is True
    assert by_name[">= 4,000 requests/s with one worker"]["met"] is False
    assert by_name["evidence and metrics <= 10% of proxy CPU"]["met"] is False
    assert by_name["evidence and metrics <= 10% of proxy CPU"]["value"] == 25.0
    no_litellm = {t["target"]: t for t in evaluate_targets(_results(400.0, 5000.0, None))}
    assert no_litellm["non-streaming, 64 connections: throughput >= 40x LiteLLM's"]["met"] is None
    assert no_litellm["non-streaming, 1 connection: added latency p50 <= 0.3 ms"]["met"] is False


def test_targets_carry_the_nginx_reference_where_the_run_measured_one() -> None:
    results = _results(250.0, 5000.0, 45.0)
    results["scenario1"]["by_concurrency"]["1"]["nginx_proxy_added_p50_us"] = {"median": 41.0}
    results["targets"] = targets = evaluate_targets(results)
    by_name = {t["target"]: t for t in targets}
    assert by_name["non-streaming, 1 connection: added latency p50 <= 0.3 ms"]["reference"] == 41.0
    assert by_name["non-streaming, 1 connection: added latency p99 <= 1.5 ms"]["reference"] is None
    del results["scenario1"], results["scenario4"]
    text = render_markdown(results)
    assert "| non-streaming, 1 connection: added latency p50 <= 0.3 ms | 250 µs | 41 µs | yes |" in text
    assert "| non-streaming, 1 connection: added latency p99 <= 1.5 ms | not measured" in text
    assert "| 25.0 % | - | **no** |" in text  # no reference for the proof share


def test_nginx_configs_are_rendered_whole_and_listen_on_loopback_only(tmp_path: Path) -> None:
    conf = _render_nginx("nginx-proxy.conf.template", tmp_path, {"PORT": "18001", "UPSTREAM_PORT": "18002"})
    text = conf.read_text()
    assert "@@" not in text and f"pid {tmp_path}/nginx.pid;" in text
    assert "server 127.0.0.1:18002;" in text and "listen 127.0.0.1:18001 backlog=4096;" in text
    assert "proxy_buffering off;" in text  # streams pass through as they arrive
    listens = [line.split()[1] for line in text.splitlines() if line.strip().startswith("listen ")]
    assert listens and all(a.startswith("127.0.0.1:") for a in listens)
    with pytest.raises(RuntimeError, match="placeholder @@UPSTREAM_PORT@@ left unfilled"):
        _render_nginx("nginx-proxy.conf.template", tmp_path, {"PORT": "18001"})


def test_stream_section_sets_the_proxy_beside_nginx_as_a_reverse_proxy() -> None:
    entry = {f"{who}_{g}_p{q}": _same(5000.0) for who in ("direct", "proxy") for g in ("ttft_us", "gap_us")
             for q in ("50", "99")}
    entry.update(added_ttft_us_p50=_same(800.0), added_gap_us_p99=_same(4760.0),
                 proxy_cpu_s_per_10k_chunks=_same(0.27), nginx_proxy_added_ttft_us_p50=_same(150.0),
                 nginx_proxy_added_gap_us_p99=_same(12_500.0), nginx_proxy_cpu_s_per_10k_chunks=_same(0.085),
                 proxy_peak_rss_mb=59.0, direct_stretch=_same(1.06),
                 completed={"direct": [1000], "proxy": [1000], "nginx_proxy": [999]})
    results = _results(250.0, 3000.0, None)
    del results["scenario1"], results["scenario4"]
    results["targets"] = []
    results["scenario2"] = {"chunks_per_stream": 200, "chunk_delay_ms": 5.0, "backend": "canned",
                            "by_streams": {"1000": entry}}
    text = render_markdown(results)
    assert "| 1000 | 800 µs / 150 µs | 4.76 ms / 12.50 ms | 0.27 s / 0.09 s | [999] |" in text


def _stream_point(added_p99_us: float, direct_p50_s: list[float]) -> dict:
    direct = [{"stream_duration_s": {"50": d, "99": d}} for d in direct_p50_s]
    return {"added_gap_us_p99": {"median": added_p99_us},
            "direct_stretch": summarize(stream_stretch(r, 1.0) for r in direct).to_dict()}


def test_a_stream_point_the_machine_cannot_carry_without_the_proxy_says_so_and_still_fails() -> None:
    name = "1,000 concurrent streams: added inter-chunk delay p99 <= 1 ms"
    results = _results(250.0, 5000.0, 45.0)
    results["scenario2"] = {"by_streams": {"1000": _stream_point(17_500.0, [2.4, 2.6, 2.5])}}
    overloaded = {t["target"]: t for t in evaluate_targets(results)}[name]
    assert overloaded["met"] is False and "2.50x their scheduled time" in overloaded["note"]
    results["scenario2"] = {"by_streams": {"1000": _stream_point(17_500.0, [1.01, 1.02, 1.03])}}
    on_schedule = {t["target"]: t for t in evaluate_targets(results)}[name]
    assert on_schedule["met"] is False and "note" not in on_schedule  # the proxy alone is to blame here
    results["scenario2"] = {"by_streams": {"1000": _stream_point(800.0, [1.01])}}
    assert {t["target"]: t for t in evaluate_targets(results)}[name]["met"] is True
    assert math.isnan(stream_stretch({"stream_duration_s": {"50": None}}, 1.0))


def test_results_are_written_whole_and_as_strict_json(tmp_path: Path) -> None:
    results = _results(float("nan"), 3000.0, None)
    results["targets"] = evaluate_targets(results)
    del results["scenario1"], results["scenario4"]  # tables need whole scenario results; targets suffice here
    results["raw"] = {"p50_us": float("nan")}
    js, md = write_results(tmp_path, results)
    data = json.loads(js.read_text())  # NaN became null: strict JSON
    assert data["raw"]["p50_us"] is None and data["targets"][0]["met"] is None
    text = md.read_text()
    assert "| not measured" in text and "Not measured: no multi-worker mode." in text
    assert not list(tmp_path.glob("*.tmp"))
    assert json_clean({"a": [float("inf"), 1.5]}) == {"a": [None, 1.5]}
    assert render_markdown(results) == text


def test_cores_section_shows_each_worker_count_and_the_scaling() -> None:
    def row(rps: float) -> dict:
        one = _same(rps)
        return {"rps": one, "p50_us": dict(one, median=900.0), "p99_us": dict(one, median=2000.0),
                "cpu_us_per_request": dict(one, median=250.0)}

    results = _results(250.0, 3000.0, None)
    del results["scenario1"], results["scenario4"]
    results["targets"] = []
    results["scenario5"] = {"measured": True, "cores": 2, "worker_counts": [1, 2], "note": "wrk shares the cores",
                            "by_concurrency": {"64": {"summary": {"workers_1": row(3000.0), "workers_2": row(5400.0)},
                                                      "rps_per_core_over_one": {"median": 1.8, "min": 1.7,
                                                                                "max": 1.9, "rounds": 2}}}}
    text = render_markdown(results)
    assert "## 5. Cores (one worker against 2, SO_REUSEPORT)" in text
    assert "| 64 | 1 | 3,000 |" in text and "| 64 | 2 | 5,400 |" in text
    assert "At 64 connections, 2 workers serve 1.80x the requests/s of one" in text
    assert "Not measured" not in text


def test_proof_section_says_how_its_share_was_measured() -> None:
    def row(cpu: float) -> dict:
        one = _same(cpu, rounds=9)
        return {"rps": dict(one, median=6000.0), "p50_us": dict(one, median=9000.0), "cpu_us_per_request": one}

    results = _results(250.0, 3000.0, None)
    del results["scenario1"], results["scenario5"]
    results["targets"] = []
    results["scenario4"] = {"connections": 64, "round_count": 9, "duration_s": 3.0,
                            "summary": {"proof_on": row(150.0), "proof_off": row(120.0)},
                            "proof_share_of_proxy_cpu": {"median": 0.2, "min": 0.125, "max": 0.31, "rounds": 9}}
    text = render_markdown(results)
    assert "| proof on | 6,000 | 9.00 ms | 150 µs |" in text
    assert ("Evidence and metrics take 20.0 % of the proxy's CPU per request (median of the per-round shares "
            "over 9 alternating rounds of 3 s; spread 12.5 to 31.0 %).") in text
    results["scenario4"].update(simultaneous=True, connections_each=32)
    assert ("Evidence and metrics take 20.0 % of the proxy's CPU per request (median of the per-round shares "
            "over 9 rounds of 3 s, both proxies loaded at the same time with 32 connections each; spread 12.5 to "
            "31.0 %).") in render_markdown(results)


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def test_results_name_the_commit_they_measured_and_whether_the_tree_differed(tmp_path: Path) -> None:
    """A real git repository: the commit, a change to a tracked file, and the bench's own
    results (rewritten by every run) not counted as a change to the code."""
    assert code_version(tmp_path) == {"commit": None, "modified": None}  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "proxy.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "latest.md").write_text("old\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "c1")
    head = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "bench" / "results" / "latest.md").write_text("new\n")
    (tmp_path / "untracked.txt").write_text("scratch\n")
    assert code_version(tmp_path) == {"commit": head, "modified": False}
    (tmp_path / "proxy.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": head, "modified": True}
    results = _results(250.0, 3000.0, None)
    results["code"] = code_version(tmp_path)
    assert f"Code: commit {head[:12]} (with uncommitted changes to tracked files)." in render_markdown(
        {**results, "targets": [], "scenario1": None, "scenario4": None})


@pytest.mark.parametrize("waiter", ["port", "line"])
def test_a_process_that_never_becomes_ready_is_stopped_not_left_behind(tmp_path: Path, waiter: str) -> None:
    """Bench processes lead their own sessions, so one that never listens (or never prints
    its ready line) would outlive the bench unless the wait stops it."""
    log = tmp_path / "quiet.stdout.log"
    log.write_text("starting\n")
    popen = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with pytest.raises(RuntimeError, match="after"):
            if waiter == "port":
                wait_port(free_port(), 0.3, popen)
            else:
                _wait_line(log, "READY", 0.3, popen)
        assert popen.poll() is not None  # stopped by the waiter
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
