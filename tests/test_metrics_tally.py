"""The one-process proxy keeps its per-request series as plain numbers (RequestTally);
a scrape must read exactly what prometheus-client's own objects would have shown."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admission import Admission
from proxy.metrics import _LATENCY_BUCKETS, DURATION, REQUESTS, TOKENS, TTFT, ProxyMetrics, RequestTally

# Bucket bounds themselves (a bound counts values equal to it), just past them, zero,
# past the last bound.
VALUES = [0.0, 0.0005, 0.001, 0.0010001, 0.005, 0.7, 1, 600, 601.5]


def _samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {(s.name, tuple(sorted(s.labels.items())), s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.name.endswith("_created")}  # the multiprocess mode has none either


def test_the_tally_renders_what_prometheus_client_objects_would() -> None:
    ref = CollectorRegistry()
    requests = Counter(*REQUESTS, registry=ref)
    tokens = Counter(*TOKENS, registry=ref)
    duration = Histogram(*DURATION, buckets=_LATENCY_BUCKETS, registry=ref)
    ttft = Histogram(*TTFT, buckets=_LATENCY_BUCKETS, registry=ref)
    mine = ProxyMetrics(Admission.model_validate({
        "schema_version": 1, "work_item": "W-1", "provider": "local", "provider_class": "local_openai_compatible",
        "model": "m", "admission_status": "admitted"}))
    for n, value in enumerate(VALUES):
        endpoint = ("chat_completions", "responses")[n % 2]
        outcome = ("ok", "upstream_error", "ok")[n % 3]
        requests.labels(endpoint, outcome).inc()
        mine.count_request(endpoint, outcome)
        duration.labels(endpoint).observe(value)
        mine.observe_duration(endpoint, value)
        if n % 3 == 0:
            ttft.labels(endpoint).observe(value / 2)
            mine.observe_ttft(endpoint, value / 2)
        tokens.labels("prompt").inc(n)
        mine.count_tokens("prompt", n)
    tokens.labels("completion")  # the tally shows both kinds from the start
    expected = _samples(generate_latest(ref).decode())
    got = _samples(mine.render().decode())
    assert expected <= got
    assert {s for s in got if s[0].startswith(("case_proxy_requests", "case_proxy_tokens", "case_proxy_request_dur",
                                              "case_proxy_time_to"))} == expected


def test_an_empty_tally_has_its_families_and_zero_tokens() -> None:
    reg = CollectorRegistry()
    reg.register(RequestTally())
    text = generate_latest(reg).decode()
    families = {fam.name for fam in text_string_to_metric_families(text)}
    assert families == {"case_proxy_requests", "case_proxy_tokens", "case_proxy_request_duration_seconds",
                        "case_proxy_time_to_first_token_seconds"}
    assert ("case_proxy_tokens_total", (("kind", "completion"),), 0.0) in _samples(text)
