"""The code vocabularies (proxy.codes) are pinned against what documents and reads
them: the docs' tables and lists, the error table, the evidence schema and the report's
fallback set. A value renamed, added or dropped in one place and not the others fails
here; so does a member whose serialised form is not its bare value."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import orjson

from proxy.codes import (
    FALLBACK_CODES,
    Decision,
    DecodingResult,
    ErrorCode,
    Outcome,
    Reason,
    UpstreamErrorKind,
    backend_status_reason,
)
from proxy.errors import ERRORS
from proxy.evidence import EvidenceRecord
from proxy.fallback import is_fallback_refusal
from proxy.metrics import UPSTREAM_ERROR_KINDS
from proxy.stream_check import StreamFault

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _section(text: str, heading: str) -> str:
    """The body of the markdown section ``heading`` (up to the next heading of any level)."""
    start = text.index(heading + "\n") + len(heading) + 1
    end = re.search(r"^#", text[start:], re.M)
    return text[start:start + end.start()] if end else text[start:]


def _table_rows(section: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return rows[2:]  # without the header and its rule


def _listed(text: str, label: str) -> set[str]:
    """The comma-separated words in ``label (a, b, c)`` in ``text``."""
    m = re.search(re.escape(label) + r"\s*\(([^)]*)\)", text)
    assert m is not None, f"{label!r} not found"
    return {w.strip() for w in m.group(1).split(",")}


def _values(enum: type) -> set[str]:
    return {m.value for m in enum}  # type: ignore[attr-defined]


def test_error_codes_are_the_http_api_table_plus_the_relayed_backend_error() -> None:
    rows = _table_rows(_section((DOCS / "http-api.md").read_text(encoding="utf-8"), "## Error codes"))
    documented = {row[0].strip("`") for row in rows}
    assert documented == _values(ErrorCode) - {ErrorCode.BACKEND_ERROR}
    assert set(ERRORS) == set(ErrorCode) - {ErrorCode.BACKEND_ERROR}
    assert "code `backend_error`" in (DOCS / "http-api.md").read_text(encoding="utf-8")


def test_fallback_codes_are_the_documented_ones_and_what_the_report_counts() -> None:
    rows = _table_rows(_section((DOCS / "http-api.md").read_text(encoding="utf-8"), "## Error codes"))
    documented = {row[0].strip("`") for row in rows if row[-1] == "yes"}
    counted = {code for code in _values(ErrorCode) if is_fallback_refusal("refused", code)}
    assert _values_of(FALLBACK_CODES) == documented == counted


def _values_of(members: frozenset[ErrorCode]) -> set[str]:
    return {m.value for m in members}


def test_outcomes_are_the_documented_metric_labels() -> None:
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    assert _listed(reference, "`outcome`") == _values(Outcome)


def test_decisions_are_the_documented_ones_and_the_evidence_schema() -> None:
    api = (DOCS / "http-api.md").read_text(encoding="utf-8")
    listed = re.search(r"decision \(([^)]*)\)", api)
    assert listed is not None
    assert set(re.findall(r"`([a-z_]+)`", listed.group(1))) == _values(Decision)
    literal = next(a for a in get_args(EvidenceRecord.model_fields["decision"].annotation) if a is not type(None))
    assert set(get_args(literal)) == _values(Decision)


def test_reasons_besides_error_codes_are_documented() -> None:
    api = (DOCS / "http-api.md").read_text(encoding="utf-8")
    for reason in (Reason.OK, Reason.CLIENT_DISCONNECTED):
        assert f"`{reason}`" in api
    assert "`backend_status_<status>`" in api and backend_status_reason(400) == "backend_status_400"
    # the default that every path replaces is no code of any other vocabulary
    assert Reason.UNHANDLED not in _values(ErrorCode) | _values(Outcome)


def test_upstream_error_kinds_are_the_documented_metric_labels() -> None:
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    assert _listed(reference, "`kind`") == _values(UpstreamErrorKind) == set(UPSTREAM_ERROR_KINDS)


def test_decoding_results_are_the_documented_metric_labels() -> None:
    policy = (DOCS / "request-policy.md").read_text(encoding="utf-8")
    m = re.search(r"`result`: ([a-z_,\s]+)\)", policy)
    assert m is not None
    assert {w.strip() for w in m.group(1).split(",")} == _values(DecodingResult)


def test_stream_faults_are_error_codes() -> None:
    assert _values(StreamFault) <= _values(ErrorCode)


def test_members_serialise_as_their_bare_values() -> None:
    """Records, metric labels and log lines carry exactly the strings they did as literals."""
    for enum in (Decision, Outcome, ErrorCode, Reason, UpstreamErrorKind, DecodingResult):
        for member in enum:
            value = member.value
            assert orjson.dumps({"k": member}) == orjson.dumps({"k": value})
            assert json.dumps({"k": member}) == json.dumps({"k": value})
            logged = "%s" % (member,)  # noqa: UP031 - the way logging formats a line
            assert (f"{member}", str(member), logged) == (value, value, value)
            assert member == value and hash(member) == hash(value)
