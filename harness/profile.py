"""The run profile: which Case command runs, on which fixture and stage, and what it may see.

A TOML file with top-level ``stage`` and ``fixture`` and a ``[case]`` table (the Case
profile). The Case command is an argv template: ``{task_file}`` and ``{workdir}`` are the
only placeholders, and it must not carry secrets (the preflight checks the filled-in argv
too). Nothing in a profile can switch a gate off.
"""

from __future__ import annotations

import hashlib
import tomllib
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Package data, so an installed wheel has its default profile; config/ keeps a copy for
# readers, which a test holds identical to this one.
REFERENCE_PROFILE_PATH: Traversable = files("harness") / "data" / "case-profile.example.toml"
DEFAULT_STAGE = "stage2-artificial-fixture"
DEFAULT_FIXTURE = "r1-string-slugify"
PLACEHOLDERS = ("{task_file}", "{workdir}")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


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
