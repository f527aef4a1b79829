"""A request's record carries plain strings where the evidence log's per-request secret
pre-check reads them: a StrEnum member there (the codes of proxy.codes) would send every
record through the full redaction, a cost the benchmark showed (27 % more CPU per
request). The backend is the scripted test fixture (harness.scripted_backend)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.codes import Decision, ErrorCode, Reason
from proxy.evidence import EvidenceLog
from proxy.records import request_record_fields
from proxy.request_policy import Endpoint
from proxy.state import Draft
from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy  # noqa: F401


def test_record_codes_are_exact_strings_with_the_same_values(proxy: ProxyUnderTest) -> None:
    draft = Draft("ab" * 16, 0.0, "POST", "/v1/chat/completions", True, endpoint=Endpoint.CHAT,
                  decision=Decision.REFUSED, reason=ErrorCode.MODEL_NOT_ADMITTED)
    rec = request_record_fields(proxy.running.state, draft, 0.001)
    assert (type(rec["decision"]), type(rec["reason"])) == (str, str)
    assert (rec["decision"], rec["reason"]) == ("refused", "model_not_admitted")
    draft.decision, draft.reason = Decision.ADMITTED, Reason.OK
    rec = request_record_fields(proxy.running.state, draft, 0.001)
    assert (type(rec["decision"]), type(rec["reason"]), rec["reason"]) == (str, str, "ok")


async def test_ordinary_records_take_the_pre_checks_fast_path(
        proxy: ProxyUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    full: list[dict[str, Any]] = []
    redacted = EvidenceLog._redacted

    def counting(self: EvidenceLog, fields: dict[str, Any]) -> dict[str, Any]:
        full.append(fields)
        return redacted(self, fields)

    monkeypatch.setattr(EvidenceLog, "_redacted", counting)
    client = proxy.client()
    await client.chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "hi"}])
    stream = await client.chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    async for _ in stream:
        pass
    with pytest.raises(Exception):  # noqa: B017 - any refusal: model_not_admitted here
        await client.chat.completions.create(model="claude-sonnet-4-6", messages=[{"role": "user", "content": "x"}])
    reasons = [r["reason"] for r in proxy.requests_evidence()[-3:]]
    assert reasons == ["ok", "ok", "model_not_admitted"]
    assert full == []
