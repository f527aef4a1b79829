"""Pure helpers: wrk output parsing, percentiles, medians with their spread, ratios.

Nothing here times anything; it is unit-tested by tests/test_bench_smoke.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

_UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0, "m": 60_000_000.0, "h": 3_600_000_000.0}


@dataclass
class WrkResult:
    """One wrk run. Latencies in microseconds."""

    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    p50_us: float = math.nan
    p75_us: float = math.nan
    p90_us: float = math.nan
    p99_us: float = math.nan
    p999_us: float = math.nan
    mean_us: float = math.nan
    max_us: float = math.nan
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _to_us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk's output. Prefers the exact ``WRK_JSON {...}`` line printed by
    bench/wrk/post.lua's ``done()``; falls back to wrk's own text (``--latency``)."""
    for line in text.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line[len("WRK_JSON "):])
            lat = data["latency_us"]
            duration_s = data["duration_us"] / 1e6
            requests = int(data["requests"])
            return WrkResult(
                requests=requests, duration_s=duration_s,
                rps=requests / duration_s if duration_s > 0 else 0.0,
                p50_us=float(lat["p50"]), p75_us=float(lat["p75"]), p90_us=float(lat["p90"]),
                p99_us=float(lat["p99"]), p999_us=float(lat["p999"]), mean_us=float(lat["mean"]),
                max_us=float(lat["max"]), errors={k: int(v) for k, v in data["errors"].items() if int(v)},
            )
    return parse_wrk_text(text)


_PCT_RE = re.compile(r"^\s*(50|75|90|99)(?:\.\d+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQS_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_LAT_RE = re.compile(r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)", re.M)
_SOCK_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk_text(text: str) -> WrkResult:
    """wrk's human-readable output (run with --latency)."""
    res = WrkResult()
    for m in _PCT_RE.finditer(text):
        setattr(res, f"p{m.group(1)}_us", _to_us(m.group(2), m.group(3)))
    m = _REQS_RE.search(text)
    if m:
        res.requests = int(m.group(1))
        res.duration_s = _to_us(m.group(2), m.group(3)) / 1e6
    m = _RPS_RE.search(text)
    if m:
        res.rps = float(m.group(1))
    m = _LAT_RE.search(text)
    if m:
        res.mean_us = _to_us(m.group(1), m.group(2))
        res.max_us = _to_us(m.group(5), m.group(6))
    m = _SOCK_RE.search(text)
    if m:
        for name, val in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            if int(val):
                res.errors[name] = int(val)
    m = _NON2XX_RE.search(text)
    if m and int(m.group(1)):
        res.errors["status"] = int(m.group(1))
    if res.requests == 0 and res.rps == 0.0:
        raise ValueError("not wrk output: no request count found")
    return res


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of unsorted values; nan if empty."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return percentile(vals, 50) if vals else math.nan


@dataclass(frozen=True)
class Summary:
    """Median over rounds with its spread (min..max) and the round count."""

    median: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 6)
        return {"median": clean(self.median), "min": clean(self.lo), "max": clean(self.hi), "rounds": self.n}


def summarize(values: Iterable[float | None]) -> Summary:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return Summary(math.nan, math.nan, math.nan, 0)
    return Summary(median(vals), min(vals), max(vals), len(vals))


def ratio(num: float | None, den: float | None) -> float:
    """num / den, nan when either is missing or den is zero."""
    if num is None or den is None or math.isnan(num) or math.isnan(den) or den == 0:
        return math.nan
    return num / den


def added(proxy: float | None, direct: float | None) -> float:
    """Added latency (proxy - direct), nan when either is missing."""
    if proxy is None or direct is None or math.isnan(proxy) or math.isnan(direct):
        return math.nan
    return proxy - direct


# A direct run whose streams take this much longer than scheduled was not kept on
# schedule by the backend and the client themselves: the machine, not the proxy, is the
# limit at that point. The margin leaves room for connection set-up and timer slack.
OVERLOAD_STRETCH = 1.5


def stream_stretch(run: dict[str, Any], scheduled_s: float) -> float:
    """How much longer a run's median stream took than its schedule (chunks x spacing);
    nan when the run reports no durations."""
    p50 = (run.get("stream_duration_s") or {}).get("50")
    return ratio(None if p50 is None else float(p50), scheduled_s)


def fmt_us(us: float) -> str:
    """A latency for a person: microseconds below 1 ms, else milliseconds or seconds."""
    if us is None or math.isnan(us):
        return "n/a"
    sign = "-" if us < 0 else ""
    a = abs(us)
    if a < 1000:
        return f"{sign}{a:.0f} µs"
    if a < 1_000_000:
        return f"{sign}{a / 1000:.2f} ms"
    return f"{sign}{a / 1e6:.2f} s"


def fmt_num(v: float, digits: int = 0) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:,.{digits}f}"


def fmt_summary(s: Summary, fmt=fmt_num) -> str:  # type: ignore[no-untyped-def]
    if s.n == 0:
        return "n/a"
    if s.n == 1 or s.lo == s.hi:
        return fmt(s.median)
    return f"{fmt(s.median)} ({fmt(s.lo)}–{fmt(s.hi)})"


def proc_cpu_seconds(stat_text: str, clk_tck: int) -> float:
    """utime + stime (seconds) from the text of /proc/<pid>/stat."""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = stat_text[stat_text.rindex(")") + 2:].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / clk_tck


def proc_status_kb(status_text: str, key: str) -> int | None:
    """A ``kB`` field (VmHWM, VmRSS) from the text of /proc/<pid>/status."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None
