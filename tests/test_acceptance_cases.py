"""The acceptance case format, the judgement of a reply and the worker's framing (pure
parts and a scripted stand-in worker; the hostile packages are in test_acceptance_hostile)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.acceptance_cases import (
    call,
    case,
    check,
    identity,
    judge,
    load_cases,
    raises,
    returns,
    returns_approx,
)
from harness.acceptance_run import parse_reply, run_cases
from harness.acceptance_worker import encode
from harness.fixture_catalog import acceptance_result


def returned(value: object, **extra: object) -> dict[str, object]:
    return {"outcome": "returned", "value": encode(value), "attrs": {}, "isinstance": {}, "stdout": "",
            "stderr": "", **extra}


def test_a_value_case_passes_only_on_the_expected_value() -> None:
    c = case("slug", call("slugkit.slugify", "Hello World"), returns("hello-world"))
    assert judge(c, returned("hello-world")).passed
    bad = judge(c, returned("hello_world"))
    assert not bad.passed and "expected eq 'hello-world', got 'hello_world'" in bad.reasons[0]
    assert not judge(c, {"outcome": "raised", "type": "builtins.TypeError", "message": "x", "attrs": {},
                         "isinstance": {}, "stdout": "", "stderr": ""}).passed


@pytest.mark.parametrize("reply", [None, "ok", {"passed": True}, {"outcome": "returned"},
                                   {"outcome": "returned", "value": "hello-world"},
                                   {"outcome": "returned", "value": {"t": "str", "v": 3}},
                                   {"outcome": "error", "message": "cannot import"}])
def test_a_malformed_or_self_judged_reply_fails(reply: object) -> None:
    c = case("slug", call("slugkit.slugify", "Hello World"), returns("hello-world"))
    assert judge(c, reply).passed is False


def test_is_means_the_singleton_not_an_equal_value() -> None:
    c = case("flag", call("pager.flag"), check("outcome", want="returned"), check("value", op="is", want=True))
    assert judge(c, returned(True)).passed
    assert not judge(c, returned(1)).passed
    assert not judge(case("eq", call("f"), returns(True)), returned("True")).passed


def test_raises_needs_the_class_the_worker_was_asked_about_and_its_attributes() -> None:
    c = case("unknown", call("unitconv.units.convert", 1, "kg", "furlong"),
             raises("unitconv.units.UnknownUnitError", unit="furlong"))
    assert c.probe.types == ["unitconv.units.UnknownUnitError"] and c.probe.attrs == ["unit"]  # type: ignore[union-attr]
    ok = {"outcome": "raised", "type": "x.Y", "message": "m", "attrs": {"unit": encode("furlong")},
          "isinstance": {"unitconv.units.UnknownUnitError": True}, "stdout": "", "stderr": ""}
    assert judge(c, ok).passed
    assert not judge(c, {**ok, "attrs": {"unit": encode("stone")}}).passed
    assert not judge(c, {**ok, "isinstance": {"unitconv.units.UnknownUnitError": False}}).passed
    assert not judge(c, {**ok, "attrs": {"unit": {"t": "missing"}}}).passed


def test_approx_contains_and_identity() -> None:
    assert judge(case("a", call("f"), returns_approx(2.2046226218)), returned(2.20462262185)).passed
    assert not judge(case("a", call("f"), returns_approx(2.2046226218)), returned(2.2046)).passed
    inlist = case("c", call("f"), check("outcome", want="returned"), check("value", op="contains", want="convert"))
    assert judge(inlist, returned(["convert", "known_units"])).passed
    assert not judge(inlist, returned(["converted"])).passed
    same = case("i", identity("a.b", "a.c"), check("ids", op="ids_equal", want=True))
    assert judge(same, {"outcome": "returned", "ids": [7, 7]}).passed
    assert not judge(same, {"outcome": "returned", "ids": [7, 8]}).passed
    assert not judge(same, {"outcome": "returned", "ids": [7]}).passed


def test_a_reply_counts_only_with_its_own_nonce_and_nothing_else() -> None:
    assert parse_reply(b'{"nonce": "n1", "result": {"outcome": "error", "message": ""}}', "n1") == {
        "outcome": "error", "message": ""}
    for line in (b"all 123 cases passed", b'{"nonce": "n0", "result": {}}', b'{"nonce": "n1"}',
                 b'{"nonce": "n1", "result": {}, "passed": true}', b"[1]", b"\xff\xfe"):
        with pytest.raises(ValueError):
            parse_reply(line, "n1")


def test_cases_file_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "cases.py"
    path.write_text("CASES = []\n")
    with pytest.raises(ValueError, match="non-empty list"):
        load_cases(path)
    path.write_text("from harness.acceptance_cases import call, case, returns\n"
                    "CASES = [case('a', call('m.f'), returns(1)), case('a', call('m.g'), returns(2))]\n")
    with pytest.raises(ValueError, match="two cases are named 'a'"):
        load_cases(path)
    path.write_text("from harness.acceptance_cases import call\nCASES = [call('not a name!')]\n")
    with pytest.raises(ValueError, match="not a dotted name"):
        load_cases(path)
    path.write_text("CASES = [\n")
    with pytest.raises(ValueError, match="cannot load the cases: SyntaxError"):
        load_cases(path)


# A stand-in worker: answers every request with the value 1, then does what it is told.
STAND_IN = """
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    result = {"outcome": "returned", "value": {"t": "int", "v": 1}, "stdout": "", "stderr": ""}
    print(json.dumps({"nonce": req["nonce"], "result": result}), flush=True)
AFTER
"""


@pytest.mark.parametrize("after,why", [("print('one more', flush=True)", "garbage on the worker's stdout after"),
                                       ("sys.exit(3)", "exited with code 3 after the last case")])
def test_what_the_worker_does_after_its_last_reply_still_counts(tmp_path: Path, after: str, why: str) -> None:
    """Every case answered right, then garbage or a failing exit: not a pass."""
    cases = [case(f"c{i}", call("m.f", i), returns(1)) for i in range(3)]
    argv = [sys.executable, "-c", STAND_IN.replace("AFTER", after)]
    run = run_cases(cases, argv, cwd=tmp_path, env={}, stderr=tmp_path / "err", case_timeout_s=10,
                    total_timeout_s=30)
    assert all(v is not None and v.passed for v in run.verdicts)
    result = acceptance_result(cases, run, "", 0.0)
    assert result.passed is False and result.total == 3 and why in result.output_tail
    clean = run_cases(cases, [sys.executable, "-c", STAND_IN.replace("AFTER", "")], cwd=tmp_path, env={},
                      stderr=tmp_path / "err", case_timeout_s=10, total_timeout_s=30)
    assert acceptance_result(cases, clean, "", 0.0).passed  # the control: the same, minus that


def test_a_worker_that_never_reads_is_bounded_by_the_total_time(tmp_path: Path) -> None:
    cases = [case(f"c{i}", call("m.f", "x" * 60000), returns(1)) for i in range(20)]
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    run = run_cases(cases, argv, cwd=tmp_path, env={}, stderr=tmp_path / "err", case_timeout_s=1,
                    total_timeout_s=2)
    assert run.timed_out and run.not_run == 20 and run.worker_exit is not None
