"""Hidden acceptance cases as harness-owned data, and the judgement of one reply.

A fixture's ``acceptance/cases.py`` (imported only by the harness, never copied near
Case's code) defines ``CASES``: a list of :class:`Case`. A case is a *probe* (what the
worker evaluates: inputs only) and *checks* (what the harness expects of the reply). Only
the probe is sent to the worker (``harness.acceptance_worker``); the checks never leave
this process, so code under test that rewrites the worker still cannot tell which answer
would pass. :func:`judge` is pure: reply in, verdict out.

Probes (``op``): ``eval`` (an expression; the reply is the value or the exception, with
requested attributes, ``isinstance`` facts and the captured stdout/stderr), ``signature``
(parameters of a callable), ``identity`` (``id()`` of several expressions: "is X the same
object as Y"), ``run_module`` (``python -m MODULE ARGV`` in the worker's sandbox).
Expressions: :func:`ref` (dotted name), :func:`call`, :func:`attr`, :func:`item`,
:func:`seq` (a list of expressions), :func:`attrs_of` (named attributes as a dict),
:func:`is_instance`; any plain value is a literal.

A worker that rewrites itself can answer structural questions with a bit (``is``,
``isinstance``, identity) by guessing; the value checks (what ``slugify("Crème")``
returns) it can only pass by computing the right values.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .acceptance_worker import encode

CASES_FILE = "cases.py"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_REPR_CHARS = 160


# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Expr:
    """An expression the worker evaluates (its JSON form is ``data``)."""

    data: dict[str, Any]


def _x(value: Any) -> dict[str, Any]:
    """An expression's JSON: an :class:`Expr` as is, any other value as a literal."""
    return value.data if isinstance(value, Expr) else {"k": "lit", "v": encode(value)}


def _dotted(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a dotted name")
    return name


def ref(name: str) -> Expr:
    """The object at a dotted name (``slugkit.core.slugify``, ``builtins.str``)."""
    return Expr({"k": "ref", "name": _dotted(name)})


def call(fn: str | Expr, *args: Any, **kwargs: Any) -> Expr:
    """``fn(*args, **kwargs)``; ``fn`` a dotted name or an expression."""
    target = ref(fn) if isinstance(fn, str) else fn
    return Expr({"k": "call", "fn": target.data, "args": [_x(a) for a in args],
                 "kwargs": {k: _x(v) for k, v in kwargs.items()}})


def attr(obj: Any, name: str) -> Expr:
    return Expr({"k": "attr", "obj": _x(obj), "name": name})


def item(obj: Any, key: Any) -> Expr:
    return Expr({"k": "item", "obj": _x(obj), "key": _x(key)})


def seq(*items: Any) -> Expr:
    """Several expressions evaluated in order; the value is the list of their values."""
    return Expr({"k": "list", "items": [_x(i) for i in items]})


def attrs_of(obj: Any, *names: str) -> Expr:
    """``{name: getattr(obj, name)}`` for each name (a missing one raises)."""
    return Expr({"k": "attrs", "obj": _x(obj), "names": list(names)})


def is_instance(obj: Any, cls: str) -> Expr:
    return Expr({"k": "isinstance", "obj": _x(obj), "cls": ref(cls).data})


# --------------------------------------------------------------------------- probes


class Patch(BaseModel):
    """A module attribute set for one probe and restored after it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    value: dict[str, Any]
    only_if_present: bool = False

    @field_validator("target")
    @classmethod
    def _check(cls, value: str) -> str:
        return _dotted(value)


class Eval(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["eval"] = "eval"
    expr: dict[str, Any]
    attrs: list[str] = []
    types: list[str] = []
    patch: list[Patch] = []


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["signature"] = "signature"
    expr: dict[str, Any]


class Identity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["identity"] = "identity"
    exprs: list[dict[str, Any]] = Field(min_length=2)


class RunModule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["run_module"] = "run_module"
    module: str
    argv: list[str]
    timeout_s: float = Field(default=30, gt=0, le=600)

    @field_validator("module")
    @classmethod
    def _check(cls, value: str) -> str:
        return _dotted(value)


Probe = Annotated[Eval | Signature | Identity | RunModule, Field(discriminator="op")]

CheckOp = Literal["eq", "ne", "is", "approx", "contains", "strip_eq", "split_eq", "lines_eq", "len_le",
                  "fullmatch", "not_startswith", "not_endswith", "all_equal", "type_is", "ids_equal"]


class Check(BaseModel):
    """One expectation: ``op`` applied to the reply's field at path ``on``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on: tuple[str | int, ...]
    op: CheckOp
    want: Any = None


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    probe: Probe
    checks: list[Check] = Field(min_length=1)


# --------------------------------------------------------------------------- building cases


def returns(want: Any) -> list[Check]:
    """The expression returned a value ``== want``."""
    return [Check(on=("outcome",), op="eq", want="returned"), Check(on=("value",), op="eq", want=want)]


def returns_approx(want: float) -> list[Check]:
    return [Check(on=("outcome",), op="eq", want="returned"), Check(on=("value",), op="approx", want=want)]


def raises(cls: str, **attrs: Any) -> list[Check]:
    """The expression raised an instance of the class at ``cls`` (subclasses count, as
    with ``pytest.raises``), with attributes equal to ``attrs`` (``message``: ``str(exc)``)."""
    out = [Check(on=("outcome",), op="eq", want="raised"), Check(on=("isinstance", _dotted(cls)), op="is", want=True)]
    for name, want in attrs.items():
        out.append(Check(on=("message",) if name == "message" else ("attrs", name), op="eq", want=want))
    return out


def check(*on: str | int, op: CheckOp = "eq", want: Any = None) -> Check:
    return Check(on=tuple(on), op=op, want=want)


def case(name: str, probe: Expr | Eval | Signature | Identity | RunModule, *checks: Check | list[Check],
         patch: Sequence[Patch] = ()) -> Case:
    """A case; an :class:`Expr` probe becomes an ``eval`` that asks for every attribute
    and type its checks look at."""
    flat: list[Check] = []
    for c in checks:
        flat.extend(c if isinstance(c, list) else [c])
    if isinstance(probe, Expr):
        attrs = [c.on[1] for c in flat if len(c.on) > 1 and c.on[0] == "attrs"]
        types = [c.on[1] for c in flat if len(c.on) > 1 and c.on[0] == "isinstance"]
        probe = Eval(expr=probe.data, attrs=list(dict.fromkeys(map(str, attrs))),
                     types=list(dict.fromkeys(map(str, types))), patch=list(patch))
    return Case(name=name, probe=probe, checks=flat)


def patch(target: str, value: Any, *, only_if_present: bool = False) -> Patch:
    return Patch(target=target, value=encode(value), only_if_present=only_if_present)


def signature(obj: str | Expr) -> Signature:
    return Signature(expr=(ref(obj) if isinstance(obj, str) else obj).data)


def identity(*objs: str | Expr) -> Identity:
    return Identity(exprs=[(ref(o) if isinstance(o, str) else o).data for o in objs])


def run_module(module: str, *argv: str, timeout_s: float = 30) -> RunModule:
    return RunModule(module=module, argv=list(argv), timeout_s=timeout_s)


def load_cases(path: Path) -> list[Case]:
    """``CASES`` of a fixture's ``acceptance/cases.py``; ValueError naming what is wrong."""
    spec = importlib.util.spec_from_file_location(f"_acceptance_cases_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: cannot load")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"{path}: invalid case: {exc}") from exc
    except (OSError, SyntaxError, ImportError, NameError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: cannot load the cases: {type(exc).__name__}: {exc}") from exc
    cases = getattr(module, "CASES", None)
    if not isinstance(cases, list) or not cases or not all(isinstance(c, Case) for c in cases):
        raise ValueError(f"{path}: CASES must be a non-empty list of harness.acceptance_cases.Case")
    seen: set[str] = set()
    for c in cases:
        if c.name in seen:
            raise ValueError(f"{path}: two cases are named {c.name!r}")
        seen.add(c.name)
    return cases


# --------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Opaque:
    """A value the worker could only name by type (a function, a class instance)."""

    type: str


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def decode(enc: Any) -> Any:
    """A tagged value of a reply as a Python value; ValueError if malformed."""
    if not isinstance(enc, dict) or not isinstance(enc.get("t"), str):
        raise ValueError("value without a type tag")
    tag, v = enc["t"], enc.get("v")
    if tag == "missing":
        return MISSING
    if tag == "object":
        return Opaque(str(enc.get("type")))
    if tag == "none":
        return None
    if tag == "bool" and isinstance(v, bool):
        return v
    if tag == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if tag == "float" and isinstance(v, (int, float, str)) and not isinstance(v, bool):
        return float(v)
    if tag == "str" and isinstance(v, str):
        return v
    if tag == "bytes" and isinstance(v, str):
        import base64
        return base64.b64decode(v, validate=True)
    if tag in ("list", "tuple") and isinstance(v, list):
        items = [decode(x) for x in v]
        return items if tag == "list" else tuple(items)
    if tag == "dict" and isinstance(v, list):
        return {_hashable(decode(k)): decode(x) for k, x in v}
    if tag == "range" and isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v):
        return range(*v)
    raise ValueError(f"malformed value tagged {tag!r}")


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def observation(probe: Eval | Signature | Identity | RunModule, result: Any) -> dict[str, Any]:
    """The reply as the checks see it; ValueError if it does not have the probe's shape."""
    if not isinstance(result, dict) or result.get("outcome") not in ("returned", "raised", "error"):
        raise ValueError("reply without an outcome")
    obs: dict[str, Any] = {"outcome": result["outcome"]}
    if result["outcome"] == "error":
        obs["message"] = str(result.get("message", ""))[:2000]
        return obs
    if isinstance(probe, Eval):
        for key in ("stdout", "stderr"):
            obs[key] = _text(result.get(key))
        obs["attrs"] = {str(k): decode(v) for k, v in _dict(result.get("attrs")).items()}
        obs["isinstance"] = {str(k): v for k, v in _dict(result.get("isinstance")).items()}
        if result["outcome"] == "returned":
            obs["value"] = decode(result.get("value"))
        else:
            obs["type"], obs["message"] = _text(result.get("type")), _text(result.get("message"))
    elif isinstance(probe, Signature):
        params = result.get("params")
        if not isinstance(params, list):
            raise ValueError("signature reply without params")
        obs["params"] = {str(p.get("name")): {"kind": p.get("kind"), "default": decode(p.get("default"))}
                         for p in params if isinstance(p, dict)}
    elif isinstance(probe, Identity):
        ids = result.get("ids")
        if not isinstance(ids, list) or len(ids) != len(probe.exprs):
            raise ValueError("identity reply without one id per expression")
        obs["ids"] = ids
    else:
        obs["returncode"] = result.get("returncode")
        obs["stdout"], obs["stderr"] = _text(result.get("stdout")), _text(result.get("stderr"))
    return obs


def _dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected an object")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[:_REPR_CHARS] + "...'"


def _select(obs: Any, path: tuple[str | int, ...]) -> Any:
    node = obs
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return MISSING
    return node


def _holds(op: CheckOp, got: Any, want: Any) -> bool:
    """Whether one check holds; a value of the wrong kind simply does not."""
    if got is MISSING:
        return False
    if op == "eq":
        return bool(got == want)
    if op == "ne":
        return bool(got != want)
    if op == "is":  # singletons (True/False/None): the same, not merely equal
        return got is want
    if op == "approx":  # pytest.approx's defaults: relative 1e-6, absolute 1e-12
        return isinstance(got, (int, float)) and not isinstance(got, bool) and math.isclose(
            got, want, rel_tol=1e-6, abs_tol=1e-12)
    if op == "type_is":
        return type(got).__name__ == want
    if op == "ids_equal":  # every id the same (want=True) or all distinct (want=False)
        return isinstance(got, list) and (len(set(got)) == 1) is want
    if op == "all_equal":
        return isinstance(got, list) and len(got) > 1 and all(g == got[0] for g in got[1:])
    if op == "contains":  # a substring of a string, an element of a list
        return isinstance(got, (str, list, tuple)) and (isinstance(got, str) <= isinstance(want, str)) and want in got
    if not isinstance(got, str) and op != "len_le":
        return False
    if op == "strip_eq":
        return bool(got.strip() == want)
    if op == "split_eq":
        return bool(got.split() == want)
    if op == "lines_eq":
        return bool(got.splitlines() == want)
    if op == "fullmatch":
        return re.fullmatch(want, got) is not None
    if op == "not_startswith":
        return not got.startswith(want)
    if op == "not_endswith":
        return not got.endswith(want)
    if op == "len_le":
        return isinstance(got, (str, list, tuple)) and len(got) <= want
    raise ValueError(f"unknown check {op!r}")


@dataclass(frozen=True)
class Verdict:
    name: str
    passed: bool
    reasons: tuple[str, ...] = ()


def judge(c: Case, result: Any) -> Verdict:
    """Compare one reply with the case's checks. A malformed reply fails the case."""
    try:
        obs = observation(c.probe, result)
    except (ValueError, TypeError) as exc:
        return Verdict(c.name, False, (f"malformed reply: {exc}",))
    if obs["outcome"] == "error":
        return Verdict(c.name, False, (f"the probe could not run: {obs['message']}",))
    reasons = []
    for chk in c.checks:
        got = _select(obs, chk.on)
        if not _holds(chk.op, got, chk.want):
            where = ".".join(map(str, chk.on))
            extra = f" ({obs.get('type')}: {_short(obs.get('message'))})" if obs["outcome"] == "raised" else ""
            reasons.append(f"{where}: expected {chk.op} {_short(chk.want)}, got {_short(got)}{extra}")
            if chk.on == ("outcome",):
                break  # the rest would only repeat it
    return Verdict(c.name, not reasons, tuple(reasons))
