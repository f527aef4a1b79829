"""harness.proxy_proof as a pure function: an honest run's facts give no reason; each fact
a hostile party could change gives exactly its own reason, saying what is wrong."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from harness import events as ev
from harness.proxy_proof import judge_proxy_proof
from proxy.evidence import EvidenceRecord

PID = 4242
HEAD = "ab" * 32


def _honest() -> dict[str, Any]:
    return {
        "started": {"event": "proxy_started", "pid": PID, "port": None, "listen": "unix",
                    "chain_mode": "hmac-sha256", "head_channel": "pipe"},
        "exited": {"event": "case_process_exited", "exit_code": 0, "duration_s": 1.0, "timed_out": False,
                   "namespace_survivors": 0, "dns_queries": 0, "dns_queries_sha256": None, "proxy_alive": True},
        "stopped": {"event": "proxy_stopped", "exit_code": 0, "evidence_sha256": None, "metrics_sha256": None,
                    "pid": PID, "metrics_transport": "unix", "metrics_peer_pid": PID,
                    "chain": {"mode": "hmac-sha256", "ok": True, "records": 3, "head_hmac": HEAD, "problems": []},
                    "head_report": {"reports": 3, "records": 3, "head": HEAD, "pid": PID, "stop": True,
                                    "problems": []}},
        "evidence": [EvidenceRecord(kind="proxy_start", time="t", pid=PID, chain="hmac-sha256"),
                     EvidenceRecord(kind="request", time="t"),
                     EvidenceRecord(kind="proxy_stop", time="t", pid=PID)],
    }


def _typed(facts: dict[str, Any]) -> tuple[Any, ...]:
    """The facts as the typed events the report hands over (harness.events)."""
    return (ev.ProxyStarted.model_validate(facts["started"]),
            ev.CaseProcessExited.model_validate(facts["exited"]) if facts["exited"] else None,
            ev.ProxyStopped.model_validate(facts["stopped"]) if facts["stopped"] else None,
            facts["evidence"])


def _judge(facts: dict[str, Any], sandboxed: bool = True) -> set[str]:
    _, reasons = judge_proxy_proof(*_typed(facts), sandboxed=sandboxed)
    return {r.code for r in reasons}


def test_an_honest_run_has_no_reason() -> None:
    section, reasons = judge_proxy_proof(*_typed(_honest()), sandboxed=True)
    assert reasons == [] and section is not None and section.chain_verified and section.channel_head_matches


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(facts: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = facts
        for p in parents:
            target = target[p]
        target[last] = value
    return change


CHANGES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("MACs do not verify", _set("stopped.chain.ok", False), "evidence_mac_invalid"),
    ("checked unkeyed", _set("stopped.chain.mode", "sha256"), "evidence_not_keyed"),
    ("file ends elsewhere than reported", _set("stopped.head_report.head", "cd" * 32), "evidence_head_mismatch"),
    ("no stop report", _set("stopped.head_report.stop", False), "evidence_head_mismatch"),
    ("nothing reported", _set("stopped.head_report", {"reports": 0, "records": None, "head": None, "pid": None,
                                                       "stop": False, "problems": []}), "evidence_head_mismatch"),
    ("no head channel", _set("stopped.head_report", None), "evidence_head_mismatch"),
    ("another pid was stopped", _set("stopped.pid", PID + 3), "proxy_pid_mismatch"),
    ("killed", _set("stopped.exit_code", -9), "proxy_exit_unclean"),
    ("no proxy_stop record", lambda f: f["evidence"].pop(), "proxy_stop_missing"),
    ("another pid stopped", lambda f: f["evidence"].__setitem__(2, EvidenceRecord(kind="proxy_stop", time="t",
                                                                                pid=PID + 1)),
     "proxy_pid_mismatch"),
    ("another pid started", lambda f: f["evidence"].insert(1, EvidenceRecord(kind="proxy_start", time="t",
                                                                            pid=PID, chain="hmac-sha256")),
     "proxy_pid_mismatch"),
    ("dead when Case exited", _set("exited.proxy_alive", False), "proxy_dead_at_case_exit"),
    ("metrics over TCP", _set("stopped.metrics_transport", "tcp"), "metrics_not_from_run_proxy"),
    ("metrics from another pid", _set("stopped.metrics_peer_pid", PID + 7), "metrics_not_from_run_proxy"),
    ("proxy never stopped", _set("stopped", None), "proxy_not_stopped"),
]


@pytest.mark.parametrize("name,change,code", CHANGES, ids=[c[0] for c in CHANGES])
def test_each_changed_fact_gives_its_own_reason(name: str, change: Callable[[dict[str, Any]], None],
                                                code: str) -> None:
    facts = copy.deepcopy(_honest())
    change(facts)
    assert code in _judge(facts), name


def test_metrics_over_tcp_is_no_reason_for_an_unsandboxed_run() -> None:
    """--no-sandbox runs listen on TCP and are unproven anyway; they are not made fail."""
    facts = copy.deepcopy(_honest())
    facts["stopped"]["metrics_transport"], facts["stopped"]["metrics_peer_pid"] = "tcp", None
    assert _judge(facts, sandboxed=False) == set()
