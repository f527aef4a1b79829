"""The CTO-WORK-020 artifacts (decision record, admission JSON) and the gates on them.

The project reads these files and never writes them. The models accept the operators'
files as written (unknown extra keys are ignored) and reject unknown values of the
enumerated fields with an error naming the file and the field. The gate function is pure
so the proxy and the harness apply exactly the same rules.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

WORK_ITEM = "CTO-WORK-020"
REQUIRED_DECISION_STATUS = "local_provider_required"
REQUIRED_PROVIDER_CLASS = "local_case_compatible"

_IDENT = r"^[a-z][a-z0-9_]*$"


class AdmissionStatus(StrEnum):
    CANDIDATE = "candidate"
    ADMITTED = "admitted"
    REVOKED = "revoked"
    REJECTED = "rejected"

    @property
    def may_run(self) -> bool:
        return self in (AdmissionStatus.CANDIDATE, AdmissionStatus.ADMITTED)


class DecisionRecord(BaseModel):
    """Whether a local provider is required (CTO-WORK-020's decision)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    work_item: str = Field(min_length=1)
    decision_status: str = Field(pattern=_IDENT)
    provider_class: str = Field(pattern=_IDENT)
    decided_at: AwareDatetime


class Admission(BaseModel):
    """The authority for provider and model (the file named by
    CTO_HARNESS_CASE_MODEL_ADMISSION_FILE)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1]
    work_item: str = Field(min_length=1)
    provider: str = Field(min_length=1, max_length=200)
    provider_class: str = Field(pattern=_IDENT)
    model: str = Field(min_length=1, max_length=200)
    admission_status: AdmissionStatus
    aliases: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()


class ArtifactError(ValueError):
    """An artifact file is missing, unreadable or invalid. ``problems`` holds one line
    per problem, each naming the file and the field."""

    def __init__(self, code: str, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.code = code
        self.problems = problems


def _load_json(path: Path, label: str, missing_code: str) -> dict[str, object]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(missing_code, [f"{label}: file {path} does not exist"]) from None
    except OSError as exc:
        raise ArtifactError(missing_code, [f"{label}: cannot read {path}: {exc.strerror}"]) from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(missing_code.replace("missing", "invalid"), [f"{label}: {path} is not valid JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ArtifactError(missing_code.replace("missing", "invalid"), [f"{label}: {path} must hold a JSON object"])
    return data


def _problems(label: str, path: Path, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        out.append(f"{label}: {path}: field '{field}': {err['msg']}")
    return out


def load_decision(path: Path) -> DecisionRecord:
    data = _load_json(path, "decision record", "decision_record_missing")
    try:
        return DecisionRecord.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError("decision_record_invalid", _problems("decision record", path, exc)) from None


def load_admission(path: Path) -> Admission:
    data = _load_json(path, "admission JSON", "admission_missing")
    try:
        return Admission.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError("admission_invalid", _problems("admission JSON", path, exc)) from None


class GateFailure(BaseModel):
    """One failed gate: a stable reason code plus a human sentence."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str


def evaluate_admission_gates(decision: DecisionRecord, admission: Admission) -> list[GateFailure]:
    """Every gate on the two artifacts, all failures reported (not only the first)."""
    failures: list[GateFailure] = []
    if decision.decision_status != REQUIRED_DECISION_STATUS:
        failures.append(GateFailure(
            code="decision_not_local_provider_required",
            message=f"decision record: decision_status is '{decision.decision_status}', "
            f"this route applies only under '{REQUIRED_DECISION_STATUS}'",
        ))
    for label, value in (("decision record", decision.provider_class), ("admission JSON", admission.provider_class)):
        if value != REQUIRED_PROVIDER_CLASS:
            failures.append(GateFailure(
                code="provider_class_not_local_case_compatible",
                message=f"{label}: provider_class is '{value}', required '{REQUIRED_PROVIDER_CLASS}'",
            ))
    for label, value in (("decision record", decision.work_item), ("admission JSON", admission.work_item)):
        if value != WORK_ITEM:
            failures.append(GateFailure(
                code="work_item_mismatch",
                message=f"{label}: work_item is '{value}', expected '{WORK_ITEM}'",
            ))
    if decision.provider_class != admission.provider_class or decision.work_item != admission.work_item:
        failures.append(GateFailure(
            code="admission_mismatch",
            message="decision record and admission JSON disagree on work_item or provider_class",
        ))
    if not admission.admission_status.may_run:
        failures.append(GateFailure(
            code="admission_status_blocks",
            message=f"admission JSON: admission_status is '{admission.admission_status.value}'; "
            "only 'candidate' or 'admitted' may run",
        ))
    return failures


def file_sha256(path: Path) -> str | None:
    """Digest of an artifact, to prove a run left it unchanged (None if unreadable)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
