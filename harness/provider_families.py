"""External model-provider families as data: the environment variables and credential
files through which a program reaches each one, and the variables that belong to the
harness and proxy themselves.

The gates (``harness.gates``) judge a run's configuration against these tables; keeping
them here, apart from the logic, lets a new provider be added as one entry. What each
name means: ``env_names`` are exact variable names (credentials, profiles, account or
endpoint selectors), ``env_prefixes`` cover a provider's whole variable namespace when it
has no variable a Case may harmlessly receive, and ``home_files`` are credential files
relative to a HOME directory. Matching of variable names is case-insensitive (Windows
spellings and lower-case copies exist in the wild).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from proxy.model_policy import Family, classify_family, fold


@dataclass(frozen=True)
class ProviderFamily:
    """One external provider (or gateway) and the ways a program finds it."""

    name: str
    env_names: tuple[str, ...] = ()
    env_prefixes: tuple[str, ...] = ()
    home_files: tuple[str, ...] = ()


PROVIDER_FAMILIES: tuple[ProviderFamily, ...] = (
    ProviderFamily("anthropic", env_names=("CLAUDE",), env_prefixes=("ANTHROPIC_", "CLAUDE_"),
                   home_files=(".claude/.credentials.json", ".claude.json")),
    # OpenAI's own cloud. OPENAI_BASE_URL / OPENAI_API_KEY are the route variables the
    # harness sets for Case (to the proxy and the run token), so they are judged apart:
    # see OPERATOR_OPENAI_* below.
    ProviderFamily("openai", env_names=("OPENAI_ORG_ID", "OPENAI_ORGANIZATION", "OPENAI_PROJECT_ID",
                                        "OPENAI_ADMIN_KEY", "CODEX_API_KEY", "CHATGPT_API_KEY"),
                   home_files=(".codex/auth.json",)),
    ProviderFamily("aws-bedrock",
                   env_names=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                              "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                              "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                              "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                              "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                              "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_BEARER_TOKEN_BEDROCK",
                              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_BEDROCK", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
                              "AWS_SSO_SESSION"),
                   env_prefixes=("BEDROCK_",),
                   home_files=(".aws/credentials", ".aws/config", ".aws/sso/cache", ".aws/login/cache")),
    ProviderFamily("google-vertex",
                   env_names=("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT",
                              "GOOGLE_CLOUD_LOCATION", "GCLOUD_PROJECT", "CLOUDSDK_CONFIG",
                              "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE", "CLOUDSDK_CORE_PROJECT"),
                   env_prefixes=("GEMINI_", "GOOGLE_GENAI_", "VERTEX", "GOOGLE_VERTEX_"),
                   home_files=(".config/gcloud/application_default_credentials.json",
                               ".config/gcloud/credentials.db", ".config/gcloud/access_tokens.db",
                               ".config/gcloud/legacy_credentials", ".gemini/oauth_creds.json", ".gemini/.env")),
    ProviderFamily("azure-openai",
                   env_names=("AZURE_API_KEY", "AZURE_API_BASE", "AZURE_API_VERSION", "AZURE_CLIENT_SECRET",
                              "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_CERTIFICATE_PATH",
                              "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AI_API_KEY", "AZURE_INFERENCE_CREDENTIAL",
                              "AZURE_INFERENCE_ENDPOINT"),
                   env_prefixes=("AZURE_OPENAI_",),
                   home_files=(".azure/msal_token_cache.json", ".azure/msal_token_cache.bin",
                               ".azure/accessTokens.json", ".azure/service_principal_entries.json")),
    ProviderFamily("huggingface", env_names=("HF_TOKEN", "HF_API_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT",
                                             "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN"),
                   env_prefixes=("HUGGINGFACE_",),
                   home_files=(".cache/huggingface/token", ".cache/huggingface/stored_tokens",
                               ".huggingface/token")),
    ProviderFamily("openrouter", env_prefixes=("OPENROUTER_",)),
    ProviderFamily("litellm", env_prefixes=("LITELLM_",)),
    ProviderFamily("portkey", env_prefixes=("PORTKEY_",)),
    ProviderFamily("ollama", env_names=("OLLAMA_HOST", "OLLAMA_API_BASE", "OLLAMA_API_KEY", "OLLAMA_BASE_URL"),
                   home_files=(".ollama/id_ed25519",)),
    ProviderFamily("groq", env_prefixes=("GROQ_",)),
    ProviderFamily("xai", env_names=("GROK_API_KEY",), env_prefixes=("XAI_",)),
    ProviderFamily("mistral", env_prefixes=("MISTRAL_", "CODESTRAL_")),
    ProviderFamily("together", env_prefixes=("TOGETHER_", "TOGETHERAI_")),
    ProviderFamily("deepseek", env_prefixes=("DEEPSEEK_",)),
    ProviderFamily("cohere", env_names=("CO_API_KEY",), env_prefixes=("COHERE_",)),
    ProviderFamily("fireworks", env_prefixes=("FIREWORKS_",)),
    ProviderFamily("perplexity", env_prefixes=("PERPLEXITY_", "PPLX_")),
    ProviderFamily("deepinfra", env_prefixes=("DEEPINFRA_",)),
    ProviderFamily("replicate", env_prefixes=("REPLICATE_",)),
    ProviderFamily("cerebras", env_prefixes=("CEREBRAS_",)),
    ProviderFamily("dashscope", env_prefixes=("DASHSCOPE_",)),
    ProviderFamily("moonshot", env_prefixes=("MOONSHOT_",)),
    ProviderFamily("github-models", env_names=("GITHUB_MODELS_TOKEN",), env_prefixes=("COPILOT_",)),
)

# OpenAI's own variables, set by the operator. The harness gives Case OPENAI_BASE_URL
# (the proxy) and OPENAI_API_KEY (the run token) itself, so these are a fallback only when
# they come from the operator's environment: a key for OpenAI's cloud, or a base URL that
# is not loopback, private or allowlisted.
OPERATOR_OPENAI_KEY_NAMES: tuple[str, ...] = ("OPENAI_API_KEY",)
OPERATOR_OPENAI_ENDPOINT_NAMES: tuple[str, ...] = ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_HOST")

# The variables harness.run.case_environment sets for Case itself, after env_allow, so a
# profile that names one of them passes nothing of the operator's (a test keeps this list
# and that function in step).
ROUTE_VARIABLES: tuple[str, ...] = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CASE_MODEL", "OPENAI_MODEL",
                                    "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                                    "all_proxy", "NO_PROXY", "no_proxy")

# The harness's and the proxy's own configuration: artifact paths, the backend URL and
# key, the proxy token. None of it is Case's business.
OWN_PREFIXES: tuple[str, ...] = ("CTO_HARNESS_", "CASE_PROXY_", "CASE_HARNESS_")

# Variables that name an endpoint: where a client sends its requests.
_ENDPOINT_NAME = re.compile(r"^\w*_(BASE_URL|API_BASE|HOST|ENDPOINT|ENDPOINT_URL\w*|API_URL|API_HOST)$",
                            re.IGNORECASE)


def provider_family_of(name: str) -> str | None:
    """The provider family whose credential or endpoint variable ``name`` is, if any."""
    upper = name.upper()
    for family in PROVIDER_FAMILIES:
        if upper in family.env_names or upper.startswith(family.env_prefixes):
            return family.name
    return None


def is_own_variable(name: str) -> bool:
    """A variable of the harness's or the proxy's own configuration."""
    return name.upper().startswith(OWN_PREFIXES)


def is_endpoint_variable(name: str) -> bool:
    """A variable whose name says it holds an endpoint (``*_BASE_URL``, ``*_API_BASE``,
    ``*_HOST``, ``*_ENDPOINT``, ``*_ENDPOINT_URL*``, ``*_API_URL``)."""
    return bool(_ENDPOINT_NAME.match(name))


def home_credential_files() -> tuple[tuple[str, str], ...]:
    """(family, path relative to HOME) for every known credential file."""
    return tuple((f.name, rel) for f in PROVIDER_FAMILIES for rel in f.home_files)


def _inside(path: PurePosixPath, root: PurePosixPath) -> bool:
    return path == root or root in path.parents


def exposed_credential_files(roots: Iterable[Path], operator_home: Path | None) -> list[tuple[str, str]]:
    """(family, path) of every known credential file that exists inside one of ``roots``:
    a root read as a HOME (``root/.aws/credentials``), and the operator's own files that
    lie inside a root (a root of ``/root`` or ``/root/.aws`` exposes
    ``/root/.aws/credentials``). Paths are reported, never read."""
    found: dict[str, str] = {}
    known = home_credential_files()
    home = operator_home.resolve() if operator_home is not None else None
    own = [(fam, home / rel) for fam, rel in known] if home is not None else []
    for given in roots:
        root = Path(given).resolve()  # a symlink or a relative path exposes what it points at
        for fam, rel in known:
            candidate = root / rel
            if candidate.exists():
                found.setdefault(str(candidate), fam)
        for fam, path in own:
            if _inside(PurePosixPath(path), PurePosixPath(root)) and path.exists():
                found.setdefault(str(path), fam)
    return sorted(((fam, path) for path, fam in found.items()), key=lambda fp: fp[1])


# ---------------------------------------------------------------------------- model names

# LiteLLM-style route prefixes ("bedrock/anthropic.claude-...", "openrouter/qwen/..."): a
# model name that starts with one asks a router to go to that provider, whatever model
# follows. "openai/" (and vLLM's "hosted_vllm/") is LiteLLM's spelling of "the
# OpenAI-compatible server at OPENAI_BASE_URL", which for Case is the proxy, so the name
# after it is judged instead.
ROUTE_PREFIXES: dict[str, str] = {
    "anthropic": "anthropic", "bedrock": "aws-bedrock", "bedrock_converse": "aws-bedrock",
    "sagemaker": "aws-bedrock", "vertex_ai": "google-vertex", "vertex_ai_beta": "google-vertex",
    "gemini": "google-vertex", "azure": "azure-openai", "azure_ai": "azure-openai", "azure_text": "azure-openai",
    "huggingface": "huggingface", "openrouter": "openrouter", "litellm_proxy": "litellm", "portkey": "portkey",
    "ollama": "ollama", "ollama_chat": "ollama", "groq": "groq", "xai": "xai", "mistral": "mistral",
    "codestral": "mistral", "together_ai": "together", "deepseek": "deepseek", "cohere": "cohere",
    "cohere_chat": "cohere", "fireworks_ai": "fireworks", "perplexity": "perplexity", "deepinfra": "deepinfra",
    "replicate": "replicate", "cerebras": "cerebras", "dashscope": "dashscope", "moonshot": "moonshot",
    "github": "github-models", "github_copilot": "github-models", "chatgpt": "openai",
    "text-completion-openai": "openai",
}
GENERIC_ROUTE_PREFIXES: tuple[str, ...] = ("openai", "hosted_vllm")

# Names of models served only from a provider's cloud, beyond what
# proxy.model_policy.classify_family knows (Anthropic, OpenAI, Google). Folded substrings.
EXTRA_MODEL_MARKERS: dict[str, tuple[str, ...]] = {
    "xai": ("grok",),
    "aws-bedrock": ("amazon.nova", "amazon.titan", "nova-pro", "nova-lite", "nova-micro", "nova-premier"),
    "mistral": ("mistral-large", "mistral-medium", "codestral", "magistral-medium"),
    "deepseek": ("deepseek-chat", "deepseek-reasoner"),
    "cohere": ("command-a",),
}
# Open-weight models of those families: local servers run them too, so the name alone
# does not point at a provider's cloud.
OPEN_WEIGHT_MARKERS: tuple[str, ...] = ("gpt-oss", "gemma")
# OpenAI's family is recognised by a model's shape only: "openai" and "codex" alone are
# also a CLI, an SDK and the OpenAI-compatible bridge Case itself uses.
_OPENAI_MODEL_SEGMENT = re.compile(
    r"^(gpt-?\d|gpt-4o|chatgpt|o[1-9](-|$)|text-embedding|davinci|babbage|dall-e|whisper-|tts-1|codex-mini|"
    r"computer-use|omni-moderation)")


def external_model_family(name: str) -> str | None:
    """The external provider family a model name (or a route to one) points at, or None
    for a name no provider's cloud owns (a local model, a word that is not a model)."""
    skeleton = fold(name)
    segments = [s for s in re.split(r"[/:]", skeleton) if s]
    if not segments:
        return None
    if len(segments) > 1 and segments[0] in ROUTE_PREFIXES:
        return ROUTE_PREFIXES[segments[0]]
    if len(segments) > 1 and segments[0] in GENERIC_ROUTE_PREFIXES:
        segments = segments[1:]
    body = "/".join(segments)
    if any(m in body for m in OPEN_WEIGHT_MARKERS):
        return None
    family = classify_family(body)
    if family is Family.ANTHROPIC:
        return "anthropic"
    if family is Family.GOOGLE:
        return "google-vertex"
    if any(_OPENAI_MODEL_SEGMENT.match(s) for s in segments):
        return "openai"
    for fam, markers in EXTRA_MODEL_MARKERS.items():
        if any(m in body for m in markers):
            return fam
    return None
