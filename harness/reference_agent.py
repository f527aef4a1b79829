"""A small reference Case agent: the official ``openai`` SDK, streaming chat completions, tools.

Run as an external program (the harness never imports it for a run)::

    OPENAI_BASE_URL=... OPENAI_API_KEY=... CASE_MODEL=... \\
        python -m harness.reference_agent --task-file TASK.md --workdir REPO [--max-steps 30]

It sends the task file as the user message, then loops: one streamed chat completion per
step (tool-call argument deltas reassembled), executes the requested tools in the
workdir, and feeds the results back. Tools: ``list_files``, ``read_file``, ``write_file``,
``run_tests``, ``git_commit``. Every path is confined to the workdir (no absolute paths,
no ``..``, no symlink escapes, nothing under ``.git``). Subprocesses (tests, git) get a
scrubbed environment, so code written by the model cannot read the API key.

Exit codes: 0 the model ended with a final message after a commit was made; 1 the step
budget ran out or no commit was made; 2 usage error (missing environment variable, bad
arguments); 3 API error (the SDK error class and message are printed). One line per
tool call goes to stderr; the API key is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_API = 3

ENV_BASE_URL = "OPENAI_BASE_URL"
ENV_API_KEY = "OPENAI_API_KEY"
ENV_MODEL = "CASE_MODEL"
REQUIRED_ENV = (ENV_BASE_URL, ENV_API_KEY, ENV_MODEL)

DEFAULT_MAX_STEPS = 30
DEFAULT_TEST_COMMAND = "python -m pytest -q -p no:cacheprovider"
READ_LIMIT_CHARS = 100_000
WRITE_LIMIT_BYTES = 1_000_000
TEST_OUTPUT_TAIL_CHARS = 8_000
LIST_LIMIT = 500
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".venv", ".mypy_cache", ".ruff_cache"}
_ENV_ALLOWLIST = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")

SYSTEM_PROMPT = """\
You are a careful coding agent working inside a git repository (your working directory).
Use the tools: list_files and read_file to inspect the code, write_file to change a file
(always give the complete new file content), run_tests to run the test suite, and
git_commit to commit. Paths are relative to the repository root. Follow the task
specification exactly. When the tests pass, commit your work with git_commit, then reply
with a short summary and no tool call."""

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "list_files",
            "description": "List the files under a directory of the repository (recursive).",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "Directory, relative to the repository root.", "default": "."}},
                "required": [],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file of the repository.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "File path relative to the repository root."}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Create or overwrite a text file with the given complete content.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path relative to the repository root."},
                    "content": {"type": "string", "description": "The complete new file content."},
                },
                "required": ["path", "content"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the repository's test suite and return the exit code and output.",
            "parameters": {"type": "object", "properties": {}, "required": []},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "git_commit",
            "description": "Stage every change (git add -A) and commit it with the given message.",
            "parameters": {
                "type": "object",
                "properties": {"message": {"type": "string", "description": "The commit message."}},
                "required": ["message"],
            },
        },
    },
]


class ToolError(Exception):
    """A tool call that could not be carried out; its message goes back to the model."""


class UsageError(Exception):
    pass


def _scrubbed_env() -> dict[str, str]:
    """Environment for subprocesses: no credentials, no PYTHON*/GIT* overrides."""
    env = {k: os.environ[k] for k in _ENV_ALLOWLIST if k in os.environ}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters omitted ...]\n" + text[-limit:]


class Workspace:
    """The tools, confined to one directory."""

    def __init__(self, root: Path, test_command: list[str], test_timeout_s: float) -> None:
        self.root = root.resolve()
        self.test_command = test_command
        self.test_timeout_s = test_timeout_s
        self.commits: list[str] = []

    # -- path confinement
    def resolve(self, path: Any, *, for_write: bool = False) -> Path:
        if path is None or path == "":
            path = "."
        if not isinstance(path, str):
            raise ToolError("path must be a string")
        if "\x00" in path:
            raise ToolError("path must not contain NUL characters")
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
            raise ToolError(f"refused: absolute path {path!r} is outside the workdir; use a path relative to the repository root")
        parts = PurePosixPath(path.replace("\\", "/")).parts
        if ".." in parts:
            raise ToolError(f"refused: path {path!r} escapes the workdir ('..' is not allowed)")
        if parts and parts[0].lower() == ".git":
            raise ToolError(f"refused: path {path!r} is inside .git")
        full = (self.root / path).resolve()
        if not full.is_relative_to(self.root):
            raise ToolError(f"refused: path {path!r} resolves outside the workdir")
        if full.is_relative_to(self.root / ".git"):
            raise ToolError(f"refused: path {path!r} is inside .git")
        if for_write and full == self.root:
            raise ToolError("refused: cannot write to the repository root itself")
        return full

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() or "."

    # -- tools
    def list_files(self, path: str = ".") -> str:
        base = self.resolve(path)
        if base.is_file():
            return self._rel(base)
        if not base.is_dir():
            raise ToolError(f"no such directory: {path}")
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith(".pyc"):
                    continue
                found.append(self._rel(Path(dirpath) / name))
                if len(found) >= LIST_LIMIT:
                    return "\n".join(found) + f"\n[... listing truncated at {LIST_LIMIT} files ...]"
        return "\n".join(found) if found else "(no files)"

    def read_file(self, path: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"no such file: {path}")
        text = target.read_bytes().decode("utf-8", errors="replace")
        if len(text) > READ_LIMIT_CHARS:
            return text[:READ_LIMIT_CHARS] + f"\n[... truncated, file has {len(text)} characters ...]"
        return text

    def write_file(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        data = content.encode("utf-8")
        if len(data) > WRITE_LIMIT_BYTES:
            raise ToolError(f"content too large ({len(data)} bytes; limit {WRITE_LIMIT_BYTES})")
        target = self.resolve(path, for_write=True)
        if target.is_dir():
            raise ToolError(f"{path} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Re-check after creating parents: a parent could be a symlink created earlier.
        if not target.parent.resolve().is_relative_to(self.root):
            raise ToolError(f"refused: path {path!r} resolves outside the workdir")
        target.write_bytes(data)
        return f"wrote {len(data)} bytes to {self._rel(target)}"

    def run_tests(self) -> str:
        try:
            proc = subprocess.run(
                self.test_command,
                cwd=self.root,
                env=_scrubbed_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.test_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ToolError(f"tests timed out after {self.test_timeout_s:g}s") from None
        except OSError as exc:
            raise ToolError(f"could not run the tests: {exc}") from None
        output = proc.stdout.decode("utf-8", errors="replace")
        return f"exit_code={proc.returncode}\n{_tail(output, TEST_OUTPUT_TAIL_CHARS)}"

    def _git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-c", f"core.hooksPath={os.devnull}", *args],
            cwd=self.root,
            env=_scrubbed_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def git_commit(self, message: str) -> str:
        if not isinstance(message, str) or not message.strip():
            raise ToolError("message must be a non-empty string")
        added = self._git("add", "-A")
        if added.returncode != 0:
            raise ToolError(f"git add failed: {(added.stderr or added.stdout).strip()}")
        committed = self._git("commit", "-q", "--no-verify", "-m", message)
        if committed.returncode != 0:
            detail = (committed.stdout + committed.stderr).strip()
            raise ToolError(f"git commit failed: {detail}")
        sha = self._git("rev-parse", "HEAD").stdout.strip()
        self.commits.append(sha)
        return f"committed {sha}"

    def dispatch(self, name: str, arguments: dict[str, Any]) -> str:
        handlers = {
            "list_files": lambda a: self.list_files(a.get("path", ".")),
            "read_file": lambda a: self.read_file(a.get("path")),
            "write_file": lambda a: self.write_file(a.get("path"), a.get("content")),
            "run_tests": lambda a: self.run_tests(),
            "git_commit": lambda a: self.git_commit(a.get("message")),
        }
        handler = handlers.get(name)
        if handler is None:
            raise ToolError(f"unknown tool {name!r}; available: {', '.join(handlers)}")
        return handler(arguments)


@dataclass
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Turn:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def stream_turn(client: Any, model: str, messages: list[dict[str, Any]], max_tokens: int | None = None) -> Turn:
    """One streamed chat completion, with tool-call deltas reassembled by index."""
    turn = Turn()
    calls: dict[int, ToolCall] = {}
    extra: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    with stream:
        for chunk in stream:
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                turn.prompt_tokens = usage.prompt_tokens or 0
                turn.completion_tokens = usage.completion_tokens or 0
            for choice in chunk.choices or []:
                delta = choice.delta
                if delta is not None:
                    if delta.content:
                        turn.content += delta.content
                    reasoning = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
                    if isinstance(reasoning, str):
                        turn.reasoning += reasoning
                    for tc in delta.tool_calls or []:
                        index = tc.index if tc.index is not None else len(calls)
                        slot = calls.setdefault(index, ToolCall())
                        if tc.id:
                            slot.id = tc.id
                        if tc.function is not None:
                            if tc.function.name:
                                slot.name += tc.function.name
                            if tc.function.arguments:
                                slot.arguments += tc.function.arguments
                if choice.finish_reason:
                    turn.finish_reason = choice.finish_reason
    turn.tool_calls = [calls[i] for i in sorted(calls)]
    return turn


def _log(message: str) -> None:
    print(f"reference-agent: {message}", file=sys.stderr, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.reference_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--task-file", required=True, type=Path, help="the task specification (markdown)")
    parser.add_argument("--workdir", required=True, type=Path, help="the git repository to work in")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="model turns allowed (default 30)")
    parser.add_argument("--test-command", default=DEFAULT_TEST_COMMAND, help="visible test command, run in the workdir")
    parser.add_argument("--test-timeout", type=float, default=300.0, help="seconds allowed for one test run")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds allowed for one model request")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="completion tokens per turn (default: the backend's; some engines then fill the context)")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    return args


def run(argv: list[str] | None = None) -> int:
    try:
        args = _parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)

    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        _log(f"usage error: missing required environment variable(s): {', '.join(missing)}")
        return EXIT_USAGE
    api_key = os.environ[ENV_API_KEY]
    base_url = os.environ[ENV_BASE_URL]
    model = os.environ[ENV_MODEL]

    def redact(text: str) -> str:
        return text.replace(api_key, "[redacted]") if api_key else text

    try:
        task_text = args.task_file.read_text(encoding="utf-8")
    except OSError as exc:
        _log(f"usage error: cannot read task file: {exc.strerror or exc}")
        return EXIT_USAGE
    if not task_text.strip():
        _log("usage error: the task file is empty")
        return EXIT_USAGE
    if not args.workdir.is_dir():
        _log(f"usage error: workdir {args.workdir} is not a directory")
        return EXIT_USAGE
    test_command = shlex.split(args.test_command)
    if not test_command:
        _log("usage error: --test-command is empty")
        return EXIT_USAGE
    if test_command[0] in ("python", "python3"):
        test_command[0] = sys.executable

    try:
        import openai  # imported late so usage errors do not pay for it
    except ImportError:
        _log("usage error: the openai SDK is not installed: pip install 'case-local-route[agent]'")
        return EXIT_USAGE

    workspace = Workspace(args.workdir, test_command, args.test_timeout)
    client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=1, timeout=args.request_timeout)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": task_text},
    ]
    prompt_tokens = completion_tokens = 0

    for step in range(1, args.max_steps + 1):
        try:
            turn = stream_turn(client, model, messages, args.max_tokens)
        except openai.OpenAIError as exc:
            _log(f"step {step}/{args.max_steps} api error: {type(exc).__name__}: {redact(str(exc))}")
            return EXIT_API
        except Exception as exc:  # malformed stream and the like: still the API's fault
            _log(f"step {step}/{args.max_steps} api error: {type(exc).__name__}: {redact(str(exc))}")
            return EXIT_API
        prompt_tokens += turn.prompt_tokens
        completion_tokens += turn.completion_tokens

        if not turn.tool_calls:
            _log(
                f"step {step}/{args.max_steps} final finish_reason={turn.finish_reason} "
                f"usage prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}"
            )
            if turn.content:
                print(turn.content, flush=True)
            if not workspace.commits:
                _log("incomplete: the model finished without making a commit")
                return EXIT_INCOMPLETE
            _log(f"done: {len(workspace.commits)} commit(s), last {workspace.commits[-1]}")
            return EXIT_OK

        for i, call in enumerate(turn.tool_calls):
            if not call.id:
                call.id = f"call_{step}_{i}"
        messages.append(
            {
                "role": "assistant",
                "content": turn.content or None,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                    for c in turn.tool_calls
                ],
            }
        )
        for call in turn.tool_calls:
            ok = True
            try:
                arguments = json.loads(call.arguments) if call.arguments.strip() else {}
                if not isinstance(arguments, dict):
                    raise ToolError("arguments must be a JSON object")
                result = workspace.dispatch(call.name, arguments)
            except json.JSONDecodeError as exc:
                ok, result = False, f"error: arguments are not valid JSON: {exc}"
            except ToolError as exc:
                ok, result = False, f"error: {exc}"
            except OSError as exc:
                ok, result = False, f"error: {exc.strerror or exc}"
            detail = ""
            if ok and call.name == "run_tests":
                detail = " " + result.split("\n", 1)[0]  # exit_code=N
            _log(f"step {step}/{args.max_steps} tool={call.name or '?'} {'ok' if ok else 'fail'}{detail}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": redact(result)})

    _log(
        f"incomplete: step budget of {args.max_steps} exhausted "
        f"(usage prompt_tokens={prompt_tokens} completion_tokens={completion_tokens})"
    )
    return EXIT_INCOMPLETE


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
