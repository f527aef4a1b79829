"""`python -m bench [--quick]`: run the benchmark scenarios and write bench/results/latest.{md,json}.

Scenarios 1 and 2 also measure a baseline, an earlier commit's proxy exported with ``git
archive`` (bench.baseline), in the same interleaved rounds: by default the ref in
bench/baseline-ref; ``--baseline REF`` another, ``--no-baseline`` none.

Everything it starts listens on 127.0.0.1 and is stopped by pid when it ends, also on
Ctrl-C. Exit codes: 0 written, 1 a scenario failed (nothing written), 2 usage or a
missing tool.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import baseline as baseline_mod
from .procs import ROOT, code_version, machine_info, proxy_env
from .report import evaluate_targets, write_results
from .scenarios import Bench, BenchSettings

SCENARIOS = {"1": "nonstreaming", "2": "streaming", "3": "large_bodies", "4": "proof_cost", "5": "cores"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer points and shorter rounds (a few minutes)")
    p.add_argument("--rounds", type=int, help="rounds per point (default 3; quick 2)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5; quick 2)")
    p.add_argument("--scenarios", default="1,2,3,4,5", help="comma-separated scenario numbers (default all)")
    p.add_argument("--skip-litellm", action="store_true", help="do not start LiteLLM (reported as not measured)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where latest.{md,json} go")
    p.add_argument("--streams", help="comma-separated stream counts for scenario 2 (default 100,1000; quick 100); "
                   "keeps the 1,000 opened over 5 s and the 1,000 at 20 ms per event if 1000 is among them")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline", metavar="REF",
                      help="git ref of the proxy to measure beside this one in scenarios 1 and 2 "
                           f"(default: the ref in {baseline_mod.BASELINE_REF_FILE.relative_to(ROOT)})")
    base.add_argument("--no-baseline", action="store_true", help="measure no baseline proxy")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SCENARIOS]
    if bad or not wanted:
        p.error(f"--scenarios: unknown scenario {', '.join(bad) or '(none given)'}; choose from 1-5")
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        p.error("--rounds must be between 1 and 20")
    if args.duration is not None and not 1 <= args.duration <= 60:
        p.error("--duration must be between 1 and 60 seconds")
    args.wanted = wanted
    args.stream_counts = None
    if args.streams is not None:
        try:
            counts = [int(x) for x in args.streams.split(",") if x.strip()]
        except ValueError:
            p.error(f"--streams: {args.streams[:40]!r} is not a comma-separated list of numbers")
        if not counts or any(not 1 <= c <= 5000 for c in counts):
            p.error("--streams: each count must be between 1 and 5000")
        args.stream_counts = counts
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    missing = [tool for tool in ("wrk",) if shutil.which(tool) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}: run scripts/install-bench-deps.sh (or make bench)",
              file=sys.stderr)
        return 2
    settings = BenchSettings.quick_settings() if args.quick else BenchSettings()
    if args.rounds:
        settings.rounds = args.rounds
    if args.duration:
        settings.duration_s = args.duration
    settings.litellm = not args.skip_litellm
    if args.stream_counts:
        settings.stream_counts = args.stream_counts
        settings.stream_spread = [pt for pt in settings.stream_spread if pt[0] in args.stream_counts]
        settings.stream_paced = [pt for pt in settings.stream_paced if pt[0] in args.stream_counts]
    # A baseline asked for by --baseline must be measured (exit 2 if it cannot be); the
    # default one (bench/baseline-ref) is skipped with a note where the checkout cannot
    # provide it (a release tarball, a shallow clone), so make bench still runs there.
    ref: str | None = None
    skipped: str | None = None
    if not args.no_baseline:
        try:
            ref = baseline_mod.check_ref(args.baseline) if args.baseline else baseline_mod.default_ref()
        except baseline_mod.BaselineError as exc:
            if args.baseline:
                print(f"bench: {exc}", file=sys.stderr)
                return 2
            skipped = str(exc)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {"schema_version": 1, "settings": vars(settings).copy()}
    try:
        results["machine"] = machine_info()
        results["code"] = code_version(ROOT)
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="case-bench-") as tmp:
        before = None
        if ref is not None:
            try:
                before = _export_baseline(ref, Path(tmp))
            except baseline_mod.BaselineError as exc:
                if args.baseline:
                    print(f"bench: {exc}", file=sys.stderr)
                    return 2
                skipped = str(exc)
        if before is not None:
            results["baseline"] = before.describe()
            log(f"baseline: {before.name} ({ref}) exported to measure beside this tree")
        elif skipped:
            results["baseline_skipped"] = skipped
            log(f"bench: no baseline measured: {skipped}")
        bench = Bench(Path(tmp), settings, log, before)
        try:
            for num in args.wanted:
                log(f"scenario {num}: {SCENARIOS[num].replace('_', ' ')}")
                results[f"scenario{num}"] = getattr(bench, SCENARIOS[num])()
        except KeyboardInterrupt:
            print("bench: interrupted; nothing written", file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - report any scenario failure, then stop everything
            traceback.print_exc()
            print(f"bench: a scenario failed ({exc}); nothing written", file=sys.stderr)
            return 1
        finally:
            bench.close()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["targets"] = evaluate_targets(results)
    results["before_after"] = baseline_mod.before_after(results)
    js, md = write_results(args.out, results)
    log(f"wrote {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md} and {js.name} "
        f"in {results['elapsed_s']:.0f} s")
    for t in results["targets"]:
        mark = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        log(f"  [{mark}] {t['target']}")
    for row in results["before_after"]:
        mark = ("info" if row["limit"] is None else "not measured" if row["met"] is None
                else "met" if row["met"] else "NOT met")
        better = baseline_mod.rounds_better_text(row)
        log(f"  [{mark}] before/after: {row['title']}: {row['target']}"
            + ("" if row["ratio"] is None else f", ratio {row['ratio']:.3f}")
            + ("" if better is None else f", better in {better}"))
    return 0


def _export_baseline(ref: str, tmp: Path) -> baseline_mod.Baseline:
    """The baseline's tree in ``tmp``, refused if ``python -m proxy`` there would import
    another tree's package."""
    exported = baseline_mod.export(ROOT, ref, tmp / "baseline-src")
    env = proxy_env(exported.root, "http://127.0.0.1:9/v1", "unused", tmp / "unused.jsonl")
    found = baseline_mod.imported_from(exported.root, env)
    if not found.is_relative_to(exported.root.resolve()):
        raise baseline_mod.BaselineError(f"the baseline's proxy would be imported from {found}, "
                                         f"not from its export {exported.root}")
    return exported


if __name__ == "__main__":
    sys.exit(main())
