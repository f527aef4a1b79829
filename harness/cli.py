"""`case-harness`: preflight, run, verify, report, schema, demo, keygen.

Exit codes: 0 pass (preflight: every gate holds; verify: the report recomputes and both
chains hold); 1 fail (verify: problems found); 2 usage or configuration error; 3 blocked
(preflight: a gate blocks; run: the run ended ``blocked``, Case never started); 4 unproven
(run --no-sandbox: everything held but Case was not sandboxed, so it is never a pass).

Inputs come from the environment (``CTO_HARNESS_*``) and a TOML run profile:
``--profile FILE``, else the file named by ``CASE_HARNESS_PROFILE``, else the packaged
reference-agent profile. Secrets are never taken from argv.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.build_info import version_line
from proxy.settings import env_path

from .cli_help import EPILOGS, MAIN_EPILOG
from .exit_codes import EXIT_BLOCKED, EXIT_CONFIG, EXIT_FAIL, EXIT_PASS
from .profile import DEFAULT_FIXTURE, REFERENCE_PROFILE_PATH, ProfileError, RunProfile, load_run_profile

if TYPE_CHECKING:
    from .report import Report


ENV_PROFILE = "CASE_HARNESS_PROFILE"
DEFAULT_RUNS_DIR = Path("harness-runs")


class UsageError(Exception):
    """A problem with the command line or the files it names (exit 2)."""


def default_profile_path(env: Mapping[str, str] | None = None) -> Path | Traversable:
    """``CASE_HARNESS_PROFILE`` if set, else the packaged reference-agent profile."""
    return env_path(os.environ if env is None else env, ENV_PROFILE) or REFERENCE_PROFILE_PATH


def load_profile(path: Path | None, fixture: str | None, env: Mapping[str, str] | None = None) -> RunProfile:
    """Load the run profile (``UsageError`` naming the file on any problem) and apply a
    ``--fixture`` override."""
    source = path or default_profile_path(env)
    if not source.is_file():
        raise UsageError(f"profile {source} does not exist")
    try:
        profile = load_run_profile(source)
    except ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None
    if fixture:
        from .fixture_catalog import list_fixtures

        if fixture not in list_fixtures():
            raise UsageError(f"unknown fixture {fixture!r}; known fixtures: {', '.join(list_fixtures())}")
        profile = with_fixture(profile, fixture)
    return profile


def with_fixture(profile: RunProfile, fixture: str) -> RunProfile:
    """A copy of the profile that runs ``fixture``."""
    return profile.model_copy(update={"fixture": fixture})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="case-harness", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=version_line("case-harness"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def profile_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", type=Path, default=None,
                        help=f"run profile TOML (default: ${ENV_PROFILE}, else the packaged reference-agent profile)")
        sp.add_argument("--fixture", default=None, help=f"fixture id (default: the profile's, else {DEFAULT_FIXTURE})")

    pre = sub.add_parser("preflight", help="check every gate; exit 0 if all hold, 3 if any blocks")
    profile_args(pre)
    pre.add_argument("--no-sandbox", action="store_true",
                     help="do not require the bubblewrap sandbox (as for run --no-sandbox)")
    run = sub.add_parser("run", help="one run: gates, proxy, Case, acceptance tests, secret scan, report")
    profile_args(run)
    run.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where runs go (default ./harness-runs)")
    run.add_argument("--backend", choices=["external", "scripted"], default="external",
                     help="external: CTO_HARNESS_CASE_LOCAL_BASE_URL; scripted: the built-in test backend (demo grade)")
    run.add_argument("--no-sandbox", action="store_true",
                     help="run Case without the bubblewrap sandbox (it shares the harness's network, files and "
                          "processes); the report says isolation.kind none and the run is at best 'unproven'")
    ver = sub.add_parser("verify", help="recompute a run's report from its evidence; exit 0 ok, 1 problems")
    ver.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ver.add_argument("--decision-file", type=Path, default=None,
                     help="decision record (default: $CTO_HARNESS_CASE_DECISION_FILE)")
    ver.add_argument("--admission-file", type=Path, default=None,
                     help="admission JSON (default: $CTO_HARNESS_CASE_MODEL_ADMISSION_FILE)")
    ver.add_argument("--public-key", type=Path, default=None, metavar="F",
                     help="Ed25519 public key (PEM, from keygen): attestation.dsse.json must be signed by it")
    rep = sub.add_parser("report", help="print a run's report summary; --html writes a page")
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rep.add_argument("--html", type=Path, default=None, metavar="OUT", help="also write an HTML page to OUT")
    sub.add_parser("schema", help="print the JSON Schema of report.json (the packaged copy)",
                   description="Print the JSON Schema that every report.json validates against, as shipped in "
                               "the package.")
    demo = sub.add_parser("demo", help="the whole route on this machine with the scripted backend, then every "
                                       "negative gate blocking")
    demo.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where runs go (default ./harness-runs)")
    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair that signs each run's attestation")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="directory for signing-key.pem (mode 0600) and signing-key.pub.pem; existing keys "
                             "are never overwritten")
    add_epilogs(p, sub)
    return p


def add_epilogs(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Each command's --help ends with the environment it reads, its exit codes and an example."""
    parser.epilog, parser.formatter_class = MAIN_EPILOG, argparse.RawDescriptionHelpFormatter
    for name, command in sub.choices.items():
        command.epilog, command.formatter_class = EPILOGS.get(name), argparse.RawDescriptionHelpFormatter


def _progress(message: str) -> None:
    print(f"case-harness: {message}", file=sys.stderr, flush=True)


def cmd_preflight(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .fixture_catalog import load_fixture
    from .run import preflight
    from .runtime_check import run_problems

    profile = load_profile(args.profile, args.fixture, env)
    # What a run would stop on before its gates: say it here too, not "ok".
    try:
        acceptance = load_fixture(profile.fixture).spec.acceptance_test_command
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if missing := run_problems(acceptance, profile.case.command):
        raise UsageError("; ".join(missing))
    result = preflight(env, profile, sandboxed=not args.no_sandbox)
    failures = [(f.code, f.message) for f in result.failures]
    if not args.no_sandbox:
        from .sandbox import probe_bwrap

        probed = probe_bwrap()
        if isinstance(probed, str):
            failures.append(("sandbox_unavailable", probed))
    if not failures:
        print(f"ok: every gate holds ({len(result.checked)} checked: {', '.join(result.checked)})"
              + ("" if args.no_sandbox else "; bubblewrap can sandbox Case"))
        return EXIT_PASS
    for code, message in failures:
        print(f"blocked: {code}: {message}")
    return EXIT_BLOCKED


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from proxy.hashchain import ChainError

    from .run import RunConfigError, run_once

    profile = load_profile(args.profile, args.fixture, env)
    try:
        outcome = run_once(profile, env, args.runs_dir, backend=args.backend, progress=_progress,
                           sandbox=not args.no_sandbox)
    except RunConfigError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ChainError) as exc:  # e.g. an unwritable --runs-dir: nothing can be recorded
        raise UsageError(f"cannot record the run under {args.runs_dir}: {exc}") from None
    txt = outcome.run_dir / "report.txt"
    if txt.is_file():
        print(txt.read_text(encoding="utf-8").rstrip())
    print(f"status: {outcome.status}")
    print(f"report: {outcome.run_dir / 'report.json'}")
    return outcome.exit_code


def cmd_verify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from proxy.settings import ENV_ADMISSION_FILE, ENV_DECISION_FILE

    from .verify import verify_run

    if not args.run_dir.is_dir():
        raise UsageError(f"run directory {args.run_dir} does not exist")
    public_key = None
    if args.public_key is not None:
        from .attestation import AttestationError, load_public_key

        try:
            public_key = load_public_key(args.public_key)
        except AttestationError as exc:
            raise UsageError(str(exc)) from None
    result = verify_run(args.run_dir,
                        decision_path=args.decision_file or env_path(env, ENV_DECISION_FILE),
                        admission_path=args.admission_file or env_path(env, ENV_ADMISSION_FILE),
                        public_key=public_key)
    if result.ok:
        print(f"ok: {args.run_dir}: the report recomputes from the evidence, both hash chains hold and the "
              "attestation covers the run's files; "
              + ("its signature verifies with the given public key" if public_key is not None
                 else "signature not checked (no --public-key)"))
        return EXIT_PASS
    for problem in result.problems:
        print(f"problem: {problem}")
    return EXIT_FAIL


def load_report(run_dir: Path) -> Report:
    """The stored report of a run, validated against the report schema."""
    from .report import load_report as load

    path = run_dir / "report.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist (not a run directory, or the run did not finish)")
    try:
        return load(path)
    except ValueError as exc:
        raise UsageError(f"{path}: not a valid report: {exc}") from None


def cmd_report(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .report import render_html, render_text

    report = load_report(args.run_dir)
    print(render_text(report).rstrip())
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(report), encoding="utf-8")
        print(f"html: {args.html}")
    return EXIT_PASS


def cmd_schema(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .report import packaged_schema_text

    sys.stdout.write(packaged_schema_text())
    return EXIT_PASS


def cmd_demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .demo import run_demo
    from .run import RunConfigError

    try:
        return run_demo(args.runs_dir)
    except RunConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_keygen(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .attestation import ENV_SIGNING_KEY_FILE, AttestationError, generate_keypair, key_id, load_public_key

    try:
        private, public = generate_keypair(args.out)
    except AttestationError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write keys into {args.out}: {exc.strerror}") from None
    print(f"private key: {private} (mode 0600; give it to runs as {ENV_SIGNING_KEY_FILE}={private})")
    print(f"public key:  {public} (case-harness verify RUN_DIR --public-key {public})")
    print(f"key id:      {key_id(load_public_key(public))}")
    return EXIT_PASS


COMMANDS = {"preflight": cmd_preflight, "run": cmd_run, "verify": cmd_verify, "report": cmd_report,
            "schema": cmd_schema, "demo": cmd_demo, "keygen": cmd_keygen}


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ) if env is None else env
    try:
        return COMMANDS[args.command](args, env)
    except UsageError as exc:
        print(f"case-harness: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("case-harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
