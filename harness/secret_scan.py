"""The secret scan: every secret the run knows, and common token shapes, in every place
the seed names and every file of the run directory, plus Case's repository read as data
(every object, ref, reflog, ``.git`` file and the work tree; see ``harness.git_mirror``).
Findings say where and what kind, never the value (locations are redacted too).

Known values are searched as written and in every encoding ``proxy.redact`` knows
(base64 and base64url at the three alignments, hex, URL-encoded in upper and lower case):
a token that went through an ``Authorization`` header, a query string, a data URL or the
middle of an encoded blob is still a leak. Docs: docs/secret-scan.md.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from proxy.redact import MIN_SECRET_LEN, Redactor, labelled_encoded_forms
from proxy.settings import ENV_API_KEY, ENV_API_KEY_FILE, ENV_BASE_URL, ENV_TOKEN

from .git_mirror import GitSnapshot, read_objects, take

ENV_EXTRA_SECRETS_FILE = "CASE_HARNESS_EXTRA_SECRETS_FILE"
_SECRET_NAME_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

# place -> files under the run directory (globs); "argv" and "commits" are special
# ("commits" also adds git_refs, git_reflog, git_files and worktree: see scan_git).
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
    "dns_queries": ("dns/*",),
    "commits": (),
    # Every other file of the run directory (outside repo/, which "commits" reads):
    # a place nobody listed is still a place.
    "other_files": (),
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


MAX_HITS_PER_TEXT = 100


class TextScanner:
    def __init__(self, secrets: SecretSet) -> None:
        self._forms = secrets.forms()
        self._shapes = Redactor(())

    def scan(self, text: str) -> list[tuple[str, int]]:
        """(kind, line number) of each hit; a hit on a known value hides shape hits inside
        it. At most MAX_HITS_PER_TEXT hits (a text full of copies of a token must not make
        the scan quadratic): one hit already makes the run unclean."""
        hits: list[tuple[str, int]] = []
        covered: list[tuple[int, int]] = []
        for kind, form in self._forms:
            start = text.find(form)
            while start != -1 and len(hits) < MAX_HITS_PER_TEXT:
                if not any(a <= start < b for a, b in covered):
                    hits.append((kind, text.count("\n", 0, start) + 1))
                    covered.append((start, start + len(form)))
                start = text.find(form, start + 1)
        for f in self._shapes.find(text):
            if len(hits) >= MAX_HITS_PER_TEXT:
                break
            if not any(a <= f.start < b for a, b in covered):
                hits.append((f.kind, text.count("\n", 0, f.start) + 1))
        return hits


def _object_field(kind: str, text: str, line: int) -> str:
    """Where in a commit or tag object line ``line`` is: its header's name (author,
    committer, tagger, tag, ...) or 'message'."""
    if kind not in ("commit", "tag"):
        return ""
    for n, row in enumerate(text.split("\n"), start=1):
        if row == "":
            return "message"
        if n == line:
            return "header " + (row.split(" ", 1)[0] if not row.startswith(" ") else "continued")
    return "message"


def _decode(data: bytes) -> str:
    # ASCII secrets survive any surrounding binary bytes; invalid sequences become U+FFFD.
    return data.decode("utf-8", "replace")


def scan_git(snap: GitSnapshot, scanner: TextScanner) -> tuple[list[str], list[ScanFinding]]:
    """Scan a harness-owned snapshot of Case's repository (:mod:`harness.git_mirror`):
    every object (blobs binary or not, trees, commits with their author, committer and
    message, tags; reachable, reflog-only or dangling), ref names and ``packed-refs``,
    reflogs, Case's other ``.git`` files (``config`` first among them) and the work
    tree, contents and file names. Returns (places scanned, findings)."""
    findings: list[ScanFinding] = []

    def add(place: str, text: str, where: str) -> None:
        """Findings in ``text``, located by ``where`` with ``{n}`` replaced by the line."""
        findings.extend(ScanFinding(place=place, kind=k, location=where.replace("{n}", str(n)))
                        for k, n in scanner.scan(text))

    read = read_objects(snap)
    for obj in read.objects:
        text = _decode(obj.data)
        state = "" if obj.reachable else " (not reachable from any ref or reflog: dangling)"
        named = f" {obj.path}" if obj.path else ""
        for k, n in scanner.scan(text):
            field = _object_field(obj.kind, text, n)
            findings.append(ScanFinding(place="commits", kind=k, location=f"{obj.kind} {obj.oid[:12]}{named}{state}, "
                                        f"line {n}" + (f" ({field})" if field else "")))
        if obj.path:
            add("commits", obj.path, f"{obj.kind} {obj.oid[:12]}: its file name")
    for problem in read.problems:  # complete now that the objects were read
        findings.append(ScanFinding(place="commits", kind="unreadable", location=f"repo: {problem}"))
    for i, ref in enumerate(read.refs, start=1):
        add("git_refs", ref, f"ref name #{i} (for-each-ref order)")
    for rel in sorted(p.relative_to(snap.bare).as_posix() for p in (snap.bare / "refs").rglob("*") if p.is_file()):
        add("git_refs", rel, "a ref file's name under .git/refs")
    if (snap.bare / "packed-refs").is_file():
        text = _decode((snap.bare / "packed-refs").read_bytes())
        add("git_refs", text, ".git/packed-refs:{n}")
    logs = sorted(p for p in (snap.bare / "logs").rglob("*") if p.is_file()) if (snap.bare / "logs").is_dir() else []
    for path in logs:
        rel = path.relative_to(snap.bare).as_posix()
        add("git_reflog", rel, "a reflog's file name under .git/logs")
        add("git_reflog", _decode(path.read_bytes()), f".git/{rel}:" + "{n}")
    for rel, data in sorted(snap.control.items()):
        add("git_files", rel, "a file name in .git")
        add("git_files", _decode(data), (f".git/{rel}:" if rel != "." else ".git (a file):") + "{n}")
    for rel, data in sorted(snap.worktree.items()):
        add("worktree", rel, "a file name in the work tree")
        add("worktree", _decode(data), f"repo/{rel}:" + "{n}")
    for rel, target in sorted(snap.links.items()):
        add("worktree" if not rel.startswith(".git/") else "git_files", f"{rel}\n{target}",
            "a symbolic link's name or target")
    for why in snap.skipped:
        findings.append(ScanFinding(place="worktree" if not why.startswith(".git") else "git_files",
                                    kind="unreadable", location=why))
    return ["commits", "git_refs", "git_reflog", "git_files", "worktree"], findings


def _other_files(run_dir: Path, listed: set[Path]) -> list[Path]:
    """Regular files of the run directory no other place covers (links not followed:
    ``rglob`` does not descend into linked directories, and linked files are skipped)."""
    out = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] == "repo" or path in listed or path.is_symlink() or not path.is_file():
            continue
        out.append(path)
    return out


def scan_run_dir(run_dir: Path, secrets: SecretSet, *, argv_text: str = "",
                 git_snapshot: GitSnapshot | None = None) -> ScanResult:
    """Scan every place; a place that exists but cannot be read is itself a finding
    (an unscanned place is not a clean place). ``git_snapshot``: Case's repository as
    the harness copied it when Case stopped (before the harness took its ``.git``
    controls back); without one, ``run_dir/repo`` is copied now. Locations are redacted
    too: a file or ref name may itself be the secret."""
    scanner = TextScanner(secrets)
    findings: list[ScanFinding] = []
    scanned: list[str] = []
    listed: set[Path] = set()
    for place, globs in PLACES.items():
        if place == "argv":
            scanned.append(place)
            findings += [ScanFinding(place=place, kind=k, location=f"process argv, line {n}")
                         for k, n in scanner.scan(argv_text)]
            continue
        if place == "commits":
            if not (run_dir / "repo").exists():
                continue
            snap = git_snapshot or take(run_dir / "repo")
            try:
                places, found = scan_git(snap, scanner)
            finally:
                if git_snapshot is None:
                    snap.remove()
            scanned += places
            findings += found
            continue
        if place == "other_files":
            files = _other_files(run_dir, listed)
        else:
            files = sorted({p for g in globs for p in run_dir.glob(g) if p.is_file() and not p.is_symlink()})
            listed |= set(files)
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
    redactor = Redactor(secrets.values)
    findings = [f.model_copy(update={"location": redactor.redact(f.location)}) for f in findings]
    return ScanResult(clean=not findings, secrets_known=len(secrets), places_scanned=scanned, findings=findings)
