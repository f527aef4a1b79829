"""Stage 2 artificial fixtures: loading, materializing a task repo, hidden acceptance runs.

A fixture lives in ``harness/fixtures/<id>/``:

- ``fixture.toml``: the :class:`FixtureSpec` (id, title, shape, test commands, timeout).
- ``repo/``: the initial repository content Case starts from (package + visible tests).
- ``task.md``: the task file Case reads.
- ``acceptance/``: hidden acceptance tests, run only by :func:`run_acceptance`.
- ``session.json``: a recorded tool-calling session for the scripted backend that solves
  the task with the reference agent's tools (see ``harness/fixtures/README.md``).

:func:`materialize` turns a fixture into a fresh git repository plus a task file that
lives *outside* that repository, so Case's commits contain code only. The acceptance
tests never enter the repository; :func:`run_acceptance` runs them from a temporary copy
against the fixture's packages copied out of a clean checkout of Case's commit
(:func:`export_commit`), with a scrubbed environment.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.redact import tail_lines

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

ACCEPTANCE_PLACEHOLDER = "{acceptance_dir}"
OUTPUT_TAIL_CHARS = 4000

# Identity of the commits the harness makes (the initial fixture state).
GIT_USER_NAME = "case-harness"
GIT_USER_EMAIL = "harness@localhost"
# Fixed dates make the initial commit sha a pure function of the fixture content.
_INITIAL_COMMIT_DATE = "2026-06-01T00:00:00+00:00"
INITIAL_COMMIT_MESSAGE = "fixture: initial state"

# Never copied from a fixture's repo/ template into a task repository.
_TEMPLATE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".git")

# The only variables a test subprocess inherits (no credentials, no PYTHON*/PYTEST*/GIT*).
_ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT", "TMPDIR", "TEMP", "TMP")

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.py)?$")


class FixtureSpec(BaseModel):
    """``fixture.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str = Field(min_length=1)
    shape: Literal["new-function", "bug-fix", "multi-file"]
    visible_test_command: list[str] = Field(min_length=1)
    acceptance_test_command: list[str] = Field(min_length=1)
    timeout_s: float = Field(gt=0, le=3600)
    # Top-level packages/modules of the checkout that the acceptance tests import. Only
    # these are copied out of Case's checkout for the acceptance run (so a stray
    # conftest.py, sitecustomize.py or pytest.ini in Case's commit has no effect).
    # Empty: the whole checkout goes on PYTHONPATH.
    packages: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError(f"fixture id {value!r} must match {_ID_RE.pattern}")
        return value

    @field_validator("packages")
    @classmethod
    def _check_packages(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(f"package {name!r} must be a top-level module or package name")
        return value

    @model_validator(mode="after")
    def _check_placeholder(self) -> FixtureSpec:
        if not any(ACCEPTANCE_PLACEHOLDER in arg for arg in self.acceptance_test_command):
            raise ValueError(f"acceptance_test_command must contain {ACCEPTANCE_PLACEHOLDER}")
        return self


@dataclass(frozen=True)
class Fixture:
    spec: FixtureSpec
    root: Path
    task_text: str
    session_path: Path
    acceptance_dir: Path

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def repo_template(self) -> Path:
        return self.root / "repo"

    def load_session(self) -> dict[str, Any]:
        """The recorded session (``session.json``) as parsed JSON."""
        return json.loads(self.session_path.read_text(encoding="utf-8"))

    def session_for(self, agent: str | None) -> Path:
        """The session the scripted backend replays: ``session.json`` (the reference
        agent's tool calls) or, for a third-party agent, ``session.<agent>.json`` in that
        agent's own action format. ValueError naming the agent and the ones that exist."""
        if agent is None:
            return self.session_path
        path = self.root / f"session.{agent}.json"
        if not path.is_file():
            known = sorted(p.name.removeprefix("session.").removesuffix(".json")
                           for p in self.root.glob("session.*.json"))
            raise ValueError(f"fixture {self.id!r} has no session for agent {agent!r} (no {path.name}); "
                             f"agents with a session: {', '.join(known) or '(none)'}")
        return path


class AcceptanceResult(BaseModel):
    """Outcome of one pytest run (acceptance or visible tests)."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    total: int
    failed: int
    errors: int
    skipped: int = 0
    exit_code: int
    timed_out: bool = False
    duration_s: float = 0.0
    output_tail: str


def list_fixtures() -> list[str]:
    """Ids of the fixtures shipped in ``harness/fixtures``, sorted."""
    if not FIXTURES_DIR.is_dir():
        return []
    return sorted(p.name for p in FIXTURES_DIR.iterdir() if (p / "fixture.toml").is_file())


def load_fixture(fixture_id: str) -> Fixture:
    """Load and validate one fixture; ValueError naming the id and the known ids if unknown."""
    known = list_fixtures()
    if fixture_id not in known:
        raise ValueError(f"unknown fixture {fixture_id!r}; known fixtures: {', '.join(known) or '(none)'}")
    root = FIXTURES_DIR / fixture_id
    try:
        raw = tomllib.loads((root / "fixture.toml").read_text(encoding="utf-8"))
        spec = FixtureSpec.model_validate(raw)
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ValueError(f"fixture {fixture_id!r}: invalid fixture.toml: {exc}") from exc
    if spec.id != fixture_id:
        raise ValueError(f"fixture {fixture_id!r}: fixture.toml says id={spec.id!r}")
    for required in ("repo", "acceptance"):
        if not (root / required).is_dir():
            raise ValueError(f"fixture {fixture_id!r}: missing {required}/ directory")
    for required in ("task.md", "session.json"):
        if not (root / required).is_file():
            raise ValueError(f"fixture {fixture_id!r}: missing {required}")
    return Fixture(
        spec=spec,
        root=root,
        task_text=(root / "task.md").read_text(encoding="utf-8"),
        session_path=root / "session.json",
        acceptance_dir=root / "acceptance",
    )


# --------------------------------------------------------------------------- git helpers


def _git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A git environment that ignores the user's and the system's git config."""
    env = {k: os.environ[k] for k in _ENV_ALLOWLIST if k in os.environ}
    env.update(
        {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "HOME": os.devnull,
        }
    )
    if extra:
        env.update(extra)
    return env


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, stdout_bytes: bool = False) -> Any:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        env=env or _git_env(),
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout if stdout_bytes else proc.stdout.decode().strip()


def materialize(fixture: Fixture, repo_dir: Path, task_file: Path) -> str:
    """Create the task repository for ``fixture`` and write its task file.

    ``repo_dir`` must not exist (or be an empty directory); it receives a copy of the
    fixture's ``repo/`` template, becomes a git repository on branch ``main`` with a
    local ``case-harness`` identity, and gets one commit, "fixture: initial state".
    ``task_file`` receives the task text; it must lie outside ``repo_dir`` so Case's
    commits contain code only. The acceptance tests are never copied. Returns the
    initial commit sha (deterministic for a given fixture content).
    """
    repo_dir = Path(repo_dir).absolute()
    task_file = Path(task_file).absolute()
    if task_file.resolve().is_relative_to(repo_dir.resolve()):
        raise ValueError(f"task file {task_file} must be outside the repository {repo_dir}")
    if repo_dir.exists():
        if not repo_dir.is_dir() or any(repo_dir.iterdir()):
            raise ValueError(f"repository directory {repo_dir} already exists and is not empty")
        repo_dir.rmdir()
    shutil.copytree(fixture.repo_template, repo_dir, ignore=_TEMPLATE_IGNORE, symlinks=False)
    task_file.parent.mkdir(parents=True, exist_ok=True)
    task_file.write_text(fixture.task_text, encoding="utf-8")

    _git(repo_dir, "init", "-q", "-b", "main")
    _git(repo_dir, "config", "user.name", GIT_USER_NAME)
    _git(repo_dir, "config", "user.email", GIT_USER_EMAIL)
    _git(repo_dir, "config", "commit.gpgsign", "false")
    _git(repo_dir, "add", "-A")
    dated = _git_env(
        {
            "GIT_AUTHOR_DATE": _INITIAL_COMMIT_DATE,
            "GIT_COMMITTER_DATE": _INITIAL_COMMIT_DATE,
        }
    )
    _git(repo_dir, "-c", "core.hooksPath=" + os.devnull, "commit", "-q", "-m", INITIAL_COMMIT_MESSAGE, env=dated)
    return _git(repo_dir, "rev-parse", "HEAD")


def head_commit(repo_dir: Path) -> str:
    """The sha of HEAD in ``repo_dir``."""
    return _git(Path(repo_dir), "rev-parse", "HEAD")


def export_commit(repo_dir: Path, commit: str, dest: Path) -> Path:
    """Write a clean checkout of ``commit`` (tracked files only, no .git) into ``dest``.

    Uses ``git archive``, so uncommitted edits and untracked files in ``repo_dir`` never
    reach the checkout. ``dest`` must not exist or be empty. Returns ``dest``.
    """
    repo_dir, dest = Path(repo_dir), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"checkout directory {dest} is not empty")
    sha = _git(repo_dir, "rev-parse", "--verify", f"{commit}^{{commit}}")
    data = _git(repo_dir, "archive", "--format=tar", sha, stdout_bytes=True)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# --------------------------------------------------------------------------- test runs


def resolve_command(argv: list[str], *, acceptance_dir: Path | None = None) -> list[str]:
    """``argv`` with a leading ``python`` replaced by this interpreter and placeholders filled."""
    out = list(argv)
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable
    if acceptance_dir is not None:
        out = [arg.replace(ACCEPTANCE_PLACEHOLDER, str(acceptance_dir)) for arg in out]
    return out


def _test_env(home: Path, pythonpath: Path | None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_ALLOWLIST if k in os.environ}
    env.update(
        {
            "HOME": str(home),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
            "PYTHONHASHSEED": "0",
            # Only pytest's own plugins: the tests need nothing else, and the result must
            # not depend on what else is installed in the harness's environment.
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        }
    )
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


_SUMMARY_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def _counts_from_junit(path: Path) -> tuple[int, int, int, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    if not suites:
        return None
    total = failed = errors = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0))
        errors += int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total, failed, errors, skipped


def _counts_from_summary(output: str) -> tuple[int, int, int, int]:
    counts: dict[str, int] = {}
    lines = [line for line in output.splitlines() if _SUMMARY_RE.search(line)]
    if lines:
        for number, word in _SUMMARY_RE.findall(lines[-1]):
            key = "errors" if word.startswith("error") else word
            counts[key] = counts.get(key, 0) + int(number)
    failed, errors, skipped = counts.get("failed", 0), counts.get("errors", 0), counts.get("skipped", 0)
    total = failed + errors + skipped + counts.get("passed", 0) + counts.get("xfailed", 0) + counts.get("xpassed", 0)
    return total, failed, errors, skipped


def _run_pytest(argv: list[str], *, cwd: Path, env: dict[str, str], junit: Path, timeout_s: float) -> AcceptanceResult:
    started = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.run(
            [*argv, f"--junitxml={junit}"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
        exit_code = proc.returncode
        output = proc.stdout.decode("utf-8", errors="replace")
    except subprocess.TimeoutExpired as exc:
        timed_out = True
        exit_code = -1
        partial = exc.output or b""
        output = partial.decode("utf-8", errors="replace") + f"\n[harness] timed out after {timeout_s:g}s\n"
    counts = _counts_from_junit(junit) if not timed_out else None
    total, failed, errors, skipped = counts if counts is not None else _counts_from_summary(output)
    passed = not timed_out and exit_code == 0 and total > 0 and failed == 0 and errors == 0 and skipped == 0
    return AcceptanceResult(
        passed=passed,
        total=total,
        failed=failed,
        errors=errors,
        skipped=skipped,
        exit_code=exit_code,
        timed_out=timed_out,
        duration_s=round(time.monotonic() - started, 3),
        output_tail=tail_lines(output, OUTPUT_TAIL_CHARS),  # whole lines: a cut could split a secret
    )


def _stage_packages(fixture: Fixture, checkout_dir: Path, staging: Path) -> Path:
    """Copy the fixture's declared packages out of the checkout; returns the import root."""
    if not fixture.spec.packages:
        return checkout_dir
    staging.mkdir()
    for name in fixture.spec.packages:
        src = checkout_dir / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, staging / name, ignore=_TEMPLATE_IGNORE, symlinks=True)
        elif src.is_file() and not src.is_symlink():
            shutil.copy2(src, staging / name)
        # Missing packages are simply absent: the acceptance tests fail to import them.
    return staging


# Wraps the acceptance test argv (argv, cwd, writable temp root, import root) into an
# isolating command: Case's committed code runs inside the tests (harness.sandbox).
AcceptanceWrap = Callable[[list[str], Path, Path, Path], list[str]]


def run_acceptance(fixture: Fixture, checkout_dir: Path, timeout_s: float | None = None,
                   wrap: AcceptanceWrap | None = None) -> AcceptanceResult:
    """Run the fixture's hidden acceptance tests against ``checkout_dir``.

    ``checkout_dir`` should be a clean checkout of Case's final commit
    (:func:`export_commit`). The tests run from a fresh temporary copy of the fixture's
    ``acceptance/`` (with a pytest.ini the harness writes, so nothing in the checkout
    can configure pytest), with only the fixture's ``packages`` from the checkout on
    PYTHONPATH, a scrubbed environment (no credentials) and plugin autoload disabled.
    ``wrap`` (the harness's sandbox) isolates the test process, which imports Case's code.
    ``passed`` requires exit code 0, at least one test, and no failure, error or skip.
    """
    checkout_dir = Path(checkout_dir).resolve()
    if not checkout_dir.is_dir():
        raise ValueError(f"checkout directory {checkout_dir} does not exist")
    timeout = fixture.spec.timeout_s if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix=f"acceptance-{fixture.id}-") as tmp:
        tmp_path = Path(tmp)
        tests_dir = tmp_path / "acceptance"
        shutil.copytree(fixture.acceptance_dir, tests_dir, ignore=_TEMPLATE_IGNORE)
        (tests_dir / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        import_root = _stage_packages(fixture, checkout_dir, tmp_path / "packages")
        home = tmp_path / "home"
        home.mkdir()
        argv = resolve_command(fixture.spec.acceptance_test_command, acceptance_dir=tests_dir)
        if wrap is not None:
            argv = wrap(argv, tests_dir, tmp_path, import_root)
        return _run_pytest(
            argv,
            cwd=tests_dir,
            env=_test_env(home, import_root),
            junit=tmp_path / "junit.xml",
            timeout_s=timeout,
        )


def run_visible_tests(fixture: Fixture, repo_dir: Path, timeout_s: float | None = None) -> AcceptanceResult:
    """Run the fixture's visible test command inside ``repo_dir`` (same result shape)."""
    repo_dir = Path(repo_dir).resolve()
    timeout = fixture.spec.timeout_s if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix=f"visible-{fixture.id}-") as tmp:
        tmp_path = Path(tmp)
        return _run_pytest(
            resolve_command(fixture.spec.visible_test_command),
            cwd=repo_dir,
            env=_test_env(tmp_path, None),
            junit=tmp_path / "junit.xml",
            timeout_s=timeout,
        )


__all__ = [
    "FIXTURES_DIR",
    "AcceptanceResult",
    "Fixture",
    "FixtureSpec",
    "export_commit",
    "head_commit",
    "list_fixtures",
    "load_fixture",
    "materialize",
    "resolve_command",
    "run_acceptance",
    "run_visible_tests",
]
