"""`case-harness demo`: the whole route on one machine, no GPU, no configuration.

What it does, in order:

1. writes DEMO inputs (a decision record and an admission JSON for ``qwen-local`` /
   ``qwen3.6-35b-a3b``, status ``candidate``) into ``<runs-dir>/demo-inputs-<UTC>/``.
   These are demo copies made for this command only, labelled as such; the operators'
   CTO-WORK-020 artifacts are never read or written;
2. a full run with the built-in scripted backend (a TEST FIXTURE replaying a recorded
   session, which says it is scripted, so the report's ``evidence_grade`` is ``demo``),
   the real proxy and the reference Case agent on ``r1-string-slugify``: expects ``pass``;
3. each negative gate as a real run that must end ``blocked`` with its reason code and
   without ``case_process_started`` (docs/gates.md lists them all);
4. ``verify`` on the pass run.

The environment of every run is built from scratch (PATH, locale, HOME, TMPDIR and the
demo inputs), so a developer's own ``ANTHROPIC_API_KEY`` or ``CTO_HARNESS_*`` cannot
change what the demo shows. Exit 0 only if everything came out as expected.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.settings import ENV_ADMISSION_FILE, ENV_API_KEY, ENV_BASE_URL, ENV_DECISION_FILE

from . import events as events_mod
from .attestation import ENV_SIGNING_KEY_FILE, load_private_key, signing_key_path
from .fixture_catalog import load_fixture
from .profile import REFERENCE_PROFILE_PATH, ConfigTemplate, RunProfile, load_run_profile
from .report import Report, load_report
from .run import RunConfigError, RunOutcome, run_once
from .runtime_check import run_problems
from .scripted_backend import ScriptedBackend

DEMO_FIXTURE = "r1-string-slugify"
ADMITTED_PROVIDER = "qwen-local"
ADMITTED_MODEL = "qwen3.6-35b-a3b"
EXTERNAL_MODEL = "claude-sonnet-4-6"

DEMO_DECISION: dict[str, Any] = {
    "work_item": "CTO-WORK-020",
    "decision_status": "local_provider_required",
    "provider_class": "local_case_compatible",
    "decided_at": "2026-06-01T02:00:00Z",
}
DEMO_ADMISSION: dict[str, Any] = {
    "schema_version": 1,
    "work_item": "CTO-WORK-020",
    "provider": ADMITTED_PROVIDER,
    "provider_class": "local_case_compatible",
    "model": ADMITTED_MODEL,
    "admission_status": "candidate",
    "aliases": [],
    "scope": ["stage2-artificial-fixture"],
}
# A decision that does not select this route (any value but local_provider_required).
NOT_REQUIRED_STATUS = "local_provider_not_required"
# Never a real key: only its presence in the environment matters to the gate.
DEMO_FAKE_ANTHROPIC_KEY = "sk-ant-demo-not-a-real-key-0000000000000000"
# Not loopback, not private, not allowlisted; never contacted (the gate blocks first).
DEMO_EXTERNAL_BASE_URL = "https://models.example.com/v1"
# A made-up backend key, copied by a hostile profile into a variable Case would get.
DEMO_FAKE_BACKEND_KEY = "demo-backend-key-not-real-0000000000"
DEMO_FAKE_AWS_KEY_ID = "AKIADEMONOTAREALKEY0"

_BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "SYSTEMROOT")

_README = """\
DEMO INPUTS: written by `case-harness demo` for the demo only.

These are demo copies of a CTO-WORK-020 decision record and admission JSON (qwen-local /
qwen3.6-35b-a3b, admission_status=candidate). They are NOT the operators' artifacts, admit
nothing, and are used only by the demo runs next to this directory.
"""


@dataclass(frozen=True)
class DemoInputs:
    directory: Path
    decision: Path
    admission: Path
    decision_not_required: Path
    admission_external_alias: Path
    home_with_aws_credentials: Path


def write_demo_inputs(runs_dir: Path) -> DemoInputs:
    """The demo's own decision record and admission JSON (plus a decision variant that
    does not select this route), clearly labelled as demo copies."""
    directory = Path(runs_dir).absolute() / f"demo-inputs-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    n = 0
    while directory.exists() and n < 100:
        n += 1
        directory = directory.with_name(f"{directory.name.split('.')[0]}.{n}")
    directory.mkdir(parents=True)
    (directory / "README.txt").write_text(_README, encoding="utf-8")
    decision = directory / "DEMO-decision.json"
    admission = directory / "DEMO-admission.json"
    not_required = directory / "DEMO-decision-not-local-provider-required.json"
    decision.write_text(json.dumps(DEMO_DECISION, indent=2) + "\n", encoding="utf-8")
    admission.write_text(json.dumps(DEMO_ADMISSION, indent=2) + "\n", encoding="utf-8")
    not_required.write_text(json.dumps({**DEMO_DECISION, "decision_status": NOT_REQUIRED_STATUS}, indent=2) + "\n",
                            encoding="utf-8")
    alias = directory / "DEMO-admission-alias-claude.json"
    alias.write_text(json.dumps({**DEMO_ADMISSION, "aliases": [EXTERNAL_MODEL]}, indent=2) + "\n", encoding="utf-8")
    home = directory / "DEMO-home-with-aws-credentials"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("# DEMO file, not a credential\n[default]\n"
                                               f"aws_access_key_id = {DEMO_FAKE_AWS_KEY_ID}\n", encoding="utf-8")
    return DemoInputs(directory, decision, admission, not_required, alias, home)


def base_env(inputs: DemoInputs, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean run environment: enough to run programs, plus the demo inputs."""
    source = os.environ if source is None else source
    env = {k: source[k] for k in _BASE_ENV if source.get(k)}
    if source.get(ENV_SIGNING_KEY_FILE):  # the operator's attestation key, a path (never argv)
        env[ENV_SIGNING_KEY_FILE] = source[ENV_SIGNING_KEY_FILE]
    env[ENV_DECISION_FILE] = str(inputs.decision)
    env[ENV_ADMISSION_FILE] = str(inputs.admission)
    return env


def demo_profile(fixture: str = DEMO_FIXTURE, model: str | None = None, **case_changes: Any) -> RunProfile:
    """The packaged reference-agent profile on ``fixture`` (optionally asking for another
    model, to show the admission-mismatch gate, or with other ``[case]`` fields changed,
    to show the profile gates)."""
    profile = load_run_profile(REFERENCE_PROFILE_PATH).model_copy(update={"fixture": fixture})
    if model is not None:
        case_changes["model"] = model
    if case_changes:
        profile = profile.model_copy(update={"case": profile.case.model_copy(update=case_changes)})
    return profile


@dataclass(frozen=True)
class NegativeCase:
    name: str
    expected_code: str
    backend: str
    env_change: Callable[[dict[str, str], DemoInputs], None]
    model: str | None = None
    # [case] fields of the profile this run changes (a hostile profile).
    case_changes: Callable[[RunProfile], dict[str, Any]] | None = None
    # Models the scripted backend lists beside the admitted one (backend "router" only).
    router_lists: tuple[str, ...] = ()
    # False: Case would run unsandboxed (--no-sandbox), so the harness's own environment
    # and HOME are within its reach and what is there blocks (docs/gates.md).
    sandbox: bool = True


def _no_base_url(env: dict[str, str], _: DemoInputs) -> None:
    env.pop(ENV_BASE_URL, None)


def _decision_not_required(env: dict[str, str], inputs: DemoInputs) -> None:
    env[ENV_DECISION_FILE] = str(inputs.decision_not_required)


def _anthropic_key(env: dict[str, str], _: DemoInputs) -> None:
    env["ANTHROPIC_API_KEY"] = DEMO_FAKE_ANTHROPIC_KEY


def _external_upstream(env: dict[str, str], _: DemoInputs) -> None:
    env[ENV_BASE_URL] = DEMO_EXTERNAL_BASE_URL


def _unchanged(env: dict[str, str], _: DemoInputs) -> None:
    return None


def _no_admission(env: dict[str, str], _: DemoInputs) -> None:
    env.pop(ENV_ADMISSION_FILE, None)


def _alias_admission(env: dict[str, str], inputs: DemoInputs) -> None:
    env[ENV_ADMISSION_FILE] = str(inputs.admission_external_alias)


def _backend_key_copy(env: dict[str, str], _: DemoInputs) -> None:
    env[ENV_API_KEY] = DEMO_FAKE_BACKEND_KEY
    env["DEMO_TOOL_SETTING"] = DEMO_FAKE_BACKEND_KEY


def _endpoint_var(env: dict[str, str], _: DemoInputs) -> None:
    env["DEMO_LLM_BASE_URL"] = "http://127.0.0.1:9/v1"


def _aws_key(env: dict[str, str], _: DemoInputs) -> None:
    env["AWS_ACCESS_KEY_ID"] = DEMO_FAKE_AWS_KEY_ID


def _home_with_aws_credentials(env: dict[str, str], inputs: DemoInputs) -> None:
    env["HOME"] = str(inputs.home_with_aws_credentials)


def _allow(*names: str) -> Callable[[RunProfile], dict[str, Any]]:
    return lambda p: {"env_allow": [*p.case.env_allow, *names]}


def _template(content: str) -> Callable[[RunProfile], dict[str, Any]]:
    return lambda p: {"config_template": ConfigTemplate(file="agent.toml", content=content)}


NEGATIVE_CASES: tuple[NegativeCase, ...] = (
    NegativeCase("missing local adapter config", "local_adapter_config_missing", "external", _no_base_url),
    NegativeCase("admission JSON not given", "admission_missing", "scripted", _no_admission),
    NegativeCase("admission mismatch (profile asks claude-sonnet-4-6)", "admission_mismatch_model", "scripted",
                 _unchanged, model=EXTERNAL_MODEL),
    NegativeCase("decision_status != local_provider_required", "decision_not_local_provider_required", "scripted",
                 _decision_not_required),
    NegativeCase("external provider fallback (ANTHROPIC_API_KEY in the shell, no sandbox)",
                 "external_fallback_configured", "scripted", _anthropic_key, sandbox=False),
    NegativeCase("external upstream", "external_upstream", "external", _external_upstream),
    NegativeCase("env_allow passes the harness's own variable", "env_allow_harness_variable", "scripted",
                 _unchanged, case_changes=_allow(ENV_BASE_URL)),
    NegativeCase("env_allow passes a copy of the backend key", "env_allow_secret_value", "scripted",
                 _backend_key_copy, case_changes=_allow("DEMO_TOOL_SETTING")),
    NegativeCase("env_allow passes an endpoint variable", "endpoint_variable_to_case", "scripted", _endpoint_var,
                 case_changes=_allow("DEMO_LLM_BASE_URL")),
    NegativeCase("config template names an endpoint URL", "endpoint_in_profile", "scripted", _unchanged,
                 case_changes=_template('base_url = "http://127.0.0.1:8000/v1"\n')),
    NegativeCase("AWS key passed to Case (AWS_ACCESS_KEY_ID)", "external_fallback_configured", "scripted", _aws_key,
                 case_changes=_allow("AWS_ACCESS_KEY_ID")),
    NegativeCase("AWS credentials file in HOME, no sandbox", "external_credential_file", "scripted",
                 _home_with_aws_credentials, sandbox=False),
    NegativeCase("config template asks gpt-4o", "unadmitted_model_configured", "scripted", _unchanged,
                 case_changes=_template('model = "gpt-4o"\n')),
    NegativeCase("backend also lists claude-sonnet-4-6", "backend_serves_external_model", "router", _unchanged,
                 router_lists=(EXTERNAL_MODEL,)),
    NegativeCase("admission alias claude-sonnet-4-6", "admission_alias_external", "scripted", _alias_admission),
)


@contextmanager
def _router_backend(also_list: tuple[str, ...]) -> Iterator[str]:
    """The scripted backend (a TEST FIXTURE) in a thread of its own, listing external
    models beside the admitted one as a LiteLLM-style router would. Yields its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="demo-router-backend", daemon=True)
    thread.start()
    backend = ScriptedBackend(model=ADMITTED_MODEL, also_list=also_list, record_requests=False)
    try:
        yield asyncio.run_coroutine_threadsafe(backend.start("127.0.0.1", 0), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(backend.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@dataclass
class Row:
    name: str
    expected: str
    got: str
    ok: bool
    where: str


def _typed_events(run_dir: Path) -> list[events_mod.Event]:
    return events_mod.read_typed_events(run_dir / "events.jsonl").events


def blocked_codes(run_dir: Path) -> list[str]:
    """The codes of every gate that blocked the run, as its events state them."""
    return [r.code for ev in _typed_events(run_dir) if isinstance(ev, events_mod.GateBlocked) for r in ev.reasons]


def case_started(run_dir: Path) -> bool:
    return any(isinstance(ev, events_mod.CaseProcessStarted) for ev in _typed_events(run_dir))


class _Ticker:
    """Prints progress lines with the elapsed time; a heartbeat thread keeps the clock
    visible during long quiet phases."""

    def __init__(self, out: Any = sys.stdout) -> None:
        self.t0 = time.monotonic()
        self.out = out
        self.label = ""
        self._last = self.t0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def say(self, message: str) -> None:
        with self._lock:
            self._last = time.monotonic()
            prefix = f"[{self._last - self.t0:6.1f}s]"
            print(f"{prefix} {self.label}: {message}" if self.label else f"{prefix} {message}", file=self.out,
                  flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last >= 10.0:
                self.say("still working")


def run_demo(runs_dir: Path, *, source_env: Mapping[str, str] | None = None, out: Any = sys.stdout) -> int:
    """Run the demo; returns the exit code (0 only if every expectation held). Raises
    RunConfigError, before writing anything, when a package the runs need is missing."""
    if missing := run_problems(load_fixture(DEMO_FIXTURE).spec.acceptance_test_command, demo_profile().case.command):
        raise RunConfigError("; ".join(missing))
    runs_dir = Path(runs_dir).absolute()
    rows: list[Row] = []
    with _Ticker(out) as tick:
        inputs = write_demo_inputs(runs_dir)
        tick.say(f"DEMO inputs (demo copies, not the operators' artifacts): {inputs.directory}")

        tick.label = "pass run"
        tick.say(f"full route: scripted backend -> proxy -> reference agent on {DEMO_FIXTURE}")
        env = base_env(inputs, source_env)
        outcome: RunOutcome = run_once(demo_profile(), env, runs_dir, backend="scripted", progress=tick.say)
        grade = _evidence_grade(outcome.run_dir)
        rows.append(Row("full route (scripted backend)", "pass, evidence_grade demo",
                        f"{outcome.status}, evidence_grade {grade}",
                        outcome.status == "pass" and grade == "demo", str(outcome.run_dir)))
        pass_run = outcome.run_dir
        isolation = _isolation(pass_run)
        rows.append(Row("Case sandboxed (pass run)", "bubblewrap, proxy-only, 0 processes left", isolation,
                        isolation == "bubblewrap, proxy-only, 0 processes left", str(pass_run)))

        for case in NEGATIVE_CASES:
            tick.label = f"gate: {case.name}"
            env = base_env(inputs, source_env)
            case.env_change(env, inputs)
            if not case.sandbox:  # an unsandboxed Case could read the key: such runs are never signed
                env.pop(ENV_SIGNING_KEY_FILE, None)
            profile = demo_profile(model=case.model)
            if case.case_changes is not None:
                profile = demo_profile(model=case.model, **case.case_changes(profile))
            if case.backend == "router":
                with _router_backend(case.router_lists) as url:
                    env[ENV_BASE_URL] = url
                    neg = run_once(profile, env, runs_dir, backend="external", progress=tick.say,
                                   sandbox=case.sandbox)
            else:
                neg = run_once(profile, env, runs_dir, backend=case.backend,  # type: ignore[arg-type]
                               progress=tick.say, sandbox=case.sandbox)
            codes = blocked_codes(neg.run_dir)
            started = case_started(neg.run_dir)
            ok = neg.status == "blocked" and case.expected_code in codes and not started
            got = f"{neg.status}: {', '.join(codes) or '-'}" + (" (CASE STARTED!)" if started else "")
            rows.append(Row(case.name, f"blocked: {case.expected_code}", got, ok, str(neg.run_dir)))

        tick.label = "verify"
        from .verify import verify_run

        tick.say(f"recomputing the pass run's report from its evidence: {pass_run}")
        key_path = signing_key_path(base_env(inputs, source_env))
        public = load_private_key(key_path).public_key() if key_path is not None else None
        verdict = verify_run(pass_run, decision_path=inputs.decision, admission_path=inputs.admission,
                             public_key=public)
        for problem in verdict.problems:
            tick.say(f"problem: {problem}")
        rows.append(Row("verify (pass run)", "ok", "ok" if verdict.ok else f"{len(verdict.problems)} problem(s)",
                        bool(verdict.ok), str(pass_run)))
        signing = _attestation(pass_run)
        rows.append(Row("attestation (pass run)",
                        "signed, verifies" if public else f"unsigned (no {ENV_SIGNING_KEY_FILE})",
                        signing + (", verifies" if public and verdict.ok else ""),
                        signing == ("signed" if public else "unsigned"), str(pass_run)))
        tick.label = ""
        elapsed = time.monotonic() - tick.t0

    _print_table(rows, out)
    all_ok = all(r.ok for r in rows)
    print(f"\nreport of the pass run: {pass_run / 'report.txt'} (and report.json)", file=out)
    print(f"  case-harness report {pass_run}", file=out)
    print(f"demo {'OK' if all_ok else 'FAILED'} in {elapsed:.1f}s", file=out, flush=True)
    return 0 if all_ok else 1


def _report(run_dir: Path) -> Report | None:
    try:
        return load_report(run_dir / "report.json")
    except (OSError, ValueError):  # missing, or not a report (pydantic's error is a ValueError)
        return None


def _evidence_grade(run_dir: Path) -> str:
    report = _report(run_dir)
    return report.evidence_grade if report else "?"


def _attestation(run_dir: Path) -> str:
    """Whether the report says the run's attestation is signed."""
    report = _report(run_dir)
    if report is None:
        return "?"
    return "signed" if report.attestation.signed else "unsigned"


def _isolation(run_dir: Path) -> str:
    """What isolated Case in a run, in the table's words."""
    report = _report(run_dir)
    if report is None:
        return "?"
    iso = report.isolation
    if iso is None:
        return "None, None, None processes left"
    return f"{iso.kind}, {iso.network}, {iso.namespace_survivors} processes left"


def _print_table(rows: list[Row], out: Any) -> None:
    headers = ("", "check", "expected", "got")
    body = [("ok" if r.ok else "FAIL", r.name, r.expected, r.got) for r in rows]
    widths = [max(len(str(x[i])) for x in [headers, *body]) for i in range(4)]
    print("", file=out)
    for line in [headers, tuple("-" * w for w in widths), *body]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip(), file=out)
    print("\nrun directories:", file=out)
    for r in rows:
        print(f"  {r.name}: {r.where}", file=out)


__all__ = ["DEMO_ADMISSION", "DEMO_DECISION", "NEGATIVE_CASES", "base_env", "demo_profile", "run_demo",
           "write_demo_inputs"]
