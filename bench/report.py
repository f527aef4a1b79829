"""The bench's outputs: the targets checked against this run's figures, latest.json for
machines and latest.md for people. Pure functions over the results dict."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .baseline import rounds_better_text
from .stats import OVERLOAD_STRETCH, fmt_num, fmt_us


def _median(d: dict[str, Any] | None) -> float:
    if not d or d.get("median") is None:
        return math.nan
    return float(d["median"])


def _spread_pct(d: dict[str, Any]) -> str:
    lo, hi = d.get("min"), d.get("max")
    return "n/a" if lo is None or hi is None else f"{lo * 100:.1f} to {hi * 100:.1f} %"


def _target(name: str, value: float, limit: float, higher_is_better: bool, fmt: str, why_missing: str,
            reference: float = math.nan) -> dict[str, Any]:
    """``reference``: the same figure for nginx as a plain reverse proxy in the same run
    (what any relay adds on this machine), where the bench measures one."""
    ref = None if math.isnan(reference) else round(reference, 3)
    if math.isnan(value):
        return {"target": name, "value": None, "limit": limit, "met": None, "note": why_missing, "unit": fmt,
                "reference": ref}
    met = value >= limit if higher_is_better else value <= limit
    return {"target": name, "value": round(value, 3), "limit": limit, "met": met, "unit": fmt, "reference": ref}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each judged on figures from this run only (None: not measured)."""
    s1 = results.get("scenario1", {}).get("by_concurrency", {})
    s2 = results.get("scenario2", {}).get("by_streams", {})
    s3 = results.get("scenario3", {}).get("by_size", {})
    s4 = results.get("scenario4", {})
    c1, c64 = s1.get("1", {}), s1.get("64", {})
    st = s2.get("1000", {})
    mb = s3.get(str(1024 * 1024), {})
    proxy64 = c64.get("summary", {}).get("proxy", {})
    return [
        _target("non-streaming, 1 connection: added latency p50 <= 0.3 ms", _median(c1.get("proxy_added_p50_us")),
                300, False, "us", "scenario 1 at concurrency 1 not run", _median(c1.get("nginx_proxy_added_p50_us"))),
        _target("non-streaming, 1 connection: added latency p99 <= 1.5 ms", _median(c1.get("proxy_added_p99_us")),
                1500, False, "us", "scenario 1 at concurrency 1 not run", _median(c1.get("nginx_proxy_added_p99_us"))),
        _target("non-streaming, 64 connections: throughput >= 40x LiteLLM's",
                _median(c64.get("proxy_rps_over_litellm")), 40, True, "x",
                "LiteLLM or concurrency 64 not measured in this run"),
        _target("non-streaming, 64 connections: >= 4,000 requests/s with one worker",
                _median(proxy64.get("rps")), 4000, True, "rps", "scenario 1 at concurrency 64 not run"),
        _overload_note(_target("1,000 concurrent streams: added inter-chunk delay p99 <= 1 ms",
                               _median(st.get("added_gap_us_p99")), 1000, False, "us",
                               "1,000 streams not run (--quick runs 100)",
                               _median(st.get("nginx_proxy_added_gap_us_p99"))), st),
        _target("1,000 concurrent streams: proxy peak RSS <= 150 MB", st.get("proxy_peak_rss_mb") or math.nan,
                150, False, "MB", "1,000 streams not run (--quick runs 100)"),
        _target("1 MB request: added latency p50 <= 5 ms", _median(mb.get("proxy_added_p50_us")), 5000, False, "us",
                "1 MB bodies not run"),
        _target("evidence and metrics <= 10% of proxy CPU", _median(s4.get("proof_share_of_proxy_cpu")) * 100, 10,
                False, "%", "scenario 4 not run"),
    ]


def _overload_note(target: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Say so when the point overloaded the machine without the proxy: if the backend and
    the client alone could not keep the streams on schedule, the added gap measured there
    is queueing behind them, whatever the proxy costs. The verdict itself stands."""
    stretch = _median(point.get("direct_stretch"))
    if target["value"] is not None and stretch >= OVERLOAD_STRETCH:
        target["note"] = (f"overloaded without the proxy: direct streams took {stretch:.2f}x their scheduled "
                          "time, so this gap is mostly queueing on the machine")
    return target


def _fmt_value(t: dict[str, Any], key: str = "value") -> str:
    v = t.get(key)
    if v is None:
        return "not measured" if key == "value" else "-"
    unit = t.get("unit")
    if unit == "us":
        return fmt_us(v)
    if unit == "x":
        return f"{v:,.1f}x"
    if unit == "%":
        return f"{v:.1f} %"
    if unit == "MB":
        return f"{v:,.0f} MB"
    return fmt_num(v)


def _cell(d: dict[str, Any] | None, kind: str = "us") -> str:
    if not d or d.get("median") is None:
        return "n/a"
    f = (fmt_us if kind == "us" else (lambda v: f"{v:,.0f}") if kind == "n" else (lambda v: f"{v:.3f} s")
         if kind == "s" else _fmt_ratio)
    lo, hi = d.get("min"), d.get("max")
    if d.get("rounds", 1) > 1 and lo is not None and hi is not None and lo != hi:
        return f"{f(d['median'])} ({f(lo)} to {f(hi)})"
    return f(d["median"])


def _code_line(code: dict[str, Any] | None) -> str:
    if not code or not code.get("commit"):
        return "Code: not a git checkout, so the commit measured is unknown."
    state = {False: "tracked files as committed", True: "with uncommitted changes to tracked files",
             None: "tree state unknown"}[code.get("modified")]
    return f"Code: commit {code['commit'][:12]} ({state})."


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    st = results["settings"]
    out = [
        "# Benchmark results",
        "",
        f"Measured {m['date_utc']} on {m['nproc']} cores ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}, "
        f"Linux {m['kernel']}; Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m.get('uvloop')}, "
        f"{m['nginx']}, {m['wrk']}" + (f", LiteLLM {m['litellm']}" if m.get("litellm") else "") + ".",
        _code_line(results.get("code")),
        f"Mode: {'quick' if st['quick'] else 'full'}; {st['rounds']} rounds of {st['duration_s']:g} s per point, "
        "rounds interleaved across the things compared. Figures are medians over rounds with the spread "
        "(min to max) in brackets; every comparison is computed per round within this run.",
        "Everything ran on 127.0.0.1 on the same machine: the load generator, the proxy and the backend share its "
        "cores, so absolute figures are pessimistic and noisy; the ratios are the point.",
        "",
        "## Targets",
        "",
        "The reference column is nginx as a plain reverse proxy (one worker, checking and recording nothing) in "
        "front of the same backend in the same rounds: what any relay adds on this machine.",
        "",
        "| target | this run | reference: nginx as a reverse proxy | met |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        note = f" ({t['note']})" if t.get("note") else ""
        out.append(f"| {t['target']} | {_fmt_value(t)}{note} | {_fmt_value(t, 'reference')} | {met} |")
    out += render_before_after(results)
    s1 = results.get("scenario1")
    if s1:
        out += ["", "## 1. Non-streaming chat completions (nginx answering canned JSON)", ""]
        out += [f"- {n}" for n in s1.get("notes", [])]
        out += ["", "| connections | target | requests/s | p50 | p90 | p99 | CPU per request | errors |",
                "|---|---|---|---|---|---|---|---|"]
        for conc, entry in s1["by_concurrency"].items():
            for name, s in entry["summary"].items():
                out.append(f"| {conc} | {name} | {_cell(s['rps'], 'n')} | {_cell(s['p50_us'])} | "
                           f"{_cell(s['p90_us'])} | {_cell(s['p99_us'])} | {_cell(s['cpu_us_per_request'])} | "
                           f"{s['errors']} |")
        out += ["", "| connections | proxy added p50 | proxy added p99 | nginx as a reverse proxy added p50 / p99 | "
                "proxy / direct throughput | proxy / LiteLLM throughput | LiteLLM added p50 |",
                "|---|---|---|---|---|---|---|"]
        for conc, e in s1["by_concurrency"].items():
            out.append(f"| {conc} | {_cell(e['proxy_added_p50_us'])} | {_cell(e['proxy_added_p99_us'])} | "
                       f"{_cell(e.get('nginx_proxy_added_p50_us'))} / {_cell(e.get('nginx_proxy_added_p99_us'))} | "
                       f"{_cell(e['proxy_rps_over_direct'], 'x')} | {_cell(e.get('proxy_rps_over_litellm'), 'x')} | "
                       f"{_cell(e.get('litellm_added_p50_us'))} |")
    s2 = results.get("scenario2")
    if s2:
        out += ["", f"## 2. Streaming ({s2['chunks_per_stream']} chunks per stream, {s2['chunk_delay_ms']:g} ms apart, "
                "unless the row names another pace)",
                "", f"Backend: {s2['backend']}. It shares the cores with the proxy and the client; the added figures "
                "compare proxy and direct runs against the same backend. "
                "Streams open evenly over min(2 s, streams / 500) unless the row says otherwise; the target is "
                "judged on the 1000 row. The last column is how much longer the direct streams (no proxy) took "
                f"than scheduled (about 1.0x on schedule); from "
                f"{OVERLOAD_STRETCH:.1f}x on, the backend and the client alone could not keep the schedule, and the "
                "proxy's added gap there is mostly queueing on the machine.",
                "", "| streams | TTFT p50 direct / proxy | added TTFT p50 | gap p50 direct / proxy | gap p99 direct / "
                "proxy | added gap p99 | proxy CPU s per 10k chunks | proxy peak RSS | completed direct / proxy | "
                "direct streams' length / schedule |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for n, e in s2["by_streams"].items():
            rss = e.get("proxy_peak_rss_mb")
            out.append(
                f"| {n} | {_cell(e['direct_ttft_us_p50'])} / {_cell(e['proxy_ttft_us_p50'])} | "
                f"{_cell(e['added_ttft_us_p50'])} | {_cell(e['direct_gap_us_p50'])} / {_cell(e['proxy_gap_us_p50'])} | "
                f"{_cell(e['direct_gap_us_p99'])} / {_cell(e['proxy_gap_us_p99'])} | {_cell(e['added_gap_us_p99'])} | "
                f"{_secs(e)} | "
                f"{'n/a' if rss is None else f'{rss:,.0f} MB'} | "
                f"{e['completed']['direct']} / {e['completed']['proxy']} | {_cell(e.get('direct_stretch'), 'x')} |")
        out += ["", "The same rounds through nginx as a plain reverse proxy in front of the same backend (checking and "
                "recording nothing): what any relay adds here.", "",
                "| streams | added TTFT p50 proxy / nginx | added gap p99 proxy / nginx | CPU s per 10k chunks "
                "proxy / nginx | completed via nginx |", "|---|---|---|---|---|"]
        for n, e in s2["by_streams"].items():
            out.append(
                f"| {n} | {_cell(e['added_ttft_us_p50'])} / {_cell(e.get('nginx_proxy_added_ttft_us_p50'))} | "
                f"{_cell(e['added_gap_us_p99'])} / {_cell(e.get('nginx_proxy_added_gap_us_p99'))} | "
                f"{_secs(e)} / {_secs(e, 'nginx_proxy_cpu_s_per_10k_chunks')} | "
                f"{e['completed'].get('nginx_proxy', 'n/a')} |")
    s3 = results.get("scenario3")
    if s3:
        out += ["", f"## 3. Large request bodies (one connection; backend: {s3['backend']})", "",
                "| body | direct p50 | proxy p50 | added p50 | added p99 |", "|---|---|---|---|---|"]
        for size, e in s3["by_size"].items():
            out.append(f"| {int(size) // 1024:,} KiB | {_cell(e['summary']['direct']['p50_us'])} | "
                       f"{_cell(e['summary']['proxy']['p50_us'])} | {_cell(e['proxy_added_p50_us'])} | "
                       f"{_cell(e['proxy_added_p99_us'])} |")
    s4 = results.get("scenario4")
    if s4:
        on, off = s4["summary"]["proof_on"], s4["summary"]["proof_off"]
        share = _median(s4["proof_share_of_proxy_cpu"])
        how = (f"{s4.get('round_count', '?')} rounds of {s4.get('duration_s', math.nan):g} s, both proxies loaded at "
               f"the same time with {s4.get('connections_each', '?')} connections each" if s4.get("simultaneous")
               else f"{s4.get('round_count', '?')} alternating rounds of {s4.get('duration_s', math.nan):g} s")
        out += ["", f"## 4. Proof cost (evidence log and metrics on against off, {s4['connections']} connections)", "",
                "| proxy | requests/s | p50 | CPU per request |", "|---|---|---|---|",
                f"| proof on | {_cell(on['rps'], 'n')} | {_cell(on['p50_us'])} | {_cell(on['cpu_us_per_request'])} |",
                f"| proof off | {_cell(off['rps'], 'n')} | {_cell(off['p50_us'])} | "
                f"{_cell(off['cpu_us_per_request'])} |",
                "", f"Evidence and metrics take {share * 100:.1f} % of the proxy's CPU per request "
                f"(median of the per-round shares over {how}; spread {_spread_pct(s4['proof_share_of_proxy_cpu'])})."
                if not math.isnan(share) else "Proof share: n/a."]
    s5 = results.get("scenario5")
    if s5 and not s5.get("measured"):
        out += ["", "## 5. Cores", "", f"Not measured: {s5['reason']}."]
    elif s5:
        out += ["", f"## 5. Cores (one worker against {s5['cores']}, SO_REUSEPORT)", "",
                "| connections | workers | requests/s | p50 | p99 | CPU per request |", "|---|---|---|---|---|---|"]
        for conc, e in s5["by_concurrency"].items():
            for name, row in e["summary"].items():
                out.append(f"| {conc} | {name.removeprefix('workers_')} | {_cell(row['rps'], 'n')} | "
                           f"{_cell(row['p50_us'])} | {_cell(row['p99_us'])} | {_cell(row['cpu_us_per_request'])} |")
        for conc, e in s5["by_concurrency"].items():
            if "rps_per_core_over_one" in e:
                out.append(f"\nAt {conc} connections, {s5['cores']} workers serve "
                           f"{_fmt_ratio(_median(e['rps_per_core_over_one']))} the requests/s of one "
                           "(median of per-round ratios).")
        out += ["", f"Here {s5['note']}: the load generator competes with the workers for the same cores, "
                "so this scaling is a floor."]
    return "\n".join(out) + "\n"


def render_before_after(results: dict[str, Any]) -> list[str]:
    """The before/after table (issue 18's performance rule): the baseline proxy against
    this one, measured in the same interleaved rounds; [] when no baseline was measured."""
    base = results.get("baseline")
    rows = results.get("before_after") or []
    if results.get("baseline_skipped"):
        return ["", "## Before/after", "", f"No baseline measured: {results['baseline_skipped']}."]
    if not base or not rows:
        return []
    out = ["", f"## Before/after: {base['target']} (baseline) against this tree", "",
           f"The baseline is commit {base['commit'][:12]} (ref {base['ref']}), exported with git archive and run as "
           "one more target in the same rounds as this tree's proxy (their order swapped every other round). "
           "Baseline and current are medians over rounds; the ratio is current / baseline. \"Better in\" counts "
           "the rounds in which this tree did better than the baseline measured just before or after it: about "
           "half the rounds either way means the ratio is within this machine's round-to-round noise.", "",
           "| figure | baseline | current | ratio | better in | target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = {"rps": "n", "s": "s"}.get(r["unit"], "us")
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
        if r["limit"] is None:
            met = "-"
        else:
            met = "not measured" if r["met"] is None else ("yes" if r["met"] else "**no**")
        note = f" ({r['note']})" if r.get("note") else ""
        better = rounds_better_text(r) or "-"
        out.append(f"| {r['title']} | {_cell(r['baseline'], kind)} | {_cell(r['current'], kind)} | {ratio}{note} | "
                   f"{better} | {r['target']} | {met} |")
    return out


def _fmt_ratio(v: float) -> str:
    return f"{v:,.1f}x" if abs(v) >= 10 else f"{v:.2f}x"


def _secs(e: dict[str, Any], key: str = "proxy_cpu_s_per_10k_chunks") -> str:
    d = e.get(key)
    if not d or d.get("median") is None:
        return "n/a"
    return f"{d['median']:.2f} s"


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(directory: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    js, md = directory / "latest.json", directory / "latest.md"
    write_atomic(js, json.dumps(json_clean(results), indent=1, allow_nan=False) + "\n")
    write_atomic(md, render_markdown(results))
    return js, md


def json_clean(o: Any) -> Any:
    """NaN (a figure that was not measured) becomes null: JSON has no NaN."""
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {str(k): json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_clean(v) for v in o]
    return o
