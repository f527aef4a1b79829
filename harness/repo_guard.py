"""Take the fixture repository back from Case before the harness runs git on it.

Case may write anything in its repository, ``.git`` included, and git obeys a
repository's own control files: a ``diff.<driver>.textconv`` in ``.git/config`` with a
committed ``.gitattributes`` runs a command in ``git log -p`` (the secret scan), an
``include.path`` pulls in more config, ``objects/info/alternates`` points git at other
object stores, and ``.git`` itself may be a file or link naming another repository. The
harness runs git outside the sandbox, so before it does, :func:`reclaim` puts back the
config the harness wrote when it made the repository and removes the rest of what could
steer git. Objects and refs (Case's commits) are data and stay.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Control files of .git (besides config) that make git run or read something else.
_REMOVE = ("hooks", "info/attributes", "objects/info/alternates", "objects/info/http-alternates", "commondir",
           "info/grafts", "shallow", "modules", "worktrees")


def snapshot_config(repo_dir: Path) -> bytes:
    """The harness's own ``.git/config``, read right after it made the repository."""
    return (repo_dir / ".git" / "config").read_bytes()


def reclaim(repo_dir: Path, harness_config: bytes) -> list[str]:
    """Restore ``.git/config`` and drop the other control files; returns what had to be
    undone (names relative to the repository, for the event). A ``.git`` that is not a
    plain directory is removed: the repository then has no commit the harness can use."""
    git = repo_dir / ".git"
    undone: list[str] = []
    if git.is_symlink() or (git.exists() and not git.is_dir()):
        git.unlink()
        return [".git (not a directory)"]
    if not git.is_dir():
        return [".git (missing)"]
    config = git / "config"
    if config.is_symlink() or not config.is_file() or config.read_bytes() != harness_config:
        undone.append(".git/config")
        if config.is_symlink() or config.is_file():
            config.unlink()
        elif config.is_dir():
            shutil.rmtree(config)
        config.write_bytes(harness_config)
    for rel in _REMOVE:
        path = git / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            if rel == "hooks" and not any(p.is_file() and not p.name.endswith(".sample") for p in path.rglob("*")):
                shutil.rmtree(path)  # git's own samples never run: not worth reporting
                continue
            shutil.rmtree(path)
        else:
            continue
        undone.append(f".git/{rel}")
    return undone
