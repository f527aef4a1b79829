"""Read Case's git repository without obeying it.

Case may write anything in its ``.git``: a ``diff.<x>.textconv`` or ``filter.<x>.smudge``
program in ``config``, hooks, ``objects/info/alternates``, replace refs, grafts. Git run
inside that directory obeys all of it, as the harness, outside the sandbox. So no git
command ever runs there: :func:`take` copies the repository's *data* (object files,
refs, reflogs) as plain files into a bare repository the harness creates with a pristine
configuration (no system or global config, no hooks, no attributes, no replace objects),
and keeps Case's other ``.git`` files (``config`` included) as bytes to be scanned, never
read by git. :func:`read_objects` then reads every object there with plumbing only
(``cat-file --batch-all-objects``, ``rev-list --all --objects --reflog``): reachable,
reflog-only and dangling objects alike.

Nothing is followed through a symbolic link; counts and sizes are bounded, and what is
left out is listed (an unscanned place is not a clean place).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Bounds: a repository past them is reported as not fully read, never silently cut.
MAX_FILES = 200_000
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_CONTROL_FILE_BYTES = 64 * 1024**2
# One object's inflated size (a small pack can inflate to far more than it weighs), and
# how much object content is held in memory at once.
MAX_OBJECT_BYTES = 256 * 1024**2
BATCH_BYTES = 64 * 1024**2
GIT_TIMEOUT_S = 300.0

# Paths in .git whose files are repository data, copied into the mirror for git to read.
_DATA_DIRS = ("objects", "refs", "logs")
_DATA_FILES = ("packed-refs",)
# Never copied: they would make git read other stores or rewrite history.
_NOT_COPIED = ("objects/info",)


@dataclass
class GitSnapshot:
    """A harness-owned copy of Case's repository data. ``control``: Case's other .git
    files (config, hooks, HEAD, info/*, ...) by path relative to ``.git``, as bytes.
    ``worktree``: the working tree's regular files (path relative to the repository) and
    symbolic links (the link text, never followed). ``skipped``: what was left out and why."""

    bare: Path
    control: dict[str, bytes] = field(default_factory=dict)
    worktree: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    _owned: Path | None = None

    def remove(self) -> None:
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)


def pristine_env(git_dir: Path) -> dict[str, str]:
    """Environment for git in the mirror: no configuration but the mirror's own (which the
    harness wrote), no replace objects, no prompts, no optional locks."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
    env.update({"GIT_DIR": str(git_dir), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                "GIT_ATTR_NOSYSTEM": "1", "GIT_NO_REPLACE_OBJECTS": "1", "GIT_TERMINAL_PROMPT": "0",
                "GIT_OPTIONAL_LOCKS": "0", "HOME": str(git_dir), "GIT_PAGER": "cat",
                "GIT_CEILING_DIRECTORIES": str(git_dir.parent)})
    return env


# Settings given on every call, winning over anything in a config file.
_PRISTINE_FLAGS = ("-c", "core.hooksPath=/dev/null", "-c", "core.attributesFile=/dev/null", "-c", "core.fsmonitor=false",
                   "-c", "core.sshCommand=false", "-c", "protocol.allow=never", "-c", "diff.external=",
                   "-c", "core.alternateRefsCommand=false")


def git(git_dir: Path, *args: str, stdin: bytes | None = None, timeout: float = GIT_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """Run git on the mirror only. Never given a path inside Case's repository."""
    return subprocess.run(["git", *_PRISTINE_FLAGS, *args], input=stdin, capture_output=True,
                          env=pristine_env(git_dir), timeout=timeout, check=False)


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry under ``root`` (not ``root`` itself), links not followed."""
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            path = Path(entry.path)
            yield path, st
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)


def _read_regular(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, opened without following a final link; None if it is not
    one (any more) or is larger than ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > limit:
                return None
            return fh.read(limit + 1)[:limit]
    except OSError:
        return None


def _is_data(rel: str) -> bool:
    if any(rel == p or rel.startswith(p + "/") for p in _NOT_COPIED):
        return False
    return rel in _DATA_FILES or any(rel.startswith(d + "/") for d in _DATA_DIRS)


def take(repo_dir: Path, workdir: Path | None = None) -> GitSnapshot:
    """Copy Case's repository at ``repo_dir`` (work tree and ``.git``) into a new
    harness-owned directory; git is run only in the copy. ``.git`` that is not a plain
    directory (a file or link naming another repository) is not followed: it is listed
    in ``skipped`` and, if a regular file, kept as control bytes."""
    owned = Path(tempfile.mkdtemp(prefix="case-git-", dir=workdir))
    bare = owned / "mirror.git"
    snap = GitSnapshot(bare=bare, _owned=owned)
    init = subprocess.run(["git", *_PRISTINE_FLAGS, "init", "--quiet", "--bare", "--template=", str(bare)],
                          capture_output=True, env=pristine_env(bare), timeout=GIT_TIMEOUT_S, check=False)
    if init.returncode != 0:
        snap.skipped.append("mirror: git init failed")
        return snap
    budget = [MAX_FILES, MAX_TOTAL_BYTES]
    dot_git = repo_dir / ".git"
    if dot_git.is_symlink() or (dot_git.exists() and not dot_git.is_dir()):
        snap.skipped.append(".git: not a directory (not followed)")
        data = _read_regular(dot_git, MAX_CONTROL_FILE_BYTES)
        if data is not None:
            snap.control["."] = data
    elif dot_git.is_dir():
        _copy_git_dir(dot_git, snap, budget)
    _copy_worktree(repo_dir, snap, budget)
    return snap


def _spend(budget: list[int], size: int, snap: GitSnapshot, rel: str) -> bool:
    if budget[0] <= 0 or budget[1] < size:
        snap.skipped.append(f"{rel}: over the scan's bounds ({MAX_FILES} files, {MAX_TOTAL_BYTES} bytes)")
        return False
    budget[0] -= 1
    budget[1] -= size
    return True


def _copy_git_dir(dot_git: Path, snap: GitSnapshot, budget: list[int]) -> None:
    for path, st in _walk(dot_git):
        rel = path.relative_to(dot_git).as_posix()
        if path.is_symlink():
            snap.links[f".git/{rel}"] = _readlink(path)  # the link text is scanned; never followed
            continue
        if not path.is_file():
            continue
        if not _spend(budget, st.st_size, snap, f".git/{rel}"):
            continue
        if _is_data(rel):
            data = _read_regular(path, MAX_TOTAL_BYTES)
            if data is None:
                snap.skipped.append(f".git/{rel}: unreadable")
                continue
            dest = snap.bare / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        else:
            data = _read_regular(path, MAX_CONTROL_FILE_BYTES)
            if data is None:
                snap.skipped.append(f".git/{rel}: unreadable or larger than {MAX_CONTROL_FILE_BYTES} bytes")
                continue
            snap.control[rel] = data
    head = snap.control.get("HEAD", b"").strip()
    if head.startswith(b"ref: refs/") or (len(head) == 40 and all(c in b"0123456789abcdef" for c in head)):
        (snap.bare / "HEAD").write_bytes(head + b"\n")


def _copy_worktree(repo_dir: Path, snap: GitSnapshot, budget: list[int]) -> None:
    for path, st in _walk(repo_dir):
        rel = path.relative_to(repo_dir).as_posix()
        if rel == ".git" or rel.startswith(".git/"):
            continue
        if path.is_symlink():
            snap.links[rel] = _readlink(path)
            continue
        if not path.is_file() or not _spend(budget, st.st_size, snap, rel):
            continue
        data = _read_regular(path, MAX_TOTAL_BYTES)
        if data is None:
            snap.skipped.append(f"{rel}: unreadable")
            continue
        snap.worktree[rel] = data


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@dataclass(frozen=True)
class GitObject:
    oid: str
    kind: str  # blob, tree, commit, tag
    data: bytes
    path: str | None  # a name it is reachable under (rev-list), if any
    reachable: bool  # from a ref or a reflog entry


@dataclass
class ObjectRead:
    """``objects`` is read lazily, a group at a time (bounded memory); ``problems`` is
    complete only once ``objects`` has been consumed."""

    objects: Iterator[GitObject]
    refs: list[str]
    problems: list[str]


def read_objects(snap: GitSnapshot) -> ObjectRead:
    """Every object in the mirror (``cat-file --batch-all-objects``: loose and packed,
    reachable or not), each with whether ``rev-list --all --objects --reflog`` reaches it
    and under which path; and every ref name. A git failure, or an object over
    MAX_OBJECT_BYTES, is a problem, not silence."""
    problems: list[str] = []
    listed = git(snap.bare, "rev-list", "--all", "--objects", "--reflog")
    names: dict[str, str | None] = {}
    if listed.returncode != 0:
        problems.append("rev-list --all --objects --reflog failed")
    for line in listed.stdout.decode("utf-8", "replace").splitlines():
        oid, _, path = line.partition(" ")
        names.setdefault(oid, path or None)
    refs_out = git(snap.bare, "for-each-ref", "--format=%(refname)")
    if refs_out.returncode != 0:
        problems.append("for-each-ref failed")
    refs = refs_out.stdout.decode("utf-8", "replace").splitlines()
    check = git(snap.bare, "cat-file", "--batch-all-objects",
                "--batch-check=%(objectname) %(objecttype) %(objectsize)", "--unordered")
    if check.returncode != 0:
        problems.append("cat-file --batch-all-objects failed")
        return ObjectRead(iter(()), refs, problems)
    listed_all = [line.split(" ") for line in check.stdout.decode().splitlines() if line]
    wanted: list[tuple[str, int]] = []
    for oid, kind, size in listed_all:
        if int(size) > MAX_OBJECT_BYTES:
            problems.append(f"{kind} {oid[:12]}: {size} bytes, over the scan's {MAX_OBJECT_BYTES}-byte bound")
        else:
            wanted.append((oid, int(size)))
    def objects() -> Iterator[GitObject]:
        count = 0
        for oid, kind, data in cat_objects(snap, wanted, problems):
            count += 1
            yield GitObject(oid, kind, data, names.get(oid), oid in names)
        if count != len(wanted):
            problems.append(f"cat-file --batch returned {count} of {len(wanted)} objects")

    return ObjectRead(objects(), refs, problems)


def cat_objects(snap: GitSnapshot, wanted: list[tuple[str, int]],
                problems: list[str]) -> Iterator[tuple[str, str, bytes]]:
    """(oid, type, content) of each wanted (oid, size), read with ``cat-file --batch`` in
    groups of at most BATCH_BYTES of content, so memory stays bounded whatever the
    objects inflate to (sizes come from ``--batch-check``, before anything is read)."""
    group: list[str] = []
    held = 0
    for i, (oid, size) in enumerate(wanted):
        group.append(oid)
        held += size
        if held >= BATCH_BYTES or i == len(wanted) - 1:
            out = git(snap.bare, "cat-file", "--batch", stdin="".join(f"{o}\n" for o in group).encode())
            if out.returncode != 0:
                problems.append("cat-file --batch failed")
            yield from _parse_batch(out.stdout, problems)
            group, held = [], 0


def _parse_batch(out: bytes, problems: list[str]) -> Iterator[tuple[str, str, bytes]]:
    pos = 0
    while pos < len(out):
        end = out.find(b"\n", pos)
        if end == -1:
            problems.append("cat-file --batch: truncated output")
            return
        header = out[pos:end].decode("utf-8", "replace").split(" ")
        if len(header) != 3 or not header[2].isdigit():
            problems.append(f"cat-file --batch: unexpected line {' '.join(header)[:80]!r}")
            return
        oid, kind, size = header[0], header[1], int(header[2])
        data = out[end + 1:end + 1 + size]
        pos = end + 1 + size + 1
        yield oid, kind, data


def resolve_commit(snap: GitSnapshot, rev: str = "HEAD") -> str | None:
    """The commit ``rev`` names in the mirror (Case's HEAD by default), or None."""
    out = git(snap.bare, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    sha = out.stdout.decode().strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def export_tree(snap: GitSnapshot, commit: str, dest: Path) -> list[str]:
    """Write the files of ``commit``'s tree into ``dest`` with plumbing only (``ls-tree``,
    ``cat-file --batch``): no ``.gitattributes`` is read, so no filter, textconv,
    ``export-subst`` or ``export-ignore`` applies: the files are the committed bytes.
    Regular files only (executable bit kept); symbolic links, submodules and entries
    whose path could leave ``dest`` (``..``, ``.git``, empty parts) are not written and
    are returned, by path, for the caller to report. Raises RuntimeError if git fails."""
    listing = git(snap.bare, "ls-tree", "-r", "-z", "--full-tree", commit)
    if listing.returncode != 0:
        raise RuntimeError("ls-tree failed on Case's commit")
    entries: list[tuple[str, str, str]] = []
    left_out: list[str] = []
    for item in listing.stdout.split(b"\0"):
        if not item:
            continue
        meta, _, raw_path = item.partition(b"\t")
        mode, kind, oid = meta.decode().split(" ")
        path = raw_path.decode("utf-8", "surrogateescape")
        parts = path.split("/")
        if kind != "blob" or mode not in ("100644", "100755") or any(
                p in ("", ".", "..") or p.lower() == ".git" for p in parts):
            left_out.append(path)
            continue
        entries.append((mode, oid, path))
    if len(entries) > MAX_FILES:
        raise RuntimeError(f"Case's commit has more than {MAX_FILES} files")
    sizes = git(snap.bare, "cat-file", "--batch-check=%(objectsize)",
                stdin="".join(f"{oid}\n" for _, oid, _ in entries).encode())
    counts = sizes.stdout.decode().split()
    if sizes.returncode != 0 or len(counts) != len(entries) or not all(c.isdigit() for c in counts):
        raise RuntimeError("cat-file --batch-check failed on Case's commit")
    if any(int(c) > MAX_OBJECT_BYTES for c in counts) or sum(int(c) for c in counts) > MAX_TOTAL_BYTES:
        raise RuntimeError("Case's commit has files over the export's bounds")
    problems: list[str] = []
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    blobs = cat_objects(snap, [(oid, int(c)) for (_, oid, _), c in zip(entries, counts, strict=True)], problems)
    written = 0
    for (mode, _, path), (_, _, data) in zip(entries, blobs, strict=False):
        written += 1
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.parent.resolve() != target.parent or not target.parent.is_relative_to(root):
            left_out.append(path)
            continue
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755 if mode == "100755" else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    if problems or written != len(entries):
        raise RuntimeError("cat-file --batch returned fewer objects than the tree lists")
    return left_out
