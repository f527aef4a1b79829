"""The benchmark's five scenarios.

Each scenario starts what it needs on 127.0.0.1, interleaves its rounds across the
things it compares (so drift on a shared machine hits all of them alike), and returns
raw per-round figures plus medians with their spread. Every comparison is computed per
round from figures taken in this run, then summarised: nothing is compared with a number
from another run or another machine.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .baseline import PACED_POINT, SPREAD_POINT, Baseline, paced_key, spread_key
from .loads import chat_body, measured_wrk, run_streams, run_wrk, write_body
from .procs import (
    Proc,
    litellm_available,
    peak_rss_mb,
    start_litellm,
    start_nginx,
    start_nginx_proxy,
    start_proxy,
    start_sse_backend,
)
from .stats import WrkResult, added, ratio, stream_stretch, summarize

Log = Callable[[str], None]
# The reference beside the proxy in scenarios 1 and 2: nginx as a plain reverse proxy
# (bench/nginx-proxy.conf.template), what any relay adds on this machine.
NGINX_PROXY = "nginx_proxy"


@dataclass
class BenchSettings:
    quick: bool = False
    rounds: int = 3
    duration_s: float = 5.0
    concurrencies: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    stream_counts: list[int] = field(default_factory=lambda: [100, 1000])
    # Extra points (streams, seconds over which they open): the 1,000 streams of the issue
    # opened over 2 s overload one worker on these machines, so that tail measures
    # queueing; the same streams opened over 5 s are a load one worker carries.
    stream_spread: list[tuple[int, float]] = field(default_factory=lambda: [SPREAD_POINT])
    stream_chunks: int = 200
    stream_delay_ms: float = 5.0
    # Extra points at a model's pace (streams, events per stream, ms between events): 200
    # events a second per stream saturates one worker at 1,000 streams; a model serving
    # 1,000 streams sends each about 50 tokens a second.
    stream_paced: list[tuple[int, int, float]] = field(default_factory=lambda: [PACED_POINT])
    body_sizes: list[int] = field(default_factory=lambda: [256 * 1024, 1024 * 1024, 8 * 1024 * 1024])
    litellm: bool = True
    core_concurrencies: list[int] = field(default_factory=lambda: [64, 256])

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        """A few minutes instead of half an hour; same scenarios, fewer points."""
        return cls(quick=True, rounds=2, duration_s=2.0, concurrencies=[1, 64], stream_counts=[100],
                   stream_spread=[], stream_paced=[], body_sizes=[1024 * 1024], core_concurrencies=[64])


def _wrk_row(res: WrkResult, cpu_s: float) -> dict[str, Any]:
    return {"rps": res.rps, "p50_us": res.p50_us, "p90_us": res.p90_us, "p99_us": res.p99_us,
            "requests": res.requests, "errors": res.errors, "cpu_s": cpu_s,
            "cpu_us_per_request": cpu_s / res.requests * 1e6 if res.requests else math.nan}


def _summaries(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_us", "p90_us", "p99_us", "cpu_us_per_request")
    out = {k: summarize(r[k] for r in rows).to_dict() for k in keys}
    out["errors"] = sum(sum(r["errors"].values()) for r in rows)
    out["requests"] = sum(r["requests"] for r in rows)
    return out


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str,
            op: Callable[[float, float], float]) -> dict[str, Any]:
    return summarize(op(x[key], y[key]) for x, y in zip(a, b, strict=True)).to_dict()


def round_order(names: list[str], rnd: int, swap: tuple[str, str] | None) -> list[str]:
    """The order targets run in round ``rnd``: as listed, except that the two named in
    ``swap`` (the proxy and its baseline) trade places every other round, so neither
    always runs right after the same neighbour or always first on a drifting machine."""
    order = list(names)
    if swap and rnd % 2 == 1 and swap[0] in order and swap[1] in order:
        i, j = order.index(swap[0]), order.index(swap[1])
        order[i], order[j] = order[j], order[i]
    return order


class Bench:
    """Owns every process it starts and stops them all, whatever happens."""

    def __init__(self, tmp: Path, settings: BenchSettings, log: Log, baseline: Baseline | None = None) -> None:
        self.tmp, self.s, self.log = tmp, settings, log
        # An earlier commit's proxy, one more target in scenarios 1 and 2 (bench.baseline).
        self.baseline = baseline
        self.token = secrets.token_urlsafe(24)
        self._procs: list[Proc] = []
        self._nginx: Proc | None = None

    def keep(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def release(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()

    @property
    def nginx(self) -> Proc:
        if self._nginx is None:
            self._nginx = self.keep(start_nginx(self.tmp))
        return self._nginx

    def proxy(self, name: str, backend_url: str, **kw: Any) -> Proc:
        return self.keep(start_proxy(self.tmp, name, backend_url, self.token, **kw))

    def baseline_proxy(self, name: str, backend_url: str, **kw: Any) -> Proc | None:
        """The baseline's proxy beside this one (same settings), or None without a baseline."""
        if self.baseline is None:
            return None
        return self.proxy(f"{name}-baseline", backend_url, code_root=self.baseline.root, **kw)

    @property
    def _swap(self) -> tuple[str, str] | None:
        return None if self.baseline is None else ("proxy", self.baseline.name)

    # Scenario 1 -----------------------------------------------------------------------
    def nonstreaming(self) -> dict[str, Any]:
        nginx = self.nginx
        proxy = self.proxy("proxy-s1", nginx.url)
        floor = self.keep(start_nginx_proxy(self.tmp, "nginx-proxy-s1", nginx))
        targets: dict[str, tuple[Proc, str, str | None]] = {
            "direct": (nginx, nginx.url + "/chat/completions", None),
            "proxy": (proxy, proxy.url + "/chat/completions", self.token),
            NGINX_PROXY: (floor, floor.url + "/chat/completions", None),
        }
        before = self.baseline_proxy("proxy-s1", nginx.url)
        if before is not None and self.baseline is not None:
            targets[self.baseline.name] = (before, before.url + "/chat/completions", self.token)
        notes: list[str] = []
        litellm_key = secrets.token_urlsafe(24)
        if not self.s.litellm:
            notes.append("LiteLLM not measured: skipped by --skip-litellm")
        elif not litellm_available():
            notes.append("LiteLLM not measured: .cache/litellm-venv is missing (scripts/install-bench-deps.sh)")
        else:
            try:
                lite = self.keep(start_litellm(self.tmp, nginx.url, litellm_key))
                targets["litellm"] = (lite, lite.url + "/chat/completions", litellm_key)
            except RuntimeError as exc:
                notes.append(f"LiteLLM not measured: it did not start ({str(exc).splitlines()[0]})")
        body = write_body(self.tmp, "small.json", chat_body("Say hello in one short sentence."))
        for name, (_, url, tok) in targets.items():
            run_wrk(url, body, 16, 1, tok)  # warm-up, not recorded
            self.log(f"  warmed up {name}")
        by_conc: dict[str, Any] = {}
        for conc in self.s.concurrencies:
            rows: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for rnd in range(self.s.rounds):
                for name in round_order(list(targets), rnd, self._swap):
                    proc, url, tok = targets[name]
                    res, cpu = measured_wrk(proc, url, body, conc, self.s.duration_s, tok)
                    rows[name].append(_wrk_row(res, cpu))
                self.log(f"  c={conc} round {rnd + 1}: " + ", ".join(
                    f"{n} {rows[n][-1]['rps']:,.0f} rps p50 {rows[n][-1]['p50_us']:,.0f} us" for n in rows))
            entry: dict[str, Any] = {"rounds": rows, "summary": {n: _summaries(r) for n, r in rows.items()},
                                     "proxy_rps_over_direct": _paired(rows["proxy"], rows["direct"], "rps", ratio)}
            for via in ("proxy", NGINX_PROXY):  # proxy_added_p50_us, nginx_proxy_added_p99_us, ...
                for q in ("p50_us", "p99_us"):
                    entry[f"{via}_added_{q}"] = _paired(rows[via], rows["direct"], q, added)
            if self.baseline is not None:
                entry["added_p50_per_round"] = {
                    via: [added(r["p50_us"], d["p50_us"]) for r, d in zip(rows[via], rows["direct"], strict=True)]
                    for via in ("proxy", self.baseline.name)}
                entry["baseline_added_p50_us"] = summarize(entry["added_p50_per_round"][self.baseline.name]).to_dict()
            if "litellm" in rows:
                entry["proxy_rps_over_litellm"] = _paired(rows["proxy"], rows["litellm"], "rps", ratio)
                entry["litellm_added_p50_us"] = _paired(rows["litellm"], rows["direct"], "p50_us", added)
            by_conc[str(conc)] = entry
        for name in list(targets):
            if name != "direct":
                self.release(targets[name][0])
        return {"targets": list(targets), "notes": notes, "by_concurrency": by_conc}

    # Scenario 2 -----------------------------------------------------------------------
    def streaming(self) -> dict[str, Any]:
        chunks, delay = self.s.stream_chunks, self.s.stream_delay_ms
        body = write_body(self.tmp, "stream.json", chat_body("Stream a long answer.", stream=True))
        backend_name = ("bench.sse_backend (a bench fixture: canned SSE events on an absolute schedule, "
                        "raw asyncio on uvloop)")
        out: dict[str, Any] = {"chunks_per_stream": chunks, "chunk_delay_ms": delay, "backend": backend_name,
                               "by_streams": {}}
        points = [(str(n), n, min(2.0, n / 500), chunks, delay) for n in self.s.stream_counts]
        points += [(spread_key(n, ramp), n, ramp, chunks, delay) for n, ramp in self.s.stream_spread]
        points += [(paced_key(n, d), n, min(2.0, n / 500), c, d) for n, c, d in self.s.stream_paced]
        for key, n, ramp, chunks, delay in points:
            min_s = chunks * delay / 1000
            tag = f"{n}-{ramp:g}" if delay == self.s.stream_delay_ms else f"{n}-{ramp:g}-{delay:g}ms"
            backend = self.keep(start_sse_backend(self.tmp, chunks, delay))
            proxy = self.proxy(f"proxy-s2-{tag}", backend.url, max_concurrency=max(4096, 2 * n))
            floor = self.keep(start_nginx_proxy(self.tmp, f"nginx-proxy-s2-{tag}", backend))
            before = self.baseline_proxy(f"proxy-s2-{tag}", backend.url, max_concurrency=max(4096, 2 * n))
            timeout = min_s * 20 + 60
            vias: dict[str, tuple[Proc, str | None]] = {"proxy": (proxy, self.token), NGINX_PROXY: (floor, None)}
            if before is not None and self.baseline is not None:
                vias[self.baseline.name] = (before, self.token)
            rows: dict[str, list[dict[str, Any]]] = {"direct": [], **{name: [] for name in vias}}
            for rnd in range(self.s.rounds):
                rows["direct"].append(run_streams(backend.url + "/chat/completions", n, body, None, ramp, timeout))
                for name in round_order(list(vias), rnd, self._swap):
                    proc, token = vias[name]
                    cpu0 = proc.cpu()
                    via = run_streams(proc.url + "/chat/completions", n, body, token, ramp, timeout)
                    via["proxy_cpu_s"] = cpu = proc.cpu() - cpu0
                    via["proxy_cpu_s_per_10k_chunks"] = cpu / via["events"] * 10_000 if via["events"] else math.nan
                    rows[name].append(via)
                self.log(f"  {n} streams round {rnd + 1}: direct gap p99 {_us(rows['direct'][-1], 'gap_us', '99')}, "
                         f"proxy {_us(rows['proxy'][-1], 'gap_us', '99')}, "
                         f"nginx proxy {_us(rows[NGINX_PROXY][-1], 'gap_us', '99')}, "
                         + "".join(f"{b} {_us(rows[b][-1], 'gap_us', '99')}, " for b in vias if b.startswith("proxy@"))
                         + f"completed {rows['proxy'][-1]['completed']}/{n}")
            rss = peak_rss_mb(proxy.pid)
            if before is not None:
                self.release(before)
            self.release(floor)
            self.release(proxy)
            self.release(backend)

            def pick(r: dict[str, Any], group: str, q: str) -> float:
                v = r[group].get(q)
                return math.nan if v is None else float(v)

            entry: dict[str, Any] = {"rounds": rows, "proxy_peak_rss_mb": rss}
            for group, q in (("ttft_us", "50"), ("ttft_us", "99"), ("gap_us", "50"), ("gap_us", "99")):
                entry[f"direct_{group}_p{q}"] = summarize(pick(r, group, q) for r in rows["direct"]).to_dict()
                entry[f"proxy_{group}_p{q}"] = summarize(pick(r, group, q) for r in rows["proxy"]).to_dict()
                for prefix, via in (("", "proxy"), ("nginx_proxy_", NGINX_PROXY)):
                    entry[f"{prefix}added_{group}_p{q}"] = summarize(
                        added(pick(p, group, q), pick(d, group, q)) for p, d in zip(rows[via], rows["direct"],
                                                                                      strict=True)).to_dict()
            for name, via in (("proxy_cpu_s_per_10k_chunks", "proxy"),
                              ("nginx_proxy_cpu_s_per_10k_chunks", NGINX_PROXY)):
                entry[name] = summarize(r["proxy_cpu_s_per_10k_chunks"] for r in rows[via]).to_dict()
            entry["direct_stretch"] = summarize(
                stream_stretch(r, min_s) for r in rows["direct"]).to_dict()
            if self.baseline is not None:
                entry["added_gap_p99_per_round"] = {
                    via: [added(pick(p, "gap_us", "99"), pick(d, "gap_us", "99"))
                          for p, d in zip(rows[via], rows["direct"], strict=True)]
                    for via in ("proxy", self.baseline.name)}
                entry["baseline_added_gap_us_p99"] = summarize(
                    entry["added_gap_p99_per_round"][self.baseline.name]).to_dict()
            entry["completed"] = {k: [r["completed"] for r in v] for k, v in rows.items()}
            entry["streams"], entry["opened_over_s"] = n, ramp
            entry["chunks_per_stream"], entry["chunk_delay_ms"] = chunks, delay
            out["by_streams"][key] = entry
        return out

    # Scenario 3 -----------------------------------------------------------------------
    def large_bodies(self) -> dict[str, Any]:
        nginx = self.nginx
        body_url = str(nginx.extra["body_url"])
        proxy = self.proxy("proxy-s3", body_url)
        out: dict[str, Any] = {"backend": "nginx reading the whole body before answering", "by_size": {}}
        for size in self.s.body_sizes:
            body = write_body(self.tmp, f"body-{size}.json", chat_body("x" * size))
            rows: dict[str, list[dict[str, Any]]] = {"direct": [], "proxy": []}
            for _ in range(self.s.rounds):
                res, cpu = measured_wrk(nginx, body_url + "/chat/completions", body, 1, self.s.duration_s, None)
                rows["direct"].append(_wrk_row(res, cpu))
                res, cpu = measured_wrk(proxy, proxy.url + "/chat/completions", body, 1, self.s.duration_s, self.token)
                rows["proxy"].append(_wrk_row(res, cpu))
            out["by_size"][str(size)] = {
                "rounds": rows, "summary": {n: _summaries(r) for n, r in rows.items()},
                "proxy_added_p50_us": _paired(rows["proxy"], rows["direct"], "p50_us", added),
                "proxy_added_p99_us": _paired(rows["proxy"], rows["direct"], "p99_us", added)}
            self.log(f"  {size // 1024} KiB: added p50 "
                     f"{out['by_size'][str(size)]['proxy_added_p50_us']['median']:,.0f} us")
        self.release(proxy)
        return out

    # Scenario 4 -----------------------------------------------------------------------
    def proof_cost(self) -> dict[str, Any]:
        """Proof on against proof off, loaded at the same time (half the connections each):
        these machines' speed drifts by more than the difference within a minute, and a
        drift hits two proxies measured over the same seconds alike. Measured both ways on
        the AMD VM (9 rounds each): alternating rounds gave shares from -8 to 17 %,
        simultaneous ones 9 to 20 % (standard deviation 7.6 against 3.1 points)."""
        nginx = self.nginx
        on = self.proxy("proxy-s4-on", nginx.url)
        off = self.proxy("proxy-s4-off", nginx.url, metrics=False, evidence=False)
        body = write_body(self.tmp, "small4.json", chat_body("Say hello in one short sentence."))
        conc = 64
        rows: dict[str, list[dict[str, Any]]] = {"proof_on": [], "proof_off": []}
        for proc, _ in ((on, "on"), (off, "off")):
            run_wrk(proc.url + "/chat/completions", body, 16, 1, self.token)
        rounds, duration_s = max(self.s.rounds, 9), min(self.s.duration_s, 3.0)
        with ThreadPoolExecutor(2) as pool:
            for _ in range(rounds):
                runs = {name: pool.submit(measured_wrk, proc, proc.url + "/chat/completions", body, conc // 2,
                                          duration_s, self.token)
                        for proc, name in ((on, "proof_on"), (off, "proof_off"))}
                for name, run in runs.items():
                    rows[name].append(_wrk_row(*run.result()))
        self.release(on)
        self.release(off)
        share = summarize(1 - ratio(o["cpu_us_per_request"], p["cpu_us_per_request"])
                          for p, o in zip(rows["proof_on"], rows["proof_off"], strict=True))
        return {"connections": conc, "connections_each": conc // 2, "simultaneous": True, "round_count": rounds,
                "duration_s": duration_s, "rounds": rows,
                "summary": {n: _summaries(r) for n, r in rows.items()},
                "proof_share_of_proxy_cpu": share.to_dict(),
                "rps_off_over_on": _paired(rows["proof_off"], rows["proof_on"], "rps", ratio)}

    # Scenario 5 -----------------------------------------------------------------------
    def cores(self) -> dict[str, Any]:
        """One worker against one worker per core (SO_REUSEPORT), same load, rounds
        interleaved. wrk and nginx run on the same cores, so the scaling seen here is a
        floor: on a machine with cores to spare for the load, it is higher."""
        nginx = self.nginx
        cores = os.cpu_count() or 1
        counts = sorted({1, cores})
        procs = {n: self.proxy(f"proxy-s5-w{n}", nginx.url, workers=n) for n in counts}
        body = write_body(self.tmp, "small5.json", chat_body("Say hello in one short sentence."))
        for proc in procs.values():
            run_wrk(proc.url + "/chat/completions", body, 16, 1, self.token)
        by_conc: dict[str, Any] = {}
        for conc in self.s.core_concurrencies:
            rows: dict[str, list[dict[str, Any]]] = {f"workers_{n}": [] for n in counts}
            for rnd in range(self.s.rounds):
                for n, proc in procs.items():
                    res, cpu = measured_wrk(proc, proc.url + "/chat/completions", body, conc, self.s.duration_s,
                                            self.token)
                    rows[f"workers_{n}"].append(_wrk_row(res, cpu))
                self.log(f"  c={conc} round {rnd + 1}: " + ", ".join(
                    f"{k} {v[-1]['rps']:,.0f} rps p99 {v[-1]['p99_us']:,.0f} us" for k, v in rows.items()))
            entry: dict[str, Any] = {"rounds": rows, "summary": {k: _summaries(v) for k, v in rows.items()}}
            if cores > 1:
                entry["rps_per_core_over_one"] = _paired(rows[f"workers_{cores}"], rows["workers_1"], "rps", ratio)
            by_conc[str(conc)] = entry
        for proc in procs.values():
            self.release(proc)
        return {"measured": True, "cores": cores, "worker_counts": counts, "by_concurrency": by_conc,
                "note": "wrk (2 threads) and nginx share these cores with the proxy workers"}


def _us(row: dict[str, Any], group: str, q: str) -> str:
    v = row.get(group, {}).get(q)
    return "n/a" if v is None else f"{v:,.0f} us"
