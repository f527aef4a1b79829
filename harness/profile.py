"""The run profile: which Case command runs, on which fixture and stage, and what it may see.

A TOML file with top-level ``stage`` and ``fixture`` and a ``[case]`` table (the Case
profile). The Case command is an argv template: ``{task_file}`` and ``{workdir}`` are the
only placeholders, and it must not carry secrets (the preflight checks the filled-in argv
too). Nothing in a profile can switch a gate off.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Iterable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Package data, so an installed wheel has its default profile; config/ keeps a copy for
# readers, which a test holds identical to this one.
REFERENCE_PROFILE_PATH: Traversable = files("harness") / "data" / "case-profile.example.toml"
DEFAULT_STAGE = "stage2-artificial-fixture"
DEFAULT_FIXTURE = "r1-string-slugify"
PLACEHOLDERS = ("{task_file}", "{workdir}")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# What a profile may never show Case: the fixtures (their acceptance tests and sessions)
# and the runs directory of a source checkout.
# (In a source checkout PROJECT_ROOT is the checkout; installed, it is site-packages.)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = PROJECT_ROOT / "harness" / "fixtures"
DEFAULT_RUNS_DIR = PROJECT_ROOT / "harness-runs"


def _real(path: Path) -> Path:
    """The path with symlinks resolved as far as they exist (a link cannot smuggle a
    protected directory in under another name)."""
    return Path(os.path.realpath(path))


def exposure_problems(exposed: Iterable[tuple[str, Path]], protected: Iterable[tuple[str, Path]]) -> list[str]:
    """Why paths Case would see are not allowed: each exposed path (label, path) must be
    absolute, not ``/``, and neither inside nor above a protected directory (the
    fixtures with their acceptance tests and sessions, the run directories, the
    operator's home as a whole). Pure but for resolving symlinks."""
    guarded = [(name, _real(p)) for name, p in protected]
    problems: list[str] = []
    for label, raw in exposed:
        path = PurePosixPath(raw)
        if not path.is_absolute():
            problems.append(f"{label}: {raw} is not an absolute path")
            continue
        if ".." in path.parts:
            problems.append(f"{label}: {raw} contains '..'")
            continue
        real = _real(Path(raw))
        if real == Path("/"):
            problems.append(f"{label}: {raw} would expose the whole file system")
            continue
        for name, guard in guarded:
            if real == guard or real.is_relative_to(guard):
                problems.append(f"{label}: {raw} is inside {name} ({guard}); Case must never see it")
                break
            if guard.is_relative_to(real):
                problems.append(f"{label}: {raw} contains {name} ({guard}); Case must never see it")
                break
    return problems


def static_protected() -> list[tuple[str, Path]]:
    """What no profile may expose, known without a run: the fixtures (acceptance tests,
    recorded sessions) and the default run directory. (The operator's home is refused
    only whole: :func:`home_problems`.)"""
    return [("the project's fixtures", FIXTURES_DIR), ("the default run directory", DEFAULT_RUNS_DIR)]


def home_problems(exposed: Iterable[tuple[str, Path]], home: Path) -> list[str]:
    """The operator's home may not be exposed whole (its dotfiles hold provider keys);
    a directory below it may."""
    real_home = _real(home)
    return [f"{label}: {raw} would expose the operator's home {real_home} whole"
            for label, raw in exposed
            if PurePosixPath(raw).is_absolute() and real_home.is_relative_to(_real(Path(raw)))]


class SandboxProfile(BaseModel):
    """``[case.sandbox]``: what Case needs from the machine, read-only.

    ``ro_paths`` are bound read-only at the same path (an agent's install directory,
    Node, another interpreter); ``home_seed`` is a directory whose content is copied into
    Case's fresh HOME at start (an agent's config). Neither may expose the project's
    fixtures, a run directory or the operator's home as a whole.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ro_paths: list[Annotated[str, Field(min_length=1)]] = []
    home_seed: str | None = Field(default=None, min_length=1)

    def exposed(self) -> list[tuple[str, Path]]:
        out = [(f"case.sandbox.ro_paths[{i}]", Path(p)) for i, p in enumerate(self.ro_paths)]
        if self.home_seed is not None:
            out.append(("case.sandbox.home_seed", Path(self.home_seed)))
        return out

    @model_validator(mode="after")
    def _nothing_protected(self) -> SandboxProfile:
        problems = exposure_problems(self.exposed(), static_protected())
        problems += home_problems(self.exposed(), Path.home())
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ProfileError(ValueError):
    """The profile cannot be used; ``problems`` has one line per field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ConfigTemplate(BaseModel):
    """A config file the harness writes for Case (into ``case/generated/``).

    ``{base_url}`` becomes the proxy's loopback URL and ``{model}`` the admitted model;
    nothing else is substituted, so a secret can only get in if the operator typed it,
    and the preflight and the secret scan look for that.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    content: str


class CaseProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    fallback_models: list[str] = []
    env_allow: list[Annotated[str, Field(pattern=_ENV_NAME)]] = []
    timeout_s: float = Field(gt=0, le=24 * 3600)
    config_template: ConfigTemplate | None = None
    sandbox: SandboxProfile = SandboxProfile()

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, argv: list[str]) -> list[str]:
        for arg in argv:
            stripped = arg
            for ph in PLACEHOLDERS:
                stripped = stripped.replace(ph, "")
            if "{" in stripped and "}" in stripped:
                raise ValueError(f"argument {arg!r} has an unknown placeholder; known: {', '.join(PLACEHOLDERS)}")
        return argv


class RunProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str = Field(DEFAULT_STAGE, min_length=1)
    fixture: str = Field(DEFAULT_FIXTURE, min_length=1)
    # Only with the scripted backend (a TEST FIXTURE): replay the fixture's
    # ``session.<name>.json`` (a session in a third-party agent's own action format)
    # instead of ``session.json`` (the reference agent's tool calls).
    scripted_session: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    case: CaseProfile

    def sha256(self) -> str:
        """Digest of the profile's content (recorded in ``run_started``)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def parse_run_profile(text: str, label: str = "profile") -> RunProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError([f"{label}: not valid TOML ({exc})"]) from None
    try:
        return RunProfile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{label}: {where}: {err['msg']}")
        raise ProfileError(problems) from None


def load_run_profile(path: Path | Traversable) -> RunProfile:
    """Read and validate a run profile (a file, or the packaged one); ``ProfileError`` (a
    ValueError) names each problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError([f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})"]) from None
    return parse_run_profile(text, str(path))
