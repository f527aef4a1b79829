"""Prometheus metrics: conventional names, bounded labels, one registry per proxy app
(so several apps can live in one test process without clashing).

The series every request updates (requests, duration, time to first token, tokens) are
kept by a one-process proxy as plain numbers in a ``RequestTally`` and rendered when
scraped: prometheus-client's own objects take a lock and a few calls per update, which
was most of the metrics' cost per request (profiled). With several workers
(``proxy.workers``) each worker process writes its values to files in a shared directory
(prometheus-client's multiprocess mode) and whichever worker answers a scrape renders the
sum over all of them: a scrape never shows one worker's share of the traffic as the
whole."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .admission import Admission
from .build_info import build_labels
from .codes import FALLBACK_CODES, UpstreamErrorKind
from .model_policy import Family

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# The per-request series: (name, help, label names), the same in both modes.
REQUESTS = ("case_proxy_requests", "Requests by endpoint and outcome.", ("endpoint", "outcome"))
DURATION = ("case_proxy_request_duration_seconds", "Time from request to last byte.", ("endpoint",))
TTFT = ("case_proxy_time_to_first_token_seconds",
        "Time from request to the first streamed event sent to the client.", ("endpoint",))
TOKENS = ("case_proxy_tokens", "Tokens reported by the backend's usage objects.", ("kind",))
TOKEN_KINDS = ("prompt", "completion")
# Values of case_proxy_upstream_errors_total{kind} (see proxy.upstream.upstream_error_kind
# and the stream and redirect failures in proxy.forwarding_handler and proxy.streaming).
UPSTREAM_ERROR_KINDS: tuple[UpstreamErrorKind, ...] = tuple(UpstreamErrorKind)


class TallyHistogram:
    """One label set of a histogram as plain numbers: a count per bucket (not yet
    cumulative) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # A bucket counts values <= its bound: the first bound not below the value.
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*_LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class RequestTally(Collector):
    """The per-request series of a one-process proxy, updated without locks: the event
    loop's thread both updates them and (through ``/metrics``) collects them."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.duration: dict[str, TallyHistogram] = {}
        self.ttft: dict[str, TallyHistogram] = {}
        self.tokens = dict.fromkeys(TOKEN_KINDS, 0)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(REQUESTS[0], REQUESTS[1], labels=REQUESTS[2])
        for labels, n in self.requests.items():
            requests.add_metric(labels, n)
        tokens = CounterMetricFamily(TOKENS[0], TOKENS[1], labels=TOKENS[2])
        for kind, n in self.tokens.items():
            tokens.add_metric((kind,), n)
        yield from (requests, tokens)
        for (name, help_text, label_names), series in ((DURATION, self.duration), (TTFT, self.ttft)):
            family = HistogramMetricFamily(name, help_text, labels=label_names)
            for endpoint, hist in series.items():
                family.add_metric((endpoint,), hist.cumulative(), hist.sum)
            yield family


class ProxyMetrics:
    def __init__(self, admission: Admission, multiprocess_dir: Path | None = None,
                 in_flight: Callable[[], float] | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.fallback_rejections = Counter(
            "case_proxy_fallback_rejections",
            "Requests refused because they tried to reach another model, provider or upstream.",
            ["reason", "family"], registry=r)
        self.served_model_mismatches = Counter(
            "case_proxy_served_model_mismatches", "Backend responses that named a model other than the admitted one.",
            ["endpoint"], registry=r)
        self.upstream_errors = Counter("case_proxy_upstream_errors", "Failures talking to the backend.",
                                       ["kind"], registry=r)
        self.body_decodings = Counter(
            "case_proxy_request_body_decodings",
            "Compressed request bodies by coding (gzip, deflate, br, zstd, unsupported) and result "
            "(decoded, corrupt, too_large, unsupported).", ["encoding", "result"], registry=r)
        self.unauthenticated_suppressed = Counter(
            "case_proxy_unauthenticated_records_suppressed",
            "Requests without the proxy token left out of the evidence log by its rate limit "
            "(they are still counted in case_proxy_requests_total{outcome=\"unauthenticated\"}).", registry=r)
        self.evidence_write_failures = Counter(
            "case_proxy_evidence_write_failures", "Evidence records that could not be written (requests refused).",
            registry=r)
        # multiprocess_mode only matters with several workers: in flight sums, ready holds
        # only if every live worker sees the backend ready.
        self.in_flight = Gauge("case_proxy_in_flight_requests", "Requests being proxied now.", registry=r,
                               multiprocess_mode="livesum")
        self.backend_ready = Gauge("case_proxy_backend_ready",
                                   "1 when the backend lists the admitted model, else 0.", registry=r,
                                   multiprocess_mode="livemin")
        self.admission_info = Gauge("case_proxy_admission_info", "The admission this proxy enforces.",
                                    ["provider", "model", "admission_status", "provider_class"], registry=r,
                                    multiprocess_mode="livemax")
        self.admission_info.labels(admission.provider, admission.model, admission.admission_status.value,
                                   admission.provider_class).set(1)
        build = build_labels()
        self.build_info = Gauge("case_proxy_build_info", "The release and interpreter this proxy runs (always 1).",
                                list(build), registry=r, multiprocess_mode="livemax")
        self.build_info.labels(**build).set(1)
        # CPU, memory, open descriptors and start time of this process (Linux /proc). One
        # process only: with several workers a scrape lands on any one of them, and
        # prometheus-client's multiprocess mode does not sum these.
        if multiprocess_dir is None:
            ProcessCollector(registry=r)
        # Pre-create the label sets alerts and dashboards look for, so they read 0, not absent.
        for reason in sorted(FALLBACK_CODES):
            for family in Family:
                self.fallback_rejections.labels(reason, family)
        # Likewise mismatches and backend failures: an alert on increase() misses the
        # first event of a series that did not exist before it.
        for endpoint in ("chat_completions", "completions", "responses", "embeddings"):
            self.served_model_mismatches.labels(endpoint)
        for error_kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(error_kind)
        # The per-request series: a tally in one process; prometheus-client's objects,
        # which write the shared files, with several workers.
        self._tally: RequestTally | None = None
        self._children: dict[tuple[str, ...], Any] = {}
        if multiprocess_dir is None:
            self._tally = RequestTally()
            r.register(self._tally)
        else:
            self._requests = Counter(*REQUESTS, registry=r)
            self._duration = Histogram(*DURATION, buckets=_LATENCY_BUCKETS, registry=r)
            self._ttft = Histogram(*TTFT, buckets=_LATENCY_BUCKETS, registry=r)
            self._tokens = Counter(*TOKENS, registry=r)
            for kind in TOKEN_KINDS:
                self._children[("tokens", kind)] = self._tokens.labels(kind)

        # One process: the gauge reads the proxy's own count at scrape time, nothing per
        # request. Several workers: multiprocess files only see explicit updates.
        self._in_flight_by_request = in_flight is None or multiprocess_dir is not None
        if not self._in_flight_by_request:
            assert in_flight is not None
            self.in_flight.set_function(in_flight)

    def request_started(self) -> None:
        if self._in_flight_by_request:
            self.in_flight.inc()

    def request_ended(self) -> None:
        if self._in_flight_by_request:
            self.in_flight.dec()

    def count_request(self, endpoint: str, outcome: str) -> None:
        if (tally := self._tally) is not None:
            key = (endpoint, outcome)
            tally.requests[key] = tally.requests.get(key, 0) + 1
        else:
            self._child("requests", endpoint, outcome).inc()

    def count_tokens(self, kind: str, n: int) -> None:
        if (tally := self._tally) is not None:
            tally.tokens[kind] += n
        else:
            self._children[("tokens", kind)].inc(n)

    def observe_duration(self, endpoint: str, seconds: float) -> None:
        if (tally := self._tally) is not None:
            hist = tally.duration.get(endpoint) or tally.duration.setdefault(endpoint, TallyHistogram())
            hist.observe(seconds)
        else:
            self._child("duration", endpoint).observe(seconds)

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        if (tally := self._tally) is not None:
            hist = tally.ttft.get(endpoint) or tally.ttft.setdefault(endpoint, TallyHistogram())
            hist.observe(seconds)
        else:
            self._child("ttft", endpoint).observe(seconds)

    def _child(self, series: str, *labels: str) -> Any:
        """A multiprocess series' child, looked up once: ``.labels()`` takes a lock and
        builds tuples on every call."""
        key = (series, *labels)
        child = self._children.get(key)
        if child is None:
            metric = {"requests": self._requests, "duration": self._duration, "ttft": self._ttft}[series]
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self._multiprocess_dir))
        return generate_latest(merged)
