"""One log record is one line: a hostile client cannot forge log lines with control
characters (a percent-decoded %0A in a path). The proxy runs as operators run it, a
subprocess whose stderr is the log; the backend is the scripted TEST FIXTURE."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp

from proxy.redact import RedactingFilter, Redactor, escape_controls
from tests.proxy_support import ProxyProcess, proxy_env

FORGED = "2026-11-28 07:00:00,000 ERROR case_proxy: FORGED evidence chain broken"


def test_escape_controls_covers_c0_c1_and_unicode_separators() -> None:
    assert escape_controls("a\nb\r\tc\x1b\x7f\x85\u2028\u2029é") == (
        "a\\x0ab\\x0d\\x09c\\x1b\\x7f\\x85\\u2028\\u2029é")


def test_the_filter_escapes_the_message_and_keeps_traceback_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("case_proxy", logging.WARNING, __file__, 1, "path %s", ("/x\n" + FORGED,),
                                   sys.exc_info())
    RedactingFilter(Redactor([])).filter(record)
    assert "\n" not in record.getMessage() and "\\x0a" + FORGED in record.getMessage()
    assert record.exc_text is not None and "\n" in record.exc_text


async def test_a_newline_in_a_path_does_not_forge_a_log_line(scripted_backend, tmp_path: Path) -> None:
    env = proxy_env(tmp_path, scripted_backend.base_url)
    log_path = tmp_path / "proxy.log"
    proc = ProxyProcess(env, log_path)
    await proc.start()
    try:
        forged_path = "/v1/messages/%0A" + FORGED.replace(" ", "%20") + "%E2%80%A8x"
        root = proc.base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as s:
            async with s.post(root + forged_path, json={"model": "m"},
                              headers={"Authorization": f"Bearer {env['CASE_PROXY_TOKEN']}"}) as r:
                assert r.status == 403  # an Anthropic-format path: a refused, logged fallback attempt
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
    lines = log_path.read_text().splitlines()
    # The refusal's warning line (its access line is checked in tests/test_logs.py): the
    # path is quoted there, so the newline stands as an escape inside one line.
    refused = [line for line in lines if "WARNING" in line and "external_provider_endpoint" in line]
    assert len(refused) == 1 and "\\n" + FORGED in refused[0] and "\\u2028" in refused[0]
    assert not any(line.startswith(FORGED) for line in lines)
