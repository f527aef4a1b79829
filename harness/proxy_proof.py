"""The report's proof that the evidence is the run's own proxy's, and nobody else's.

The harness draws a per-run key and gives it only to the proxy it starts (an inherited
descriptor; Case runs in another PID namespace and cannot read the proxy's memory or
descriptors). The proxy MAC-chains its evidence with it and reports its chain head over a
private pipe; the harness verifies the file under the key as soon as the proxy exits and
records what it found in ``proxy_stopped``. This module judges those facts: a pure
function of the events and the evidence records, one reason per requirement that fails,
each saying what is wrong. See docs/threat-model.md for what this proves and what not.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from proxy.evidence import EvidenceRecord
from proxy.hashchain import KEYED_MODE

from . import events as ev
from .reasons import Reason


class ProxyProof(BaseModel):
    """What the harness established about the proxy that wrote the evidence."""

    chain_mode: str | None = Field(description="the chain the harness checked: hmac-sha256 (under the run key) "
                                   "or sha256 (plain: consistency only)")
    chain_verified: bool = Field(description="proxy/evidence.jsonl verified under the run key when the proxy stopped")
    channel_head_matches: bool = Field(description="the file's head (records, MAC of its last line) is the last "
                                       "head the proxy reported over its private channel, marked as its stop report")
    exit_code: int | None = Field(description="the proxy's exit code (0: it stopped cleanly)")
    final_record: str | None = Field(description="the kind of the evidence's last record (proxy_stop expected)")
    harness_pid: int | None = Field(description="the pid of the proxy the harness started")
    start_pid: int | None = Field(description="the pid in the evidence's proxy_start record")
    stop_pid: int | None = Field(description="the pid in the evidence's proxy_stop record")
    alive_at_case_exit: bool | None = Field(description="the proxy was running when Case exited")
    metrics_transport: str | None = Field(description="how /metrics was read: unix (the proxy's private socket) "
                                          "or tcp (--no-sandbox)")
    metrics_peer_pid: int | None = Field(description="the pid that answered /metrics (SO_PEERCRED)")


def judge_proxy_proof(proxy_started: ev.ProxyStarted | None, case_exited: ev.CaseProcessExited | None,
                      proxy_stopped: ev.ProxyStopped | None, evidence: list[EvidenceRecord],
                      sandboxed: bool) -> tuple[ProxyProof | None, list[Reason]]:
    """The section and its failed requirements; (None, []) when no proxy was started."""
    if proxy_started is None:
        return None, []
    chain = proxy_stopped.chain if proxy_stopped else None
    heard = proxy_stopped.head_report if proxy_stopped else None
    starts = [r for r in evidence if r.kind == "proxy_start"]
    stops = [r for r in evidence if r.kind == "proxy_stop"]
    final = evidence[-1].kind if evidence else None
    harness_pid = proxy_started.pid
    start_pid = starts[0].pid if starts else None
    stop_pid = stops[-1].pid if stops else None
    alive = case_exited.proxy_alive if case_exited else None
    reasons: list[Reason] = []

    def fail(code: str, message: str) -> None:
        reasons.append(Reason(code=code, message=message))

    mode = chain.mode if chain else None
    verified = chain is not None and chain.mode == KEYED_MODE and chain.ok
    if proxy_stopped is None or chain is None:
        fail("proxy_not_stopped", "the harness never recorded the proxy's stop, so nothing proves who wrote the "
             "evidence")
    elif chain.mode != KEYED_MODE:
        fail("evidence_not_keyed", "the evidence was not checked as an HMAC-SHA256 chain under the run key "
             f"(mode {chain.mode}): anyone who can write the file could have re-hashed it")
    elif not chain.ok:
        fail("evidence_mac_invalid", "proxy/evidence.jsonl does not verify under the run key (HMAC-SHA256 chain): "
             + ("; ".join(chain.problems[:3]) or "no verdict") + ". Its records were written or rewritten by "
             "someone without the key")
    if starts and any(r.chain != KEYED_MODE for r in starts):
        fail("evidence_not_keyed", "the proxy_start record does not say the chain is keyed (hmac-sha256)")
    head_matches = (heard is not None and chain is not None and heard.stop and heard.head is not None
                    and heard.head == chain.head_hmac and heard.records == chain.records)
    if proxy_stopped is not None and not head_matches:
        if heard is None or not heard.reports:
            detail = "the proxy reported no head over its private channel"
        elif not heard.stop:
            detail = (f"its last report ({heard.records} records) was not its stop report (killed, or "
                      "another process stopped in its place)")
        else:
            detail = (f"the proxy's final report says {heard.records} records ending in MAC "
                      f"{str(heard.head)[:16]}, the file holds {chain.records if chain else None} ending in "
                      f"{str(chain.head_hmac if chain else None)[:16]}")
        fail("evidence_head_mismatch", "the evidence file does not end where the run's proxy said it did: " + detail)
    exit_code = proxy_stopped.exit_code if proxy_stopped else None
    if proxy_stopped is not None and exit_code != 0:
        fail("proxy_exit_unclean", f"the proxy exited with {exit_code!r}, not 0 (killed or crashed)")
    if final != "proxy_stop":
        fail("proxy_stop_missing", f"the evidence ends with {final or 'nothing'}, not the proxy's proxy_stop record")
    pids: dict[str, int | None] = {"the proxy the harness started": harness_pid, "proxy_start": start_pid,
                                   "proxy_stop": stop_pid}
    if proxy_stopped is not None and proxy_stopped.pid != harness_pid:
        pids["the proxy the harness stopped"] = proxy_stopped.pid
    if heard is not None and heard.pid is not None:
        pids["the head reports"] = heard.pid
    if len(starts) != 1 or len(set(pids.values())) != 1:
        fail("proxy_pid_mismatch", "the proxy that started, stopped and reported is not one process: "
             + ", ".join(f"{k} {v}" for k, v in pids.items()) + f" ({len(starts)} proxy_start records)")
    if case_exited is not None and alive is not True:
        fail("proxy_dead_at_case_exit", "the run's proxy was not running when Case exited: what Case used after "
             "it died was not the run's proxy")
    transport = proxy_stopped.metrics_transport if proxy_stopped else None
    peer = proxy_stopped.metrics_peer_pid if proxy_stopped else None
    if sandboxed and proxy_stopped is not None and (transport != "unix" or peer is None or peer != harness_pid):
        fail("metrics_not_from_run_proxy", f"/metrics was read over {transport or 'nothing'} from pid {peer}, not "
             f"over the private unix socket from the proxy the harness started (pid {harness_pid})")
    return ProxyProof(chain_mode=mode, chain_verified=verified, channel_head_matches=head_matches,
                      exit_code=exit_code, final_record=final, harness_pid=harness_pid, start_pid=start_pid,
                      stop_pid=stop_pid, alive_at_case_exit=alive, metrics_transport=transport,
                      metrics_peer_pid=peer), reasons


def proof_line(proof: ProxyProof | None) -> str:
    """The report text's line: which chain mode was checked and what held."""
    if proof is None:
        return "evidence proof: - (no proxy was started)"
    mode = {KEYED_MODE: "HMAC-SHA256 under the run key", "sha256": "plain SHA-256 only"}.get(proof.chain_mode or "",
                                                                                         "not checked")
    return (f"evidence proof: {mode}, {'verified' if proof.chain_verified else 'NOT verified'}; head "
            f"{'matches' if proof.channel_head_matches else 'does NOT match'} the proxy's stop report; proxy pid "
            f"{proof.harness_pid} exit {proof.exit_code}, /metrics over {proof.metrics_transport or '-'} from pid "
            f"{proof.metrics_peer_pid}")
