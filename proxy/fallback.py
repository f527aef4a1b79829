"""The one definition of a fallback attempt, shared by the proxy's metrics and the report.

A request is a *fallback refusal* when the proxy refused it (decision ``refused``) for
one of the reasons below: it tried to reach another model, provider or upstream. That is
what ``case_proxy_fallback_rejections_total`` counts (``proxy.app``) and what the report
compares that counter with (``harness.report``), both from the request's decision and
reason as its evidence record states them, so the two can only disagree when the
evidence or the scrape was tampered with or lost. A request without the run's token is
not Case's: its decision is ``rejected`` with an authentication reason, never a fallback
refusal, whatever it asked for.

The report's *fallback attempt* (``external_fallback``) is a fallback refusal, except a
forward-proxy refusal whose target is not a model provider's host: that is egress,
listed on its own (telemetry and update checks must not fail a run).
"""

from __future__ import annotations

from .codes import DECISION_REFUSED, FALLBACK_CODES, ErrorCode
from .upstream_policy import is_known_provider_host


def is_fallback_refusal(decision: str | None, reason: str | None) -> bool:
    """Refused because it tried to reach another model, provider or upstream: one count
    of ``case_proxy_fallback_rejections_total`` (label ``reason``)."""
    return decision == DECISION_REFUSED and reason in FALLBACK_CODES


def is_fallback_attempt(decision: str | None, reason: str | None, target_host: str | None) -> bool:
    """A fallback refusal that is not mere egress: a forward-proxy attempt counts only
    when its target is a model provider's host."""
    if not is_fallback_refusal(decision, reason):
        return False
    if reason == ErrorCode.FORWARD_PROXY_REFUSED:
        return bool(target_host) and is_known_provider_host(target_host or "")
    return True
