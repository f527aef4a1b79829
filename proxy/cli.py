"""`case-proxy`: serve, check-config, verify-evidence.

Exit codes: 0 ok; 1 evidence chain broken (verify-evidence) or a worker failed (serve
with several workers); 2 usage or configuration error (check-config also for a failed
gate or, with --probe, a backend that does not list the admitted model); 3 serve refused
to start because a gate blocks (decision record, admission, upstream pin).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .evidence import verify_evidence
from .server import EXIT_CONFIG, check_static, probe_backend, run
from .settings import ConfigError, load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="case-proxy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the enforcement proxy")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8787; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes sharing the port via SO_REUSEPORT (default 1; one evidence chain each)")
    serve.add_argument("--unix", type=Path, default=None, metavar="PATH",
                       help="listen on this unix socket instead of a TCP port (its directory should be private)")
    serve.add_argument("--config", type=Path, default=None, help="TOML config file (see config/proxy.example.toml)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    check = sub.add_parser("check-config", help="validate configuration, artifacts and gates; exit 0 or 2")
    check.add_argument("--config", type=Path, default=None)
    check.add_argument("--probe", action="store_true",
                       help="also ask the backend (GET /v1/models, through the upstream pin) whether it serves "
                            "the admitted model")
    verify = sub.add_parser("verify-evidence", help="verify evidence logs' hash chains and schema "
                                                    "(several files: one chain per worker)")
    verify.add_argument("files", type=Path, nargs="+", metavar="file")
    return p


def _verify(files: list[Path]) -> int:
    """Each file is its own chain; exit 1 if any is broken, 2 if any is missing."""
    missing = [f for f in files if not f.is_file()]
    for f in missing:
        print(f"case-proxy: evidence file {f} does not exist", file=sys.stderr)
    if missing:
        return EXIT_CONFIG
    broken = False
    for f in files:
        verdict = verify_evidence(f)
        prefix = f"{f}: " if len(files) > 1 else ""
        if verdict.ok:
            print(f"{prefix}ok: {verdict.records} records, chain intact, last sha256 {verdict.last_sha256}")
            continue
        broken = True
        for problem in verdict.problems:
            print(f"{prefix}broken: {problem}")
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify-evidence":
        return _verify(args.files)
    try:
        settings = load_settings(config_file=args.config,
                                 host=getattr(args, "host", None), port=getattr(args, "port", None),
                                 workers=getattr(args, "workers", None),
                                 unix_socket=getattr(args, "unix", None))
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
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        from .workers import supervise

        return supervise(settings)
    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
