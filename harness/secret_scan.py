"""The secret scan: every secret the run knows, and common token shapes, in every place
the seed names. Findings say where and what kind, never the value.

Known values are searched as written and base64- and URL-encoded (a token that went
through an ``Authorization`` header, a query string or a data URL is still a leak).
"""

from __future__ import annotations

import os
import subprocess
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from proxy.redact import MIN_SECRET_LEN, Redactor, labelled_encoded_forms
from proxy.settings import ENV_API_KEY, ENV_API_KEY_FILE, ENV_BASE_URL, ENV_TOKEN

ENV_EXTRA_SECRETS_FILE = "CASE_HARNESS_EXTRA_SECRETS_FILE"
_SECRET_NAME_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

# place -> files under the run directory (globs); "argv" and "commits" are special.
PLACES: dict[str, tuple[str, ...]] = {
    "argv": (),
    "task_file": ("task.md",),
    "generated_config": ("case/generated/**/*",),
    "case_logs": ("case/*.log",),
    "proxy_logs": ("proxy/*.log",),
    "proxy_evidence": ("proxy/evidence.jsonl",),
    "proxy_metrics": ("proxy/metrics.prom",),
    "backend_logs": ("backend/*",),
    "acceptance_output": ("acceptance.json",),
    "events": ("events.jsonl",),
    "commits": (),
}


@dataclass(frozen=True)
class KnownSecret:
    label: str
    value: str


class SecretSet:
    """The values a run must never write. Held in memory only."""

    def __init__(self, items: Iterable[KnownSecret] = ()) -> None:
        self._items: dict[str, KnownSecret] = {}
        for item in items:
            self.add(item.label, item.value)

    def add(self, label: str, value: str | None) -> None:
        value = (value or "").strip()
        if len(value) >= MIN_SECRET_LEN and value not in self._items:
            self._items[value] = KnownSecret(label, value)

    @property
    def values(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def forms(self) -> list[tuple[str, str]]:
        """(kind, searchable form) for every value and encoding, longest first."""
        out: dict[str, str] = {}
        for item in self._items.values():
            for form, encoding in labelled_encoded_forms(item.value).items():
                out.setdefault(form, f"{item.label} ({encoding})" if encoding else item.label)
        return sorted(((k, f) for f, k in out.items()), key=lambda kf: -len(kf[1]))


def _read_secret_file(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def endpoint_forms(url: str) -> list[str]:
    """The endpoint value as it might be written: as given, without a trailing slash, and
    (for a non-loopback host) its host:port."""
    raw = url.strip()
    forms = [raw, raw.rstrip("/")]
    try:
        parts = urllib.parse.urlsplit(raw)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        if parts.hostname and parts.hostname not in _LOOPBACK_HOSTS:
            forms.append(netloc)
        forms += [v for v in (parts.username, parts.password) if v]
    except ValueError:
        pass
    return forms


def collect_secrets(env: Mapping[str, str], extra: Iterable[str] = ()) -> SecretSet:
    """Every secret the run knows: ``extra`` (the run token), the backend key, the
    endpoint value and credentials in it, secret-named ``CTO_HARNESS_*`` variables, the
    proxy token, and values the operator lists in ``CASE_HARNESS_EXTRA_SECRETS_FILE``
    (one per line)."""
    found = SecretSet()
    for value in extra:
        found.add("run_token", value)
    found.add("backend_key", env.get(ENV_API_KEY))
    if env.get(ENV_API_KEY_FILE):
        found.add("backend_key", _read_secret_file(env[ENV_API_KEY_FILE]))
    found.add("proxy_token", env.get(ENV_TOKEN))
    base = env.get(ENV_BASE_URL) or ""
    if base.strip():
        forms = endpoint_forms(base)
        for form in forms[:3]:
            found.add("endpoint", form)
        for cred in forms[3:]:
            found.add("url_credential", cred)
    for name, value in env.items():
        if name.startswith("CTO_HARNESS_") and any(m in name.upper() for m in _SECRET_NAME_MARKERS):
            if name.endswith("_FILE"):
                found.add(f"env:{name.removesuffix('_FILE')}", _read_secret_file(value))
            else:
                found.add(f"env:{name}", value)
    if env.get(ENV_EXTRA_SECRETS_FILE):
        text = _read_secret_file(env[ENV_EXTRA_SECRETS_FILE]) or ""
        for line in text.splitlines():
            found.add("operator_listed", line)
    return found


class ScanFinding(BaseModel):
    model_config = ConfigDict(frozen=True)
    place: str
    kind: str
    location: str  # file (relative to the run directory) and line, or a commit; never the value


class ScanResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    clean: bool
    secrets_known: int
    places_scanned: list[str]
    findings: list[ScanFinding]


class TextScanner:
    def __init__(self, secrets: SecretSet) -> None:
        self._forms = secrets.forms()
        self._shapes = Redactor(())

    def scan(self, text: str) -> list[tuple[str, int]]:
        """(kind, line number) of each hit; a hit on a known value hides shape hits inside it."""
        hits: list[tuple[str, int]] = []
        covered: list[tuple[int, int]] = []
        for kind, form in self._forms:
            start = text.find(form)
            while start != -1:
                if not any(a <= start < b for a, b in covered):
                    hits.append((kind, text.count("\n", 0, start) + 1))
                    covered.append((start, start + len(form)))
                start = text.find(form, start + 1)
        for f in self._shapes.find(text):
            if not any(a <= f.start < b for a, b in covered):
                hits.append((f.kind, text.count("\n", 0, f.start) + 1))
        return hits


def _git_log_text(repo: Path) -> str | None:
    env = {k: os.environ[k] for k in ("PATH", "LANG", "HOME") if k in os.environ}
    env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_PAGER": "cat"})
    try:
        out = subprocess.run(["git", "-C", str(repo), "log", "-p", "--all", "--no-color", "--no-textconv",
                              "--no-ext-diff", "--format=commit %H%n%B"],
                             capture_output=True, env=env, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.decode("utf-8", "replace")


def _commit_of_line(text: str, line: int) -> str:
    commit = "?"
    for n, row in enumerate(text.splitlines()[:line], start=1):
        if row.startswith("commit ") and len(row) == 47:
            commit = row[7:19]
        if n >= line:
            break
    return f"commit {commit}"


def scan_run_dir(run_dir: Path, secrets: SecretSet, *, argv_text: str = "") -> ScanResult:
    """Scan every place; a place that exists but cannot be read is itself a finding
    (an unscanned place is not a clean place)."""
    scanner = TextScanner(secrets)
    findings: list[ScanFinding] = []
    scanned: list[str] = []
    for place, globs in PLACES.items():
        if place == "argv":
            scanned.append(place)
            findings += [ScanFinding(place=place, kind=k, location=f"process argv, line {n}")
                         for k, n in scanner.scan(argv_text)]
            continue
        if place == "commits":
            repo = run_dir / "repo"
            if not (repo / ".git").exists():
                continue
            text = _git_log_text(repo)
            scanned.append(place)
            if text is None:
                findings.append(ScanFinding(place=place, kind="unreadable", location="repo: git log -p failed"))
                continue
            findings += [ScanFinding(place=place, kind=k, location=_commit_of_line(text, n))
                         for k, n in scanner.scan(text)]
            continue
        files = sorted({p for g in globs for p in run_dir.glob(g) if p.is_file()})
        if not files:
            continue
        scanned.append(place)
        for path in files:
            rel = path.relative_to(run_dir).as_posix()
            try:
                text = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                findings.append(ScanFinding(place=place, kind="unreadable", location=rel))
                continue
            findings += [ScanFinding(place=place, kind=k, location=f"{rel}:{n}") for k, n in scanner.scan(text)]
    return ScanResult(clean=not findings, secrets_known=len(secrets), places_scanned=scanned, findings=findings)
