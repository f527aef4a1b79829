"""Stage 2 artificial fixtures: loading, materializing a task repo, hidden acceptance runs.

A fixture lives in ``harness/fixtures/<id>/``:

- ``fixture.toml``: the :class:`FixtureSpec` (id, title, shape, packages under test,
  visible test command, timeouts).
- ``repo/``: the initial repository content Case starts from (package + visible tests).
- ``task.md``: the task file Case reads.
- ``acceptance/cases.py``: the hidden acceptance cases (``harness.acceptance_cases``),
  imported only by the harness; only their probes reach the worker that runs Case's code.
- ``session.json``: a recorded tool-calling session for the scripted backend that solves
  the task with the reference agent's tools (see ``harness/fixtures/README.md``).

:func:`materialize` turns a fixture into a fresh git repository plus a task file that
lives *outside* that repository, so Case's commits contain code only. The acceptance
cases never enter the repository; :func:`run_acceptance` sends their inputs to a worker
(``harness.acceptance_worker``) that imports the fixture's packages copied out of a clean
checkout of Case's commit (:func:`export_commit`), with a scrubbed environment, and
judges the replies in this process (``harness.acceptance_run``).
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.redact import tail_lines

from .acceptance_cases import CASES_FILE, Case, load_cases
from .acceptance_run import WorkerRun, run_cases

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

WORKER_MODULE = "harness.acceptance_worker"
WORKER_SOURCE = Path(__file__).resolve().parent / "acceptance_worker.py"
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
    # All acceptance cases together (one worker), and each case's reply.
    timeout_s: float = Field(gt=0, le=3600)
    case_timeout_s: float = Field(default=10, gt=0, le=600)
    # Top-level packages/modules of the checkout that the acceptance cases import. Only
    # these are copied out of Case's checkout for the acceptance run (so a stray
    # sitecustomize.py in Case's commit has no effect). Empty: the whole checkout.
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

    @property
    def acceptance_test_command(self) -> list[str]:
        """What runs the acceptance cases: the worker, a module of this package (what
        ``harness.runtime_check`` checks is installed). It runs from a copy, by path."""
        return ["python", "-m", WORKER_MODULE]


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

    def load_cases(self) -> list[Case]:
        """The hidden acceptance cases (``acceptance/cases.py``); ValueError if invalid."""
        return load_cases(self.acceptance_dir / CASES_FILE)

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
    """Outcome of one test run: the acceptance cases (one per case: ``total``; wrong
    answers: ``failed``; cases the worker never answered: ``errors``; ``exit_code`` 0 all
    passed, 1 some failed, 2 the worker was lost, -1 timed out) or a pytest run of the
    visible tests (pytest's counts and exit code)."""

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
    for required in ("task.md", "session.json", f"acceptance/{CASES_FILE}"):
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


def resolve_command(argv: list[str]) -> list[str]:
    """``argv`` with a leading ``python`` replaced by this interpreter."""
    out = list(argv)
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable
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


# Wraps the worker's argv (argv, cwd, writable temp root, import root) into an isolating
# command: Case's committed code runs inside the worker (harness.sandbox).
AcceptanceWrap = Callable[[list[str], Path, Path, Path], list[str]]


def run_acceptance(fixture: Fixture, checkout_dir: Path, timeout_s: float | None = None,
                   wrap: AcceptanceWrap | None = None) -> AcceptanceResult:
    """Judge ``checkout_dir`` by the fixture's hidden acceptance cases.

    ``checkout_dir`` should be a clean checkout of Case's final commit
    (:func:`export_commit`). Only the fixture's ``packages`` are copied out of it, next to
    a copy of the worker, into a temporary directory; the worker runs there with a
    scrubbed environment (no credentials), inside ``wrap`` (the harness's sandbox), and
    receives each case's inputs only. Replies are judged here (``harness.acceptance_run``).
    ``passed`` requires at least one case, every case answered and right, and the
    worker's clean exit when its input ends.
    """
    checkout_dir = Path(checkout_dir).resolve()
    if not checkout_dir.is_dir():
        raise ValueError(f"checkout directory {checkout_dir} does not exist")
    cases = fixture.load_cases()
    timeout = fixture.spec.timeout_s if timeout_s is None else timeout_s
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"acceptance-{fixture.id}-") as tmp:
        tmp_path = Path(tmp)
        work = tmp_path / "worker"
        work.mkdir()
        worker = work / WORKER_SOURCE.name
        shutil.copyfile(WORKER_SOURCE, worker)
        import_root = _stage_packages(fixture, checkout_dir, tmp_path / "packages")
        home = tmp_path / "home"
        home.mkdir()
        # -I: no PYTHON* variables, no user site, no script directory on sys.path.
        argv = [sys.executable, "-I", "-X", "utf8", str(worker), str(import_root)]
        if wrap is not None:
            argv = wrap(argv, work, tmp_path, import_root)
        stderr = tmp_path / "worker.stderr"
        run = run_cases(cases, argv, cwd=work, env=_test_env(home, None), stderr=stderr,
                        case_timeout_s=min(fixture.spec.case_timeout_s, timeout), total_timeout_s=timeout)
        worker_err = _read_tail(stderr, OUTPUT_TAIL_CHARS)
    return acceptance_result(cases, run, worker_err, round(time.monotonic() - started, 3))


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def acceptance_result(cases: list[Case], run: WorkerRun, worker_err: str, duration_s: float) -> AcceptanceResult:
    """The counts and the verdict from the judged cases. Pure."""
    total, failed, errors = len(cases), run.failed, run.not_run
    clean = run.lost is None and run.worker_exit == 0
    passed = total > 0 and failed == 0 and errors == 0 and clean and not run.timed_out
    lines = [f"FAILED {v.name}: {'; '.join(v.reasons)}" for v in run.verdicts if v is not None and not v.passed]
    # The worker's last words, short, and the harness's own lines last: the tail keeps them.
    if worker_err.strip():
        lines += ["[harness] worker stderr (tail):", tail_lines(worker_err, 1000).rstrip("\n")]
    if run.lost:
        lines.append(f"[harness] worker lost at {run.lost}; {errors} case(s) not run, counted as errors")
    elif run.worker_exit != 0:
        lines.append(f"[harness] the worker exited with code {run.worker_exit} after the last case")
    lines += [f"[harness] {note}" for note in run.notes]
    lines.append(f"[harness] {total - failed - errors} passed, {failed} failed, {errors} not run, of {total} cases")
    exit_code = -1 if run.timed_out else 2 if not clean else 0 if passed else 1
    return AcceptanceResult(passed=passed, total=total, failed=failed, errors=errors, exit_code=exit_code,
                            timed_out=run.timed_out, duration_s=duration_s,
                            output_tail=tail_lines("\n".join(lines) + "\n", OUTPUT_TAIL_CHARS))


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
