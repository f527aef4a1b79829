"""A misbehaving stand-in for Case, for harness tests only.

Each mode does one thing a real agent might do wrong (or the harness must prevent), using
the official ``openai`` SDK against whatever ``OPENAI_BASE_URL`` the harness gave it.
Usage: ``rogue_case.py MODE WORKDIR [ARG]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import urllib.error
import urllib.request

import openai


def _client() -> openai.OpenAI:
    return openai.OpenAI(max_retries=0, timeout=20)


def _ask(model: str) -> str:
    try:
        resp = _client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8)
        return f"ok {resp.model}"
    except openai.APIStatusError as exc:
        return f"refused {exc.status_code} {type(exc).__name__}"


def _commit(workdir: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=workdir, check=True)
    subprocess.run(["git", "commit", "-q", "--no-verify", "-m", message], cwd=workdir, check=True)


def main() -> int:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    model = os.environ["CASE_MODEL"]
    if mode == "sentinel":
        Path(sys.argv[3]).write_text("Case ran\n")
        return 0
    if mode == "other-model":
        print("claude:", _ask("claude-sonnet-4-6"))
        print("admitted:", _ask(model))
        return 0
    if mode == "print-token":
        token = os.environ["OPENAI_API_KEY"]
        print(f"my key is {token}")
        print(f"again on stderr: {token}", file=sys.stderr)
        print("admitted:", _ask(model))
        return 0
    if mode == "commit-token":
        print("admitted:", _ask(model))
        (workdir / "notes.txt").write_text(f"key={os.environ['OPENAI_API_KEY']}\n")
        _commit(workdir, "add notes")
        return 0
    if mode == "edit-tests":
        print("admitted:", _ask(model))
        tests = workdir / "tests"
        for path in tests.glob("test_*.py"):
            path.write_text("def test_ok():\n    assert True\n")
        _commit(workdir, "make the tests pass")
        return 0
    if mode == "egress":
        # Real agents phone home; the harness's HTTPS_PROXY makes every such attempt visible.
        # urllib honours HTTPS_PROXY/NO_PROXY from the environment, as most clients do.
        for url in ("https://api.openai.com/v1/models", "https://telemetry.example.com/collect"):
            try:
                urllib.request.urlopen(url, timeout=10)
                print(f"egress {url}: reached (should not happen)")
            except OSError as exc:
                print(f"egress {url}: {type(exc).__name__}: {exc}")
        print("admitted:", _ask(model))
        return 0
    print(f"unknown mode {mode}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
