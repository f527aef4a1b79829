"""One definition of "fallback attempt" (proxy/fallback.py), used by the proxy's metric and
the report alike.

Every decision x reason x outcome (x forward-proxy target) a request can end with goes
through the proxy's real metric path (``proxy.app._count`` into a ``ProxyMetrics``,
scraped as Prometheus text) and the report's real path (``proxy.app.request_record_fields``
-> ``EvidenceRecord`` -> ``harness.report.fallback_section``); the two must agree on
each, or the report fails a clean run with ``metrics_evidence_disagree`` (or passes a
dirty one). The hostile client is one without the run's token that asks for a provider:
it is not Case, and never a fallback attempt.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

from harness.demo import DEMO_ADMISSION
from harness.report import ReportInputs, RunEvents, fallback_section, metric_sum
from proxy.admission import Admission
from proxy.app import Draft, request_record_fields
from proxy.codes import FALLBACK_CODES
from proxy.errors import ERRORS
from proxy.evidence import EvidenceRecord
from proxy.fallback import is_fallback_attempt, is_fallback_refusal
from proxy.hashchain import ChainVerdict
from proxy.metrics import ProxyMetrics
from proxy.records import _count

DECISIONS = ("admitted", "refused", "rejected", "error")
REASONS = tuple(sorted({*ERRORS, "ok", "unhandled", "client_disconnected"}))
OUTCOMES = ("ok", "refused", "rejected", "unauthenticated", "unavailable", "upstream_error")
TARGETS = (None, "api.anthropic.com", "telemetry.example.org")
METRIC = "case_proxy_fallback_rejections_total"
ADMISSION = Admission.model_validate(DEMO_ADMISSION)


def _through_proxy_and_report(decision: str, reason: str, outcome: str, target: str | None,
                              family: str | None = None) -> tuple[float, bool, int]:
    """(the metric's count, whether the report finds the metric and the evidence agree, the
    report's fallback attempts) for one request that ended this way."""
    draft = Draft("0" * 32, 0.0, "POST", "/v1/chat/completions", True, decision=decision, reason=reason,
                  outcome=outcome, target_host=target, family=family)
    metrics = ProxyMetrics(ADMISSION)
    _count(metrics, draft, 0.001, outcome)
    text = generate_latest(metrics.registry).decode()
    record = EvidenceRecord.model_validate(request_record_fields(SimpleNamespace(), draft, 0.001))  # type: ignore[arg-type]
    inputs = ReportInputs(events_verdict=ChainVerdict(ok=True, records=0, last_sha256="", problems=[]), events=[],
                          events_sha256=None, evidence_present=True, evidence_verdict=None, evidence=[record],
                          evidence_sha256=None, metrics_text=text, scan=None, decision_sha256_after=None,
                          admission_sha256_after=None)
    fallback, _, reasons = fallback_section(inputs, RunEvents.of([]), blocked=False)
    metric = metric_sum(text, METRIC)
    assert metric is not None
    return metric, not any(r.code == "metrics_evidence_disagree" for r in reasons), fallback.attempts


def test_metric_and_report_agree_on_every_combination() -> None:
    disagreements: list[str] = []
    counted = 0
    for decision, reason, outcome, target in itertools.product(DECISIONS, REASONS, OUTCOMES, TARGETS):
        metric, agree, attempts = _through_proxy_and_report(decision, reason, outcome, target)
        expected = is_fallback_refusal(decision, reason)
        if not agree or metric != int(expected):
            disagreements.append(f"{decision}/{reason}/{outcome}/{target}: metric {metric:g}, "
                                 f"report {'agrees' if agree else 'disagrees'}")
        if attempts != int(is_fallback_attempt(decision, reason, target)):
            disagreements.append(f"{decision}/{reason}/{outcome}/{target}: report attempts {attempts}")
        counted += int(expected)
    assert disagreements == []
    # Control: the product did reach the fallback refusals (each reason, every outcome and target).
    assert counted == len(FALLBACK_CODES) * len(OUTCOMES) * len(TARGETS)


@pytest.mark.parametrize("code", ["missing_token", "invalid_token", "proxy_auth_required"])
@pytest.mark.parametrize("target", [None, "api.anthropic.com", "api.openai.com"])
def test_an_unauthenticated_request_is_never_a_fallback_attempt(code: str, target: str | None) -> None:
    """A client without the run's token asks for a provider (CONNECT api.anthropic.com, or a
    claude model): the proxy answers 401/407 and the request is not Case's."""
    # As proxy.app._dispatch leaves it: outcome unauthenticated, decision never "refused".
    metric, agree, attempts = _through_proxy_and_report("rejected", code, "unauthenticated", target)
    assert (metric, agree, attempts) == (0, True, 0)
    assert not is_fallback_refusal("rejected", code) and not is_fallback_attempt("rejected", code, target)


def test_egress_to_a_non_provider_is_counted_by_the_metric_but_not_an_attempt() -> None:
    assert _through_proxy_and_report("refused", "forward_proxy_refused", "refused", "telemetry.example.org",
                                     family="other") == (1, True, 0)
    assert _through_proxy_and_report("refused", "forward_proxy_refused", "refused", "api.anthropic.com",
                                     family="anthropic") == (1, True, 1)


def test_the_metric_reads_the_request_as_recorded() -> None:
    """The counter follows the decision and reason the evidence record states, nothing else
    the draft carries: a refusal the evidence calls an internal error is not counted."""
    kwargs: dict[str, Any] = {"family": "anthropic"}
    draft = Draft("0" * 32, 0.0, "POST", "/v1/chat/completions", True, decision="error", reason="internal_error",
                  outcome="unavailable", **kwargs)
    metrics = ProxyMetrics(ADMISSION)
    _count(metrics, draft, 0.001, "unavailable")
    assert metric_sum(generate_latest(metrics.registry).decode(), METRIC) == 0
