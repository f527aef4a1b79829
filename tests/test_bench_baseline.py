"""The bench's baseline (bench.baseline): the ref file, the before/after judgement and
its table (pure), the round order, and that the exported baseline's own proxy starts."""

from __future__ import annotations

import json
import math
import secrets
import subprocess
from pathlib import Path

import pytest

from bench.baseline import (
    PACED_POINT,
    RULES,
    SPREAD_POINT,
    BaselineError,
    before_after,
    check_ref,
    default_ref,
    export,
    imported_from,
    judge,
    label,
    paced_key,
    parse_ref,
    rounds_better,
    spread_key,
)
from bench.procs import ROOT, proxy_env, start_sse_backend
from bench.procs import start_proxy as start_bench_proxy
from bench.report import render_markdown
from bench.scenarios import round_order
from bench.stats import summarize

BASE = "proxy@1472c50"
RULE = {r.key: r for r in RULES}


def test_the_ref_file_gives_its_first_non_comment_line_and_refuses_what_is_not_a_ref(tmp_path: Path) -> None:
    assert parse_ref("# a comment\n\n  1472c50  \nmain\n", "f") == "1472c50"
    assert default_ref() == "1472c50"  # bench/baseline-ref as committed: main before issue 18
    for bad, why in (("# only a comment\n", "no ref"), ("--upload-pack=touch x\n", "not a git ref"),
                     ("main..HEAD\n", "not a git ref"), ("a b\n", "not a git ref")):
        with pytest.raises(BaselineError, match=why) as err:
            parse_ref(bad, "bench/baseline-ref")
        assert "bench/baseline-ref" in str(err.value)
    with pytest.raises(BaselineError, match="cannot read"):
        default_ref(tmp_path / "missing")
    assert check_ref("v1.2/rc-1") == "v1.2/rc-1"
    assert label("1472c50" + "0" * 33) == BASE


def test_ratios_are_judged_against_each_rule() -> None:
    s = summarize
    p50 = RULE["one_conn_added_p50"]
    assert judge(p50, s([300.0]), s([329.0]))["met"] is True       # 1.097: within 10 %
    row = judge(p50, s([300.0]), s([331.0]))
    assert row["met"] is False and row["ratio"] == pytest.approx(331 / 300, abs=1e-4)
    rps = RULE["c64_rps"]
    assert judge(rps, s([8000.0]), s([7300.0]))["met"] is True       # 0.9125
    assert judge(rps, s([8000.0]), s([7100.0]))["met"] is False      # 0.8875
    gap = RULE["streams_1000_added_gap_p99"]
    assert judge(gap, s([5000.0]), s([5000.0]))["met"] is True       # equal: did not grow
    assert judge(gap, s([5000.0]), s([5100.0]))["met"] is False
    # Medians over rounds, not the last round's figure.
    assert judge(gap, s([100.0, 5000.0, 5200.0]), s([4900.0, 4950.0, 9000.0]))["met"] is True


def test_a_ratio_to_nothing_is_not_measured_never_met() -> None:
    gap = RULE["streams_1000_added_gap_p99"]
    for base, cur, why in ((summarize([-40.0]), summarize([10.0]), "not above zero"),
                           (summarize([0.0]), summarize([0.0]), "not above zero"),
                           (summarize([]), summarize([10.0]), "not measured"),
                           (summarize([10.0]), summarize([math.nan]), "not measured")):
        row = judge(gap, base, cur)
        assert row["met"] is None and row["ratio"] is None and why in row["note"]


def _results(p50: tuple[list[float], list[float]], rps: tuple[list[float], list[float]],
             gap: tuple[list[float], list[float]] | None) -> dict:
    s2 = {} if gap is None else {"by_streams": {"1000": {"added_gap_p99_per_round": {BASE: gap[0], "proxy": gap[1]}}}}
    return {
        "schema_version": 1,
        "machine": {"date_utc": "2026-11-28 00:00 UTC", "nproc": 2, "cpu_model": "test", "memory_gb": 1,
                    "os": "test", "kernel": "0", "python": "3.11", "aiohttp": "3", "nginx": "nginx", "wrk": "wrk"},
        "settings": {"quick": True, "rounds": 2, "duration_s": 1.0},
        "baseline": {"ref": "1472c50", "commit": "1472c50" + "0" * 33, "target": BASE},
        "scenario1": {"notes": [], "by_concurrency": {
            "1": {"added_p50_per_round": {BASE: p50[0], "proxy": p50[1]}},
            "64": {"rounds": {BASE: [{"rps": v, "cpu_us_per_request": 110.0 + 20 * i} for i, v in enumerate(rps[0])],
                              "proxy": [{"rps": v, "cpu_us_per_request": 140.0 + 20 * i}
                                        for i, v in enumerate(rps[1])]}}}},
        "scenario2": s2,
        "targets": [],
    }


def test_before_after_rows_come_from_the_runs_paired_rounds_and_render_as_a_table() -> None:
    results = _results(([300.0, 310.0], [350.0, 360.0]), ([8000.0, 8200.0], [7900.0, 8100.0]), None)
    rows = {r["key"]: r for r in before_after(results)}
    assert rows["one_conn_added_p50"]["ratio"] == pytest.approx(355 / 305, abs=1e-4)
    assert rows["one_conn_added_p50"]["met"] is False
    assert rows["c64_rps"]["ratio"] == pytest.approx(8000 / 8100, abs=1e-4) and rows["c64_rps"]["met"] is True
    assert rows["streams_1000_added_gap_p99"]["met"] is None  # the 1,000 streams were not run
    assert rows["one_conn_added_p50"]["rounds_better"] == {"current_better": 0, "paired": 2}
    assert rows["c64_rps"]["rounds_better"] == {"current_better": 0, "paired": 2}
    results["before_after"] = list(rows.values())
    del results["scenario1"], results["scenario2"]  # their own sections are tested in test_bench_stats
    text = render_markdown(results)
    assert f"## Before/after: {BASE} (baseline) against this tree" in text
    assert ("| non-streaming, 1 connection: added latency p50 | 305 µs (300 µs to 310 µs) | "
            "355 µs (350 µs to 360 µs) | 1.164 | 0 of 2 rounds | within 10 % (current / baseline <= 1.10) | "
            "**no** |") in text
    assert ("| non-streaming, 64 connections: requests/s | 8,100 (8,000 to 8,200) | 8,000 (7,900 to 8,100) | 0.988 | "
            "0 of 2 rounds |") in text
    assert "| 1,000 streams: added inter-chunk delay p99 | n/a | n/a | n/a (not measured in this run) | - |" in text
    cpu = rows["c64_cpu"]  # a figure beside the targets: a ratio, never a verdict
    assert cpu["ratio"] == pytest.approx(150 / 120, abs=1e-4) and cpu["met"] is None and cpu["limit"] is None
    assert text.count("(no target: where the cost is) | - |") == 3
    assert ("| non-streaming, 64 connections: proxy CPU per request | 120 µs (110 µs to 130 µs) | "
            "150 µs (140 µs to 160 µs) | 1.250 | 0 of 2 rounds |") in text


def test_rounds_are_paired_by_position_and_a_round_missing_on_either_side_is_left_out() -> None:
    """The count next to a ratio says whether it is noise: each round's pair ran
    back to back, so the pairs are taken position by position, never re-sorted."""
    lower, higher = RULES[0], RULES[1]  # added p50: lower is better; requests/s: higher is better
    assert not lower.higher_is_better and higher.higher_is_better
    base, cur = [10.0, 20.0, 30.0, None, 50.0], [11.0, 19.0, 29.0, 1.0, math.nan]
    assert rounds_better(lower, base, cur) == {"current_better": 2, "paired": 3}
    assert rounds_better(higher, base, cur) == {"current_better": 1, "paired": 3}
    assert rounds_better(lower, [10.0, 20.0], [10.0, 20.0]) == {"current_better": 0, "paired": 2}  # a tie is not better
    # Sorted side by side, the current one would be lower in both; round by round it lost one.
    assert rounds_better(lower, [1.0, 3.0], [2.0, 0.0]) == {"current_better": 1, "paired": 2}
    assert rounds_better(lower, [1.0, 2.0], [1.0]) is None  # not one value per round each: no pairing


def test_without_a_baseline_there_is_no_before_after() -> None:
    results = _results(([300.0], [350.0]), ([8000.0], [7900.0]), ([1.0], [1.0]))
    del results["baseline"]
    assert before_after(results) == []
    results["before_after"] = []
    del results["scenario1"], results["scenario2"]
    assert "Before/after" not in render_markdown(results)


def test_the_proxy_and_its_baseline_trade_places_every_other_round() -> None:
    names = ["direct", "proxy", "nginx_proxy", BASE]
    assert round_order(names, 0, ("proxy", BASE)) == names
    assert round_order(names, 1, ("proxy", BASE)) == ["direct", BASE, "nginx_proxy", "proxy"]
    assert round_order(names, 2, ("proxy", BASE)) == names
    assert round_order(names, 1, None) == names


def test_an_unknown_ref_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="not a commit"):
        export(ROOT, "no-such-ref-" + secrets.token_hex(4), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _has_commit(ref: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_commit("1472c50"), reason="this checkout lacks the baseline commit (shallow clone)")
def test_the_exported_baseline_imports_its_own_proxy_and_serves(tmp_path: Path) -> None:
    """The export is the commit's files, and `python -m proxy` there runs that commit's
    proxy (not this tree's, which an editable install could put first): it lacks a
    module this tree has, and it answers a chat completion through the bench's start."""
    base = export(ROOT, "1472c50", tmp_path / "src")
    assert base.name == BASE and base.commit.startswith("1472c50")
    assert not (base.root / "proxy" / "stream_check.py").exists()  # added by issue 18's work
    env = proxy_env(base.root, "http://127.0.0.1:9/v1", "t", tmp_path / "e.jsonl")
    assert imported_from(base.root, env).is_relative_to(base.root.resolve())
    backend = start_sse_backend(tmp_path, 3, 1.0)
    try:
        proxy = start_bench_proxy(tmp_path, "base", backend.url, "tok-" + secrets.token_hex(8), code_root=base.root)
        try:
            cmdline = Path(f"/proc/{proxy.pid}/cwd").resolve()
            assert cmdline == base.root.resolve()
            assert proxy.alive()
        finally:
            proxy.stop()
    finally:
        backend.stop()


def test_the_default_baseline_is_skipped_with_a_note_where_the_checkout_lacks_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make bench in a checkout without the ref (a shallow clone) still runs, and says
    in the results that no baseline was measured; an explicit --baseline is exit 2."""
    import bench.__main__ as bench_main

    def lacking(repo: Path, ref: str, dest: Path) -> None:
        raise BaselineError(f"baseline ref {ref!r} is not a commit in {repo}")

    monkeypatch.setattr("bench.baseline.export", lacking)
    monkeypatch.setattr(bench_main.shutil, "which", lambda tool: f"/usr/bin/{tool}")  # no wrk or nginx needed
    monkeypatch.setattr(bench_main, "machine_info", lambda: _results(([], []), ([], []), None)["machine"])
    monkeypatch.setattr(bench_main, "SCENARIOS", {"1": "none_at_all"})
    monkeypatch.setattr(bench_main.Bench, "none_at_all", lambda self: {}, raising=False)
    assert bench_main.main(["--scenarios", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert "baseline" not in results and "is not a commit" in results["baseline_skipped"]
    assert "No baseline measured: baseline ref '1472c50' is not a commit" in (tmp_path / "latest.md").read_text()
    assert bench_main.main(["--scenarios", "1", "--baseline", "main", "--out", str(tmp_path)]) == 2


def test_the_paced_stream_point_is_read_beside_the_targets_never_judged() -> None:
    """The 1,000 streams at a model's pace (bench.scenarios' default extra point) give a
    ratio of their own: the tail and the CPU per chunk, with no verdict."""
    results = _results(([300.0], [350.0]), ([8000.0], [7900.0]), ([5000.0], [7000.0]))
    results["scenario2"]["by_streams"][paced_key(PACED_POINT[0], PACED_POINT[2])] = {
        "added_gap_p99_per_round": {BASE: [20_000.0, 19_000.0], "proxy": [17_000.0, 16_000.0]},
        "rounds": {BASE: [{"proxy_cpu_s_per_10k_chunks": 0.38}], "proxy": [{"proxy_cpu_s_per_10k_chunks": 0.30}]}}
    rows = {r["key"]: r for r in before_after(results)}
    assert rows["streams_1000_added_gap_p99"]["met"] is False  # the target's own point: 7,000 against 5,000
    paced = rows["streams_paced_added_gap_p99"]
    assert paced["ratio"] == pytest.approx(16_500 / 19_500, abs=1e-4) and paced["met"] is None
    assert rows["streams_paced_cpu"]["ratio"] == pytest.approx(0.30 / 0.38, abs=1e-4)
    assert rows["streams_paced_cpu"]["met"] is None
    assert paced_key(*PACED_POINT[::2]) == "1000 at 20 ms per event"


def test_the_wait_for_a_first_event_and_the_carried_load_are_read_beside_the_target() -> None:
    """At the target's point a proxy that starts streams sooner relays more of them at
    once, so its gap can grow while every stream ends sooner: the table shows the time to
    first event, the time until the last stream ended, and the same streams opened over
    5 s (a load one worker carries), each with a ratio and no verdict."""
    results = _results(([300.0], [350.0]), ([8000.0], [7900.0]), ([5000.0, 5200.0], [7000.0, 6000.0]))
    st = results["scenario2"]["by_streams"]["1000"]
    st["rounds"] = {BASE: [{"ttft_us": {"50": 1_100_000.0}, "wall_s": 5.3}, {"ttft_us": {"50": 900_000.0}, "wall_s": 5.0}],
                    "proxy": [{"ttft_us": {"50": 600_000.0}, "wall_s": 4.2}, {"ttft_us": {}, "wall_s": 4.4}]}
    results["scenario2"]["by_streams"][spread_key(*SPREAD_POINT)] = {
        "added_gap_p99_per_round": {BASE: [5_700.0, 5_600.0], "proxy": [4_500.0, 4_700.0]},
        "rounds": {BASE: [{"proxy_cpu_s_per_10k_chunks": 0.27}] * 2, "proxy": [{"proxy_cpu_s_per_10k_chunks": 0.22}] * 2}}
    rows = {r["key"]: r for r in before_after(results)}
    assert rows["streams_1000_added_gap_p99"]["met"] is False  # the target's verdict is untouched
    ttft = rows["streams_1000_ttft_p50"]
    # A round without the percentile is left out of the median and of the pairing.
    assert ttft["ratio"] == pytest.approx(600_000 / 1_000_000, abs=1e-4) and ttft["met"] is None
    assert ttft["rounds_better"] == {"current_better": 1, "paired": 1}
    wall = rows["streams_1000_wall"]
    assert wall["ratio"] == pytest.approx(4.3 / 5.15, abs=1e-4) and wall["met"] is None
    assert wall["rounds_better"] == {"current_better": 2, "paired": 2}
    spread = rows["streams_spread_added_gap_p99"]
    assert spread["ratio"] == pytest.approx(4_600 / 5_650, abs=1e-4) and spread["met"] is None
    assert rows["streams_spread_cpu"]["ratio"] == pytest.approx(0.22 / 0.27, abs=1e-4)
    assert spread_key(*SPREAD_POINT) == "1000 over 5 s"
    results["before_after"] = list(rows.values())
    del results["scenario1"], results["scenario2"]
    text = render_markdown(results)
    assert "| 1,000 streams: time to first event p50 | 1.00 s (900.00 ms to 1.10 s) | 600.00 ms | 0.600 | 1 of 1 rounds |" in text
    assert "| 1,000 streams: time until the last stream ended | 5.150 s (5.000 s to 5.300 s) | 4.300 s" in text
    assert "| 1,000 streams opened over 5 s: added inter-chunk delay p99 |" in text


def test_asking_for_1000_streams_keeps_the_points_read_beside_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--streams 1000 still measures the 1,000 opened over 5 s and at a model's pace (the
    before/after table reads them); a count without 1,000 drops both."""
    import bench.__main__ as bench_main

    monkeypatch.setattr(bench_main.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(bench_main, "machine_info", lambda: _results(([], []), ([], []), None)["machine"])
    monkeypatch.setattr(bench_main, "SCENARIOS", {"1": "none_at_all"})
    monkeypatch.setattr(bench_main.Bench, "none_at_all", lambda self: {}, raising=False)
    for counts, spread, paced in (("1000", [list(SPREAD_POINT)], [list(PACED_POINT)]), ("100,300", [], [])):
        out = tmp_path / counts.replace(",", "-")
        assert bench_main.main(["--scenarios", "1", "--streams", counts, "--no-baseline", "--out", str(out)]) == 0
        settings = json.loads((out / "latest.json").read_text())["settings"]
        assert settings["stream_counts"] == [int(c) for c in counts.split(",")]
        assert settings["stream_spread"] == spread and settings["stream_paced"] == paced
