"""The ``--help`` epilogs of ``case-proxy``: for each subcommand, the environment it
reads, its exit codes and one example, so an operator needs no other page to run it."""

from __future__ import annotations

from .settings import ENV_SETTINGS

_ENV_CORE = """\
  CTO_HARNESS_CASE_DECISION_FILE         the CTO-WORK-020 decision record (JSON)
  CTO_HARNESS_CASE_MODEL_ADMISSION_FILE  the admission JSON: admitted provider and model
  CTO_HARNESS_CASE_LOCAL_BASE_URL        the engine's base URL, e.g. http://127.0.0.1:8000/v1 (never logged)
  CTO_HARNESS_CASE_LOCAL_API_KEY[_FILE]  the engine's key, if it wants one (or a file holding it)
  CASE_PROXY_TOKEN[_FILE]                the bearer token clients must send, 16+ characters (or a file)
  CASE_PROXY_EVIDENCE_FILE               the hash-chained evidence log (JSONL)
  CASE_PROXY_CONFIG                      optional TOML file (config/proxy.example.toml); the variables win"""

# Every server setting's variable, beside the TOML key it overrides.
_ENV_SERVER = "\n".join(f"  {var:<38} [{section}].{key}" for (section, key), var in ENV_SETTINGS.items())

EPILOGS: dict[str, str] = {
    "serve": f"""\
environment:
{_ENV_CORE}
  CASE_PROXY_LOG_FORMAT                  text (default) or json; --log-format wins
  CASE_PROXY_ACCESS_LOG                  1/0: one access line per request (default 1); --no-access-log wins
  CASE_PROXY_LOG_LEVEL                   DEBUG, INFO (default), WARNING or ERROR; --log-level wins
  CASE_PROXY_EXTRA_SECRETS_FILE          more values to redact, one per line ([files].extra_secrets_file)
  CASE_PROXY_CHAIN_KEY_FD                an inherited descriptor holding a hex key: HMAC-keyed evidence chain
  CASE_PROXY_CHAIN_HEAD_FD               an inherited pipe the chain head is reported on (the harness's)
server settings (a flag wins over its variable, a variable over the TOML key):
{_ENV_SERVER}

exit codes:
  0  stopped cleanly (SIGTERM or SIGINT; open requests drained)
  1  a worker failed while serving (--workers N)
  2  configuration error, one line per problem (do not restart: fix it)
  3  a gate blocks: decision record, admission or upstream pin (do not restart)
  4  the evidence log at its path is torn (do not restart: see docs/evidence.md)

example:
  CASE_PROXY_TOKEN_FILE=/run/secrets/case-proxy-token case-proxy serve --port 8787 --log-format json
""",
    "check-config": f"""\
environment:
{_ENV_CORE}

exit codes:
  0  configuration valid and every gate holds (with --probe: the backend lists the admitted model)
  2  a problem or a failed gate, one line each (with --probe: backend_not_ready and why)

example:
  case-proxy check-config --probe
""",
    "verify-evidence": """\
environment:
  CASE_PROXY_CHAIN_KEY_FD   an inherited descriptor holding the run's hex key: the HMACs are checked too
                            (without it only the plain SHA-256 chain is, and the output says so)

exit codes:
  0  every chain intact (per file: the mode checked, records and last sha256)
  1  a chain is broken (each problem printed)
  2  a file does not exist, or the key cannot be read

example:
  case-proxy verify-evidence /var/lib/case-proxy/evidence.worker*.jsonl
""",
}

MAIN_EPILOG = """\
exit codes: 0 ok, 1 evidence chain broken or a worker failed, 2 configuration error,
3 a gate blocks. `case-proxy COMMAND --help` lists each command's environment.

example:
  case-proxy check-config --probe && case-proxy serve
"""
