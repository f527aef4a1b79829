"""`python -m bench.log_micro`: microseconds per access line and per redaction pre-check.

CPU only, no sockets: one admitted chat request's access line (proxy.log_setup.log_access)
goes through the proxy's own logging set-up (configure_logging, the redaction filter with
three registered secrets) to /dev/null, in text and JSON form; the pieces are timed
alone too. Time is this thread's CPU time (a shared machine's preemption is not counted), the best of
many short repeats. The access line is on by
default (at INFO), though ``make bench`` runs its proxies at WARNING, where it is off:
this is where its cost is measured. The numbers in docs/performance.md come from here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

from proxy.app import Draft
from proxy.log_setup import access_fields, access_message, configure_logging, log_access
from proxy.redact import Redactor, install_log_redaction
from proxy.request_policy import Endpoint

MODEL = "qwen3.6-35b-a3b"
# Stand-ins of the three secrets a proxy registers (its token, the backend URL and key).
SECRETS = ("tok-" + "a" * 32, "http://127.0.0.1:8000/v1", "sk-backend-0123456789abcdef")


def draft() -> Draft:
    return Draft(request_id="0123456789abcdef0123456789abcdef", started=time.perf_counter(), method="POST",
                 path="/v1/chat/completions", own_id=True, endpoint=Endpoint.CHAT, requested_model=MODEL,
                 effective_model=MODEL, decision="admitted", reason="ok", family="qwen", status=200,
                 served_model=MODEL, outcome="admitted", forwarded=True)


def best_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, time.thread_time() - t0)
    return best / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.log_micro", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=60, help="timed repeats per figure; the best is kept (default 60)")
    args = p.parse_args(argv)
    if not 1 <= args.repeats <= 1000:
        p.error("--repeats must be between 1 and 1000")
    redactor = Redactor(SECRETS)
    redactor.vet_clean([MODEL, "/v1/chat/completions"])
    d = draft()
    print(f"Python {sys.version.split()[0]}; {len(SECRETS)} registered secrets")
    root = logging.getLogger()
    saved = (list(root.handlers), list(root.filters), root.level)
    with open(os.devnull, "w") as sink:
        try:
            for fmt in ("text", "json"):
                configure_logging("INFO", fmt, stream=sink)
                install_log_redaction(redactor)
                us = best_us(lambda: log_access(d, 0.000321), 200, args.repeats)
                print(f"access line, {fmt}, with the redaction filter: {us:.2f} us")
                for f in list(root.filters):
                    root.removeFilter(f)
        finally:
            root.handlers[:] = saved[0]
            root.filters[:] = saved[1]
            root.setLevel(saved[2])
    message = access_message(access_fields(d, 0.000321))
    print(f"  access_message: {best_us(lambda: access_message(access_fields(d, 0.000321)), 200, args.repeats):.2f} us")
    print(f"  may_match(access message, {len(message)} chars): "
          f"{best_us(lambda: redactor.may_match(message), 500, args.repeats):.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
