"""The run's signed in-toto attestation (harness/attestation.py).

One real signed pass run (scripted TEST FIXTURE backend, harness/scripted_backend.py) is
made once and copied for each tampering test. The hostile party is whoever can write the
run directory after the run: it rewrites the report, the event chain and the statement
so that every other check of ``verify`` holds, and only the signature can catch it.
The statement is also checked with securesystemslib's DSSE support, an implementation
the project did not write.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.dsse import Envelope as SslEnvelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey

import harness.run as harness_run
from harness import attestation as att
from harness import events as ev
from harness.profile import SandboxProfile
from harness.report import collect_inputs, compute_report, report_json
from harness.run import RunConfigError
from harness.verify import verify_run
from proxy.hashchain import HashChainWriter
from proxy.settings import ENV_BASE_URL

from .harness_support import base_env, reference_profile, report_of, run, write_artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return att.generate_keypair(tmp_path_factory.mktemp("keys") / "k")


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[dict[str, Any]]:
    """A signed pass run, with the argv text the secret scan was handed."""
    base = tmp_path_factory.mktemp("signedrun")
    arts = write_artifacts(base / "in")
    seen: dict[str, Any] = {}
    real_scan = harness_run.scan_run_dir

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen["argv_text"] = kwargs.get("argv_text", "")
        return real_scan(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(harness_run, "scan_run_dir", spy)
    try:
        outcome = run(reference_profile(), {**base_env(arts), att.ENV_SIGNING_KEY_FILE: str(keys[0])}, base / "runs")
    finally:
        mp.undo()
    assert outcome.status == "pass", report_of(outcome.run_dir).reasons
    yield {"run_dir": outcome.run_dir, "decision": arts.decision, "admission": arts.admission,
           "argv_text": seen["argv_text"]}


@pytest.fixture
def copy_of_run(signed_run: dict[str, Any], tmp_path: Path) -> Path:
    dest = tmp_path / signed_run["run_dir"].name
    shutil.copytree(signed_run["run_dir"], dest, symlinks=True)
    return dest


def _envelope(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / att.ATTESTATION_FILE).read_text())


def _statement(run_dir: Path) -> dict[str, Any]:
    return json.loads(base64.b64decode(_envelope(run_dir)["payload"]))


def _public(keys: tuple[Path, Path]) -> Any:
    return att.load_public_key(keys[1])


# --- pure parts -------------------------------------------------------------------------------

def test_pae_is_the_dsse_spec_encoding() -> None:
    # The DSSE protocol's own example (protocol.md, "Pre-Authentication Encoding").
    assert att.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_key_id_is_securesystemslibs_default() -> None:
    key = Ed25519PrivateKey.generate()
    assert att.key_id(key.public_key()) == SSlibKey.from_crypto(key.public_key()).keyid


def test_subject_problems_name_each_difference() -> None:
    stmt = att.Statement.model_validate({"_type": att.STATEMENT_TYPE, "predicateType": att.PREDICATE_TYPE,
                                         "predicate": {}, "subject": [
                                             {"name": "a", "digest": {"sha256": "1"}},
                                             {"name": "b", "digest": {"sha256": "2"}}]})
    want = [att.Subject(name="a", digest={"sha256": "9"}), att.Subject(name="c", digest={"sha256": "3"})]
    assert att.subject_problems(stmt, want) == [
        "the attestation does not cover c", "the attestation names b, which the run does not have",
        "a does not match its digest in the attestation (changed after the run?)"]


def test_a_planted_link_is_replaced_not_followed(tmp_path: Path) -> None:
    """Hostile Case (unsandboxed, same owner): links attestation.dsse.json to a file of
    the harness's user before the harness writes it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text("{}")
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (run_dir / att.ATTESTATION_FILE).symlink_to(victim)
    att.write_attestation(run_dir, None)
    assert victim.read_text() == "keep me\n"
    out = run_dir / att.ATTESTATION_FILE
    assert not out.is_symlink() and json.loads(out.read_text())["signatures"] == []
    assert [s.name for s in att.read_envelope(out)[1].subject] == ["report.json"]


# --- keys and keygen -------------------------------------------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env or {"PATH": os.environ["PATH"]})


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    first = _cli("keygen", "--out", str(out))
    assert first.returncode == 0, first.stderr
    priv, pub = out / att.PRIVATE_KEY_FILE, out / att.PUBLIC_KEY_FILE
    assert f"{att.ENV_SIGNING_KEY_FILE}={priv}" in first.stdout  # an absolute path, usable from anywhere
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = att.load_private_key(priv)
    assert att.key_id(key.public_key()) == att.key_id(att.load_public_key(pub)) in first.stdout
    before = priv.read_bytes()
    again = _cli("keygen", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert priv.read_bytes() == before
    # The private key never reaches stdout (what an operator might paste or log).
    body = "".join(line for line in before.decode().splitlines() if not line.startswith("-----"))
    assert body not in first.stdout + first.stderr


def test_keygen_prints_absolute_paths_for_a_relative_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "--out", "keys"], env={}) == 0
    out = capsys.readouterr().out
    assert f"{att.ENV_SIGNING_KEY_FILE}={tmp_path / 'keys' / att.PRIVATE_KEY_FILE}" in out


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    priv, _ = att.generate_keypair(tmp_path / "k")
    os.chmod(priv, 0o644)
    with pytest.raises(att.AttestationError, match="readable by others"):
        att.load_private_key(priv)


def test_a_run_refuses_an_unusable_key_before_anything_runs(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in")
    runs = tmp_path / "runs"
    not_a_key = tmp_path / "k.pem"
    not_a_key.write_text("hello\n")
    os.chmod(not_a_key, 0o600)
    with pytest.raises(RunConfigError, match="not an unencrypted PEM private key"):
        run(reference_profile(), {**base_env(arts), att.ENV_SIGNING_KEY_FILE: str(not_a_key)}, runs)
    priv, _ = att.generate_keypair(runs / "keys")  # under the runs directory, where runs are published
    with pytest.raises(RunConfigError, match="inside the runs directory"):
        run(reference_profile(), {**base_env(arts), att.ENV_SIGNING_KEY_FILE: str(priv)}, runs)
    assert not [p for p in runs.iterdir() if p.name != "keys"], "no run directory may be made"


def test_an_unsandboxed_case_never_runs_next_to_the_key(tmp_path: Path) -> None:
    arts = write_artifacts(tmp_path / "in")
    priv, _ = att.generate_keypair(tmp_path / "keys")
    with pytest.raises(RunConfigError, match="--no-sandbox"):
        run(reference_profile(), {**base_env(arts), att.ENV_SIGNING_KEY_FILE: str(priv)}, tmp_path / "runs",
            sandbox=False)


def test_a_profile_that_shows_case_the_key_is_refused(tmp_path: Path) -> None:
    """Hostile Case profile: it asks for the key's directory read-only in the sandbox."""
    arts = write_artifacts(tmp_path / "in")
    priv, _ = att.generate_keypair(tmp_path / "keys")
    profile = reference_profile(sandbox=SandboxProfile(ro_paths=[str(priv.parent)]))
    with pytest.raises(RunConfigError, match="contains the attestation signing key"):
        run(profile, {**base_env(arts), att.ENV_SIGNING_KEY_FILE: str(priv)}, tmp_path / "runs")


# --- the signed run ------------------------------------------------------------------------------

def test_untouched_signed_run_verifies(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    report = report_of(copy_of_run)
    assert report.attestation.signed and report.attestation.key_id == att.key_id(_public(keys))
    assert verify_run(copy_of_run, public_key=_public(keys)).problems == []
    ok = _cli("verify", str(copy_of_run), "--public-key", str(keys[1]))
    assert ok.returncode == 0 and "signature verifies" in ok.stdout, ok.stdout + ok.stderr


def test_signed_run_verifies_with_securesystemslib(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    """An implementation the project did not write: DSSE envelope, PAE, Ed25519, key id."""
    envelope = SslEnvelope.from_dict(_envelope(copy_of_run))
    ssl_key = SSlibKey.from_crypto(serialization.load_pem_public_key(keys[1].read_bytes()))  # type: ignore[arg-type]
    accepted = envelope.verify([ssl_key], 1)
    assert list(accepted) == [ssl_key.keyid]
    assert envelope.payload_type == "application/vnd.in-toto+json"
    stmt = json.loads(envelope.payload)
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == att.PREDICATE_TYPE
    # Each subject, recomputed here with hashlib and git's own answer, not the project's code.
    subjects = {s["name"]: s["digest"] for s in stmt["subject"]}
    for name in ("report.json", "events.jsonl", "proxy/evidence.jsonl", "acceptance.json", "secret_scan.json"):
        assert subjects[name] == {"sha256": hashlib.sha256((copy_of_run / name).read_bytes()).hexdigest()}, name
    report = json.loads((copy_of_run / "report.json").read_text())
    assert subjects[att.DECISION_SUBJECT] == {"sha256": report["digests"]["decision_sha256_after"]}
    assert subjects[att.ADMISSION_SUBJECT] == {"sha256": report["digests"]["admission_sha256_after"]}
    assert subjects[att.COMMIT_SUBJECT] == {"gitCommit": report["tests"]["commit"]}
    assert len(report["tests"]["commit"]) == 40
    assert stmt["predicate"]["status"] == "pass" and stmt["predicate"]["case_model"] == report["case_model"]
    # The proof that the run's own proxy wrote the evidence is part of what is signed.
    assert (stmt["predicate"]["evidence_chain_mode"], stmt["predicate"]["evidence_mac_verified"]) == (
        "hmac-sha256", True)
    # A flipped bit in the payload: securesystemslib refuses it as well.
    tampered = _envelope(copy_of_run)
    tampered["payload"] = base64.b64encode(envelope.payload.replace(b'"pass"', b'"fail"')).decode()
    with pytest.raises(VerificationError):
        SslEnvelope.from_dict(tampered).verify([ssl_key], 1)


def test_the_signing_key_is_never_in_the_run_directory_or_argv(signed_run: dict[str, Any],
                                                                keys: tuple[Path, Path]) -> None:
    key = att.load_private_key(keys[0])
    forms = [value for _, value in att.key_secrets(key)]
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    files = [p for p in signed_run["run_dir"].rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert raw not in data, path
        for form in forms:
            assert form.encode() not in data, path
    argv = signed_run["argv_text"]
    assert "harness.scripted_backend" in argv or "proxy" in argv, "the argv of the run's processes was sampled"
    assert all(form not in argv for form in forms) and str(keys[0]) not in argv
    scan = json.loads((signed_run["run_dir"] / "secret_scan.json").read_text())
    assert scan["clean"]


# --- the hostile rewriter -------------------------------------------------------------------------

def _rewrite_events(run_dir: Path, change: Any) -> None:
    """Re-hash events.jsonl from scratch after ``change`` edits the event list (what
    anyone who can write the file can do to a plain SHA-256 chain)."""
    _, events = ev.read_events(run_dir / "events.jsonl")
    change(events)
    path = run_dir / "events.jsonl"
    path.unlink()
    writer = HashChainWriter(path)
    writer.open()
    for event in events:
        writer.append(event)
    writer.close()


def _forge_report(run_dir: Path, change: Any) -> None:
    """Change the events, recompute the report, re-chain report_written to match: every
    check of verify but the attestation's then holds."""
    _rewrite_events(run_dir, lambda events: (change(events), events.pop()))
    original = json.loads((run_dir / "report.json").read_text())
    report = compute_report(collect_inputs(run_dir, decision_sha256_after=original["digests"]["decision_sha256_after"],
                                           admission_sha256_after=original["digests"]["admission_sha256_after"]))
    data = report_json(report)
    (run_dir / "report.json").write_text(data)
    _rewrite_events(run_dir, lambda events: events.append({
        "event": ev.REPORT_WRITTEN, "time": events[-1]["time"],
        "report_sha256": hashlib.sha256(data.encode()).hexdigest(), "status": report.status,
        "decision_sha256_after": original["digests"]["decision_sha256_after"],
        "admission_sha256_after": original["digests"]["admission_sha256_after"], "report_secret_scan_clean": True}))


def _restatement(run_dir: Path, key: Ed25519PrivateKey | None, keep_signatures: bool = False) -> None:
    """Rewrite the statement to match the edited files, signed with ``key`` (the
    forger's), or keeping the original signatures over the new payload."""
    old = _envelope(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    new = att.envelope(att.statement(att.run_subjects(run_dir), att.proof_fields(report)), key).model_dump()
    if keep_signatures:
        new["signatures"] = old["signatures"]
    (run_dir / att.ATTESTATION_FILE).write_text(json.dumps(new))


def _more_tests(events: list[dict[str, Any]]) -> None:
    for e in events:
        if e["event"] == ev.FIXTURE_TESTS_RUN:
            e["total"] += 1000


def test_a_consistently_rewritten_report_is_rejected(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    _forge_report(copy_of_run, _more_tests)
    assert report_of(copy_of_run).tests.total > 1000
    _restatement(copy_of_run, None, keep_signatures=True)
    assert verify_run(copy_of_run).problems == [], "the forgery must defeat every other check"
    problems = verify_run(copy_of_run, public_key=_public(keys)).problems
    assert any("no signature of the attestation verifies" in p for p in problems), problems
    cli = _cli("verify", str(copy_of_run), "--public-key", str(keys[1]))
    assert cli.returncode == 1 and "no signature of the attestation verifies" in cli.stdout


def test_an_edited_report_under_the_original_statement_is_rejected(copy_of_run: Path,
                                                                   keys: tuple[Path, Path]) -> None:
    """The forger leaves the signed statement alone: its report.json digest no longer matches."""
    _forge_report(copy_of_run, _more_tests)
    problems = verify_run(copy_of_run, public_key=_public(keys)).problems
    assert "attestation: report.json does not match its digest in the attestation (changed after the run?)" \
        in problems, problems


def test_an_edited_subject_file_is_rejected(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    """metrics.prom gains a comment line: the recomputed report is the same, so only the
    subject digest can notice."""
    with open(copy_of_run / "proxy" / "metrics.prom", "a", encoding="utf-8") as fh:
        fh.write("# edited after the run\n")
    problems = verify_run(copy_of_run, public_key=_public(keys)).problems
    assert problems == ["attestation: proxy/metrics.prom does not match its digest in the attestation "
                        "(changed after the run?)"], problems


def test_an_edited_report_txt_is_rejected(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    """report.txt is not recomputed by verify: a FAIL turned into PASS there is caught by its subject."""
    path = copy_of_run / "report.txt"
    path.write_text(path.read_text().replace("status: PASS", "status: PASS (edited)"))
    assert verify_run(copy_of_run, public_key=_public(keys)).problems == [
        "attestation: report.txt does not match its digest in the attestation (changed after the run?)"]


def test_a_deleted_subject_file_is_rejected(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    (copy_of_run / "acceptance.json").unlink()
    problems = verify_run(copy_of_run, public_key=_public(keys)).problems
    assert "attestation: the attestation names acceptance.json, which the run does not have" in problems


def test_a_wrong_key_is_rejected(copy_of_run: Path, tmp_path: Path) -> None:
    _, other_pub = att.generate_keypair(tmp_path / "other")
    problems = verify_run(copy_of_run, public_key=att.load_public_key(other_pub)).problems
    assert any("no signature of the attestation verifies" in p for p in problems), problems
    cli = _cli("verify", str(copy_of_run), "--public-key", str(other_pub))
    assert cli.returncode == 1 and "no signature of the attestation verifies" in cli.stdout


def test_a_run_resigned_with_the_forgers_key_is_rejected(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    """The forger re-signs everything with a key of its own (and names it in the report)."""
    forger = Ed25519PrivateKey.generate()
    fid = att.key_id(forger.public_key())
    _forge_report(copy_of_run, lambda events: (_more_tests(events), events[0].update(attestation_key_id=fid)))
    _restatement(copy_of_run, forger)
    assert verify_run(copy_of_run, public_key=forger.public_key()).problems == []
    problems = verify_run(copy_of_run, public_key=_public(keys)).problems
    assert any("no signature of the attestation verifies" in p for p in problems), problems


def test_stripping_the_signature_is_rejected(copy_of_run: Path, keys: tuple[Path, Path]) -> None:
    data = _envelope(copy_of_run)
    data["signatures"] = []
    (copy_of_run / att.ATTESTATION_FILE).write_text(json.dumps(data))
    assert "attestation: the report says the attestation is signed, the envelope has 0 signature(s)" \
        in verify_run(copy_of_run).problems
    assert "attestation: the attestation is unsigned (the run had no signing key)" \
        in verify_run(copy_of_run, public_key=_public(keys)).problems


def test_cli_verify_public_key_usage_errors(copy_of_run: Path, tmp_path: Path) -> None:
    missing = _cli("verify", str(copy_of_run), "--public-key", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "nope.pem" in missing.stderr
    notkey = tmp_path / "not.pem"
    notkey.write_text("x\n")
    bad = _cli("verify", str(copy_of_run), "--public-key", str(notkey))
    assert bad.returncode == 2 and "is not a PEM public key" in bad.stderr


def test_an_unsigned_run_says_so(tmp_path: Path, signed_run: dict[str, Any]) -> None:
    arts = write_artifacts(tmp_path / "in")
    outcome = run(reference_profile(), base_env(arts), tmp_path / "runs")
    assert outcome.status == "pass"
    # The signed run's scan looked for the key's two forms as well, the unsigned one not.
    known = [json.loads((d / "secret_scan.json").read_text())["secrets_known"]
             for d in (signed_run["run_dir"], outcome.run_dir)]
    assert known[0] == known[1] + 2, known
    report = report_of(outcome.run_dir)
    assert report.attestation.signed is False and report.attestation.key_id is None
    assert "attestation: attestation.dsse.json UNSIGNED" in (outcome.run_dir / "report.txt").read_text()
    assert _envelope(outcome.run_dir)["signatures"] == []
    stmt = _statement(outcome.run_dir)
    assert {s["name"] for s in stmt["subject"]} >= {"report.json", "events.jsonl", "proxy/evidence.jsonl"}
    assert verify_run(outcome.run_dir).problems == []
    priv, pub = att.generate_keypair(tmp_path / "keys")
    assert "attestation: the attestation is unsigned (the run had no signing key)" \
        in verify_run(outcome.run_dir, public_key=att.load_public_key(pub)).problems


def test_a_blocked_run_is_signed_too(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    arts = write_artifacts(tmp_path / "in")
    env = {k: v for k, v in base_env(arts).items() if k != ENV_BASE_URL}  # the gate that blocks
    outcome = run(reference_profile(), {**env, att.ENV_SIGNING_KEY_FILE: str(keys[0])}, tmp_path / "runs",
                  backend="external")
    assert outcome.status == "blocked"
    names = {s["name"] for s in _statement(outcome.run_dir)["subject"]}
    assert {"report.json", "events.jsonl", att.DECISION_SUBJECT, att.ADMISSION_SUBJECT} <= names
    assert att.COMMIT_SUBJECT not in names and "proxy/evidence.jsonl" not in names
    assert _statement(outcome.run_dir)["predicate"]["status"] == "blocked"
    assert verify_run(outcome.run_dir, public_key=_public(keys)).problems == []


def test_demo_signs_its_sandboxed_runs_and_verifies_the_pass_run(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from harness.demo import run_demo

    lines: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    source = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    assert run_demo(tmp_path / "runs", source_env={**source, att.ENV_SIGNING_KEY_FILE: str(keys[0])},
                    out=Out()) == 0
    text = "".join(lines)
    row = [line for line in text.splitlines() if "attestation (pass run)" in line and not line.startswith(" ")]
    assert len(row) == 1 and row[0].startswith("ok ") and row[0].rstrip().endswith("signed, verifies"), row
    signed = {d.name: report_of(d).attestation.signed for d in (tmp_path / "runs").iterdir()
              if (d / "report.json").is_file()}
    # The --no-sandbox rows never get the key; every other run is signed.
    assert True in signed.values() and False in signed.values(), signed
