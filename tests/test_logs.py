"""The proxy's log: JSON lines for shippers, one access line per request, no secrets.

The proxy runs in front of the scripted backend (harness.scripted_backend, a test
fixture, not a model).
"""

from __future__ import annotations

import io
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import Draft
from proxy.log_setup import ACCESS_FIELDS, access_fields, access_message, configure_logging, log_access, parse_bool
from proxy.redact import Redactor, install_log_redaction
from proxy.request_policy import Endpoint
from proxy.settings import ConfigError, load_settings
from tests.proxy_support import ADMITTED, ProxyProcess, proxy_env, write_artifacts


def _draft(**kw: Any) -> Draft:
    d = Draft(request_id="abc123", started=0.0, method="POST", path="/v1/chat/completions", own_id=True)
    d.endpoint, d.decision, d.reason, d.status = Endpoint.CHAT, "refused", "model_not_admitted", 403
    d.family = "anthropic"
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def test_access_fields_and_text_form() -> None:
    fields = access_fields(_draft(), 0.0123456)
    assert list(fields) == list(ACCESS_FIELDS)
    assert fields["duration_ms"] == 12.346 and fields["status"] == 403 and fields["endpoint"] == "chat_completions"
    text = access_message(fields)
    assert text == ("access request_id=abc123 method=POST path=/v1/chat/completions endpoint=chat_completions "
                    "decision=refused reason=model_not_admitted family=anthropic status=403 duration_ms=12.346 "
                    "stream=False")
    assert "family=" not in access_message(access_fields(_draft(family=None), 0.001))


@pytest.fixture
def json_log() -> Any:
    """The root logger writing JSON into a buffer, as ``serve --log-format json`` sets it up;
    the previous handlers are restored afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    buf = io.StringIO()
    handler = configure_logging("INFO", "json", stream=buf)
    yield buf, handler
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved:
        root.addHandler(h)
    root.setLevel(level)


def test_a_secret_in_an_access_field_is_redacted_in_json(json_log: Any) -> None:
    """Hostile client: puts a registered secret (the backend key, which it must never
    learn back) into the path and the request id. The JSON formatter writes extra fields
    as they are; the redaction filter in front of it must clean them."""
    buf, _ = json_log
    secret = "bk-" + secrets.token_hex(16)
    root = logging.getLogger()
    filt = install_log_redaction(Redactor([secret]))
    try:
        log_access(_draft(path=f"/v1/{secret}", request_id=secret, reason="unknown_url", status=404), 0.002)
    finally:
        root.removeFilter(filt)
        for h in root.handlers:
            h.removeFilter(filt)
    line = buf.getvalue().strip()
    assert secret not in line
    rec = json.loads(line)
    assert rec["logger"] == "case_proxy.access" and rec["level"] == "INFO"
    assert rec["path"] == "/v1/[REDACTED]" and rec["request_id"] == "[REDACTED]"
    assert rec["status"] == 404 and rec["reason"] == "unknown_url"
    assert rec["message"].startswith("access ") and secret not in rec["message"]


def test_a_secret_in_a_field_the_message_does_not_hold_is_redacted(json_log: Any) -> None:
    """Hostile: a record whose ``extra`` field holds a secret that its message does not
    (or holds only escaped: a quote makes the access line's text form differ). The filter
    skips the fields' own check only when each stands verbatim in a clean message; these
    must still be checked and cleaned."""
    buf, _ = json_log
    secret = "bk-" + secrets.token_hex(16)
    root = logging.getLogger()
    filt = install_log_redaction(Redactor([secret]))
    try:
        logging.getLogger("case_proxy.access").info("access clean message", extra={"path": f"/v1/{secret}"})
        log_access(_draft(path=f'/v1/"{secret}', reason="unknown_url", status=404), 0.002)
    finally:
        root.removeFilter(filt)
        for h in root.handlers:
            h.removeFilter(filt)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 2 and secret not in buf.getvalue()
    assert json.loads(lines[0])["path"] == "/v1/[REDACTED]"
    assert json.loads(lines[1])["path"] == '/v1/"[REDACTED]'


def test_json_line_holds_time_level_logger_message(json_log: Any) -> None:
    buf, _ = json_log
    logging.getLogger("case_proxy").warning("something %s", "happened")
    rec = json.loads(buf.getvalue().strip())
    assert rec["message"] == "something happened" and rec["level"] == "WARNING" and rec["logger"] == "case_proxy"
    assert rec["time"][:4].isdigit() and "T" in rec["time"] and rec["time"].endswith("+00:00")  # RFC 3339, UTC


def test_parse_bool_names_the_variable() -> None:
    assert parse_bool(" Off ", "X") is False and parse_bool("1", "X") is True
    with pytest.raises(ValueError, match="CASE_PROXY_ACCESS_LOG: 'sometimes' is not a yes/no value"):
        parse_bool("sometimes", "CASE_PROXY_ACCESS_LOG")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    d, a = write_artifacts(tmp_path)
    return {"CTO_HARNESS_CASE_DECISION_FILE": str(d), "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a),
            "CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:9/v1", "CASE_PROXY_TOKEN": "t" * 20,
            "CASE_PROXY_EVIDENCE_FILE": str(tmp_path / "e.jsonl"), **extra}


def test_log_settings_precedence_and_errors(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[log]\nformat = "json"\naccess_log = false\n')
    s = load_settings(env=_env(tmp_path))
    assert (s.log_format, s.access_log) == ("text", True)  # defaults
    s = load_settings(env=_env(tmp_path), config_file=toml)
    assert (s.log_format, s.access_log) == ("json", False)
    s = load_settings(env=_env(tmp_path, CASE_PROXY_LOG_FORMAT="text", CASE_PROXY_ACCESS_LOG="yes"), config_file=toml)
    assert (s.log_format, s.access_log) == ("text", True)  # the environment wins over the file
    s = load_settings(env=_env(tmp_path, CASE_PROXY_LOG_FORMAT="text"), log_format="json", access_log=False)
    assert (s.log_format, s.access_log) == ("json", False)  # the command line wins over both
    with pytest.raises(ConfigError) as exc:
        load_settings(env=_env(tmp_path, CASE_PROXY_LOG_FORMAT="xml", CASE_PROXY_ACCESS_LOG="maybe"))
    assert any("CASE_PROXY_LOG_FORMAT: 'xml' is not a log format" in p for p in exc.value.problems)
    assert any("CASE_PROXY_ACCESS_LOG: 'maybe'" in p for p in exc.value.problems)
    toml.write_text('[log]\nformat = "yaml"\nrotate = true\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(env=_env(tmp_path), config_file=toml)
    assert any("[log].format: 'yaml'" in p for p in exc.value.problems)
    assert any("unknown key 'log.rotate'" in p for p in exc.value.problems)


async def _traffic(base_url: str, token: str, secret: str) -> None:
    root = base_url.removesuffix("/v1")
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(base_url + "/chat/completions", headers={**auth, "X-Request-Id": "req-admitted-1"},
                          json={"model": ADMITTED, "messages": [{"role": "user", "content": f"body {secret}"}]}) as r:
            assert r.status == 200
        async with s.post(base_url + "/chat/completions", headers={**auth, "X-Request-Id": "req-refused-1"},
                          json={"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 403
        async with s.get(base_url + f"/{secret}", headers={**auth, "X-Request-Id": "req-secret-path"}) as r:
            assert r.status == 404
        async with s.get(root + "/healthz") as r:
            assert r.status == 200


async def test_serve_json_log_has_one_access_line_per_request_and_no_secret(scripted_backend: Any,
                                                                           tmp_path: Path) -> None:
    """The real ``serve --log-format json``: every stderr line parses as JSON; each proxied
    request has one access line with its fields; probes have none; the backend key, sent
    by a hostile client in a path and a body, and the token appear nowhere."""
    secret = "bk-" + secrets.token_hex(16)
    env = proxy_env(tmp_path, scripted_backend.base_url, CTO_HARNESS_CASE_LOCAL_API_KEY=secret)
    proc = ProxyProcess(env, tmp_path / "proxy.log", "--log-format", "json")
    await proc.start()
    try:
        await _traffic(proc.base_url, env["CASE_PROXY_TOKEN"], secret)
    finally:
        assert proc.stop() == 0
    text = (tmp_path / "proxy.log").read_text()
    assert secret not in text and env["CASE_PROXY_TOKEN"] not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    # The record id is the proxy's own; the client's X-Request-Id stands beside it.
    access = {rec["client_request_id"]: rec for rec in lines if rec["logger"] == "case_proxy.access"}
    assert set(access) == {"req-admitted-1", "req-refused-1", "req-secret-path"}, access
    ok, refused, unknown = access["req-admitted-1"], access["req-refused-1"], access["req-secret-path"]
    assert (ok["endpoint"], ok["decision"], ok["reason"], ok["status"]) == ("chat_completions", "admitted", "ok", 200)
    assert ok["duration_ms"] > 0 and ok["method"] == "POST"
    assert (refused["decision"], refused["reason"], refused["family"], refused["status"]) == \
        ("refused", "model_not_admitted", "anthropic", 403)
    assert (unknown["reason"], unknown["status"], unknown["path"]) == ("unknown_url", 404, "/v1/[REDACTED]")
    assert "body" not in json.dumps(ok) and "messages" not in json.dumps(ok)


async def test_access_log_can_be_turned_off(scripted_backend: Any, tmp_path: Path) -> None:
    env = proxy_env(tmp_path, scripted_backend.base_url, CASE_PROXY_ACCESS_LOG="0")
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    try:
        await _traffic(proc.base_url, env["CASE_PROXY_TOKEN"], "s" * 20)
    finally:
        assert proc.stop() == 0
    text = (tmp_path / "proxy.log").read_text()
    assert "case_proxy.access" not in text and "listening on" in text  # the rest of the log stays


def test_text_value_quotes_what_could_forge_a_line_or_a_field() -> None:
    assert access_message({"path": "/v1/chat/completions", "status": 200}) == \
        "access path=/v1/chat/completions status=200"
    forged = access_message({"path": "/v1/a\n2026-01-01 00:00:00,000 INFO x: access status=200", "status": 404})
    assert "\n" not in forged and forged.startswith('access path="/v1/a\\n2026-01-01')
    assert access_message({"path": "/v1/x status=200", "status": 404}) == 'access path="/v1/x status=200" status=404'


async def test_a_hostile_path_cannot_forge_text_log_lines(scripted_backend: Any, tmp_path: Path) -> None:
    """Hostile client: the proxy logs the URL-decoded path, so it sends %0A (a new line
    that looks like an access line of an admitted request) and %20 (a forged field).
    Each request must stay one line of its own, with the path quoted."""
    from yarl import URL

    env = proxy_env(tmp_path, scripted_backend.base_url)
    proc = ProxyProcess(env, tmp_path / "proxy.log")
    await proc.start()
    fake = "2026-01-01 00:00:00,000 INFO case_proxy.access: access request_id=forged decision=admitted status=200"
    try:
        async with aiohttp.ClientSession() as s:
            auth = {"Authorization": f"Bearer {env['CASE_PROXY_TOKEN']}"}
            for rid, raw in (("hostile-newline", "/v1/a%0A" + fake.replace(" ", "%20").replace("=", "%3D")),
                             ("hostile-space", "/v1/x%20status%3D200%20decision%3Dadmitted"),
                             ("hostile-refused", "/v1/messages/a%0A" + fake.replace(" ", "%20").replace("=", "%3D"))):
                url = URL(proc.base_url.removesuffix("/v1") + raw, encoded=True)
                async with s.get(url, headers={**auth, "X-Request-Id": rid}) as r:
                    assert r.status == (403 if rid == "hostile-refused" else 404)  # refused: also a warning line
    finally:
        assert proc.stop() == 0
    lines = (tmp_path / "proxy.log").read_text().splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01") or "request_id=forged" in line.split('"')[0]]
    newline = [line for line in lines if " client_request_id=hostile-newline " in line]
    space = [line for line in lines if " client_request_id=hostile-space " in line]
    assert len(newline) == 1 and 'path="/v1/a\\n2026-01-01' in newline[0] and "status=404" in newline[0]
    assert len(space) == 1 and 'path="/v1/x status=200 decision=admitted"' in space[0]
    assert "decision=rejected" in space[0] and "decision=admitted status" not in space[0].split('"')[2]


def test_the_text_formatter_writes_the_same_time_as_loggings_own() -> None:
    """The per-second cache of the date part must not change a digit: records just
    before, on and after second boundaries, out of order, and a datefmt of its own."""
    from proxy.log_setup import TEXT_FORMAT, TextFormatter

    ours, theirs = TextFormatter(TEXT_FORMAT), logging.Formatter(TEXT_FORMAT)
    record = logging.LogRecord("case_proxy.access", logging.INFO, __file__, 1, "access x", None, None)
    for created in (1767225599.9996, 1767225600.0, 1767225600.0004, 1767225600.999, 1767225601.5, 1767225599.25,
                    1767225661.001):
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == theirs.format(record)
        assert ours.formatTime(record, "%H:%M") == theirs.formatTime(record, "%H:%M")


def test_the_access_line_follows_the_level_and_says_where_it_came_from(json_log: Any) -> None:
    """log_access makes its record itself (no stack walk): the level still decides
    whether it is written, and the record still names its logger and function."""
    buf, _ = json_log
    root = logging.getLogger()
    root.setLevel("WARNING")
    log_access(_draft(), 0.001)
    assert buf.getvalue() == ""
    root.setLevel("INFO")
    seen: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = seen.append  # type: ignore[method-assign]
    root.addHandler(catcher)
    try:
        log_access(_draft(), 0.001)
    finally:
        root.removeHandler(catcher)
    assert json.loads(buf.getvalue())["message"].startswith("access request_id=abc123 ")
    assert seen[0].name == "case_proxy.access" and seen[0].funcName == "log_access"
    assert seen[0].pathname.endswith("log_setup.py") and seen[0].levelno == logging.INFO
