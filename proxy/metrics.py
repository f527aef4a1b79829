"""Prometheus metrics: conventional names, bounded labels, one registry per proxy app
(so several apps can live in one test process without clashing).

With several workers (``proxy.workers``) each worker process writes its values to files
in a shared directory (prometheus-client's multiprocess mode) and whichever worker
answers a scrape renders the sum over all of them: a scrape never shows one worker's
share of the traffic as the whole."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .admission import Admission

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ProxyMetrics:
    def __init__(self, admission: Admission, multiprocess_dir: Path | None = None,
                 in_flight: Callable[[], float] | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("case_proxy_requests", "Requests by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=r)
        self.fallback_rejections = Counter(
            "case_proxy_fallback_rejections",
            "Requests refused because they tried to reach another model, provider or upstream.",
            ["reason", "family"], registry=r)
        self.served_model_mismatches = Counter(
            "case_proxy_served_model_mismatches", "Backend responses that named a model other than the admitted one.",
            ["endpoint"], registry=r)
        self.upstream_errors = Counter("case_proxy_upstream_errors", "Failures talking to the backend.",
                                       ["kind"], registry=r)
        self.evidence_write_failures = Counter(
            "case_proxy_evidence_write_failures", "Evidence records that could not be written (requests refused).",
            registry=r)
        self.duration = Histogram("case_proxy_request_duration_seconds", "Time from request to last byte.",
                                  ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("case_proxy_time_to_first_token_seconds",
                              "Time from request to the first streamed event sent to the client.",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("case_proxy_tokens", "Tokens reported by the backend's usage objects.",
                              ["kind"], registry=r)
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
        # Pre-create the label sets alerts and dashboards look for, so they read 0, not absent.
        for reason in ("model_not_admitted", "routing_override_refused", "external_provider_endpoint",
                       "external_provider_header", "forward_proxy_refused"):
            for family in ("anthropic", "openai", "google", "other"):
                self.fallback_rejections.labels(reason, family)
        self._token_children = {kind: self.tokens.labels(kind) for kind in ("prompt", "completion")}

        # One process: the gauge reads the proxy's own count at scrape time, nothing per
        # request. Several workers: multiprocess files only see explicit updates.
        self._in_flight_by_request = in_flight is None or multiprocess_dir is not None
        if not self._in_flight_by_request:
            assert in_flight is not None
            self.in_flight.set_function(in_flight)

        # Children of the per-request series, looked up once: .labels() takes a lock and
        # builds tuples on every call, a measurable share of the proxy's CPU per request.
        self._request_children: dict[tuple[str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    def request_started(self) -> None:
        if self._in_flight_by_request:
            self.in_flight.inc()

    def request_ended(self) -> None:
        if self._in_flight_by_request:
            self.in_flight.dec()

    def count_request(self, endpoint: str, outcome: str) -> None:
        child = self._request_children.get((endpoint, outcome))
        if child is None:
            child = self._request_children[(endpoint, outcome)] = self.requests.labels(endpoint, outcome)
        child.inc()

    def count_tokens(self, kind: str, n: int) -> None:
        self._token_children[kind].inc(n)

    def observe_duration(self, endpoint: str, seconds: float) -> None:
        child = self._duration_children.get(endpoint)
        if child is None:
            child = self._duration_children[endpoint] = self.duration.labels(endpoint)
        child.observe(seconds)

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self._multiprocess_dir))
        return generate_latest(merged)
