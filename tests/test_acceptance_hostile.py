"""Hostile Case packages against the acceptance verdict (issue 17, first attack).

Each test commits a package that attacks the acceptance run from inside (import-time code
or the function under test), exports it as a run does, and runs the acceptance cases in
the same sandbox as a run (``harness.acceptance_run.sandbox_wrap``). The verdict is
computed in the harness from values the worker never sees, so every attack ends ``fail``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from harness import sandbox as sbx
from harness.acceptance_run import sandbox_wrap
from harness.fixture_catalog import AcceptanceResult, Fixture, export_commit, load_fixture, materialize, run_acceptance
from harness.profile import static_protected
from tests.test_fixtures import apply_session_writes, commit_all

FIXTURE = "r1-string-slugify"

# (a) The attack of the issue: at import, make pytest's runner a no-op, write a passing
# junit file where the runner's argv says, and (variant) leave with status 0 at once.
RUNNER_PATCH = '''
import os, sys
try:
    import _pytest.python
    _pytest.python.Function.runtest = lambda self: None
except Exception:
    pass
for _arg in sys.argv:
    if _arg.startswith("--junitxml="):
        with open(_arg.split("=", 1)[1], "w") as _fh:
            _fh.write('<testsuites><testsuite name="pytest" tests="90" failures="0" errors="0" skipped="0">'
                      '</testsuite></testsuites>')
        if EXIT:
            os._exit(0)
if EXIT and "acceptance_worker" in " ".join(sys.argv):
    os._exit(0)


def slugify(text, *, separator="-", max_length=None, lowercase=True):
    return "wrong"
'''

# (b) Rewrite the worker from inside: every reply claims success in every shape the
# worker knows (a value, equal ids, keyword-only parameters), and json.dumps adds "ok".
FORGER = '''
import json, sys

_main = sys.modules["__main__"]
_dumps = json.dumps


def _fake(probe, import_root):
    op = probe.get("op")
    if op == "identity":
        return {"outcome": "returned", "ids": [1] * len(probe["exprs"])}
    if op == "signature":
        return {"outcome": "returned", "params": [
            {"name": n, "kind": "KEYWORD_ONLY", "default": {"t": "bool", "v": True}}
            for n in ("separator", "max_length", "lowercase")]}
    return {"outcome": "returned", "value": {"t": "str", "v": "ok"}, "attrs": {},
            "isinstance": {t: True for t in probe.get("types", [])}, "stdout": "", "stderr": ""}


def _forged_dumps(obj, *args, **kwargs):
    if isinstance(obj, dict) and "nonce" in obj:
        obj = {"nonce": obj["nonce"], "result": dict(obj["result"], status="ok", passed=True)}
    return _dumps(obj, *args, **kwargs)


_main.answer = _fake
json.dumps = _forged_dumps
print("PASSED", flush=True)


def slugify(text, *, separator="-", max_length=None, lowercase=True):
    return "ok"
'''

# (c) A correct solution that also writes garbage on every descriptor it can write to.
GARBAGE = '''
import os
for _fd in range(3, 64):
    try:
        os.write(_fd, b"all 123 cases passed\\n")
    except OSError:
        pass
'''

# (d) A correct solution that hangs on one input (case 20 or so of 123).
HANG = '''
import time as _time
from . import core as _core
_right = _core.slugify


def _hanging(text, *, separator="-", max_length=None, lowercase=True):
    if text == "Straße":
        _time.sleep(3600)
    return _right(text, separator=separator, max_length=max_length, lowercase=lowercase)


slugify = _core.slugify = _hanging
'''

# (e) A correct solution whose process leaves (status 0) in the middle of the cases.
EXIT_EARLY = '''
import os as _os
from . import core as _core
_right = _core.slugify
_calls = [0]


def _leaving(text, *, separator="-", max_length=None, lowercase=True):
    _calls[0] += 1
    if _calls[0] == 10:
        _os._exit(0)
    return _right(text, separator=separator, max_length=max_length, lowercase=lowercase)


slugify = _core.slugify = _leaving
'''

# (f) Look for the expected values everywhere the worker can: its own memory (every live
# string, the requests included), the argv and environment of every process it can see,
# and every readable file of its sandbox. Report to stderr what was found. It never
# computes a slug itself, so a needle it finds came from outside; it holds and reports
# each needle reversed, so no needle it made itself is found in its memory.
SEEKER = '''
import gc, os, sys
_done = [False]
REVERSED = NEEDLE_LIST  # reversed: neither this file nor this module holds a needle itself
CONTROL = "a request"  # found when a live dict is a request: the scan reaches requests


def _members(obj):
    try:
        return [*obj.keys(), *obj.values()] if isinstance(obj, dict) else list(obj)
    except Exception:
        return []


def _memory():
    """What needles the worker's live objects hold (the request being answered too)."""
    found = set()
    live = [o for o in gc.get_objects() if isinstance(o, (dict, list, tuple, set))]
    frame = sys._getframe()
    while frame is not None:  # every caller's locals: the worker's request and raw line
        live.append(dict(frame.f_locals))
        frame = frame.f_back
    strings = set()
    for obj in live:
        if isinstance(obj, dict) and "nonce" in obj and "probe" in obj:
            found.add("memory:" + CONTROL)
        for m in _members(obj):
            if isinstance(m, bytes):
                m = m.decode("utf-8", "replace")
            if isinstance(m, str):
                strings.add(m)
    blob = "\\n".join(strings)
    # Memory is collected above, before any needle exists as a string; a hit is
    # recorded reversed, so no needle outlives the test of it.
    found.update("memory:" + r for r in REVERSED if r[::-1] in blob)
    return found


def _scan():
    found, files, control_files = _memory(), 0, 0
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        for part in ("cmdline", "environ"):
            try:
                data = open(f"/proc/{pid}/{part}", "rb").read().decode("utf-8", "replace")
            except OSError:
                continue
            found.update(f"proc:{r}" for r in REVERSED if r[::-1] in data)
    scratch = os.path.dirname(os.getcwd())  # the worker's own directory first, then all
    skip = {"/proc", "/sys", "/dev", scratch}
    for top in (scratch, "/"):
        for root, dirs, names in os.walk(top):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
            for name in names:
                path = os.path.join(root, name)
                if files >= 40000 or path.endswith((".pyc", ".so", ".a", ".zip", ".whl", ".gz")):
                    continue
                files += 1
                try:
                    with open(path, "rb") as fh:
                        data = fh.read(1 << 18).decode("utf-8", "replace")
                except OSError:
                    continue
                found.update(f"file:{r}:{path}" for r in REVERSED if r[::-1] in data)
                control_files += "acceptance_worker" in data
    line = f"SCAN files={files} control_files={control_files} found={sorted(found)!r}"
    os.write(2, line[:900].encode() + b"\\n")  # past the worker's capture


def slugify(text, *, separator="-", max_length=None, lowercase=True):
    """Never computes a slug: any needle in memory came from outside."""
    if not _done[0]:
        _done[0] = True
        _scan()
    else:  # every later request too: one of them might carry what the first did not
        hits = sorted(f for f in _memory() if f != "memory:" + CONTROL)
        if hits:
            os.write(2, f"HIT {hits!r}"[:300].encode() + b"\\n")
    return "x"
'''


def sandboxed() -> object:
    probed = sbx.probe_bwrap()
    if isinstance(probed, str):
        pytest.fail(f"these tests need the acceptance sandbox: {probed}")
    masked = sbx.masked_paths(sbx.interpreter_paths(), [p for _, p in static_protected()])
    return sandbox_wrap(probed.path, masked)


def commit_package(tmp_path: Path, init_py: str, *, solved: bool) -> tuple[Fixture, Path]:
    """The r1 task repo with ``init_py`` as slugkit/__init__.py (after the recorded
    solution if ``solved``), committed and exported like a run's checkout."""
    fixture = load_fixture(FIXTURE)
    repo = tmp_path / "repo"
    materialize(fixture, repo, tmp_path / "task.md")
    if solved:
        apply_session_writes(fixture, repo)
    init = repo / "slugkit" / "__init__.py"
    init.write_text(("from .core import slugify\n" if solved else "") + init_py, encoding="utf-8")
    final = commit_all(repo, "hostile")
    return fixture, export_commit(repo, final, tmp_path / "checkout")


def run(fixture: Fixture, checkout: Path, **kwargs: object) -> AcceptanceResult:
    return run_acceptance(fixture, checkout, wrap=sandboxed(), **kwargs)  # type: ignore[arg-type]


def value_cases(fixture: Fixture) -> int:
    """Cases that want a non-empty string value: a forger cannot know which."""
    return sum(1 for c in fixture.load_cases()
               if any(chk.on == ("value",) and chk.op == "eq" and isinstance(chk.want, str) and chk.want
                      for chk in c.checks))


def test_the_solution_passes_in_the_sandbox(tmp_path: Path) -> None:
    """The control for the tests below: the recorded solution, untouched, passes there."""
    fixture, checkout = commit_package(tmp_path, "", solved=True)
    result = run(fixture, checkout)
    assert result.passed, result.output_tail
    assert result.total == len(fixture.load_cases()) > 100


@pytest.mark.parametrize("exit_at_import", [False, True], ids=["patch-runtest", "patch-and-os-exit"])
def test_runner_patch_is_a_fail(tmp_path: Path, exit_at_import: bool) -> None:
    fixture, checkout = commit_package(tmp_path, RUNNER_PATCH.replace("EXIT", str(exit_at_import)), solved=False)
    result = run(fixture, checkout)
    assert result.passed is False
    if exit_at_import:  # the worker is gone before its first reply: every case not run
        assert result.errors == result.total and "exited before answering" in result.output_tail
    else:  # every case answered; every case that wants a slug got the wrong value
        assert result.errors == 0 and result.failed >= value_cases(fixture) > 50


def test_forged_replies_are_judged_by_their_values(tmp_path: Path) -> None:
    fixture, checkout = commit_package(tmp_path, FORGER, solved=False)
    result = run(fixture, checkout)
    assert result.passed is False
    # The forged replies were well-framed, so they were judged, and wrong: every case
    # that wants a slug fails (structural ones a forger can guess, identity or the
    # signature, and the exceptions it claims to be, may pass: see docs/threat-model.md).
    assert result.errors == 0
    assert result.failed >= value_cases(fixture) > 50, result.output_tail


def test_garbage_on_the_reply_channel_fails_the_rest(tmp_path: Path) -> None:
    fixture, checkout = commit_package(tmp_path, GARBAGE, solved=True)
    result = run(fixture, checkout)
    assert result.passed is False
    assert result.errors == result.total and result.exit_code == 2
    assert "garbage on the worker's stdout" in result.output_tail


def test_a_hanging_case_times_out_and_fails_the_rest(tmp_path: Path) -> None:
    fixture, checkout = commit_package(tmp_path, HANG, solved=True)
    fast = dataclasses.replace(fixture, spec=fixture.spec.model_copy(update={"case_timeout_s": 2.0}))
    result = run(fast, checkout)
    assert result.passed is False and result.timed_out and result.exit_code == -1
    assert result.failed == 0 and 0 < result.errors < result.total  # the cases before it passed
    assert "did not answer in time" in result.output_tail
    assert result.duration_s < 30


def test_a_worker_that_exits_early_fails_the_rest(tmp_path: Path) -> None:
    fixture, checkout = commit_package(tmp_path, EXIT_EARLY, solved=True)
    result = run(fixture, checkout)
    assert result.passed is False and result.exit_code == 2
    assert result.failed == 0 and 0 < result.errors < result.total
    assert "exited before answering" in result.output_tail


def expected_only_strings(fixture: Fixture) -> list[str]:
    """Expected slugs of the cases that appear in no probe (so only the harness knows
    them), distinctive enough for no accidental hit in a file of the machine."""
    probes = " ".join(c.probe.model_dump_json() for c in fixture.load_cases())
    wants = {chk.want for c in fixture.load_cases() for chk in c.checks if isinstance(chk.want, str)}
    return sorted(w for w in wants if len(w) >= 12 and w not in probes and re.fullmatch(r"[a-z]+(-[a-z0-9]+)+", w))


def test_the_expected_values_are_nowhere_the_worker_can_look(tmp_path: Path) -> None:
    fixture = load_fixture(FIXTURE)
    needles = expected_only_strings(fixture)
    assert len(needles) >= 6, needles
    fixture, checkout = commit_package(tmp_path, SEEKER.replace("NEEDLE_LIST", repr([n[::-1] for n in needles])),
                                      solved=False)
    slow = dataclasses.replace(fixture, spec=fixture.spec.model_copy(update={"case_timeout_s": 120.0}))
    result = run(slow, checkout, timeout_s=300)
    assert "HIT" not in result.output_tail, result.output_tail  # a later request held a needle
    match = re.search(r"SCAN files=(\d+) control_files=(\d+) found=(\[.*?\])\n", result.output_tail)
    assert match, result.output_tail
    found = ast.literal_eval(match.group(3))
    # The scan worked: it read files (its own worker script among them) and found the
    # request it was answering in its memory...
    control = "memory:a request"
    assert int(match.group(1)) > 100 and int(match.group(2)) >= 1
    assert control in found
    # ...and no expected value anywhere: not in memory, argv, environment or a file.
    assert [f for f in found if f != control] == []
    assert result.passed is False and result.errors == 0  # it answered every case, wrongly
