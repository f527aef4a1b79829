"""Redaction before truncation, and the operator's extra secrets, in the proxy.

A hostile client pads a value so that a cut at N characters splits the proxy token: cut
first, redact after, and no form of the token matches any more, so most of it would be
written to the evidence. These tests send such values through the official ``openai``
SDK (the scripted backend behind the proxy is a test fixture) and look for any
16-character run of the secret in the evidence file.
"""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from proxy.redact import Redactor, clip
from proxy.settings import ConfigError, load_settings
from tests.proxy_support import ProxyUnderTest, make_proxy, proxy, write_artifacts  # noqa: F401

MSG = [{"role": "user", "content": "hi"}]
RUN = 16


def runs_of(secret: str, text: str) -> list[str]:
    """Every ``RUN``-character piece of ``secret`` that occurs in ``text``."""
    return [secret[i:i + RUN] for i in range(len(secret) - RUN + 1) if secret[i:i + RUN] in text]


def test_clip_redacts_before_it_cuts() -> None:
    secret = "cpt-" + "0123456789abcdef" * 2
    red = Redactor([secret])
    padded = "x" * 190 + secret
    assert runs_of(secret, red.clip(padded, 200)) == []
    assert red.clip(padded, 200).startswith("x" * 190 + "[REDA")
    assert red.clip("short", 200) == "short"


def test_a_vetted_value_skips_the_scan_but_not_the_cut() -> None:
    # clip answers a vetted value (the admitted model, a route) without the pre-check;
    # it must still cut one longer than the limit, and must not let a secret added
    # after the vetting through.
    secret = "cpt-" + "0123456789abcdef" * 2
    red = Redactor([secret])
    red.vet_clean(["qwen3.6-35b-a3b", "y" * 50])
    assert red.clip("qwen3.6-35b-a3b", 200) == "qwen3.6-35b-a3b"
    assert red.clip("y" * 50, 10) == "y" * 10
    red.add_secret("qwen3.6-35b")
    assert "qwen3.6-35b" not in red.clip("qwen3.6-35b-a3b", 200)


def test_clip_without_a_redactor_drops_a_long_value_whole() -> None:
    assert clip("abc", 3) == "abc"
    assert clip("x" * 190 + "secretsecretsecret", 200) == "[208 characters, too long to record]"


@pytest.mark.parametrize("pad", [150, 170, 180, 190, 199])
async def test_padded_model_leaves_no_run_of_the_token_in_the_evidence(proxy: ProxyUnderTest, pad: int) -> None:
    """Hostile client: ``model`` = padding + the proxy token, the padding chosen so a cut
    at 200 falls inside the token."""
    with pytest.raises(openai.PermissionDeniedError):
        await proxy.client().chat.completions.create(model="m" * pad + proxy.token, messages=MSG)
    text = proxy.evidence_path.read_text()
    assert proxy.requests_evidence()[-1]["reason"] == "model_not_admitted"
    assert runs_of(proxy.token, text) == []


async def test_padded_model_path_leaves_no_run_of_the_token(proxy: ProxyUnderTest) -> None:
    """The same through ``GET /v1/models/{id}`` (the id lands in the record and the path)."""
    with pytest.raises(openai.NotFoundError) as info:
        await proxy.client().models.retrieve("p" * 170 + proxy.token)
    assert runs_of(proxy.token, proxy.evidence_path.read_text()) == []
    assert runs_of(proxy.token, str(info.value)) == []


async def test_padded_unknown_path_leaves_no_run_of_the_token(proxy: ProxyUnderTest) -> None:
    """An unknown endpoint's path goes into the record and the error message."""
    with pytest.raises(openai.NotFoundError) as info:
        await proxy.client().get("/" + "q" * 180 + proxy.token, cast_to=object)
    assert runs_of(proxy.token, proxy.evidence_path.read_text()) == []
    assert runs_of(proxy.token, str(info.value.body)) == []


async def test_padded_field_name_leaves_no_run_of_the_token(proxy: ProxyUnderTest) -> None:
    """An unknown body field's name is shown in the refusal, bounded to 64 characters."""
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.create(model="qwen3.6-35b-a3b", messages=MSG,
                                                     extra_body={"f" * 40 + proxy.token: 1})
    assert runs_of(proxy.token, str(info.value.body)) == []
    assert runs_of(proxy.token, proxy.evidence_path.read_text()) == []


# --- the operator's extra secrets ---

def _settings_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    d, a = write_artifacts(tmp_path)
    return {"CTO_HARNESS_CASE_DECISION_FILE": str(d), "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a),
            "CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:9/v1", "CASE_PROXY_TOKEN": "t" * 20,
            "CASE_PROXY_EVIDENCE_FILE": str(tmp_path / "e.jsonl"), **extra}


def test_extra_secrets_file_is_loaded_one_per_line(tmp_path: Path) -> None:
    listed = tmp_path / "extra"
    listed.write_text("operator-secret-one-0001\n\n  operator-secret-two-0002  \n")
    s = load_settings(env=_settings_env(tmp_path, CASE_PROXY_EXTRA_SECRETS_FILE=str(listed)))
    assert {"operator-secret-one-0001", "operator-secret-two-0002"} <= set(s.secret_values())


def test_extra_secrets_file_from_toml(tmp_path: Path) -> None:
    listed = tmp_path / "extra"
    listed.write_text("operator-secret-toml-0003\n")
    toml = tmp_path / "p.toml"
    toml.write_text(f'[files]\nextra_secrets_file = "{listed}"\n')
    s = load_settings(env=_settings_env(tmp_path), config_file=toml)
    assert "operator-secret-toml-0003" in s.secret_values()


def test_unreadable_extra_secrets_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=_settings_env(tmp_path, CASE_PROXY_EXTRA_SECRETS_FILE=str(tmp_path / "missing")))
    assert any("CASE_PROXY_EXTRA_SECRETS_FILE: cannot read" in p for p in info.value.problems)


async def test_proxy_redacts_the_operators_extra_secret(make_proxy, tmp_path: Path) -> None:  # noqa: F811
    """Hostile client: puts a value the operator listed (not the token) in ``model``."""
    secret = "operator-listed-credential-7f3a9c"
    listed = tmp_path / "extra-secrets"
    listed.write_text(secret + "\n")
    put = await make_proxy(env={"CASE_PROXY_EXTRA_SECRETS_FILE": str(listed)})
    with pytest.raises(openai.PermissionDeniedError):
        await put.client().chat.completions.create(model=secret, messages=MSG)
    text = put.evidence_path.read_text()
    assert put.requests_evidence()[-1]["requested_model"] == "[REDACTED]"
    assert runs_of(secret, text) == []


# --- the harness: Case's output kept up to a limit ---

HARNESS_TOKEN = "Zk3-" + "q" * 4 + "J8xVb2Lr7tYw1Nc5Hs9Gd0Pf6Ma4Ke"


@pytest.mark.parametrize("pad", [70, 80, 90, 99])
def test_case_output_capture_never_keeps_part_of_a_token(pad: int) -> None:
    """Hostile Case: prints padding so the capture limit falls inside the token."""
    import io

    from harness.run import _Capture

    cap = _Capture(io.BytesIO(b"a line\n" + b"p" * pad + HARNESS_TOKEN.encode() + b" more\n" * 50), limit=120)
    cap.run()
    text = Redactor([HARNESS_TOKEN]).redact(cap.text())
    assert cap.dropped > 0 and text.startswith("a line\n")
    assert runs_of(HARNESS_TOKEN, text) == []


@pytest.mark.parametrize("cut", [16, 20, 30])
def test_acceptance_output_tail_never_starts_inside_a_token(cut: int) -> None:
    """Hostile Case code: prints the token so the tail's first character falls inside it."""
    from harness.fixture_catalog import OUTPUT_TAIL_CHARS
    from proxy.redact import tail_lines

    output = "early\n" + HARNESS_TOKEN + "x" * (OUTPUT_TAIL_CHARS - cut - 1) + "\n"
    assert output[-OUTPUT_TAIL_CHARS:].startswith(HARNESS_TOKEN[-cut:] + "x")  # a plain cut keeps `cut` characters
    tail = Redactor([HARNESS_TOKEN]).redact(tail_lines(output, OUTPUT_TAIL_CHARS))
    assert runs_of(HARNESS_TOKEN, tail) == []


# --- a hostile backend: it knows the backend key, and names a padded "model" ---

BACKEND_KEY = "bk-" + "7c1e9a3f5b2d4e6a8c0f1b3d5e7a9c2e"


def test_hostile_backend_model_object_is_not_cut_into_the_record() -> None:
    from proxy.served_model import UsageTotals, check_json_body

    body = orjson.dumps({"model": ["p" * 170 + BACKEND_KEY], "choices": []})
    check = check_json_body(body, "qwen3.6-35b-a3b", UsageTotals())
    assert not check.ok and check.served_model is not None
    assert runs_of(BACKEND_KEY, check.served_model) == []


def test_hostile_backend_stream_model_is_not_cut_into_the_record() -> None:
    from proxy.served_model import UsageTotals
    from proxy.stream_check import StreamChecker, StreamRefused

    checker = StreamChecker("qwen3.6-35b-a3b", UsageTotals())
    event = b"data: " + orjson.dumps({"model": "p" * 170 + BACKEND_KEY, "choices": []}) + b"\n\n"
    with pytest.raises(StreamRefused):
        checker.feed(event)
    assert checker.served_model is not None and runs_of(BACKEND_KEY, checker.served_model) == []


def test_a_mistyped_variable_holding_a_secret_is_not_half_shown(tmp_path: Path) -> None:
    """An operator puts a long secret in the wrong variable: the error names the variable
    and does not show 40 characters of the value."""
    from proxy.log_setup import parse_bool

    secret = "sk-" + "Q" * 10 + "0123456789abcdefghijklmnopqrstuvwxyz"
    with pytest.raises(ValueError) as info:
        parse_bool(secret, "CASE_PROXY_ACCESS_LOG")
    assert "CASE_PROXY_ACCESS_LOG" in str(info.value) and runs_of(secret, str(info.value)) == []
    with pytest.raises(ConfigError) as exc:
        load_settings(env=_settings_env(tmp_path, CASE_PROXY_LOG_FORMAT=secret))
    assert runs_of(secret, "\n".join(exc.value.problems)) == []
