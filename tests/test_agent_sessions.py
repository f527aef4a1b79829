"""Sessions in a third-party agent's own action format (``session.<agent>.json``) and the
run profiles in config/agents/: checked without the agent installed (the `agents` tier
runs the agents themselves). The sessions are replayed by the scripted backend, a TEST
FIXTURE."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.fixture_catalog import export_commit, head_commit, load_fixture, materialize, run_acceptance
from harness.gates import GateInputs, evaluate_gates
from harness.profile import ProfileError, parse_run_profile
from harness.run import RunConfigError, run_once
from proxy.admission import Admission, DecisionRecord
from proxy.settings import ENV_ADMISSION_FILE, ENV_BASE_URL, ENV_DECISION_FILE

from .harness_support import ADMISSION, DECISION, base_env, reference_profile, write_artifacts

ROOT = Path(__file__).resolve().parents[1]
# mini-swe-agent 2.4.6, minisweagent/models/litellm_textbased_model.py and
# minisweagent/environments/local.py: the action and the completion command.
MINI_ACTION = re.compile(r"```mswea_bash_command\s*\n(.*?)\n```", re.DOTALL)
MINI_DONE = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


def _mini_commands() -> list[str]:
    session = json.loads(load_fixture("r1-string-slugify").session_for("mini-swe-agent").read_text())
    commands = []
    for i, step in enumerate(session["steps"]):
        found = MINI_ACTION.findall(step["content"])
        assert len(found) == 1, f"step {i}: mini-swe-agent needs exactly one action, found {len(found)}"
        assert step["content"].startswith("THOUGHT: ") and not step.get("tool_calls")
        commands.append(found[0])
    return commands


def test_the_mini_session_is_in_mini_swe_agents_format_and_ends_with_its_completion_command() -> None:
    commands = _mini_commands()
    assert commands[-1] == MINI_DONE
    assert "git commit" in commands[-2]
    assert not any("acceptance" in c for c in commands)  # the hidden tests stay hidden


def test_the_mini_session_solves_the_fixture_when_its_commands_run(tmp_path: Path) -> None:
    """The commands, run as mini-swe-agent runs them (bash, in the repository), leave a
    commit that passes the hidden acceptance tests."""
    fixture = load_fixture("r1-string-slugify")
    repo = tmp_path / "repo"
    initial = materialize(fixture, repo, tmp_path / "task.md")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "GIT_CONFIG_NOSYSTEM": "1", "LANG": "C.UTF-8"}
    for cmd in _mini_commands()[:-1]:
        done = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (cmd[:200], done.stdout[-2000:], done.stderr[-2000:])
    head = head_commit(repo)
    assert head != initial
    result = run_acceptance(fixture, export_commit(repo, head, tmp_path / "checkout"))
    assert result.passed and result.total >= 10, result.output_tail


def test_the_aider_session_is_one_whole_file_edit_that_solves_the_fixture(tmp_path: Path) -> None:
    """aider's `whole` format: the path on its own line, then the file in one fenced block."""
    fixture = load_fixture("r1-string-slugify")
    steps = json.loads(fixture.session_for("aider").read_text())["steps"]
    assert len({s["content"] for s in steps}) == 1  # the same answer whatever step aider's turns select
    edits = re.findall(r"^(\S+\.py)\n```python\n(.*?)\n```$", steps[0]["content"], re.DOTALL | re.MULTILINE)
    assert [path for path, _ in edits] == ["slugkit/core.py"]
    repo = tmp_path / "repo"
    materialize(fixture, repo, tmp_path / "task.md")
    (repo / "slugkit" / "core.py").write_text(edits[0][1] + "\n", encoding="utf-8")
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", "aider"], check=True, capture_output=True)
    result = run_acceptance(fixture, export_commit(repo, head_commit(repo), tmp_path / "checkout"))
    assert result.passed and result.total >= 10, result.output_tail


def test_an_agent_without_a_session_is_a_clear_usage_error(tmp_path: Path) -> None:
    fixture = load_fixture("r1-string-slugify")
    assert fixture.session_for(None) == fixture.session_path
    with pytest.raises(ValueError, match=r"no session for agent 'goose'.*aider, mini-swe-agent"):
        fixture.session_for("goose")
    profile = reference_profile().model_copy(update={"scripted_session": "goose"})
    with pytest.raises(RunConfigError, match="no session for agent 'goose'"):
        run_once(profile, base_env(write_artifacts(tmp_path / "in")), tmp_path / "runs", backend="scripted")
    assert not (tmp_path / "runs").exists()  # refused before any run directory
    # A real backend replays nothing: the line is ignored (this run blocks on its missing
    # backend URL, at the gates, not on the session).
    outcome = run_once(profile, base_env(write_artifacts(tmp_path / "in")), tmp_path / "runs", backend="external")
    assert outcome.status == "blocked"


@pytest.mark.parametrize("name", ["../session", "a/b", "", "Mini"])
def test_scripted_session_names_a_file_in_the_fixture_and_nothing_else(name: str) -> None:
    with pytest.raises(ProfileError, match="scripted_session"):
        parse_run_profile(f'scripted_session = "{name}"\n[case]\ncommand = ["x"]\nprovider = "p"\nmodel = "m"\n'
                          "timeout_s = 1\n")


def _rendered(name: str, tmp_path: Path) -> str:
    """config/agents/<name>.toml as scripts/install-agents.sh renders it, on stand-in paths."""
    venv, prefix = tmp_path / "venv", tmp_path / "python"
    (venv / "bin").mkdir(parents=True)
    prefix.mkdir()
    text = (ROOT / "config" / "agents" / f"{name}.toml").read_text()
    return text.replace("@AGENT_VENV@", str(venv)).replace("@AGENT_PYTHON_PREFIX@", str(prefix))


@pytest.mark.parametrize("agent", ["mini-swe-agent", "aider"])
def test_each_agent_profile_renders_to_a_profile_every_gate_accepts(agent: str, tmp_path: Path) -> None:
    profile = parse_run_profile(_rendered(agent, tmp_path))
    assert profile.scripted_session == agent
    assert load_fixture(profile.fixture).session_for(agent).is_file()
    assert "@" not in " ".join([*profile.case.command, *profile.case.sandbox.ro_paths])
    assert profile.case.config_template is not None and "{base_url}" in profile.case.config_template.content
    env = {ENV_DECISION_FILE: "/d.json", ENV_ADMISSION_FILE: "/a.json", ENV_BASE_URL: "http://127.0.0.1:8000/v1"}
    inputs = GateInputs(profile=profile, env=env, decision=DecisionRecord.model_validate(DECISION),
                        admission=Admission.model_validate(ADMISSION), backend_models=(ADMISSION["model"],),
                        case_isolated=True)
    assert [f.code for f in evaluate_gates(inputs).failures] == []


def test_a_missing_agent_install_fails_the_agents_tier_and_names_the_fix(tmp_path: Path) -> None:
    env = {**os.environ, "CASE_TEST_AGENTS_DIR": str(tmp_path / "no-agents")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "agents",
                           "tests/agents"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    assert "make agents-deps" in out and "3 failed" in out, out[-2000:]
    assert "skipped" not in out
