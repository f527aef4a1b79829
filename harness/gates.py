"""The preflight: every gate that must hold before Case may start.

``evaluate_gates`` is pure: it takes what was read (artifacts, profile, environment, the
backend's model list) and returns every failure with a stable code, never only the
first. ``run_preflight`` does the reading, and probes the backend only when its URL has
passed the upstream gate (an external URL is never contacted).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from proxy.admission import (
    Admission,
    ArtifactError,
    DecisionRecord,
    GateFailure,
    evaluate_admission_gates,
    load_admission,
    load_decision,
)
from proxy.model_policy import Family, classify_family, fold
from proxy.redact import Redactor
from proxy.settings import ENV_ADMISSION_FILE, ENV_BASE_URL, ENV_CONFIG_FILE, ENV_DECISION_FILE, env_path
from proxy.upstream_policy import UpstreamRefusal, UpstreamTarget, classify_upstream, is_known_provider_host

from .profile import RunProfile

# Every gate the preflight evaluates, in report order.
GATES: tuple[str, ...] = (
    "decision_record", "admission", "admission_agreement", "profile_identity", "local_adapter_config",
    "upstream", "backend_identity", "external_fallback", "argv_secrets",
)

# Variables that name an external provider's credential or endpoint. Their presence in
# the harness environment, or in the profile's env_allow, is a configured fallback.
_PROVIDER_VAR = re.compile(
    r"^(ANTHROPIC_\w+|CLAUDE_\w+|CLAUDE|GEMINI_\w+|GOOGLE_API_KEY|GOOGLE_GENAI_\w+|VERTEX_\w+|OPENROUTER_\w+|"
    r"MISTRAL_API_KEY|GROQ_API_KEY|TOGETHER_API_KEY|TOGETHERAI_API_KEY|DEEPSEEK_API_KEY|XAI_API_KEY|"
    r"FIREWORKS_API_KEY|PERPLEXITY_API_KEY|COHERE_API_KEY|CO_API_KEY|AZURE_OPENAI_\w+|AWS_BEARER_TOKEN_BEDROCK|"
    r"BEDROCK_\w+|OPENAI_ORG_ID|OPENAI_ORGANIZATION|OPENAI_PROJECT_ID)$",
    re.IGNORECASE,
)
# Variables that name an OpenAI-compatible endpoint: allowed only when they point at a
# loopback/private host (the harness sets OPENAI_BASE_URL to the proxy itself anyway).
_ENDPOINT_VARS = ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_HOST")
_EXTERNAL_PROVIDERS = ("anthropic", "claude", "openai", "google", "gemini", "vertex", "bedrock", "azure",
                       "openrouter", "mistral", "groq", "together", "deepseek", "xai", "cohere", "fireworks")
_HOST_IN_TEXT = re.compile(r"(?:https?://)?([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


class ModelsProbeResult(Protocol):
    ok: bool
    models: tuple[str, ...]
    error: str | None


Probe = Callable[[str, "str | None"], ModelsProbeResult]


@dataclass(frozen=True)
class GateInputs:
    """Everything the gates judge, already read."""

    profile: RunProfile
    env: Mapping[str, str]
    decision: DecisionRecord | None = None
    decision_error: ArtifactError | None = None
    admission: Admission | None = None
    admission_error: ArtifactError | None = None
    allow_hosts: frozenset[str] = frozenset()
    backend_models: tuple[str, ...] | None = None  # None: not probed (or unreachable)
    backend_error: str | None = None
    argv: tuple[str, ...] = ()  # the Case argv as it would run
    secrets: tuple[str, ...] = ()  # values that must not appear in any argv


@dataclass(frozen=True)
class PreflightResult:
    failures: list[GateFailure]
    checked: list[str] = field(default_factory=lambda: list(GATES))
    decision: DecisionRecord | None = None
    admission: Admission | None = None
    upstream: UpstreamTarget | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


def _fail(code: str, message: str) -> GateFailure:
    return GateFailure(code=code, message=message)


def _artifact_failures(inputs: GateInputs) -> list[GateFailure]:
    out: list[GateFailure] = []
    env = inputs.env
    if env_path(env, ENV_DECISION_FILE) is None:
        out.append(_fail("decision_record_missing", f"{ENV_DECISION_FILE} is not set"))
    elif inputs.decision_error is not None:
        out.extend(_fail(inputs.decision_error.code, p) for p in inputs.decision_error.problems)
    if env_path(env, ENV_ADMISSION_FILE) is None:
        out.append(_fail("admission_missing", f"{ENV_ADMISSION_FILE} is not set"))
    elif inputs.admission_error is not None:
        out.extend(_fail(inputs.admission_error.code, p) for p in inputs.admission_error.problems)
    if inputs.decision is not None and inputs.decision.decision_status != "local_provider_required":
        # Reported even when the admission is unusable: it is the route's first condition.
        if inputs.admission is None:
            out.append(_fail("decision_not_local_provider_required",
                             f"decision record: decision_status is '{inputs.decision.decision_status}', "
                             "this route applies only under 'local_provider_required'"))
    if inputs.decision is not None and inputs.decision.provider_class != "local_case_compatible" \
            and inputs.admission is None:
        out.append(_fail("provider_class_not_local_case_compatible",
                         f"decision record: provider_class is '{inputs.decision.provider_class}', "
                         "required 'local_case_compatible'"))
    if inputs.decision is not None and inputs.admission is not None:
        out.extend(evaluate_admission_gates(inputs.decision, inputs.admission))
    return out


def _model_ok(name: str, admission: Admission) -> bool:
    return name == admission.model or name in admission.aliases


def _profile_failures(inputs: GateInputs) -> list[GateFailure]:
    """The Case profile must name the admitted provider and model."""
    adm, case = inputs.admission, inputs.profile.case
    if adm is None:
        return []
    out: list[GateFailure] = []
    if case.provider != adm.provider:
        out.append(_fail("admission_mismatch_provider",
                         f"Case profile: provider is '{case.provider}', the admission names '{adm.provider}'"))
    if not _model_ok(case.model, adm):
        out.append(_fail("admission_mismatch_model",
                         f"Case profile: model is '{case.model}', the admitted model is '{adm.model}'"))
    return out


def _upstream(inputs: GateInputs) -> tuple[UpstreamTarget | None, list[GateFailure]]:
    raw = inputs.env.get(ENV_BASE_URL)
    if raw is None or not raw.strip():
        return None, [_fail("local_adapter_config_missing", f"{ENV_BASE_URL} is unset or empty")]
    verdict = classify_upstream(raw, inputs.allow_hosts)
    if isinstance(verdict, UpstreamRefusal):
        if verdict.code in ("base_url_invalid", "base_url_missing"):
            return None, [_fail("local_adapter_config_missing", f"{ENV_BASE_URL}: {verdict.message}")]
        if verdict.code == "base_url_has_credentials":
            return None, [_fail("local_adapter_config_invalid", f"{ENV_BASE_URL}: {verdict.message}")]
        return None, [_fail("external_upstream", f"{ENV_BASE_URL}: {verdict.message}")]
    return verdict, []


def _backend_failures(inputs: GateInputs) -> list[GateFailure]:
    adm = inputs.admission
    if adm is None:
        return []
    if inputs.backend_models is None:
        return [_fail("backend_unreachable",
                      f"the backend's /v1/models could not be read: {inputs.backend_error or 'not probed'}")]
    if adm.model not in inputs.backend_models:
        listed = ", ".join(inputs.backend_models[:10]) or "nothing"
        return [_fail("admission_mismatch_backend",
                      f"the backend does not serve the admitted model '{adm.model}' (it lists: {listed})")]
    return []


def _looks_external_model(name: str, admission: Admission | None) -> bool:
    if admission is not None and _model_ok(name, admission):
        return False
    return True


def _fallback_failures(inputs: GateInputs) -> list[GateFailure]:
    """An external provider, its credentials or endpoint, or another model, anywhere in
    Case's reach."""
    out: list[GateFailure] = []
    adm, case = inputs.admission, inputs.profile.case
    for name in sorted(inputs.env):
        if _PROVIDER_VAR.match(name) and (inputs.env.get(name) or "").strip():
            out.append(_fail("external_fallback_configured",
                             f"the environment sets {name} (an external provider's credential or endpoint); "
                             "unset it for the run"))
    for name in case.env_allow:
        if _PROVIDER_VAR.match(name):
            out.append(_fail("external_fallback_configured",
                             f"Case profile: env_allow passes {name} (an external provider's credential or endpoint)"))
    for name in _ENDPOINT_VARS:
        value = (inputs.env.get(name) or "").strip()
        if value and isinstance(classify_upstream(value, inputs.allow_hosts), UpstreamRefusal):
            out.append(_fail("external_fallback_configured",
                             f"the environment sets {name} to an endpoint that is not loopback, private or allowlisted"))
    if any(p in fold(case.provider) for p in _EXTERNAL_PROVIDERS):
        out.append(_fail("external_fallback_configured",
                         f"Case profile: provider '{case.provider}' is an external model provider"))
    if _looks_external_model(case.model, adm) and classify_family(case.model) is not Family.OTHER:
        out.append(_fail("external_fallback_configured",
                         f"Case profile: model '{case.model}' is an external provider's model "
                         f"({classify_family(case.model).value})"))
    for fb in case.fallback_models:
        if _looks_external_model(fb, adm):
            out.append(_fail("external_fallback_configured",
                             f"Case profile: fallback_models names '{fb}', which is not the admitted model"))
    texts = [("command", " ".join(case.command))]
    if case.config_template is not None:
        texts.append(("config_template", case.config_template.content))
    for label, text in texts:
        for host in _HOST_IN_TEXT.findall(text):
            if is_known_provider_host(host):
                out.append(_fail("external_fallback_configured",
                                 f"Case profile: {label} names the external provider host '{host}'"))
        for token in re.findall(r"[A-Za-z0-9._/:-]+", text):
            if classify_family(token) is Family.ANTHROPIC and not (adm and _model_ok(token, adm)):
                out.append(_fail("external_fallback_configured",
                                 f"Case profile: {label} names the Anthropic model or provider '{token}'"))
    return out


def _argv_failures(inputs: GateInputs) -> list[GateFailure]:
    """No secret value (nor anything shaped like a token) in the argv Case would get."""
    redactor = Redactor(inputs.secrets)
    kinds = sorted({f.kind for arg in inputs.argv for f in redactor.find(arg)})
    return [_fail("secret_in_argv", f"the Case command line would carry a secret ({kind})") for kind in kinds]


def evaluate_gates(inputs: GateInputs) -> PreflightResult:
    """Every gate; all failures, each with its code."""
    failures = _artifact_failures(inputs)
    failures += _profile_failures(inputs)
    target, upstream_failures = _upstream(inputs)
    failures += upstream_failures
    if target is not None:
        failures += _backend_failures(inputs)
    failures += _fallback_failures(inputs)
    failures += _argv_failures(inputs)
    unique = list(dict.fromkeys(failures))
    return PreflightResult(failures=unique, decision=inputs.decision, admission=inputs.admission, upstream=target)


def allow_hosts_from_config(env: Mapping[str, str]) -> frozenset[str]:
    """``[upstream].allow_hosts`` of the proxy config the run will use, if any (the
    harness and the proxy must agree on what counts as allowlisted)."""
    path = env_path(env, ENV_CONFIG_FILE)
    if path is None:
        return frozenset()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return frozenset()  # the proxy's own check-config reports it; nothing is allowlisted
    hosts = data.get("upstream", {}).get("allow_hosts", [])
    return frozenset(h for h in hosts if isinstance(h, str))


def read_gate_inputs(env: Mapping[str, str], profile: RunProfile, probe: Probe, *, argv: tuple[str, ...] = (),
                     secrets: tuple[str, ...] = (), api_key: str | None = None) -> GateInputs:
    """Read the artifacts, and probe the backend only if its URL passes the upstream gate."""
    decision = admission = None
    decision_error = admission_error = None
    if (p := env_path(env, ENV_DECISION_FILE)) is not None:
        try:
            decision = load_decision(p)
        except ArtifactError as exc:
            decision_error = exc
    if (p := env_path(env, ENV_ADMISSION_FILE)) is not None:
        try:
            admission = load_admission(p)
        except ArtifactError as exc:
            admission_error = exc
    allow = allow_hosts_from_config(env)
    backend_models: tuple[str, ...] | None = None
    backend_error: str | None = None
    base_url = (env.get(ENV_BASE_URL) or "").strip()
    if admission is not None and base_url and isinstance(classify_upstream(base_url, allow), UpstreamTarget):
        result = probe(base_url, api_key)
        if result.ok:
            backend_models = tuple(result.models)
        else:
            backend_error = result.error
    return GateInputs(profile=profile, env=env, decision=decision, decision_error=decision_error,
                      admission=admission, admission_error=admission_error, allow_hosts=allow,
                      backend_models=backend_models, backend_error=backend_error, argv=argv, secrets=secrets)


def run_preflight(env: Mapping[str, str], profile: RunProfile, probe: Probe, *, argv: tuple[str, ...] = (),
                  secrets: tuple[str, ...] = (), api_key: str | None = None) -> PreflightResult:
    return evaluate_gates(read_gate_inputs(env, profile, probe, argv=argv, secrets=secrets, api_key=api_key))


def url_credentials(url: str) -> list[str]:
    """Userinfo parts of a URL (secrets even if the URL itself is refused)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return []
    return [v for v in (parts.username, parts.password) if v]
