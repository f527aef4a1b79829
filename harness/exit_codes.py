"""The harness's exit codes, one set for the CLI and for a run: 0 pass (or ok), 1 fail,
2 usage or configuration error, 3 blocked by a gate before Case started, 4 unproven
(everything held, but Case ran without the sandbox, ``--no-sandbox``: never a pass)."""

from __future__ import annotations

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2
EXIT_BLOCKED = 3
EXIT_UNPROVEN = 4
STATUS_EXIT = {"pass": EXIT_PASS, "fail": EXIT_FAIL, "blocked": EXIT_BLOCKED, "unproven": EXIT_UNPROVEN}
