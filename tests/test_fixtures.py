"""Stage 2 fixtures: they load, materialize cleanly, fail as shipped, and their sessions solve them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from harness.fixture_catalog import (
    AcceptanceResult,
    FixtureSpec,
    export_commit,
    head_commit,
    list_fixtures,
    load_fixture,
    materialize,
    run_acceptance,
    run_visible_tests,
)
from harness.reference_agent import TOOLS

FIXTURE_IDS = list_fixtures()
AGENT_TOOLS = {t["function"]["name"] for t in TOOLS}


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return head_commit(repo)


def apply_session_writes(fixture, repo: Path) -> list[str]:
    written = []
    for step in fixture.load_session()["steps"]:
        for call in step.get("tool_calls") or []:
            if call["name"] == "write_file":
                rel = PurePosixPath(call["arguments"]["path"])
                assert not rel.is_absolute() and ".." not in rel.parts
                target = repo / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(call["arguments"]["content"], encoding="utf-8")
                written.append(str(rel))
    return written


@pytest.fixture
def workspace(tmp_path):
    def make(fixture_id: str):
        fixture = load_fixture(fixture_id)
        repo, task = tmp_path / "work" / "repo", tmp_path / "work" / "task.md"
        sha = materialize(fixture, repo, task)
        return fixture, repo, task, sha

    return make


def test_the_three_shapes_are_shipped():
    assert "r1-string-slugify" in FIXTURE_IDS
    shapes = {load_fixture(fid).spec.shape for fid in FIXTURE_IDS}
    assert shapes == {"new-function", "bug-fix", "multi-file"}


@pytest.mark.parametrize("fixture_id", FIXTURE_IDS)
def test_fixture_loads(fixture_id):
    fixture = load_fixture(fixture_id)
    assert fixture.spec.id == fixture_id == fixture.id
    assert fixture.task_text.strip()
    assert fixture.root.is_dir() and fixture.acceptance_dir.is_dir()
    assert not any(fixture.acceptance_dir.glob("test_*.py")), "acceptance is data now, not a pytest suite"
    cases = fixture.load_cases()
    assert len(cases) >= 10 and len({c.name for c in cases}) == len(cases)
    assert (fixture.repo_template / "tests").is_dir()
    assert fixture.spec.packages, "each shipped fixture names the packages its acceptance tests import"
    for name in fixture.spec.packages:
        assert (fixture.repo_template / name).exists()
    # Standard library only: the fixture repo declares no dependencies.
    assert not (fixture.repo_template / "requirements.txt").exists()


def test_unknown_fixture_names_id_and_known_ids():
    with pytest.raises(ValueError) as info:
        load_fixture("r9-nope")
    message = str(info.value)
    assert "r9-nope" in message
    for fid in FIXTURE_IDS:
        assert fid in message


def test_spec_rejects_bad_values():
    base = {
        "id": "x-1",
        "title": "t",
        "shape": "new-function",
        "visible_test_command": ["python", "-m", "pytest"],
        "timeout_s": 10,
    }
    FixtureSpec.model_validate(base)
    for patch in (
        {"shape": "refactor"},
        {"acceptance_test_command": ["python", "-m", "pytest"]},  # gone: the cases are data
        {"case_timeout_s": 0},
        {"timeout_s": 0},
        {"unexpected": 1},
        {"packages": ["../evil"]},
        {"id": "Bad Id"},
    ):
        with pytest.raises(ValueError):
            FixtureSpec.model_validate({**base, **patch})


@pytest.mark.parametrize("fixture_id", FIXTURE_IDS)
def test_session_uses_agent_tools_and_ends_with_commit_then_message(fixture_id):
    session = load_fixture(fixture_id).load_session()
    assert session["description"]
    steps = session["steps"]
    for step in steps[:-1]:
        assert step["tool_calls"], step
        for call in step["tool_calls"]:
            assert call["name"] in AGENT_TOOLS
            assert isinstance(call.get("arguments", {}), dict)
            json.dumps(call.get("arguments", {}))
    assert steps[-1]["content"] and not steps[-1].get("tool_calls")
    names = [c["name"] for s in steps for c in s.get("tool_calls") or []]
    assert "write_file" in names
    assert names.index("run_tests") < names.index("git_commit") == len(names) - 1


@pytest.mark.parametrize("fixture_id", FIXTURE_IDS)
def test_materialize(workspace, fixture_id):
    fixture, repo, task, sha = workspace(fixture_id)
    # A git repository on main with exactly one commit, by the harness identity.
    assert (repo / ".git").is_dir()
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert git(repo, "rev-list", "--count", "HEAD") == "1"
    assert head_commit(repo) == sha
    assert git(repo, "log", "-1", "--format=%an <%ae>|%s") == "case-harness <harness@localhost>|fixture: initial state"
    assert git(repo, "config", "--local", "user.name") == "case-harness"
    assert git(repo, "status", "--porcelain") == ""
    # The task file lives outside the repository and is not committed.
    assert task.read_text(encoding="utf-8") == fixture.task_text
    assert not task.resolve().is_relative_to(repo.resolve())
    tracked = git(repo, "ls-files").splitlines()
    assert "task.md" not in tracked and "TASK.md" not in tracked
    # No acceptance file (by name or content) is in the repository.
    acceptance = {p.name: p.read_bytes() for p in fixture.acceptance_dir.rglob("*") if p.is_file()}
    for path in repo.rglob("*"):
        if ".git" in path.parts or not path.is_file():
            continue
        assert path.name not in acceptance
        assert path.read_bytes() not in acceptance.values()
    # The same fixture always yields the same initial commit.
    other = repo.parent.parent / "again"
    assert materialize(fixture, other / "repo", other / "task.md") == sha


def test_materialize_refuses_task_file_inside_repo_and_non_empty_dir(tmp_path):
    fixture = load_fixture("r1-string-slugify")
    with pytest.raises(ValueError, match="outside"):
        materialize(fixture, tmp_path / "repo", tmp_path / "repo" / "TASK.md")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        materialize(fixture, busy, tmp_path / "task.md")


@pytest.mark.parametrize("fixture_id", FIXTURE_IDS)
def test_initial_state_fails_visible_and_acceptance_tests(workspace, tmp_path, fixture_id):
    fixture, repo, _, sha = workspace(fixture_id)
    visible = run_visible_tests(fixture, repo)
    assert not visible.passed
    checkout = export_commit(repo, sha, tmp_path / "checkout")
    result = run_acceptance(fixture, checkout)
    assert isinstance(result, AcceptanceResult)
    assert result.passed is False
    assert result.exit_code != 0
    assert result.failed + result.errors > 0
    assert len(result.output_tail) <= 4000


@pytest.mark.parametrize("fixture_id", FIXTURE_IDS)
def test_session_writes_solve_the_fixture(workspace, tmp_path, fixture_id):
    fixture, repo, _, sha = workspace(fixture_id)
    written = apply_session_writes(fixture, repo)
    assert written
    assert run_visible_tests(fixture, repo).passed
    final = commit_all(repo, "apply recorded session")
    checkout = export_commit(repo, final, tmp_path / "checkout")
    assert not (checkout / ".git").exists()
    before = sorted(str(p) for p in fixture.acceptance_dir.rglob("*"))
    result = run_acceptance(fixture, checkout)
    assert result.passed, result.output_tail
    assert result.total >= 10 and result.failed == result.errors == result.skipped == 0
    assert result.exit_code == 0 and not result.timed_out
    # The acceptance tests ran from a copy: nothing appeared in the fixture's acceptance dir.
    assert sorted(str(p) for p in fixture.acceptance_dir.rglob("*")) == before


@pytest.mark.parametrize("fixture_id", FIXTURE_IDS)
def test_editing_only_visible_tests_does_not_pass(workspace, tmp_path, fixture_id):
    fixture, repo, _, _ = workspace(fixture_id)
    for test_file in (repo / "tests").glob("test_*.py"):
        test_file.write_text("def test_nothing():\n    assert True\n", encoding="utf-8")
    assert run_visible_tests(fixture, repo).passed
    final = commit_all(repo, "make the visible tests pass")
    result = run_acceptance(fixture, export_commit(repo, final, tmp_path / "checkout"))
    assert result.passed is False


def test_checkout_cannot_configure_or_short_circuit_pytest(workspace, tmp_path):
    fixture, repo, _, _ = workspace("r1-string-slugify")
    # Files that would rig a naive run: a conftest that turns failures into passes, a
    # pytest.ini that narrows collection, a sitecustomize that exits 0 on startup.
    (repo / "conftest.py").write_text(
        "import pytest\n\n@pytest.hookimpl(hookwrapper=True)\n"
        "def pytest_runtest_makereport(item, call):\n"
        "    outcome = yield\n    rep = outcome.get_result()\n    rep.outcome = 'passed'\n",
        encoding="utf-8",
    )
    (repo / "pytest.ini").write_text("[pytest]\naddopts = -k nothing_matches\n", encoding="utf-8")
    (repo / "sitecustomize.py").write_text("import os\nos._exit(0)\n", encoding="utf-8")
    final = commit_all(repo, "rig the test run")
    result = run_acceptance(fixture, export_commit(repo, final, tmp_path / "checkout"))
    assert result.passed is False
    assert result.failed > 0


def test_export_commit_ignores_uncommitted_changes(workspace, tmp_path):
    fixture, repo, _, sha = workspace("r1-string-slugify")
    apply_session_writes(fixture, repo)  # solved in the working tree, but never committed
    checkout = export_commit(repo, sha, tmp_path / "checkout")
    assert (checkout / "slugkit" / "core.py").read_text() == (fixture.repo_template / "slugkit" / "core.py").read_text()
    assert run_acceptance(fixture, checkout).passed is False


def test_acceptance_timeout_is_reported(workspace, tmp_path):
    fixture, repo, _, _ = workspace("r1-string-slugify")
    (repo / "slugkit" / "core.py").write_text(
        "import time\n\ndef slugify(text, *, separator='-', max_length=None, lowercase=True):\n    time.sleep(60)\n",
        encoding="utf-8",
    )
    final = commit_all(repo, "hang")
    result = run_acceptance(fixture, export_commit(repo, final, tmp_path / "checkout"), timeout_s=3)
    assert result.timed_out and not result.passed
