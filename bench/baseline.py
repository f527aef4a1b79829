"""The baseline proxy: an earlier commit's proxy measured in the same rounds as this one.

Issue 18's performance rule compares the proxy with "main before this change" in the same
run of ``make bench``, not with a figure from another day. This module exports that
commit with ``git archive`` into the bench's temporary directory, so it runs as it was
(its own ``proxy`` package first on ``sys.path``, its own example decision and admission
files), and judges the before/after figures. The default ref is the one line of
``bench/baseline-ref``; ``python -m bench --baseline REF`` picks another, ``--no-baseline``
none. Everything except the export is a pure function.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import Summary, summarize

BASELINE_REF_FILE = Path(__file__).resolve().parent / "baseline-ref"
# A ref as git spells a commit, a branch or a tag; nothing that starts an option or
# walks (``--``, ``..``, ``@{``), so it can stand in git's argv without a shell.
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")


class BaselineError(RuntimeError):
    """The baseline cannot be set up: a bad ref file, an unknown ref, a failed export."""


def parse_ref(text: str, origin: str) -> str:
    """The ref in a ``baseline-ref`` file: its first line that is neither blank nor a
    ``#`` comment. BaselineError names ``origin`` when there is none or it is malformed."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        return check_ref(line, origin)
    raise BaselineError(f"{origin}: no ref in it (one line such as 1472c50)")


def check_ref(ref: str, origin: str = "--baseline") -> str:
    if not _REF_RE.match(ref) or ".." in ref:
        raise BaselineError(f"{origin}: {ref[:40]!r} is not a git ref (letters, digits, '.', '_', '/', '-')")
    return ref


def default_ref(path: Path = BASELINE_REF_FILE) -> str:
    try:
        return parse_ref(path.read_text(), str(path))
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read it ({exc.strerror})") from None


def label(commit: str) -> str:
    """The target's name in the results: ``proxy@`` and the commit's first 7 digits."""
    return f"proxy@{commit[:7]}"


@dataclass(frozen=True)
class Baseline:
    """An exported tree: ``root`` holds the commit's files, ``commit`` its full id."""

    ref: str
    commit: str
    root: Path

    @property
    def name(self) -> str:
        return label(self.commit)

    def describe(self) -> dict[str, str]:
        return {"ref": self.ref, "commit": self.commit, "target": self.name}


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=120)


def export(repo: Path, ref: str, dest: Path) -> Baseline:
    """``git archive`` of ``ref`` unpacked into ``dest`` (made here, must not exist). The
    archive's members are unpacked with tarfile's ``data`` filter: no links out, no
    absolute paths, no device files."""
    ref = check_ref(ref)
    rev = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    if rev.returncode != 0:
        raise BaselineError(f"baseline ref {ref!r} is not a commit in {repo} "
                            "(a shallow clone may lack it: git fetch --unshallow)")
    commit = rev.stdout.decode().strip()
    arch = _git(repo, "archive", "--format=tar", commit)
    if arch.returncode != 0:
        raise BaselineError(f"git archive {commit[:12]} failed: {arch.stderr.decode(errors='replace')[:300]}")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(arch.stdout)) as tar:
        tar.extractall(dest, filter="data")
    if not (dest / "proxy" / "__main__.py").is_file():
        raise BaselineError(f"baseline {commit[:12]} has no proxy/__main__.py: not a proxy of this project")
    return Baseline(ref, commit, dest)


def imported_from(root: Path, env: dict[str, str]) -> Path:
    """Where ``python -m proxy`` started in ``root`` with ``env`` takes its ``proxy``
    package from: the bench refuses to call a run a baseline run if this is the working
    tree's package (an editable install found first would be)."""
    out = subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"], cwd=str(root), env=env,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise BaselineError(f"the baseline's proxy does not import: {out.stderr.strip()[-300:]}")
    return Path(out.stdout.strip()).resolve()


# The before/after judgement ---------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One of the issue's before/after rules: ``current / baseline`` against ``limit``
    (None: a figure shown beside them, with no target of its own)."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    limit: float | None
    wording: str


RULES: tuple[Rule, ...] = (
    Rule("one_conn_added_p50", "non-streaming, 1 connection: added latency p50", "us", False, 1.10,
         "within 10 % (current / baseline <= 1.10)"),
    Rule("c64_rps", "non-streaming, 64 connections: requests/s", "rps", True, 0.90,
         "within 10 % (current / baseline >= 0.90)"),
    Rule("streams_1000_added_gap_p99", "1,000 streams: added inter-chunk delay p99", "us", False, 1.00,
         "does not grow (current / baseline <= 1.00)"),
    # CPU spent by each proxy for the same work: on a shared machine the steadiest of the
    # figures (a neighbour's load stretches latencies far more than it changes the CPU a
    # request takes), so it says where the rows above come from.
    Rule("one_conn_cpu", "non-streaming, 1 connection: proxy CPU per request", "us", False, None,
         "(no target: where the cost is)"),
    Rule("c64_cpu", "non-streaming, 64 connections: proxy CPU per request", "us", False, None,
         "(no target: where the cost is)"),
    Rule("streams_1000_cpu", "1,000 streams: proxy CPU seconds per 10,000 chunks", "s", False, None,
         "(no target: where the cost is)"),
    # The stream target is judged at 200 events a second per stream, which
    # saturates one worker here; the same streams at a model's pace, opened over the
    # same 2 s, are still past one worker here (docs/performance.md, sixth pass).
    Rule("streams_paced_added_gap_p99", "1,000 streams at 20 ms per event: added inter-chunk delay p99", "us", False,
         None, "(no target: a model's pace)"),
    Rule("streams_paced_cpu", "1,000 streams at 20 ms per event: proxy CPU seconds per 10,000 chunks", "s", False,
         None, "(no target: a model's pace)"),
    # At the target's point a proxy that starts streams sooner has more of them relaying at
    # once on its one saturated core, so a faster start shows up as a longer gap (a busy
    # wait added to every request lowered the gap p99: docs/performance.md, sixth pass).
    # What a user waits for is shown beside it.
    Rule("streams_1000_ttft_p50", "1,000 streams: time to first event p50", "us", False, None,
         "(no target: the queue a new stream waits in)"),
    Rule("streams_1000_wall", "1,000 streams: time until the last stream ended", "s", False, None,
         "(no target: the queue a new stream waits in)"),
    # The same streams opened over 5 s: a load one worker carries, so the tail is the relay's.
    Rule("streams_spread_added_gap_p99", "1,000 streams opened over 5 s: added inter-chunk delay p99", "us", False,
         None, "(no target: a load one worker carries)"),
    Rule("streams_spread_cpu", "1,000 streams opened over 5 s: proxy CPU seconds per 10,000 chunks", "s", False,
         None, "(no target: a load one worker carries)"),
)


def judge(rule: Rule, baseline: Summary, current: Summary) -> dict[str, Any]:
    """A row of the before/after table. The ratio is of the two medians over this run's
    rounds (interleaved, so drift hits both); it is undefined (not measured, ``met``
    None) when either side is missing or the baseline's median is not above zero, as an
    added delay can be on a quiet machine: a ratio to nothing says nothing."""
    row: dict[str, Any] = {"key": rule.key, "title": rule.title, "unit": rule.unit, "target": rule.wording,
                           "limit": rule.limit, "baseline": baseline.to_dict(), "current": current.to_dict(),
                           "ratio": None, "met": None}
    b, c = baseline.median, current.median
    if math.isnan(b) or math.isnan(c):
        row["note"] = "not measured in this run"
        return row
    if b <= 0:
        row["note"] = "baseline median is not above zero: no ratio"
        return row
    r = c / b
    row["ratio"] = round(r, 4)
    if rule.limit is not None:
        row["met"] = r >= rule.limit if rule.higher_is_better else r <= rule.limit
    return row


# The stream point at a model's pace (streams, events per stream, ms between events)
# that bench.scenarios measures by default and the before/after table reads.
PACED_POINT: tuple[int, int, float] = (1000, 100, 20.0)
# The stream point opened over a longer time (streams, seconds over which they open): a
# load one worker carries, measured by default and read by the before/after table.
SPREAD_POINT: tuple[int, float] = (1000, 5.0)


def paced_key(streams: int, delay_ms: float) -> str:
    """The results key of a stream point at a model's pace."""
    return f"{streams} at {delay_ms:g} ms per event"


def spread_key(streams: int, opened_over_s: float) -> str:
    """The results key of a stream point opened over a longer time than the default."""
    return f"{streams} over {opened_over_s:g} s"


def rounds_better(rule: Rule, baseline: list[float | None], current: list[float | None]) -> dict[str, int] | None:
    """In how many rounds the current proxy did better than the baseline, counting only
    rounds measured on both sides. The two ran in the same rounds, one after the other,
    so each pair shared the machine's state: a ratio of medians past its limit with about
    half the rounds on each side is this machine's noise, not the code. None when the
    lists are not one value per round each (they cannot be paired)."""
    if len(baseline) != len(current):
        return None
    better = paired = 0
    for b, c in zip(baseline, current, strict=True):
        if b is None or c is None or math.isnan(b) or math.isnan(c):
            continue
        paired += 1
        better += c > b if rule.higher_is_better else c < b
    return {"current_better": better, "paired": paired}


# A figure's values for the baseline and for this tree, one per round (None: not measured).
Pair = tuple[list[float | None], list[float | None]]


def rounds_better_text(row: dict[str, Any]) -> str | None:
    """"k of n rounds" for a before/after row, None when no round could be paired."""
    sign = row.get("rounds_better")
    return f"{sign['current_better']} of {sign['paired']} rounds" if sign and sign["paired"] else None


def _column(rows: list[dict[str, Any]], key: str, quantile: str | None = None) -> list[float | None]:
    """One figure per round (``row[key]``, or ``row[key][quantile]`` for a percentile
    dict), None where a round has none (so rounds stay aligned)."""
    out: list[float | None] = []
    for r in rows:
        v = r.get(key)
        if quantile is not None:
            v = v.get(quantile) if isinstance(v, dict) else None
        out.append(None if v is None else float(v))
    return out


def before_after(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The before/after rows (issue 18's three targets, then figures without one) from a
    results dict that measured a baseline (``results["baseline"]["target"]`` names its rows); [] when none was."""
    base = (results.get("baseline") or {}).get("target")
    if not base:
        return []
    s1 = (results.get("scenario1") or {}).get("by_concurrency", {})
    s2 = (results.get("scenario2") or {}).get("by_streams", {})
    c1, c64, st = s1.get("1", {}), s1.get("64", {}), s2.get("1000", {})
    paced = s2.get(paced_key(PACED_POINT[0], PACED_POINT[2]), {})
    spread = s2.get(spread_key(*SPREAD_POINT), {})

    def per_round(point: dict[str, Any], key: str) -> Pair:
        """A figure the scenario already lists per round for each target (added latencies)."""
        by_target = point.get(key, {})
        return by_target.get(base, []), by_target.get("proxy", [])

    def from_rounds(point: dict[str, Any], key: str, quantile: str | None = None) -> Pair:
        """A figure read from each target's own round rows."""
        rounds = point.get("rounds", {})
        return _column(rounds.get(base, []), key, quantile), _column(rounds.get("proxy", []), key, quantile)

    pairs: dict[str, Pair] = {
        "one_conn_added_p50": per_round(c1, "added_p50_per_round"),
        "c64_rps": from_rounds(c64, "rps"),
        "streams_1000_added_gap_p99": per_round(st, "added_gap_p99_per_round"),
        "one_conn_cpu": from_rounds(c1, "cpu_us_per_request"),
        "c64_cpu": from_rounds(c64, "cpu_us_per_request"),
        "streams_1000_cpu": from_rounds(st, "proxy_cpu_s_per_10k_chunks"),
        "streams_paced_added_gap_p99": per_round(paced, "added_gap_p99_per_round"),
        "streams_paced_cpu": from_rounds(paced, "proxy_cpu_s_per_10k_chunks"),
        "streams_1000_ttft_p50": from_rounds(st, "ttft_us", "50"),
        "streams_1000_wall": from_rounds(st, "wall_s"),
        "streams_spread_added_gap_p99": per_round(spread, "added_gap_p99_per_round"),
        "streams_spread_cpu": from_rounds(spread, "proxy_cpu_s_per_10k_chunks"),
    }
    rows = []
    for rule in RULES:
        b, c = pairs[rule.key]
        row = judge(rule, summarize(b), summarize(c))
        row["rounds_better"] = rounds_better(rule, b, c)
        rows.append(row)
    return rows
