"""The ``--help`` epilogs of ``case-harness``: for each subcommand, the environment it
reads, its exit codes and one example."""

from __future__ import annotations

_ENV_RUN = """\
  CTO_HARNESS_CASE_DECISION_FILE         the CTO-WORK-020 decision record (JSON)
  CTO_HARNESS_CASE_MODEL_ADMISSION_FILE  the admission JSON: admitted provider and model
  CTO_HARNESS_CASE_LOCAL_BASE_URL        the engine's base URL (--backend external); never recorded
  CTO_HARNESS_CASE_LOCAL_API_KEY[_FILE]  the engine's key, if it wants one
  CASE_HARNESS_PROFILE                   the run profile TOML when --profile is not given
  CASE_PROXY_CONFIG                      the proxy's TOML file ([upstream].allow_hosts, limits)
  ANTHROPIC_API_KEY, CLAUDE_*, OPENAI_BASE_URL, ...  read only to block: an external provider's
                                         credential or endpoint here is the gate external_fallback_configured"""

EPILOGS: dict[str, str] = {
    "preflight": f"""\
environment:
{_ENV_RUN}

exit codes:
  0  every gate holds
  2  usage or configuration error (a profile that does not exist or does not validate)
  3  a gate blocks (each printed as "blocked: CODE: message"; see docs/troubleshooting.md)

example:
  case-harness preflight --profile config/case-profile.example.toml
""",
    "run": f"""\
environment:
{_ENV_RUN}
  CASE_HARNESS_EXTRA_SECRETS_FILE        more values for the secret scan, one per line
  CASE_HARNESS_SIGNING_KEY_FILE          Ed25519 private key (from keygen) that signs attestation.dsse.json;
                                         unset: the attestation is written unsigned and the report says so

exit codes:
  0  pass
  1  fail (report.txt lists every reason)
  2  usage or configuration error (nothing was run)
  3  blocked: a gate failed and Case never started

example:
  case-harness run --profile my-case-profile.toml --fixture r2-bugfix-pagination
""",
    "verify": """\
environment:
  CTO_HARNESS_CASE_DECISION_FILE         default for --decision-file (checked unchanged since the run)
  CTO_HARNESS_CASE_MODEL_ADMISSION_FILE  default for --admission-file

exit codes:
  0  the report recomputes from the run's evidence, both hash chains hold and attestation.dsse.json
     covers the run's files (and, with --public-key, is signed by that key)
  1  problems found (each printed)
  2  usage error (the run directory does not exist, the public key is not an Ed25519 PEM key)

example:
  case-harness verify harness-runs/20261128T071746Z-r1-string-slugify-282994 --public-key keys/signing-key.pub.pem
""",
    "report": """\
environment: none read.

exit codes:
  0  report printed (and the HTML page written with --html)
  2  no valid report.json in the run directory

example:
  case-harness report harness-runs/20261128T071746Z-r1-string-slugify-282994 --html report.html
""",
    "schema": """\
environment: none read.

exit codes:
  0  the schema was printed

example:
  case-harness schema
""",
    "keygen": """\
environment: none read.

exit codes:
  0  signing-key.pem (mode 0600) and signing-key.pub.pem written
  2  usage error (a key file already exists there, the directory cannot be written)

example:
  case-harness keygen --out ~/.config/case-harness/keys
  CASE_HARNESS_SIGNING_KEY_FILE=~/.config/case-harness/keys/signing-key.pem case-harness run
""",
    "demo": """\
environment: none of the CTO_HARNESS_* variables; every run gets a fresh environment
  (PATH, locale, HOME, TMPDIR and demo copies of the artifacts), so your own
  ANTHROPIC_API_KEY or CTO_HARNESS_* cannot change what the demo shows. Only
  CASE_HARNESS_SIGNING_KEY_FILE is passed on: the sandboxed runs sign their attestation
  with it and the pass run's signature is verified.

exit codes:
  0  everything came out as expected (the pass run passed, each negative gate blocked, verify ok)
  1  something did not

example:
  case-harness demo --runs-dir /tmp/harness-runs
""",
}

MAIN_EPILOG = """\
exit codes: 0 pass, 1 fail, 2 usage or configuration error, 3 blocked.
`case-harness COMMAND --help` lists each command's environment.

example:
  case-harness demo
"""
