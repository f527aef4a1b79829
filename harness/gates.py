"""The preflight: every gate that must hold before Case may start.

``evaluate_gates`` is pure: it takes what was read (artifacts, profile, environment, the
backend's model list) and returns every failure with a stable code, never only the
first. ``run_preflight`` does the reading, and probes the backend only when its URL has
passed the upstream gate (an external URL is never contacted).
"""

from __future__ import annotations

import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from proxy.model_policy import fold
from proxy.redact import Redactor
from proxy.settings import ENV_ADMISSION_FILE, ENV_BASE_URL, ENV_CONFIG_FILE, ENV_DECISION_FILE, env_path
from proxy.upstream_policy import UpstreamRefusal, UpstreamTarget, classify_upstream, is_known_provider_host

from .profile import CaseProfile, RunProfile
from .provider_families import (
    OPERATOR_OPENAI_ENDPOINT_NAMES,
    OPERATOR_OPENAI_KEY_NAMES,
    ROUTE_VARIABLES,
    exposed_credential_files,
    external_model_family,
    is_endpoint_variable,
    is_own_variable,
    provider_family_of,
)

# Every gate the preflight evaluates, in report order.
GATES: tuple[str, ...] = (
    "decision_record", "admission", "admission_agreement", "admission_aliases", "profile_identity",
    "local_adapter_config", "upstream", "backend_identity", "backend_models", "external_fallback",
    "credential_files", "env_allow", "endpoint_variables", "profile_models", "argv_secrets",
)

_EXTERNAL_PROVIDERS = ("anthropic", "claude", "openai", "google", "gemini", "vertex", "bedrock", "azure",
                       "openrouter", "mistral", "groq", "together", "deepseek", "xai", "cohere", "fireworks")
_HOST_IN_TEXT = re.compile(r"(?:https?://)?([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
_URL_IN_TEXT = re.compile(r"\bhttps?://[^\s\"'<>]+", re.IGNORECASE)
_TOKEN = re.compile(r"[A-Za-z0-9._/:@+-]+")
# An option or key that names a model: model, weak_model, editor-model, model_name, ...
_MODEL_KEY = re.compile(r"^(?:[\w.-]*[-_.])?model(?:s|[-_]?name|[-_]?id)?$", re.IGNORECASE)
_KEY_VALUE = re.compile(r"(?P<key>[A-Za-z_][\w.-]*)[\"']?\s*[:=]\s*"
                        r"(?P<q>[\"']?)(?P<val>\{model\}|[^\"'\s,}\]#]+)(?P=q)")


class ModelsProbeResult(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def error(self) -> str | None: ...


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
    secrets: tuple[str, ...] = ()  # values that must not appear in any argv nor reach Case
    # True only when Case runs where it cannot read the harness's environment, its /proc
    # or the operator's HOME (the sandbox). False: those count as within Case's reach.
    case_isolated: bool = False
    credential_files: tuple[tuple[str, str], ...] = ()  # (family, path) Case could read


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


def _external_model(name: str, admission: Admission | None) -> str | None:
    """The external family of a model name, unless it is the admitted model or an alias."""
    if admission is not None and _model_ok(name, admission):
        return None
    return external_model_family(name)


def _admitted_spelling(value: str, admission: Admission | None) -> bool:
    """A model value Case may be given: ``{model}``, the admitted model or an alias, also
    in LiteLLM's ``openai/<name>`` spelling (an OpenAI-compatible server at
    OPENAI_BASE_URL, which for Case is the proxy)."""
    if value == "{model}":
        return True
    if admission is None:
        return False
    return _model_ok(value, admission) or (value.startswith("openai/") and _model_ok(value[len("openai/"):], admission))


def _provider_env_failures(inputs: GateInputs) -> list[GateFailure]:
    """Credentials and endpoints of external providers, wherever Case could read them:
    passed through ``env_allow`` always; in the harness's own environment only while
    Case can read that (no sandbox: same uid, ``/proc/<ppid>/environ``)."""
    out: list[GateFailure] = []
    env = inputs.env
    if not inputs.case_isolated:
        for name in sorted(env):
            if not (env.get(name) or "").strip():
                continue
            family = provider_family_of(name)
            if family is None and name.upper() in OPERATOR_OPENAI_KEY_NAMES:
                family = "openai"
            if family is None and name.upper() in OPERATOR_OPENAI_ENDPOINT_NAMES and isinstance(
                    classify_upstream(env[name], inputs.allow_hosts), UpstreamRefusal):
                family = "openai"
            if family is not None:
                out.append(_fail("external_fallback_configured",
                                 f"the harness environment sets {name} ({family}: an external provider's credential "
                                 "or endpoint) and Case runs without a sandbox, so it could read it; unset it for "
                                 "the run or run Case sandboxed"))
    for name in inputs.profile.case.env_allow:
        family = provider_family_of(name)
        if family is not None:
            out.append(_fail("external_fallback_configured",
                             f"Case profile: env_allow passes {name} ({family}: an external provider's credential "
                             "or endpoint); remove it from env_allow"))
    case = inputs.profile.case
    if any(p in fold(case.provider) for p in _EXTERNAL_PROVIDERS):
        out.append(_fail("external_fallback_configured",
                         f"Case profile: provider '{case.provider}' is an external model provider"))
    for label, text in _profile_texts(case):
        for host in _HOST_IN_TEXT.findall(text):
            if is_known_provider_host(host):
                out.append(_fail("external_fallback_configured",
                                 f"Case profile: {label} names the external provider host '{host}'"))
    return out


def _credential_file_failures(inputs: GateInputs) -> list[GateFailure]:
    where = ("a directory the profile exposes to Case" if inputs.case_isolated
             else "the operator's HOME, which Case can read without a sandbox")
    return [_fail("external_credential_file",
                  f"{path} ({family} credentials) is in {where}; move it away or run Case sandboxed without it")
            for family, path in inputs.credential_files]


def _env_allow_failures(inputs: GateInputs) -> list[GateFailure]:
    """env_allow must not hand Case the harness's or proxy's own configuration, nor any
    variable whose value carries a secret the run knows."""
    out: list[GateFailure] = []
    secrets = [s for s in inputs.secrets if s]
    for name in inputs.profile.case.env_allow:
        if is_own_variable(name):
            out.append(_fail("env_allow_harness_variable",
                             f"Case profile: env_allow passes {name}, the harness's or proxy's own configuration "
                             "(CTO_HARNESS_*, CASE_PROXY_*, CASE_HARNESS_*); remove it"))
            continue
        if name in ROUTE_VARIABLES:
            continue  # the harness sets it for Case after env_allow; nothing of the operator's passes
        value = inputs.env.get(name) or ""
        if value and any(secret in value for secret in secrets):
            out.append(_fail("env_allow_secret_value",
                             f"Case profile: env_allow passes {name}, whose value carries one of the run's secrets "
                             "(backend key, endpoint, proxy or run token, operator-listed secret); remove it"))
    return out


def _endpoint_failures(inputs: GateInputs) -> list[GateFailure]:
    """The only endpoint Case may be given is the proxy's: OPENAI_BASE_URL, set by the
    harness, and ``{base_url}`` in the config template."""
    out: list[GateFailure] = []
    for name in inputs.profile.case.env_allow:
        if name in ROUTE_VARIABLES or is_own_variable(name) or provider_family_of(name) is not None:
            continue  # judged by their own gates (the route ones are the proxy's)
        if is_endpoint_variable(name):
            out.append(_fail("endpoint_variable_to_case",
                             f"Case profile: env_allow passes {name}, an endpoint variable; Case's only endpoint is "
                             "the proxy (OPENAI_BASE_URL, set by the harness)"))
    for label, text in _profile_texts(inputs.profile.case):
        for url in _URL_IN_TEXT.findall(text):
            host = urlsplit(url).hostname or ""
            if is_known_provider_host(host):
                continue  # external_fallback_configured names it
            out.append(_fail("endpoint_in_profile",
                             f"Case profile: {label} names an endpoint URL (host '{host or '?'}'); give Case "
                             "'{base_url}' (the proxy) instead"))
    return out


def _profile_texts(case: CaseProfile) -> list[tuple[str, str]]:
    texts = [("command", " ".join(case.command))]
    if case.config_template is not None:
        texts.append(("config_template", case.config_template.content))
    return texts


def _model_values(case: CaseProfile) -> list[tuple[str, str]]:
    """(where, value) of every model option in the command and key in the config template."""
    out: list[tuple[str, str]] = []
    argv = list(case.command)
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            key, eq, value = arg.lstrip("-").partition("=")
            if _MODEL_KEY.match(key):
                if eq:
                    out.append(("command", value))
                elif i + 1 < len(argv):
                    out.append(("command", argv[i + 1]))
                continue
        for m in _KEY_VALUE.finditer(arg):
            if _MODEL_KEY.match(m["key"]):
                out.append(("command", m["val"]))
    if case.config_template is not None:
        for m in _KEY_VALUE.finditer(case.config_template.content):
            # A YAML block header (``model:`` then, on the next line, ``model_name: ...``)
            # matches as key ``model`` with the next key as "value": not a model value; the
            # nested keys are judged themselves.
            if _MODEL_KEY.match(m["key"]) and not (m["val"].endswith(":") and not m["q"]):
                out.append(("config_template", m["val"]))
    return [(where, v) for where, value in out for v in value.split(",") if v]


def _model_failures(inputs: GateInputs) -> list[GateFailure]:
    """No model but the admitted one in the command, the fallbacks or the config template."""
    out: list[GateFailure] = []
    adm, case = inputs.admission, inputs.profile.case
    for fb in case.fallback_models:
        if not (adm is not None and _model_ok(fb, adm)):
            family = external_model_family(fb)
            out.append(_fail("unadmitted_model_configured",
                             f"Case profile: fallback_models names '{fb}'"
                             + (f" ({family})" if family else "") + ", which is not the admitted model"))
    reported: set[str] = set()
    for where, value in _model_values(case):
        if not _admitted_spelling(value, adm):
            reported.add(value)
            family = external_model_family(value)
            out.append(_fail("unadmitted_model_configured",
                             f"Case profile: {where} sets a model to '{value}'" + (f" ({family})" if family else "")
                             + "; use the admitted model or {model}"))
    for label, text in _profile_texts(case):
        for token in _TOKEN.findall(text):
            family = _external_model(token, adm)
            if family is not None and token not in reported:
                out.append(_fail("unadmitted_model_configured",
                                 f"Case profile: {label} names '{token}', a model or route of {family}"))
    return out


def _backend_model_failures(inputs: GateInputs) -> list[GateFailure]:
    """A backend that also lists an external provider's model is a router to that provider."""
    adm = inputs.admission
    if adm is None or inputs.backend_models is None:
        return []
    out: list[GateFailure] = []
    for name in inputs.backend_models:
        family = _external_model(name, adm)
        if family is not None:
            out.append(_fail("backend_serves_external_model",
                             f"the backend's /v1/models lists '{name}' ({family}) beside the admitted model; "
                             "it routes to an external provider, use a backend that serves only local models"))
    return out


def _alias_failures(inputs: GateInputs) -> list[GateFailure]:
    """An alias that names an external model makes a request for it look admitted."""
    adm = inputs.admission
    if adm is None:
        return []
    return [_fail("admission_alias_external",
                  f"admission JSON: alias '{alias}' names a model or route of {family}; an alias must not "
                  "look like an external provider's model")
            for alias in adm.aliases if (family := external_model_family(alias)) is not None]


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
    failures += _backend_model_failures(inputs)
    failures += _alias_failures(inputs)
    failures += _provider_env_failures(inputs)
    failures += _credential_file_failures(inputs)
    failures += _env_allow_failures(inputs)
    failures += _endpoint_failures(inputs)
    failures += _model_failures(inputs)
    failures += _argv_failures(inputs)
    # Messages quote profile text (model values, hosts); a secret pasted there must not
    # travel on into the events and the report.
    redactor = Redactor(inputs.secrets)
    failures = [GateFailure(code=f.code, message=redactor.redact(f.message)) for f in failures]
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


def operator_homes(env: Mapping[str, str]) -> tuple[Path, ...]:
    """The HOME the run's environment names and the harness user's own (they can differ;
    an unsandboxed Case can read both)."""
    homes: list[Path] = []
    if (env.get("HOME") or "").strip():
        homes.append(Path(env["HOME"]))
    try:
        homes.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    except (KeyError, OSError):
        pass
    return tuple(dict.fromkeys(h.absolute() for h in homes))


def credential_files_in_reach(env: Mapping[str, str], *, case_isolated: bool,
                              exposed: Sequence[Path] = ()) -> tuple[tuple[str, str], ...]:
    """Known provider credential files Case could read: without a sandbox, those in the
    operator's HOME; in one, those inside the directories the profile exposes to it
    (``exposed``: the home seed, read-only paths)."""
    homes = operator_homes(env)
    roots = list(exposed) if case_isolated else list(homes)
    found: dict[str, str] = {}
    for home in homes or (None,):
        for family, path in exposed_credential_files(roots, home):
            found.setdefault(path, family)
    return tuple(sorted(((f, p) for p, f in found.items()), key=lambda fp: fp[1]))


def read_gate_inputs(env: Mapping[str, str], profile: RunProfile, probe: Probe, *, argv: tuple[str, ...] = (),
                     secrets: tuple[str, ...] = (), api_key: str | None = None, case_isolated: bool = False,
                     exposed: Sequence[Path] = ()) -> GateInputs:
    """Read the artifacts, and probe the backend only if its URL passes the upstream gate.

    ``case_isolated`` is True only when Case will run in the sandbox (it then cannot
    read the harness's environment or the operator's HOME); ``exposed`` are the host
    directories such a sandbox shows Case (home seed, read-only paths)."""
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
                      backend_models=backend_models, backend_error=backend_error, argv=argv, secrets=secrets,
                      case_isolated=case_isolated,
                      credential_files=credential_files_in_reach(env, case_isolated=case_isolated, exposed=exposed))


def run_preflight(env: Mapping[str, str], profile: RunProfile, probe: Probe, *, argv: tuple[str, ...] = (),
                  secrets: tuple[str, ...] = (), api_key: str | None = None, case_isolated: bool = False,
                  exposed: Sequence[Path] = ()) -> PreflightResult:
    return evaluate_gates(read_gate_inputs(env, profile, probe, argv=argv, secrets=secrets, api_key=api_key,
                                           case_isolated=case_isolated, exposed=exposed))


def url_credentials(url: str) -> list[str]:
    """Userinfo parts of a URL (secrets even if the URL itself is refused)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return []
    return [v for v in (parts.username, parts.password) if v]
