"""The acceptance worker: the only process that runs Case's code during acceptance.

Standard library only, run by path (``python -I -X utf8 acceptance_worker.py IMPORT_ROOT``)
inside the acceptance sandbox, from a copy the harness writes into the sandbox's scratch
directory: nothing of the project is importable there. It reads one JSON request per line
on stdin and writes one JSON reply per line on a private copy of stdout.

A request carries a nonce drawn by the harness and a probe: what to evaluate (inputs only).
The reply echoes the nonce and says what happened: the value (JSON with a type tag), or the
exception's type, message and requested attributes, plus what the code printed. The
EXPECTED values never come here: the harness compares, counts and decides. Case's code runs
in this process and may rewrite any of it; that is why nothing here is trusted, and why a
reply is only a claim the harness checks against values the worker never saw.

Protocol channel: at start the worker duplicates fd 1 (close-on-exec) for its replies and
points fd 1 at fd 2, so what Case's code (or a program it starts) writes to fd 1 lands in
the stderr log instead of corrupting the channel. Python-level output during a probe is
captured and returned (``stdout``/``stderr``).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import subprocess
import sys
from typing import Any

MAX_DEPTH = 32
MAX_ITEMS = 100_000
MAX_TEXT = 1_000_000
MISSING = {"t": "missing"}


class _Budget:
    """Bounds the size of one encoded value (a hostile or runaway result stays small)."""

    def __init__(self) -> None:
        self.items = 0

    def take(self) -> None:
        self.items += 1
        if self.items > MAX_ITEMS:
            raise OverflowError("value too large to report")


def qualname(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', '?'))}"


def encode(value: Any, budget: _Budget | None = None, depth: int = 0) -> dict[str, Any]:
    """A value as JSON with a type tag; anything else as its type's name."""
    budget = budget or _Budget()
    budget.take()
    if depth > MAX_DEPTH:
        raise OverflowError("value nested too deep to report")
    if value is None:
        return {"t": "none"}
    if type(value) is bool:
        return {"t": "bool", "v": value}
    if type(value) is int:
        return {"t": "int", "v": value}
    if type(value) is float:
        return {"t": "float", "v": value if math.isfinite(value) else repr(value)}
    if type(value) is str:
        if len(value) > MAX_TEXT:
            raise OverflowError("string too long to report")
        return {"t": "str", "v": value}
    if type(value) is bytes:
        if len(value) > MAX_TEXT:
            raise OverflowError("bytes too long to report")
        return {"t": "bytes", "v": base64.b64encode(value).decode("ascii")}
    if type(value) in (list, tuple):
        return {"t": type(value).__name__, "v": [encode(v, budget, depth + 1) for v in value]}
    if type(value) is dict:
        return {"t": "dict", "v": [[encode(k, budget, depth + 1), encode(v, budget, depth + 1)]
                                   for k, v in value.items()]}
    if type(value) is range:
        return {"t": "range", "v": [value.start, value.stop, value.step]}
    return {"t": "object", "type": qualname(type(value))}


def decode(enc: Any) -> Any:
    """A literal from a request (the same tags as :func:`encode`)."""
    if not isinstance(enc, dict) or "t" not in enc:
        raise ValueError(f"not a tagged value: {enc!r:.80}")
    tag: Any = enc["t"]
    v: Any = enc.get("v")  # a malformed v raises, and the probe reports it
    if tag == "none":
        return None
    if tag in ("bool", "int", "str"):
        return v
    if tag == "float":
        return float(v)
    if tag == "bytes":
        return base64.b64decode(v)
    if tag == "list":
        return [decode(x) for x in v]
    if tag == "tuple":
        return tuple(decode(x) for x in v)
    if tag == "dict":
        return {decode(k): decode(x) for k, x in v}
    if tag == "range":
        return range(*v)
    raise ValueError(f"unknown value tag {tag!r}")


def resolve(dotted: str) -> Any:
    """``a.b.c``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")) and cut > 1:
                continue
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def evaluate(expr: dict[str, Any]) -> Any:
    """One expression of a probe (see ``harness.acceptance_cases``)."""
    kind = expr.get("k")
    if kind == "lit":
        return decode(expr["v"])
    if kind == "ref":
        return resolve(expr["name"])
    if kind == "call":
        args = [evaluate(a) for a in expr.get("args", [])]
        kwargs = {k: evaluate(a) for k, a in expr.get("kwargs", {}).items()}
        return evaluate(expr["fn"])(*args, **kwargs)
    if kind == "attr":
        return getattr(evaluate(expr["obj"]), expr["name"])
    if kind == "item":
        return evaluate(expr["obj"])[evaluate(expr["key"])]
    if kind == "list":
        return [evaluate(e) for e in expr["items"]]
    if kind == "attrs":
        obj = evaluate(expr["obj"])
        return {name: getattr(obj, name) for name in expr["names"]}
    if kind == "isinstance":
        return isinstance(evaluate(expr["obj"]), evaluate(expr["cls"]))
    raise ValueError(f"unknown expression kind {kind!r}")


@contextlib.contextmanager
def patched(patches: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    """Set module attributes for one probe (``only_if_present``: skip a missing one)."""
    undo: list[tuple[Any, str, Any]] = []
    try:
        for p in patches:
            owner_name, _, attr = p["target"].rpartition(".")
            owner = resolve(owner_name)
            if not hasattr(owner, attr):
                if p.get("only_if_present"):
                    continue
                raise AttributeError(f"{p['target']} does not exist")
            undo.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, decode(p["value"]))
        yield
    finally:
        for owner, attr, old in reversed(undo):
            setattr(owner, attr, old)


def _facts(obj: Any, probe: dict[str, Any]) -> dict[str, Any]:
    """The requested attributes of ``obj`` and whether it is an instance of each type."""
    attrs = {}
    for name in probe.get("attrs", []):
        try:
            attrs[name] = encode(getattr(obj, name))
        except Exception:  # noqa: BLE001 - a missing attribute is a fact to report
            attrs[name] = MISSING
    kinds: dict[str, bool | None] = {}
    for ref in probe.get("types", []):
        try:
            kinds[ref] = isinstance(obj, resolve(ref))
        except Exception:  # noqa: BLE001
            kinds[ref] = None
    return {"attrs": attrs, "isinstance": kinds}


def probe_eval(probe: dict[str, Any]) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with patched(probe.get("patch", [])):
                value = evaluate(probe["expr"])
            result: dict[str, Any] = {"outcome": "returned", "value": encode(value), **_facts(value, probe)}
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the CLI's exits are results
            if isinstance(exc, KeyboardInterrupt):
                raise
            result = {"outcome": "raised", "type": qualname(type(exc)), "message": _text(exc),
                      **_facts(exc, probe)}
    result.update(stdout=out.getvalue()[:MAX_TEXT], stderr=err.getvalue()[:MAX_TEXT])
    return result


def _text(exc: BaseException) -> str:
    try:
        return str(exc)[:MAX_TEXT]
    except Exception:  # noqa: BLE001
        return "<str() failed>"


def probe_signature(probe: dict[str, Any]) -> dict[str, Any]:
    params = []
    for p in inspect.signature(evaluate(probe["expr"])).parameters.values():
        has_default = p.default is not inspect.Parameter.empty
        params.append({"name": p.name, "kind": p.kind.name,
                       "default": encode(p.default) if has_default else MISSING})
    return {"outcome": "returned", "params": params}


def probe_identity(probe: dict[str, Any]) -> dict[str, Any]:
    return {"outcome": "returned", "ids": [id(evaluate(e)) for e in probe["exprs"]]}


def probe_run_module(probe: dict[str, Any], import_root: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = import_root
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-m", probe["module"], *probe["argv"]], capture_output=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=float(probe["timeout_s"]), check=False)
    return {"outcome": "returned", "returncode": proc.returncode,
            "stdout": proc.stdout.decode("utf-8", "replace")[:MAX_TEXT],
            "stderr": proc.stderr.decode("utf-8", "replace")[:MAX_TEXT]}


def answer(probe: dict[str, Any], import_root: str) -> dict[str, Any]:
    """One probe; an exception outside the code under test is reported as such."""
    op = probe.get("op")
    try:
        if op == "eval":
            return probe_eval(probe)
        if op == "signature":
            return probe_signature(probe)
        if op == "identity":
            return probe_identity(probe)
        if op == "run_module":
            return probe_run_module(probe, import_root)
        return {"outcome": "error", "message": f"unknown probe op {op!r}"}
    except Exception as exc:  # noqa: BLE001 - e.g. the name to inspect cannot be imported
        return {"outcome": "error", "message": f"{qualname(type(exc))}: {_text(exc)[:2000]}"}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: acceptance_worker.py IMPORT_ROOT", file=sys.stderr)
        return 2
    import_root = argv[1]
    channel = os.fdopen(os.dup(1), "wb")  # os.dup: not inherited by children
    os.dup2(2, 1)
    sys.path.insert(0, import_root)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        nonce = request["nonce"]
        try:
            reply = {"nonce": nonce, "result": answer(request["probe"], import_root)}
            data = json.dumps(reply, ensure_ascii=True, allow_nan=False)
        except (OverflowError, ValueError, RecursionError, TypeError) as exc:
            data = json.dumps({"nonce": nonce, "result": {"outcome": "error",
                                                          "message": f"unreportable result: {exc}"[:2000]}})
        channel.write(data.encode("ascii") + b"\n")
        channel.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
