"""Whole runs in which a hostile party goes after the evidence itself: it rewrites the
evidence consistently (plain SHA-256, as anyone who can write the file can), it kills the
run's proxy and puts its own in its place, it truncates the log under a running proxy,
and a hostile Case looks for the proxy to read its key. The backend is the scripted TEST
FIXTURE (no GPU here); the proxy, git, bubblewrap and Case-like programs are real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import harness.run as run_mod
from harness.events import read_events
from harness.run import RunOutcome

from .harness_support import base_env, reference_profile, report_of, rogue_profile, run, write_artifacts
from .proxy_support import ProxyUnderTest, make_proxy  # noqa: F401 - a fixture
from .test_keyed_chain import rehash_plain_from

ROOT = Path(__file__).resolve().parent.parent


def _messages(run_dir: Path) -> dict[str, str]:
    return {r.code: r.message for r in report_of(run_dir).reasons}


def test_a_consistent_rewrite_of_the_evidence_fails_the_run_naming_the_mac(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The moment after the proxy wrote its last record and exited, someone who can write
    proxy/evidence.jsonl rewrites a record and re-hashes every later line with plain
    SHA-256: the plain chain is whole again, so only the MAC can tell."""
    real_stop = run_mod.stop_process

    def stop_then_rewrite(proc: subprocess.Popen[Any], timeout_s: float) -> int | None:
        code = real_stop(proc, timeout_s)
        if "proxy" in proc.args and "serve" in proc.args:  # type: ignore[operator]
            evidence = next((tmp_path / "runs").glob("*/proxy/evidence.jsonl"))
            rehash_plain_from(evidence, 2, {"duration_ms": 0.5})
        return code

    monkeypatch.setattr(run_mod, "stop_process", stop_then_rewrite)
    outcome = run(reference_profile(), base_env(write_artifacts(tmp_path / "a")), tmp_path / "runs")
    report = report_of(outcome.run_dir)
    assert report.chains.evidence_ok is True, "the rewrite must leave the plain chain whole (else this proves nothing)"
    assert outcome.status == "fail"
    messages = _messages(outcome.run_dir)
    assert "evidence_mac_invalid" in messages and "HMAC-SHA256" in messages["evidence_mac_invalid"], messages
    assert "evidence_head_mismatch" in messages, messages
    assert "evidence_unpaired_forwarding" not in messages, messages  # consistent: the pairs were re-linked too
    assert report.proxy_proof is not None and report.proxy_proof.chain_verified is False


def _wait_for(pattern: str, root: Path, timeout_s: float) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"nothing matched {pattern} under {root} in {timeout_s}s")


def _socket_of(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return args[args.index(b"--unix") + 1].decode()


def test_a_killed_and_impersonated_proxy_fails_the_run_with_the_reasons(tmp_path: Path) -> None:
    """Mid-run the run's proxy is killed and another proxy (the same program, without the
    run key or the head channel) takes its socket path and its evidence file."""
    artifacts = write_artifacts(tmp_path / "a")
    env = base_env(artifacts)
    outcome: list[RunOutcome] = []
    runner = threading.Thread(target=lambda: outcome.append(run(rogue_profile("pause"), env, tmp_path / "runs")))
    runner.start()
    impostor: subprocess.Popen[bytes] | None = None
    try:
        paused = _wait_for("*/repo/.paused", tmp_path / "runs", 120)
        run_dir = paused.parent.parent
        _, events = read_events(run_dir / "events.jsonl")
        pid = next(e["pid"] for e in events if e["event"] == "proxy_started")
        sock = _socket_of(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0:
            time.sleep(0.05)
        os.unlink(sock)
        impostor_env = {k: v for k, v in os.environ.items() if not k.startswith(("CTO_HARNESS_", "CASE_PROXY_"))}
        impostor_env.update({"CTO_HARNESS_CASE_DECISION_FILE": str(artifacts.decision),
                             "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(artifacts.admission),
                             "CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:9/v1",
                             "CASE_PROXY_TOKEN": "impostor-token-0123456789",
                             "CASE_PROXY_EVIDENCE_FILE": str(run_dir / "proxy" / "evidence.jsonl")})
        impostor = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--unix", sock], env=impostor_env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert impostor.stdout is not None
        assert impostor.stdout.readline().startswith(b"CASE_PROXY_LISTENING")
        (paused.parent / ".go").touch()
        runner.join(300)
    finally:
        (tmp_path / "runs").mkdir(exist_ok=True)
        for p in (tmp_path / "runs").glob("*/repo"):
            (p / ".go").touch()
        runner.join(300)
        if impostor is not None:
            impostor.send_signal(signal.SIGTERM)
            impostor.wait(30)
    assert outcome and outcome[0].status == "fail"
    messages = _messages(outcome[0].run_dir)
    for code in ("proxy_exit_unclean", "evidence_mac_invalid", "evidence_head_mismatch", "proxy_dead_at_case_exit",
                 "metrics_not_from_run_proxy", "proxy_pid_mismatch", "proxy_stop_missing"):
        assert code in messages, (code, messages)
    assert "no prev_hmac" in messages["evidence_mac_invalid"]
    assert str(impostor.pid) in messages["metrics_not_from_run_proxy"]  # type: ignore[union-attr]


def test_an_untouched_run_proves_its_proxy_and_verify_rejects_a_rewrite_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = bytes(range(32))  # the run key, known to this test only, to look for it afterwards

    class KnownKey(run_mod.RunKey):
        def __init__(self) -> None:
            super().__init__(key=known)

    monkeypatch.setattr(run_mod, "RunKey", KnownKey)
    outcome = run(reference_profile(), base_env(write_artifacts(tmp_path / "a")), tmp_path / "runs")
    report = report_of(outcome.run_dir)
    assert outcome.status == "pass", report.reasons
    for path in outcome.run_dir.rglob("*"):  # never written: not in any file of the run, in any form
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert known not in data and known.hex().encode() not in data, path
    proof = report.proxy_proof
    assert proof is not None and proof.chain_mode == "hmac-sha256" and proof.chain_verified
    assert proof.channel_head_matches and proof.exit_code == 0 and proof.final_record == "proxy_stop"
    assert proof.harness_pid == proof.start_pid == proof.stop_pid == proof.metrics_peer_pid
    assert proof.alive_at_case_exit is True and proof.metrics_transport == "unix"
    assert "evidence proof: HMAC-SHA256 under the run key, verified; head matches" in \
        (outcome.run_dir / "report.txt").read_text()

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness", "verify", str(outcome.run_dir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    assert verify().returncode == 0, verify().stdout
    rehash_plain_from(outcome.run_dir / "proxy" / "evidence.jsonl", 2, {"duration_ms": 0.5})
    after = verify()
    assert after.returncode != 0 and "evidence" in after.stdout + after.stderr, after.stdout


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "control-unsandboxed"])
def test_a_sandboxed_case_cannot_see_the_proxy_process(tmp_path: Path, sandbox: bool) -> None:
    """Case looks through /proc for the proxy (to read its environment or descriptors, or
    to signal it). The unsandboxed control shows the probe finds it when it can."""
    outcome = run(rogue_profile("find-proxy"), base_env(write_artifacts(tmp_path / "a")), tmp_path / "runs",
                  sandbox=sandbox)
    stdout = (outcome.run_dir / "case" / "stdout.log").read_text()
    assert "admitted:" in stdout, stdout  # Case ran and reached the proxy through its route
    if sandbox:
        assert "SAW PROXY" not in stdout and "READ PROXY" not in stdout, stdout
    else:
        assert "SAW PROXY" in stdout, stdout


async def test_a_truncated_log_refuses_the_next_request(make_proxy: Any) -> None:
    """The log is truncated under a running proxy (by anyone who can write it): the next
    request is refused before it is forwarded, and counted."""
    proxy: ProxyUnderTest = await make_proxy()
    client = proxy.client()
    model = "qwen3.6-35b-a3b"
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    def chats() -> int:
        return sum(1 for r in proxy.backend.requests if r.path.endswith("/chat/completions"))

    forwarded = chats()
    os.truncate(proxy.evidence_path, 0)
    import openai

    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "again"}],
                                             max_tokens=4)
    assert refused.value.status_code == 503 and "evidence" in str(refused.value.body)
    assert proxy.metric("case_proxy_evidence_write_failures_total") >= 1
    assert chats() == forwarded == 1  # the refused request never reached the backend
