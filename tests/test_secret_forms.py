"""Each known secret is found in every form it may take on the way (plain, base64 at all
three alignments, base64url, hex, URL-encoded in upper and lower case), and the common
token shapes are found without being registered. Both by the proxy's redactor and the
harness's scan (one module, ``proxy.redact``). Sample tokens are assembled at run time
from a prefix and random characters: none is a real credential."""

from __future__ import annotations

import base64
import secrets
import string
import urllib.parse

import pytest

from harness.secret_scan import SecretSet, TextScanner
from proxy.redact import _SHAPE_ANCHORS_LOWER, REDACTED, Redactor

SECRET = "cpt-" + "A9z/+_~." + secrets.token_hex(12)  # characters that encode differently


def _hostile_embeddings(value: str) -> dict[str, str]:
    """A hostile Case's ways of writing ``value`` so a plain search misses it."""
    raw = value.encode()
    out = {
        "plain": f"x {value} y",
        "hex_lower": f"data={raw.hex()}",
        "hex_upper": f"DATA={raw.hex().upper()}",
        "url_upper": "q=" + urllib.parse.quote(value, safe=""),
        "url_lower": "q=" + urllib.parse.quote(value, safe="").replace("%2F", "%2f").replace("%2B", "%2b"),
        "url_every_byte": "q=" + "".join(f"%{b:02x}" for b in raw),
        "url_plus": "q=" + urllib.parse.quote_plus(value),
    }
    for k in range(3):
        pre = b"P" * k
        out[f"base64_offset{k}"] = base64.b64encode(pre + raw + b"trailing bytes").decode()
        out[f"base64url_offset{k}"] = base64.urlsafe_b64encode(b"q" * (k + 3) + raw).decode().rstrip("=")
    return out


@pytest.mark.parametrize("form", sorted(_hostile_embeddings(SECRET)))
def test_every_encoded_form_is_redacted_and_scanned(form: str) -> None:
    text = _hostile_embeddings(SECRET)[form]
    red = Redactor([SECRET]).redact(text)
    assert REDACTED in red
    # Nothing of the value, in this encoding, is left around the marker.
    assert _hostile_embeddings(SECRET)[form] != red
    hits = TextScanner(_set(SECRET)).scan(text)
    assert hits and all(k.startswith("run_token") for k, _ in hits), hits


def _set(value: str) -> SecretSet:
    s = SecretSet()
    s.add("run_token", value)
    return s


def test_base64_offsets_are_different_texts() -> None:
    """The three alignments really are three different strings (the test above is not
    checking one form three times)."""
    forms = {_hostile_embeddings(SECRET)[f"base64_offset{k}"][4:40] for k in range(3)}
    assert len(forms) == 3


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


AL, LO, HEXL = string.ascii_letters + string.digits, string.ascii_lowercase + string.digits, "0123456789abcdef"
SHAPES = {
    "google_api_key": lambda: "AI" + "za" + _rand(AL + "_-", 35),
    "huggingface_token": lambda: "hf" + "_" + _rand(string.ascii_letters, 34),
    "groq_key": lambda: "gs" + "k_" + _rand(AL, 52),
    "xai_key": lambda: "xa" + "i-" + _rand(AL, 80),
    "gitlab_token": lambda: "gl" + "pat-" + _rand(AL + "_-", 20),
    "npm_token": lambda: "np" + "m_" + _rand(LO, 36),
    "stripe_key": lambda: "sk" + "_live_" + _rand(AL, 24),
    "pypi_token": lambda: "py" + "pi-AgEIcHlwaS5vcmc" + _rand(AL, 60),
    "digitalocean_token": lambda: "do" + "p_v1_" + _rand(HEXL, 64),
    "sendgrid_key": lambda: "SG" + "." + _rand(AL, 22) + "." + _rand(AL, 43),
    "shopify_token": lambda: "sh" + "pat_" + _rand(HEXL, 32),
    "databricks_token": lambda: "da" + "pi" + _rand(HEXL, 32),
    "age_secret_key": lambda: "AGE-SECRET" + "-KEY-1" + _rand("QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L", 58),
    "linear_key": lambda: "lin" + "_api_" + _rand(AL, 40),
    "pulumi_token": lambda: "pu" + "l-" + _rand(HEXL, 40),
    "rubygems_token": lambda: "ruby" + "gems_" + _rand(HEXL, 48),
    "doppler_token": lambda: "dp" + ".pt." + _rand(AL, 43),
    "telegram_bot_token": lambda: "123456789:A" + "A" + _rand(AL, 33),
    "http_basic": lambda: "Authorization: Basic " + base64.b64encode(b"deploy:" + _rand(AL, 12).encode()).decode(),
    "github_token": lambda: "gh" + "p_" + _rand(AL, 36),
    "openai_key": lambda: "sk" + "-proj-" + _rand(AL, 40),
    "aws_access_key": lambda: "AK" + "IA" + _rand(string.ascii_uppercase + string.digits, 16),
}


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_token_shape_found_unregistered(kind: str) -> None:
    token = SHAPES[kind]()
    text = f'config = "{token}"\n'
    found = {f.kind for f in Redactor().find(text)}
    assert kind in found, found
    assert REDACTED in Redactor().redact(text)
    assert kind in {k for k, _ in TextScanner(SecretSet()).scan(text)}


@pytest.mark.parametrize("text", [
    "Basic configuration is described below.",
    "Basic usage: run it",
    "Authorization: Basic aGVsbG8gd29ybGQ=",  # 'hello world': no user:password
    "see https://example.org/docs for the sk_ prefix and hf_ tokens",
])
def test_prose_and_non_credentials_are_left_alone(text: str) -> None:
    assert Redactor().find(text) == []
    assert Redactor().redact(text) == text


def test_npm_token_shape_is_case_insensitive() -> None:
    token = "NP" + "M_" + _rand(string.ascii_uppercase + string.digits, 36)
    assert "npm_token" in {f.kind for f in Redactor().find(token)}


def test_the_grouped_pre_check_finds_every_anchor_wherever_it_stands() -> None:
    """Hostile text: every anchor (each encoded form of the registered secrets and each
    token-shape literal) alone, and inside text that holds every other character of the
    common set, at the start, middle and end. The pre-check searches an anchor only when
    its group's character is present, which must never let one through: it agrees with
    a plain search of every anchor, as text and (the evidence path) as JSON bytes."""
    import json
    import random

    redactor = Redactor([SECRET, "http://127.0.0.1:8000/v1", "sk-backend-" + secrets.token_hex(8)])
    anchors = redactor._anchors
    filler = string.ascii_lowercase + string.digits + " =/.:,"
    rng = random.Random(18)
    for anchor in anchors:
        pad = "".join(rng.choice(filler) for _ in range(60))
        for text in (anchor, pad + anchor, anchor + pad, pad[:30] + anchor + pad[30:]):
            assert redactor.may_match(text), (anchor, text)
            if text.isascii():
                assert redactor._may_match_json(json.dumps({"v": text}).encode()), anchor
    for _ in range(300):
        text = "".join(rng.choice(filler + "ABCDEFGHIJKLMNOPQRSTUVWXYZ_-%+") for _ in range(rng.randint(0, 120)))
        folded = text.casefold()
        expected = any(a in text for a in anchors) or any(a in folded for a in _SHAPE_ANCHORS_LOWER)
        assert redactor.may_match(text) == expected, text


def test_a_vetted_value_is_skipped_only_until_a_secret_it_holds_is_registered() -> None:
    """The proxy vets the values it clips on every request (the admitted model, the
    routes) so a set lookup answers for them. Hostile order: a value vetted clean, then
    a secret registered that the value contains (an operator's extra secret added
    later). The vetting must be forgotten, and the value redacted."""
    token = "xk" + secrets.token_hex(12)
    vetted = f"qwen3.6-35b-a3b-{token}"
    redactor = Redactor(["tok-" + secrets.token_hex(16)])
    redactor.vet_clean([vetted, "/v1/chat/completions"])
    assert vetted in redactor.clean and redactor.clip(vetted, 200) == vetted
    assert not redactor.may_match("/v1/chat/completions")
    redactor.add_secret(token)
    assert redactor.may_match(vetted)
    assert redactor.clip(vetted, 200) == f"qwen3.6-35b-a3b-{REDACTED}"
