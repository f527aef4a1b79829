"""The proxy's enforcement decisions as pure functions: no socket, no event loop."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission import Admission
from proxy.allowlists import forwardable_request_headers
from proxy.app import Draft, request_record_fields
from proxy.evidence import PROXY_GENERATED_FIELDS, EvidenceLog, EvidenceRecord, records_from_bytes, utc_now_rfc3339
from proxy.hashchain import ChainError, HashChainWriter, read_chain
from proxy.model_policy import Family, classify_family, decide_model
from proxy.redact import REDACTED, Redactor
from proxy.request_policy import (
    FORWARDED,
    Endpoint,
    _provider_header_walk,
    external_endpoint,
    provider_header,
    routing_override,
)
from proxy.upstream_policy import UpstreamRefusal, UpstreamTarget, check_resolved_address, classify_upstream

ROOT = Path(__file__).resolve().parent.parent
ADMISSION = Admission.model_validate({**json.loads((ROOT / "config" / "admission.example.json").read_text()),
                                      "aliases": ["qwen-local-default"]})
SECRET = "s3cr3t-token-value-0123456789"


@pytest.mark.parametrize(("requested", "admitted", "code", "family", "rewritten"), [
    ("qwen3.6-35b-a3b", True, "ok", None, False),
    ("qwen-local-default", True, "ok", None, True),
    ("QWEN3.6-35B-A3B", False, "model_not_admitted", Family.OTHER, False),      # names match exactly
    (" qwen3.6-35b-a3b", False, "model_not_admitted", Family.OTHER, False),
    ("qwen3.6-35b-a3b\u200b", False, "model_not_admitted", Family.OTHER, False),
    ("claude-sonnet-4-6", False, "model_not_admitted", Family.ANTHROPIC, False),
    ("anthropic/claude-3-5-sonnet", False, "model_not_admitted", Family.ANTHROPIC, False),
    ("bedrock/anthropic.claude-v2", False, "model_not_admitted", Family.ANTHROPIC, False),
    ("\u0441laude-sonnet-4-6", False, "model_not_admitted", Family.ANTHROPIC, False),   # Cyrillic 'с'
    ("CLAUDE-SONNET-4-6 ", False, "model_not_admitted", Family.ANTHROPIC, False),
    ("openai/gpt-4o", False, "model_not_admitted", Family.OPENAI, False),
    ("o3-mini", False, "model_not_admitted", Family.OPENAI, False),
    ("gemini-2.5-pro", False, "model_not_admitted", Family.GOOGLE, False),
    ("llama-3-70b", False, "model_not_admitted", Family.OTHER, False),
    (None, False, "model_missing", None, False),
    ("", False, "model_missing", None, False),
    (["qwen3.6-35b-a3b"], False, "model_missing", None, False),
])
def test_model_pin(requested: object, admitted: bool, code: str, family: Family | None, rewritten: bool) -> None:
    d = decide_model(requested, ADMISSION)
    assert (d.admitted, d.code, d.family, d.alias_rewritten) == (admitted, code, family, rewritten)
    assert d.effective_model == ("qwen3.6-35b-a3b" if admitted else None)


def test_near_miss_of_the_admitted_name_says_how_to_fix_it() -> None:
    assert "names must match exactly" in decide_model("Qwen3.6-35B-A3B", ADMISSION).message
    assert classify_family("qwen3.6-35b-a3b") is Family.OTHER


@pytest.mark.parametrize(("body", "field", "family"), [
    ({"model": "m", "fallbacks": ["claude-sonnet-4-6"]}, "fallbacks", Family.ANTHROPIC),
    ({"model": "m", "api_base": "https://api.openai.com/v1"}, "api_base", Family.OPENAI),
    ({"model": "m", "base_url": "http://10.0.0.9"}, "base_url", Family.OTHER),
    ({"model": "m", "models": ["gemini-pro"]}, "models", Family.GOOGLE),
])
def test_routing_fields_are_refused_with_their_family(body: dict[str, object], field: str, family: Family) -> None:
    refusal = routing_override(body)
    assert refusal is not None and (refusal.param, refusal.family) == (field, family)
    assert routing_override({"model": "m", "messages": [], "chat_template_kwargs": {"x": 1}, "top_k": 5}) is None


_NAME_PIECES = st.sampled_from(["anthropic-", "ANTHROPIC-", "Anthropic-Version", "x-goog-", "X-Goog-Api-Key", "x-goog",
                                 "anthropic", "content-type", "x-stainless-lang", "-", "a", "K", "\u212a", "\u0130"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_NAME_PIECES | st.text(max_size=6), max_size=4).map("".join), max_size=6))
def test_the_provider_header_pre_check_never_hides_one_the_full_walk_refuses(names: list[str]) -> None:
    # The joined-name search answers most requests; it must agree with the walk over
    # every name (which it replaced on the usual path), refusal for refusal.
    fast, walked = provider_header(names), _provider_header_walk(names)
    assert (fast and (fast.code, fast.family, fast.message)) == (walked and (walked.code, walked.family, walked.message))


def test_provider_headers_are_refused_and_credentials_never_forwarded() -> None:
    refusal = provider_header(["content-type", "anthropic-version"])
    assert refusal is not None and refusal.family is Family.ANTHROPIC
    assert provider_header(["content-type", "x-stainless-lang", "x-codex-turn"]) is None
    out = forwardable_request_headers([("Authorization", "Bearer x"), ("X-Api-Key", "k"), ("Connection", "close"),
                                       ("X-Forwarded-Host", "api.anthropic.com"), ("x-stainless-lang", "python")])
    assert {k.lower() for k in out} == {"x-stainless-lang"}


@pytest.mark.parametrize(("url", "allowed", "klass"), [
    ("http://127.0.0.1:8000/v1", True, "loopback"),
    ("http://[::1]:8000/v1", True, "loopback"),
    ("http://10.1.2.3:8000/v1", True, "private"),
    ("http://169.254.169.254/v1", False, None),                 # cloud metadata, not a backend
    ("https://api.anthropic.com/v1", False, None),
    ("http://user:pw@127.0.0.1:8000/v1", False, None),         # credentials belong in the key variable
    ("ftp://127.0.0.1/v1", False, None),
    ("http://8.8.8.8/v1", False, None),
    # is_private says yes to these; none is a backend on the operators' network
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/v1", False, None),   # Teredo
    ("http://[64:ff9b:1::a00:1]/v1", False, None),                       # local-use NAT64
    ("http://[64:ff9b::808:808]/v1", False, None),                       # NAT64 of 8.8.8.8
    ("http://198.18.0.1/v1", False, None),                               # benchmarking
    ("http://192.0.2.1/v1", False, None),                                # documentation
    ("http://[2001:db8::1]/v1", False, None),                            # documentation
    ("http://0.0.0.0:8000/v1", False, None),
    ("http://100.64.0.7/v1", True, "private"),                           # CGNAT / tailnet
    ("http://[fd12:3456::1]/v1", True, "private"),                       # ULA
    ("http://[::ffff:192.168.1.5]/v1", True, "private"),                 # IPv4-mapped
    ("http://127.8.9.10:8000/v1", True, "loopback"),
])
def test_upstream_pin(url: str, allowed: bool, klass: str | None) -> None:
    target = classify_upstream(url)
    if allowed:
        assert isinstance(target, UpstreamTarget) and target.upstream_class.value == klass
        assert url not in target.fingerprint and "pw" not in target.fingerprint
    else:
        assert isinstance(target, UpstreamRefusal) and target.code


def test_known_provider_hosts_stay_refused_even_when_listed() -> None:
    assert isinstance(classify_upstream("https://api.openai.com/v1", {"api.openai.com"}), UpstreamRefusal)
    listed = classify_upstream("http://gpu-box.internal:8000/v1", {"gpu-box.internal"})
    assert isinstance(listed, UpstreamTarget) and listed.upstream_class.value == "allowlisted"
    # Connect-time checks (no DNS rebinding): a listed name may not land on the metadata
    # service; a loopback name may land only on loopback.
    assert check_resolved_address(listed, "10.0.0.5") and not check_resolved_address(listed, "169.254.169.254")
    local = classify_upstream("http://localhost:8000/v1")
    assert isinstance(local, UpstreamTarget)
    assert check_resolved_address(local, "127.0.0.1") and not check_resolved_address(local, "93.184.216.34")


@pytest.mark.parametrize(("url", "authority"), [
    ("http://localhost/v1", "localhost"), ("http://localhost:8000/v1", "localhost:8000"),
    ("http://[::1]:8000/v1", "[::1]:8000"), ("http://[::1]/v1", "[::1]"), ("http://10.0.0.5:443/v1", "10.0.0.5:443"),
])
def test_target_authority_is_the_host_header(url: str, authority: str) -> None:
    """The Host header the backend client sends: IPv6 bracketed, the scheme's default
    port left out (and only that port)."""
    target = classify_upstream(url)
    assert isinstance(target, UpstreamTarget) and target.authority == authority


def test_forwarded_routes_are_never_other_providers_endpoints() -> None:
    """_dispatch skips the endpoint scan for the forwarded routes on this ground."""
    assert [p for p in FORWARDED if external_endpoint(p) is not None] == []
    assert external_endpoint("/v1/messages") is not None


CLEAN_RECORD = {"kind": "request", "path": "/v1/chat/completions", "reason": "ok", "usage": {"prompt_tokens": 3},
                "requested_model": "qwen3.6-35b-a3b", "upstream_fingerprint": "sha256:00ff"}


@pytest.mark.parametrize("dirty", [
    {"path": f"/v1/x/{SECRET}"},
    {"requested_model": "sk-ant-" + "a" * 30},
    {"reason": "Bearer abcdefghijklmnop"},
    {"usage": {"note": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLXZhbHVl"}},
    {"target_host": "https://u:p@example.org/"},
    {f"key-{SECRET}": 1},
    {"tags": ["x", "AWS_SECRET_ACCESS_KEY=" + "A" * 40]},
    {"note": "aws_\u017fecret_access_key=" + "B" * 40},   # long s: (?i) folds it to 's'
])
def test_redact_obj_fast_path_is_sound(dirty: dict[str, object]) -> None:
    """The pre-check over the whole record must never let a finding through."""
    r = Redactor([SECRET])
    clean = dict(CLEAN_RECORD)
    assert r.redact_obj(clean) is clean  # nothing to redact: no copy, no regex
    out = r.redact_obj({**clean, **dirty})
    text = json.dumps(out)
    assert REDACTED in text and SECRET not in text and "sk-ant-aaaa" not in text and "u:p@" not in text


def test_redact_obj_handles_secrets_that_json_escapes() -> None:
    quoted = 'pa"ss\\word-1234567'
    r = Redactor([quoted])
    out = r.redact_obj({"reason": f"x {quoted} y", "n": 1})
    assert out == {"reason": f"x {REDACTED} y", "n": 1}


def test_request_record_fields_are_a_valid_evidence_record() -> None:
    """The hot path writes a plain dict; readers validate it as an EvidenceRecord."""
    state = SimpleNamespace(target=classify_upstream("http://127.0.0.1:8000/v1"))
    draft = Draft("rid1", 0.0, "POST", "/v1/chat/completions", False)
    draft.endpoint, draft.decision, draft.reason, draft.forwarded = Endpoint.CHAT, "admitted", "ok", True
    draft.usage.prompt_tokens, draft.ttft_s = 12, 0.004
    fields = request_record_fields(state, draft, 0.01)  # type: ignore[arg-type]
    assert None not in fields.values()
    record = EvidenceRecord.model_validate(fields)
    assert record.upstream_class == "loopback" and record.usage is not None and record.usage.prompt_tokens == 12
    assert record.usage.completion_tokens is None and record.ttft_ms == 4.0


def _free_text_fields() -> list[str]:
    """EvidenceRecord's string fields the per-request pre-check must read."""
    return [name for name, f in EvidenceRecord.model_fields.items()
            if name not in PROXY_GENERATED_FIELDS and f.annotation in (str, str | None)]


def test_the_skipped_fields_are_never_free_text_from_outside() -> None:
    """Skipping a field is sound only for values the proxy makes: every skipped string
    field is one the proxy fills from its own vocabulary or clock, never a request's."""
    skipped_strings = {name for name, f in EvidenceRecord.model_fields.items()
                       if name in PROXY_GENERATED_FIELDS and f.annotation in (str, str | None)}
    assert skipped_strings == {"time", "endpoint", "family", "upstream_class", "upstream_fingerprint",
                               "forwarding_sha256"}  # a line hash the proxy computed
    assert {"request_id", "method", "path", "requested_model", "served_model", "target_host",
            "reason"} <= set(_free_text_fields())


@pytest.mark.parametrize("field", _free_text_fields())
def test_a_secret_in_any_free_text_field_is_redacted_on_the_hot_path(tmp_path: Path, field: str) -> None:
    log = EvidenceLog(tmp_path / "e.jsonl", Redactor([SECRET]))
    log.open()
    clean = {"kind": "request", "time": "2026-11-25T00:00:00.000Z", "request_id": "r1", "path": "/v1/models"}
    log.write_fields(dict(clean))  # write_fields extends the dict it is given with the chain fields
    log.write_fields({**clean, field: f"x-{SECRET}-y"})
    log.write_fields({**clean, field: "sk-ant-" + "q" * 24})  # a token shape, unregistered
    log.close()
    text = (tmp_path / "e.jsonl").read_text()
    assert SECRET not in text and "sk-ant-qqqq" not in text and text.count(REDACTED) == 2
    verdict, records = records_from_bytes((tmp_path / "e.jsonl").read_bytes())
    assert verdict.ok and len(records) == 3


def test_a_record_with_the_proxys_own_id_and_vetted_values_is_not_scanned(tmp_path: Path) -> None:
    """The common admitted record holds nothing from outside once the proxy drew its id:
    the pre-check then has nothing to scan. An id a client sent is still scanned."""
    scans: list[str] = []

    class CountingRedactor(Redactor):
        def may_match(self, text: str) -> bool:
            scans.append(text)
            return super().may_match(text)

    r = CountingRedactor([SECRET])
    r.vet_clean(["qwen3.6-35b-a3b", "POST", "/v1/chat/completions", "ok"])
    scans.clear()
    log = EvidenceLog(tmp_path / "e.jsonl", r)
    log.open()
    record = {"kind": "request", "time": "2026-11-25T00:00:00.000Z", "request_id": "ab" * 16, "method": "POST",
              "path": "/v1/chat/completions", "requested_model": "qwen3.6-35b-a3b", "reason": "ok", "status": 200}
    log.write_fields(dict(record), own_id=True)
    assert scans == []
    log.write_fields(dict(record))
    assert scans == ["ab" * 16]
    log.write_fields({**record, "request_id": f"x-{SECRET}"})
    log.close()
    _, records = records_from_bytes((tmp_path / "e.jsonl").read_bytes())
    assert [x.request_id for x in records] == ["ab" * 16, "ab" * 16, f"x-{REDACTED}"]


def test_stage_fields_adds_the_chain_fields(tmp_path: Path) -> None:
    writer = HashChainWriter(tmp_path / "c.jsonl")
    writer.open()
    writer.stage_fields({"a": 1})
    writer.stage_fields({})
    writer.append({"b": 2})  # writes the staged records first
    with pytest.raises(ChainError):
        writer.stage_fields({"seq": 7})
    writer.close()
    verdict, records = read_chain(tmp_path / "c.jsonl")
    assert verdict.ok and [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["a"] == 1 and records[1] == {"seq": 1, "prev_sha256": records[1]["prev_sha256"]}
    lines = (tmp_path / "c.jsonl").read_bytes().splitlines()
    assert records[2]["prev_sha256"] == hashlib.sha256(lines[1]).hexdigest()


def test_evidence_time_is_rfc3339_utc_with_milliseconds() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = utc_now_rfc3339()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    assert before <= datetime.fromisoformat(stamp.replace("Z", "+00:00")) <= after


def test_evidence_time_never_rounds_into_the_next_second(monkeypatch: pytest.MonkeyPatch) -> None:
    # The millisecond suffix is looked up in a table: the last instant of a second is
    # .999, never an index past it; the first is .000.
    monkeypatch.setattr("proxy.evidence.time.time", lambda: 1_764_000_000.99995)
    assert utc_now_rfc3339() == "2025-11-24T16:00:00.999Z"
    monkeypatch.setattr("proxy.evidence.time.time", lambda: 1_764_000_001.0)
    assert utc_now_rfc3339() == "2025-11-24T16:00:01.000Z"


@pytest.mark.parametrize(("kind", "sample"), [
    ("pem_private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----"),
    ("anthropic_key", "sk-ant-" + "b" * 24),
    ("openai_key", "sk-proj-" + "c" * 24),
    ("github_token", "ghp_" + "d" * 36),
    ("slack_token", "xoxb-" + "1" * 12),
    ("aws_access_key", "AKIA" + "E" * 16),
    ("aws_secret_key", "aws_secret_access_key = " + "f" * 40),
    ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl"),
    ("bearer", "Authorization: Bearer " + "g" * 20),
    ("url_credentials", "http://user:pass@host/"),
])
def test_every_token_shape_passes_the_pre_check(kind: str, sample: str) -> None:
    r = Redactor()
    assert r.may_match(f"before {sample} after")
    assert kind in {f.kind for f in r.find(f"before {sample} after")}


def test_vetted_values_hold_no_secret_and_are_forgotten_with_a_new_secret() -> None:
    r = Redactor([SECRET])
    r.vet_clean(["qwen3.6-35b-a3b", "/v1/chat/completions", f"model-{SECRET}", "sk-ant-" + "q" * 24])
    assert r.clean == {"qwen3.6-35b-a3b", "/v1/chat/completions"}
    r.add_secret("qwen3.6-35b-a3b")
    assert r.clean == frozenset()


def test_a_vetted_value_is_written_as_is_and_others_still_redacted(tmp_path: Path) -> None:
    r = Redactor([SECRET])
    r.vet_clean(["qwen3.6-35b-a3b"])
    log = EvidenceLog(tmp_path / "e.jsonl", r)
    log.open()
    base = {"kind": "request", "time": "2026-11-25T00:00:00.000Z", "request_id": "r1"}
    log.write_fields({**base, "requested_model": "qwen3.6-35b-a3b", "served_model": f"x-{SECRET}"})
    log.close()
    _, records = records_from_bytes((tmp_path / "e.jsonl").read_bytes())
    assert records[0].requested_model == "qwen3.6-35b-a3b" and records[0].served_model == f"x-{REDACTED}"
