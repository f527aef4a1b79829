"""The docs name every code the code can emit, so a new code without docs breaks the build.

The codes are read from the source (the error table, and the string literals passed to
the functions that raise gate failures, upstream refusals and report reasons), not from
a list kept by hand.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from proxy.errors import ERRORS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def string_args(path: Path, func: str, *, position: int = 0, keyword: str | None = None) -> set[str]:
    """String literals passed to ``func(...)`` in ``path``, at ``position`` or as ``keyword``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name != func:
            continue
        args: list[ast.expr] = []
        if len(node.args) > position:
            args.append(node.args[position])
        args += [kw.value for kw in node.keywords if keyword is not None and kw.arg == keyword]
        out |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return out


def http_codes() -> set[str]:
    return set(ERRORS)


def gate_codes() -> set[str]:
    admission, gates = ROOT / "proxy" / "admission.py", ROOT / "harness" / "gates.py"
    missing = string_args(admission, "_load_json", position=2)  # also raised as ..._invalid
    return (string_args(gates, "_fail") | string_args(admission, "GateFailure", keyword="code")
            | string_args(admission, "ArtifactError") | missing | {m.replace("missing", "invalid") for m in missing})


def upstream_codes() -> set[str]:
    return string_args(ROOT / "proxy" / "upstream_policy.py", "UpstreamRefusal")


def report_codes() -> set[str]:
    """Every section's reasons: the report's own and the proxy proof's."""
    return string_args(ROOT / "harness" / "report.py", "fail") | string_args(ROOT / "harness" / "proxy_proof.py", "fail")


def undocumented(codes: set[str], text: str) -> list[str]:
    """Codes that do not appear in ``text`` as inline code (backticks)."""
    named = set(re.findall(r"`([a-z0-9_<>]+)`", text))
    return sorted(c for c in codes if c not in named)


def test_the_code_lists_are_read_from_the_source() -> None:
    """Negative control for the extraction: it finds codes known to exist in each place
    (so an empty or broken extraction cannot pass the checks below)."""
    assert {"model_not_admitted", "too_many_requests", "served_model_mismatch"} <= http_codes()
    assert {"work_item_mismatch", "admission_mismatch_backend", "external_fallback_configured", "secret_in_argv",
            "decision_record_missing", "decision_record_invalid", "admission_invalid",
            "admission_status_blocks"} <= gate_codes()
    assert {"base_url_has_credentials", "external_provider_host", "external_upstream"} <= upstream_codes()
    assert {"acceptance_tests_failed", "secret_found", "artifact_changed", "run_aborted",
            "evidence_mac_invalid", "proxy_pid_mismatch"} <= report_codes()
    assert len(gate_codes()) >= 18 and len(report_codes()) >= 20


def test_the_check_finds_a_missing_code() -> None:
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    assert undocumented({"work_item_mismatch"}, text) == []
    assert undocumented({"work_item_mismatch"}, text.replace("`work_item_mismatch`", "work item")) == \
        ["work_item_mismatch"]


def test_http_api_doc_names_every_error_code() -> None:
    assert undocumented(http_codes(), (DOCS / "http-api.md").read_text(encoding="utf-8")) == []


def test_troubleshooting_names_every_refusal_gate_and_report_code() -> None:
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    for kind, codes in (("HTTP error", http_codes()), ("gate", gate_codes()), ("upstream", upstream_codes()),
                        ("report reason", report_codes())):
        assert undocumented(codes, text) == [], f"{kind} codes missing from docs/troubleshooting.md"


def test_http_api_statuses_match_the_error_table() -> None:
    """Each row of the error-code table states the status the code really answers with."""
    text = (DOCS / "http-api.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", text, flags=re.MULTILINE))
    assert set(rows) == http_codes()
    assert {code: int(status) for code, status in rows.items()} == {c: s.status for c, s in ERRORS.items()}


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    words = len(re.findall(r"\S+", readme))
    assert words < 2000, f"README.md has {words} words; the newcomer's page stays under 2,000"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
