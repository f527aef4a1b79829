"""The secret scan reads Case's repository everywhere, and never runs what Case put in it.

Each test is a hostile Case hiding the run token in one place only (a binary blob, a
file only a merge introduces, an author email, a branch name, a dangling object, the
work tree, ``.git/config``, a tag, a reflog-only commit) or planting a program in its
``.git/config`` for git to run as the harness (textconv, smudge, gpg.program, fsmonitor).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import git_mirror
from harness.secret_scan import ScanResult, SecretSet, scan_run_dir

TOKEN = "hrt-" + "5f0c2a9e7b1d4c3a8e6f" + "0d9b7a5c3e1f2a4b"


def _env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "case", "GIT_AUTHOR_EMAIL": "case@example.invalid",
            "GIT_COMMITTER_NAME": "case", "GIT_COMMITTER_EMAIL": "case@example.invalid"}


class Repo:
    """Case's repository under ``run/repo``, driven by the test as a hostile Case would."""

    def __init__(self, tmp: Path) -> None:
        self.run_dir = tmp / "run"
        self.path = self.run_dir / "repo"
        self.path.mkdir(parents=True)
        self.env = _env(tmp)
        self.git("init", "-q", "-b", "main")
        (self.path / "README.md").write_text("fixture\n")
        self.commit("initial")

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
        out = subprocess.run(["git", "-C", str(self.path), *args], env={**self.env, **(env or {})}, input=stdin,
                             capture_output=True, check=True)
        return out.stdout.decode().strip()

    def commit(self, message: str, env: dict[str, str] | None = None) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, env=env)
        return self.git("rev-parse", "HEAD")

    def scan(self) -> ScanResult:
        secrets = SecretSet()
        secrets.add("run_token", TOKEN)
        return scan_run_dir(self.run_dir, secrets)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path)


def places(result: ScanResult) -> set[tuple[str, str]]:
    return {(f.place, f.kind) for f in result.findings}


def assert_never_shown(result: ScanResult) -> None:
    assert TOKEN not in result.model_dump_json()
    assert TOKEN[:16] not in result.model_dump_json()


def test_secret_only_in_a_binary_blob(repo: Repo) -> None:
    (repo.path / "model.bin").write_bytes(b"\x00\xff\xfe\x00PK\x03\x04" + TOKEN.encode() + b"\x00\x01\x02" * 50)
    repo.commit("add weights")
    repo.git("rm", "-q", "model.bin")
    repo.commit("drop weights")
    result = repo.scan()
    blob = [f for f in result.findings if f.place == "commits" and f.location.startswith("blob ")]
    assert blob and blob[0].kind == "run_token" and "model.bin" in blob[0].location
    assert {p for p, _ in places(result)} == {"commits"}
    assert_never_shown(result)


def test_secret_only_in_a_file_a_merge_introduces(repo: Repo) -> None:
    repo.git("checkout", "-q", "-b", "side")
    (repo.path / "side.txt").write_text("side\n")
    repo.commit("side work")
    repo.git("checkout", "-q", "main")
    (repo.path / "main.txt").write_text("main\n")
    repo.commit("main work")
    repo.git("merge", "-q", "--no-commit", "--no-ff", "side")
    (repo.path / "evil.py").write_text(f"KEY = '{TOKEN}'\n")  # in neither parent: an evil merge
    repo.git("add", "evil.py")
    repo.git("commit", "-q", "-m", "Merge branch side")
    repo.git("rm", "-q", "evil.py")
    repo.commit("tidy")
    result = repo.scan()
    assert any(f.place == "commits" and f.location.startswith("blob ") and "evil.py" in f.location
               for f in result.findings), result.findings
    assert_never_shown(result)


def test_secret_only_in_an_author_email(repo: Repo) -> None:
    repo.commit("ordinary message", env={"GIT_AUTHOR_EMAIL": f"{TOKEN}@example.invalid"})
    result = repo.scan()
    assert [(f.place, f.kind) for f in result.findings] == [("commits", "run_token")]
    assert result.findings[0].location.startswith("commit ") and "(header author)" in result.findings[0].location
    assert_never_shown(result)


def test_secret_only_in_a_branch_name(repo: Repo) -> None:
    repo.git("branch", f"notes-{TOKEN}")
    result = repo.scan()
    assert ("git_refs", "run_token") in places(result)
    assert_never_shown(result)


def test_secret_only_in_a_tag_name_and_message(repo: Repo) -> None:
    repo.git("tag", "-a", "v1", "-m", f"release {TOKEN}")
    repo.git("tag", f"t-{TOKEN}")
    result = repo.scan()
    assert any(f.place == "commits" and f.location.startswith("tag ") for f in result.findings)
    assert ("git_refs", "run_token") in places(result)
    assert_never_shown(result)


def test_secret_only_in_a_dangling_object(repo: Repo) -> None:
    oid = repo.git("hash-object", "-w", "--stdin", stdin=f"scratch {TOKEN}\n".encode())
    result = repo.scan()
    hits = [f for f in result.findings if f.place == "commits"]
    assert len(hits) == 1 and hits[0].location.startswith(f"blob {oid[:12]}") and "dangling" in hits[0].location
    assert_never_shown(result)


def test_secret_only_in_a_reflog_commit(repo: Repo) -> None:
    (repo.path / "k.txt").write_text(TOKEN)
    repo.commit("oops")
    repo.git("reset", "-q", "--hard", "HEAD~1")
    result = repo.scan()
    blob = [f for f in result.findings if f.place == "commits" and f.location.startswith("blob ")]
    assert blob and "dangling" not in blob[0].location  # reachable through the reflog
    assert_never_shown(result)


def test_secret_only_in_the_worktree(repo: Repo) -> None:
    (repo.path / "notes").mkdir()
    (repo.path / "notes" / "scratch.txt").write_text(f"\n\nuncommitted {TOKEN}\n")
    result = repo.scan()
    assert [(f.place, f.location) for f in result.findings] == [("worktree", "repo/notes/scratch.txt:3")]


def test_secret_only_in_a_worktree_file_name(repo: Repo) -> None:
    (repo.path / f"cache-{TOKEN}").write_text("x\n")
    result = repo.scan()
    assert ("worktree", "run_token") in places(result)
    assert_never_shown(result)


def test_secret_only_in_git_config(repo: Repo) -> None:
    repo.git("config", "remote.origin.url", f"https://case:{TOKEN}@git.example.invalid/r.git")
    result = repo.scan()
    assert any(f.place == "git_files" and f.location.startswith(".git/config:") for f in result.findings)
    assert_never_shown(result)


def test_symlink_in_the_worktree_is_not_followed(repo: Repo, tmp_path: Path) -> None:
    outside = tmp_path / "harness-secret"
    outside.write_text(TOKEN)
    (repo.path / "link").symlink_to(outside)
    assert repo.scan().findings == []  # the target is not Case's to leak through, nor read


def _plant_programs(repo: Repo, marker: Path) -> None:
    """Every program a hostile Case can name in .git/config for git to run, each
    touching ``marker`` when run; and a commit for them to run on."""
    prog = repo.path.parent / "evil.sh"
    prog.write_text(f"#!/bin/sh\necho ran >> {marker}\ncat\n")
    prog.chmod(0o755)
    for key, value in (("diff.x.textconv", str(prog)), ("filter.x.smudge", str(prog)), ("filter.x.clean", str(prog)),
                       ("filter.x.process", str(prog)), ("diff.external", str(prog)), ("core.fsmonitor", str(prog)),
                       ("gpg.program", str(prog)), ("log.showSignature", "true"), ("core.pager", str(prog)),
                       ("core.hooksPath", str(repo.path.parent))):
        repo.git("config", key, value)
    (repo.path / ".gitattributes").write_text("* diff=x filter=x\n")
    (repo.path / "a.txt").write_text("some text\n")
    for hook in ("post-checkout", "reference-transaction", "pre-auto-gc"):
        (repo.path / ".git" / "hooks" / hook).write_text(f"#!/bin/sh\necho ran >> {marker}\n")
        (repo.path / ".git" / "hooks" / hook).chmod(0o755)
    marker.unlink(missing_ok=True)


def _signed_commit(repo: Repo) -> None:
    """A commit carrying a (fake) signature, so ``log.showSignature`` makes git call gpg.program."""
    tree = repo.git("write-tree")
    parent = repo.git("rev-parse", "HEAD")
    body = (f"tree {tree}\nparent {parent}\nauthor case <c@x> 1767225600 +0000\n"
            f"committer case <c@x> 1767225600 +0000\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n"
            f" iQEzBAABCAAdFiEE\n -----END PGP SIGNATURE-----\n\nsigned\n")
    oid = repo.git("hash-object", "-t", "commit", "-w", "--stdin", "--literally", stdin=body.encode())
    repo.git("update-ref", "refs/heads/main", oid)


def test_programs_in_cases_git_config_never_run(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (repo.path / "a.txt").write_text(f"{TOKEN}\n")
    repo.commit("add a")
    _plant_programs(repo, marker)
    repo.commit("attributes")
    _signed_commit(repo)
    # The planted programs do run when git is used in Case's repository (the test is live).
    subprocess.run(["git", "-C", str(repo.path), "log", "-p", "-1", "--format=%H"], env=repo.env, capture_output=True)
    assert marker.exists()
    marker.unlink()
    result = repo.scan()
    assert not marker.exists(), "a program Case named in its .git/config ran during the scan"
    # ... and the textconv could not hide the file's content from the scan.
    assert any(f.place == "commits" and f.location.startswith("blob ") for f in result.findings)


def test_mirror_ignores_alternates_and_replace_refs(repo: Repo, tmp_path: Path) -> None:
    """Alternates are not followed (another store's objects are not Case's to read through),
    and a replace ref cannot swap the object the scan reads for an innocent one."""
    (repo.path / "a.txt").write_text(f"{TOKEN}\n")
    secret_commit = repo.commit("add a")
    (repo.path / "a.txt").write_text("innocent\n")
    innocent = repo.commit("innocent")
    repo.git("replace", secret_commit, innocent)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "objects").mkdir(parents=True)
    (repo.path / ".git" / "objects" / "info" / "alternates").write_text(str(elsewhere / "objects") + "\n")
    snap = git_mirror.take(repo.path)
    try:
        assert not (snap.bare / "objects" / "info" / "alternates").exists()
        assert "objects/info/alternates" in snap.control
    finally:
        snap.remove()
    result = repo.scan()
    assert any(f.place == "commits" and f.location.startswith("blob ") for f in result.findings)


def test_secret_in_an_unlisted_run_file_and_dns_log_is_found(tmp_path: Path) -> None:
    """Places no glob names (the DNS sink's log, any new file) are scanned too."""
    run_dir = tmp_path / "run"
    (run_dir / "dns").mkdir(parents=True)
    (run_dir / "dns" / "queries.jsonl").write_text(f'{{"name": "{TOKEN}.exfil.example"}}\n')
    (run_dir / "somewhere" / "new").mkdir(parents=True)
    (run_dir / "somewhere" / "new" / "file.txt").write_text(f"x\n{TOKEN}\n")
    secrets = SecretSet()
    secrets.add("run_token", TOKEN)
    result = scan_run_dir(run_dir, secrets)
    assert {(f.place, f.location) for f in result.findings} == {
        ("dns_queries", "dns/queries.jsonl:1"), ("other_files", "somewhere/new/file.txt:2")}


# --- the export for the acceptance tests: the committed bytes, nothing Case configured ---

def test_export_runs_no_filter_and_ignores_gitattributes(repo: Repo, tmp_path: Path) -> None:
    """Hostile Case: a smudge filter and textconv in .git/config, ``export-subst`` and
    ``export-ignore`` in .gitattributes. The export runs none of it and writes exactly
    the committed bytes of every file."""
    marker = tmp_path / "marker"
    (repo.path / "pkg").mkdir()
    (repo.path / "pkg" / "core.py").write_text("VERSION = '$Format:%H$'\n")
    (repo.path / "pkg" / "hidden.py").write_text("X = 1\n")
    (repo.path / "run.sh").write_text("#!/bin/sh\n")
    (repo.path / "run.sh").chmod(0o755)
    _plant_programs(repo, marker)
    (repo.path / ".gitattributes").write_text("* diff=x filter=x export-subst\npkg/hidden.py export-ignore\n")
    head = repo.commit("attributes")
    # live: git archive in Case's repository does run the smudge filter and both attributes
    subprocess.run(["git", "-C", str(repo.path), "archive", "--format=tar", "-o", str(tmp_path / "a.tar"), "HEAD"],
                   env=repo.env, capture_output=True, check=True)
    assert marker.exists()
    marker.unlink()
    snap = git_mirror.take(repo.path)
    try:
        assert git_mirror.resolve_commit(snap) == head
        out = tmp_path / "checkout"
        assert git_mirror.export_tree(snap, head, out) == []
    finally:
        snap.remove()
    assert not marker.exists(), "a filter Case named ran during the export"
    assert (out / "pkg" / "core.py").read_text() == "VERSION = '$Format:%H$'\n"
    assert (out / "pkg" / "hidden.py").read_text() == "X = 1\n"
    assert os.access(out / "run.sh", os.X_OK) and not os.access(out / "pkg" / "core.py", os.X_OK)


def test_export_writes_nothing_outside_the_checkout(repo: Repo, tmp_path: Path) -> None:
    """Hostile Case: a tree with a symbolic link, a '..' entry and a '.git' directory."""
    (repo.path / "link").symlink_to("/etc")
    repo.git("add", "link")
    blob = repo.git("hash-object", "-w", "--stdin", stdin=b"escaped\n")
    inner = repo.git("mktree", "--missing", stdin=f"100644 blob {blob}\tconfig\n".encode())
    base = repo.git("write-tree")
    listing = repo.git("ls-tree", base) + f"\n040000 tree {inner}\t.git\n040000 tree {inner}\t..\n"
    tree = repo.git("hash-object", "-t", "tree", "-w", "--stdin", "--literally",
                    stdin=_tree_bytes(listing))
    commit = repo.git("commit-tree", tree, "-m", "evil", "-p", "HEAD")
    snap = git_mirror.take(repo.path)
    try:
        out = tmp_path / "deep" / "checkout"
        left = git_mirror.export_tree(snap, commit, out)
    finally:
        snap.remove()
    assert sorted(left) == sorted([".git/config", "../config", "link"])
    assert not (tmp_path / "deep" / "config").exists() and not (out / ".git").exists()
    assert not (out / "link").exists() and (out / "README.md").read_text() == "fixture\n"


def _tree_bytes(listing: str) -> bytes:
    """A raw tree object from ``ls-tree`` lines, in the order given (no checks: hostile)."""
    out = b""
    for line in listing.strip().splitlines():
        meta, name = line.split("\t", 1)
        mode, _, oid = meta.split(" ")
        out += mode.lstrip("0").encode() + b" " + name.encode() + b"\0" + bytes.fromhex(oid)
    return out


def test_an_object_over_the_bound_is_a_finding_not_silence(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile Case: a blob too large to read (a small pack can inflate to gigabytes)."""
    monkeypatch.setattr(git_mirror, "MAX_OBJECT_BYTES", 1000)
    (repo.path / "big.bin").write_bytes(b"\0" * 5000)
    repo.commit("big")
    repo.git("rm", "-q", "big.bin")
    repo.commit("gone")
    result = repo.scan()
    assert not result.clean
    assert [f.kind for f in result.findings if "over the scan's" in f.location] == ["unreadable"]


def test_a_text_full_of_tokens_is_scanned_quickly() -> None:
    import time

    from harness.secret_scan import MAX_HITS_PER_TEXT, TextScanner
    secrets = SecretSet()
    secrets.add("run_token", TOKEN)
    text = (TOKEN + "\n") * 200_000
    started = time.monotonic()
    hits = TextScanner(secrets).scan(text)
    assert len(hits) == MAX_HITS_PER_TEXT and time.monotonic() - started < 5
