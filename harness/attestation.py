"""``attestation.dsse.json``: the run as a signed in-toto Statement v1.

The report and its chains can be rewritten consistently by whoever can write the run
directory; a signature by a key that never was in it cannot. After ``report_written``
the harness writes an in-toto Statement v1 whose subjects are the SHA-256 digests of
the run's files (report, events, the proxy's evidence, ...), of the decision record and
the admission JSON, and Case's final commit (``gitCommit``), with the report's proof
fields as predicate (:data:`PREDICATE_TYPE`, documented in ``docs/attestation.md``). It
goes into a DSSE envelope (payloadType ``application/vnd.in-toto+json``) signed with
Ed25519 over DSSE's pre-authentication encoding; without a key the envelope has no
signatures and the report says ``attestation.signed: false``.

Key ids are the securesystemslib default (SHA-256 of the canonical JSON of
``{"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": <hex>}}``), so a
verifier built on securesystemslib finds the key without being told its id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ATTESTATION_FILE = "attestation.dsse.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# The project owns no domain: a URN names its predicate type (schema: docs/attestation.md).
PREDICATE_TYPE = "urn:case-local-route:predicate:run-proof:v2"
ENV_SIGNING_KEY_FILE = "CASE_HARNESS_SIGNING_KEY_FILE"
PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub.pem"
# Subjects that are not files of the run directory (fixed names; the paths are the operator's).
DECISION_SUBJECT = "CTO-WORK-020/decision-record"
ADMISSION_SUBJECT = "CTO-WORK-020/admission"
COMMIT_SUBJECT = "repo/final-commit"
# Files of the run directory the statement covers whenever they exist: the report (and
# its text form), the events and the evidence, plus every other input of the report.
RUN_FILES = ("report.json", "report.txt", "events.jsonl", "acceptance.json", "secret_scan.json", "proxy/metrics.prom",
             "dns/queries.jsonl")
REQUIRED_RUN_FILES = ("report.json", "events.jsonl")
EVIDENCE_GLOB = "evidence*.jsonl"  # proxy/evidence.jsonl and any rotated part
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


class AttestationError(Exception):
    """A key or envelope that cannot be used; the message names what is wrong."""


# --- boundary models --------------------------------------------------------------------

class Subject(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    digest: dict[str, str]


class Statement(BaseModel):
    """in-toto Statement v1 (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type_: str = Field(alias="_type")
    subject: list[Subject] = Field(min_length=1)
    predicateType: str  # noqa: N815 (the spec's name)
    predicate: dict[str, Any]


class DsseSignature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keyid: str = ""
    sig: str


class Envelope(BaseModel):
    """DSSE envelope (https://github.com/secure-systems-lab/dsse/blob/master/envelope.md)."""

    model_config = ConfigDict(extra="forbid")
    payload: str
    payloadType: str  # noqa: N815
    signatures: list[DsseSignature]


# --- pure parts ---------------------------------------------------------------------------

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is signed, so the type is signed too."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def public_hex(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(public: Ed25519PublicKey) -> str:
    """securesystemslib's default key id of an Ed25519 key (canonical JSON, ASCII only)."""
    doc = {"keytype": "ed25519", "keyval": {"public": public_hex(public)}, "scheme": "ed25519"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def proof_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """The predicate: what the report proves (``docs/attestation.md`` lists each field)."""
    fallback = report.get("external_fallback") or {}
    tests = report.get("tests") or {}
    isolation = report.get("isolation") or {}
    scan = report.get("secret_scan") or {}
    chains = report.get("chains") or {}
    digests = report.get("digests") or {}
    proof = report.get("proxy_proof") or {}
    return {
        "report_schema_version": report.get("schema_version"),
        "status": report.get("status"),
        "reasons": [r.get("code") for r in report.get("reasons") or []],
        "run_id": report.get("run_id"),
        "fixture": report.get("fixture"),
        "stage": report.get("stage"),
        "evidence_grade": report.get("evidence_grade"),
        "case_model_provider": report.get("case_model_provider"),
        "case_model": report.get("case_model"),
        "case_model_admission_status": report.get("case_model_admission_status"),
        "case_runtime_bridge_provider": report.get("case_runtime_bridge_provider"),
        "decision_status": report.get("decision_status"),
        "provider_class": report.get("provider_class"),
        "admitted_requests": report.get("admitted_requests"),
        "external_fallback_used": fallback.get("used"),
        "external_fallback_attempts": fallback.get("attempts"),
        "served_model_mismatches": report.get("served_model_mismatches"),
        "tests_passed": report.get("tests_passed"),
        "tests_total": tests.get("total"),
        "case_commit": tests.get("commit"),
        "required_events_passed": report.get("required_events_passed"),
        "isolation_kind": isolation.get("kind"),
        "namespace_survivors": isolation.get("namespace_survivors"),
        "secret_scan_clean": scan.get("clean"),
        "chains_ok": bool(chains.get("events_ok")) and chains.get("evidence_ok") is not False,
        "evidence_chain_mode": proof.get("chain_mode"),
        "evidence_mac_verified": proof.get("chain_verified"),
        "decision_sha256_before": digests.get("decision_sha256_before"),
        "admission_sha256_before": digests.get("admission_sha256_before"),
        "upstream_class": (report.get("endpoint") or {}).get("upstream_class"),
    }


def statement(subjects: list[Subject], predicate: dict[str, Any]) -> bytes:
    """The Statement's bytes (the DSSE payload), subjects sorted by name."""
    doc = {"_type": STATEMENT_TYPE, "subject": [s.model_dump() for s in sorted(subjects, key=lambda s: s.name)],
           "predicateType": PREDICATE_TYPE, "predicate": predicate}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def envelope(payload: bytes, key: Ed25519PrivateKey | None) -> Envelope:
    """The DSSE envelope of ``payload``; no signatures without a key."""
    sigs = []
    if key is not None:
        sig = key.sign(pae(PAYLOAD_TYPE, payload))
        sigs.append(DsseSignature(keyid=key_id(key.public_key()), sig=base64.b64encode(sig).decode()))
    return Envelope(payload=base64.b64encode(payload).decode(), payloadType=PAYLOAD_TYPE, signatures=sigs)


def signature_problems(env: Envelope, public: Ed25519PublicKey) -> list[str]:
    """Why ``env`` is not signed by ``public`` (empty: one valid signature by it)."""
    if not env.signatures:
        return ["the attestation is unsigned (the run had no signing key)"]
    if env.payloadType != PAYLOAD_TYPE:
        return [f"the attestation's payloadType is {env.payloadType!r}, not {PAYLOAD_TYPE!r}"]
    try:
        payload = base64.b64decode(env.payload, validate=True)
    except (binascii.Error, ValueError):
        return ["the attestation's payload is not base64"]
    message = pae(env.payloadType, payload)
    for sig in env.signatures:
        try:
            public.verify(base64.b64decode(sig.sig, validate=True), message)
            return []
        except (InvalidSignature, binascii.Error, ValueError):
            continue
    ids = ", ".join(s.keyid or "(no keyid)" for s in env.signatures)
    return [f"no signature of the attestation verifies with the given public key {key_id(public)[:16]} "
            f"(signed by key id {ids}): wrong key, or the statement was changed after signing"]


# --- keys ----------------------------------------------------------------------------------

def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out_dir`` (private key mode 0600, never
    overwriting a file) and return (private, public) paths."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (priv_path, pub_path):
        if path.exists() or path.is_symlink():
            raise AttestationError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    os.chmod(priv_path, 0o600)  # whatever the umask did
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pub)
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key at ``path``: an unencrypted PKCS#8 PEM Ed25519 key that only its
    owner can read (as ssh insists, a key others can read is refused)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise AttestationError(f"signing key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AttestationError(f"signing key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise AttestationError(f"signing key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                               f"chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise AttestationError(f"signing key {path} is not an unencrypted PEM private key "
                               f"({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AttestationError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AttestationError(f"public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise AttestationError(f"public key {path} is not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AttestationError(f"public key {path} is not an Ed25519 key")
    return key


def key_secrets(key: Ed25519PrivateKey) -> list[tuple[str, str]]:
    """Forms of the private key the secret scan looks for: its PEM body and raw bytes."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return [("signing_key", body), ("signing_key", raw.hex())]


def signing_key_path(env: Mapping[str, str]) -> Path | None:
    """The private key's path from ``CASE_HARNESS_SIGNING_KEY_FILE`` (never argv)."""
    raw = (env.get(ENV_SIGNING_KEY_FILE) or "").strip()
    return Path(raw).absolute() if raw else None


# --- the run directory ------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_file_names(run_dir: Path) -> list[str]:
    """The run directory's files a statement must cover, as they are now."""
    names = [n for n in RUN_FILES if (run_dir / n).is_file()]
    proxy = run_dir / "proxy"
    if proxy.is_dir():
        names += sorted(f"proxy/{p.name}" for p in proxy.glob(EVIDENCE_GLOB) if p.is_file())
    return names


def recorded_artifacts(run_dir: Path) -> tuple[str | None, str | None, str | None]:
    """(decision SHA-256, admission SHA-256, Case's final commit) as the run's events
    recorded them: the digests in ``report_written``, the commit in ``fixture_tests_run``."""
    from . import events as ev

    events = ev.read_typed_events(run_dir / "events.jsonl").events
    written = next((e for e in reversed(events) if isinstance(e, ev.ReportWritten)), None)
    tests = next((e for e in events if isinstance(e, ev.FixtureTestsRun)), None)
    return ((written.decision_sha256_after or None) if written else None,
            (written.admission_sha256_after or None) if written else None,
            (tests.commit or None) if tests else None)


def run_subjects(run_dir: Path) -> list[Subject]:
    """What a run's statement covers, from the run directory alone: every file the
    report is computed from, and the decision record, admission JSON and Case's commit
    as its events recorded them. The writer and ``verify`` both call this."""
    run_dir = Path(run_dir)
    subjects = [Subject(name=n, digest={"sha256": _sha256_file(run_dir / n)}) for n in run_file_names(run_dir)]
    decision, admission, commit = recorded_artifacts(run_dir)
    for name, digest in ((DECISION_SUBJECT, decision), (ADMISSION_SUBJECT, admission)):
        if digest is not None:
            subjects.append(Subject(name=name, digest={"sha256": digest}))
    if commit is not None:
        subjects.append(Subject(name=COMMIT_SUBJECT, digest={"gitCommit": commit}))
    return subjects


def write_attestation(run_dir: Path, key: Ed25519PrivateKey | None) -> Path:
    """Write ``attestation.dsse.json`` for a finished run (after ``report_written``)."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_bytes())
    env = envelope(statement(run_subjects(run_dir), proof_fields(report)), key)
    out = run_dir / ATTESTATION_FILE
    # A new file renamed into place: a link planted under either name is replaced, never
    # followed (an unsandboxed Case shares the run directory's owner).
    tmp = run_dir / f".{ATTESTATION_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(env.model_dump_json(indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read_envelope(path: Path) -> tuple[Envelope, Statement]:
    """The envelope and its statement, or :class:`AttestationError` saying what is wrong."""
    try:
        if path.stat().st_size > MAX_ENVELOPE_BYTES:
            raise AttestationError(f"{path.name} is larger than {MAX_ENVELOPE_BYTES} bytes")
        env = Envelope.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise AttestationError(f"{path.name}: {exc.strerror}") from None
    except ValidationError as exc:
        raise AttestationError(f"{path.name} is not a DSSE envelope: {str(exc).splitlines()[0]}") from None
    try:
        payload = base64.b64decode(env.payload, validate=True)
        stmt = Statement.model_validate_json(payload)
    except (binascii.Error, ValueError) as exc:
        raise AttestationError(f"{path.name}: the payload is not an in-toto statement: "
                               f"{str(exc).splitlines()[0]}") from None
    return env, stmt


def subject_problems(stmt: Statement, expected: list[Subject]) -> list[str]:
    """Where the statement's subjects differ from what the run's files give (pure)."""
    problems: list[str] = []
    if stmt.type_ != STATEMENT_TYPE:
        problems.append(f"the statement's _type is {stmt.type_!r}, not {STATEMENT_TYPE!r}")
    if stmt.predicateType != PREDICATE_TYPE:
        problems.append(f"the statement's predicateType is {stmt.predicateType!r}, not {PREDICATE_TYPE!r}")
    names = [s.name for s in stmt.subject]
    if len(names) != len(set(names)):
        problems.append("the statement names a subject twice")
    have = {s.name: s.digest for s in stmt.subject}
    want = {s.name: s.digest for s in expected}
    for name in sorted(set(want) - set(have)):
        problems.append(f"the attestation does not cover {name}")
    for name in sorted(set(have) - set(want)):
        problems.append(f"the attestation names {name}, which the run does not have")
    for name in sorted(set(have) & set(want)):
        if have[name] != want[name]:
            problems.append(f"{name} does not match its digest in the attestation (changed after the run?)")
    return problems


def verify_attestation(run_dir: Path, *, public_key: Ed25519PublicKey | None,
                       report: Mapping[str, Any] | None) -> list[str]:
    """Problems with the run's attestation: its signature (when a public key is given),
    its subjects against the run's files now and its predicate against the report."""
    run_dir = Path(run_dir)
    path = run_dir / ATTESTATION_FILE
    if not path.is_file():
        return [f"{ATTESTATION_FILE} is missing"]
    try:
        env, stmt = read_envelope(path)
    except AttestationError as exc:
        return [str(exc)]
    problems = signature_problems(env, public_key) if public_key is not None else []
    said_signed = bool(((report or {}).get("attestation") or {}).get("signed"))
    if report is not None and said_signed != bool(env.signatures):
        problems.append("the report says the attestation is " + ("signed" if said_signed else "unsigned")
                        + f", the envelope has {len(env.signatures)} signature(s)")
    problems += subject_problems(stmt, run_subjects(run_dir))
    if report is not None and stmt.predicate != proof_fields(report):
        problems.append("the attestation's predicate differs from the report's proof fields")
    return problems
