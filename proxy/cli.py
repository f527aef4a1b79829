"""`case-proxy`: serve, check-config, verify-evidence.

Exit codes: 0 ok; 1 evidence chain or rotation link broken (verify-evidence) or a worker
failed (serve with several workers); 2 usage or configuration error (check-config also
for a failed gate or, with --probe, a backend that does not list the admitted model); 3
serve refused to start because a gate blocks (decision record, admission, upstream pin);
4 serve refused to start because the evidence log at its path is torn (not an intact
chain): restarting cannot help, tell the service manager not to (systemd:
``RestartPreventExitStatus=4``); 5 verify-evidence: every chain intact, but a forwarded
request has no completion record (in flight, or the proxy crashed or was killed). A
service manager should not restart on 2, 3 or 4: nothing changes until an operator does.

Server settings come from flags, then the environment (``CASE_PROXY_HOST``,
``CASE_PROXY_PORT``, ``CASE_PROXY_WORKERS``, ``CASE_PROXY_LOG_LEVEL``, ... see
``proxy.settings.ENV_SETTINGS``), then the TOML file, then defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .build_info import version_line
from .cli_help import EPILOGS, MAIN_EPILOG
from .evidence_channel import read_key_fd
from .evidence_files import link_files, pair_forwarding, read_evidence_file, summary_line
from .hashchain import KEYED_MODE, ChainVerdict
from .log_setup import LOG_FORMATS, configure_logging
from .server import EXIT_CONFIG, check_static, probe_backend, run
from .settings import ENV_ACCESS_LOG, ENV_CHAIN_KEY_FD, ENV_LOG_FORMAT, ConfigError, load_settings

EXIT_BROKEN = 1
EXIT_UNPAIRED = 5

ENV_LOG_LEVEL = "CASE_PROXY_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"


def log_level(flag: str | None, env: Mapping[str, str]) -> str:
    """The flag, else ``CASE_PROXY_LOG_LEVEL`` (any case), else INFO; ConfigError for a
    level the variable names that does not exist."""
    if flag is not None:
        return flag
    raw = (env.get(ENV_LOG_LEVEL) or "").strip()
    if not raw:
        return DEFAULT_LOG_LEVEL
    if raw.upper() not in LOG_LEVELS:
        raise ConfigError([f"{ENV_LOG_LEVEL}: unknown level {raw!r}; one of {', '.join(LOG_LEVELS)}"])
    return raw.upper()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="case-proxy", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=version_line("case-proxy"))
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the enforcement proxy")
    serve.add_argument("--host", default=None, help="bind address ($CASE_PROXY_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None,
                       help="port ($CASE_PROXY_PORT; default 8787; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes sharing the port via SO_REUSEPORT ($CASE_PROXY_WORKERS; default 1; "
                            "one evidence chain each)")
    serve.add_argument("--unix", type=Path, default=None, metavar="PATH",
                       help="listen on this unix socket instead of a TCP port (its directory should be private)")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML config file ($CASE_PROXY_CONFIG; see config/proxy.example.toml)")
    serve.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                       help=f"($CASE_PROXY_LOG_LEVEL; default {DEFAULT_LOG_LEVEL})")
    serve.add_argument("--log-format", default=None, choices=list(LOG_FORMATS),
                       help=f"log lines on stderr as text or JSON (default: ${ENV_LOG_FORMAT}, else [log].format, "
                            "else text)")
    serve.add_argument("--no-access-log", dest="access_log", action="store_const", const=False, default=None,
                       help=f"no access line per request (also ${ENV_ACCESS_LOG}=0 or [log].access_log = false)")
    check = sub.add_parser("check-config", help="validate configuration, artifacts and gates; exit 0 or 2")
    check.add_argument("--config", type=Path, default=None)
    check.add_argument("--probe", action="store_true",
                       help="also ask the backend (GET /v1/models, through the upstream pin) whether it serves "
                            "the admitted model")
    verify = sub.add_parser("verify-evidence", help="verify evidence logs' hash chains and schema, the links "
                                                    "between rotated files and the forwarding/completion pairs "
                                                    "(several files: rotated logs, one chain per worker)")
    verify.add_argument("files", type=Path, nargs="+", metavar="file")
    add_epilogs(p, sub)
    return p


def add_epilogs(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Each command's --help ends with the environment it reads, its exit codes and an example."""
    parser.epilog, parser.formatter_class = MAIN_EPILOG, argparse.RawDescriptionHelpFormatter
    for name, command in sub.choices.items():
        command.epilog, command.formatter_class = EPILOGS.get(name), argparse.RawDescriptionHelpFormatter


def mode_note(verdict: ChainVerdict) -> str:
    """Which chain was checked, said plainly (a keyed log read without its key proves
    only that it is consistent, not who wrote it)."""
    if verdict.mode == KEYED_MODE:
        return "mode hmac-sha256: MACs checked under the given key"
    if verdict.hmac_lines:
        return (f"mode sha256 only: {verdict.hmac_lines} lines carry HMACs that were NOT checked "
                f"(no key; {ENV_CHAIN_KEY_FD} gives one)")
    return "mode sha256: a plain chain (consistent, not proof of who wrote it)"


def _verify(files: list[Path], env: Mapping[str, str] | None = None) -> int:
    """Each file is its own chain; files a rotation joined are followed across (in any
    order given). Exit 1 if a chain or a link is broken, 2 if a file is missing or the
    key cannot be read, 5 if all is intact but a forwarded request has no completion
    record. With ``CASE_PROXY_CHAIN_KEY_FD`` the MACs are checked too."""
    env = os.environ if env is None else env
    key = None
    raw_fd = (env.get(ENV_CHAIN_KEY_FD) or "").strip()
    if raw_fd:
        try:
            key = read_key_fd(int(raw_fd)) if raw_fd.isdigit() else None
        except ValueError as exc:
            print(f"case-proxy: {ENV_CHAIN_KEY_FD}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if key is None:
            print(f"case-proxy: {ENV_CHAIN_KEY_FD}: {raw_fd!r} is not a file descriptor number", file=sys.stderr)
            return EXIT_CONFIG
    missing = [f for f in files if not f.is_file()]
    for f in missing:
        print(f"case-proxy: evidence file {f} does not exist", file=sys.stderr)
    if missing:
        return EXIT_CONFIG
    read = [read_evidence_file(f, key) for f in files]
    broken = False
    for ef in read:
        verdict = ef.verdict
        prefix = f"{ef.path}: " if len(files) > 1 else ""
        print(f"{prefix}{mode_note(verdict)}")
        if verdict.ok:
            print(f"{prefix}ok: {verdict.records} records, chain intact, last sha256 {verdict.last_sha256}")
            continue
        broken = True
        for problem in verdict.problems:
            print(f"{prefix}broken: {problem}")
    links = link_files(read)
    for chain in links.order:
        if len(chain) > 1:
            print("linked: " + " -> ".join(chain))
    for note in links.notes:
        print(f"note: {note}")
    for problem in links.problems:
        broken = True
        print(f"broken: {problem}")
    unpaired, pair_problems = pair_forwarding(read)
    for problem in pair_problems:
        broken = True
        print(f"broken: {problem}")
    for u in unpaired:
        print(f"unpaired: {summary_line(u)}")
    if broken:
        return EXIT_BROKEN
    return EXIT_UNPAIRED if unpaired else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify-evidence":
        return _verify(args.files)
    try:
        settings = load_settings(config_file=args.config,
                                 host=getattr(args, "host", None), port=getattr(args, "port", None),
                                 workers=getattr(args, "workers", None),
                                 log_format=getattr(args, "log_format", None),
                                 access_log=getattr(args, "access_log", None),
                                 unix_socket=getattr(args, "unix", None))
        level = log_level(getattr(args, "log_level", None), os.environ)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"case-proxy: {line}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        problems, gates = check_static(settings)
        for line in problems + gates:
            print(f"case-proxy: {line}", file=sys.stderr)
        if problems or gates:
            return EXIT_CONFIG
        if args.probe:
            state = asyncio.run(probe_backend(settings))
            if not state.ready:
                print(f"case-proxy: backend_not_ready: {state.reason}", file=sys.stderr)
                return EXIT_CONFIG
            print("ok: configuration valid, every gate holds, and the backend lists the admitted model")
            return 0
        print("ok: configuration valid and every gate holds")
        return 0
    configure_logging(level, settings.log_format)
    if settings.workers > 1:
        from .workers import supervise

        return supervise(settings)
    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
