"""The keyed evidence chain (HMAC-SHA256 under the run key) and the head channel: a
party without the key rewrites a log consistently, the way a plain SHA-256 chain allows,
and is caught only by a reader holding the key."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.evidence_channel import HeadChannel, parse_report, read_key_fd
from proxy.evidence_files import link_files, read_evidence_file
from proxy.hashchain import GENESIS, ChainError, HashChainWriter, TornChain, verify_chain

KEY = secrets.token_bytes(32)
ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, n: int, key: bytes | None = KEY, heads: list[tuple[int, int, str]] | None = None) -> None:
    w = HashChainWriter(path, key=key, on_head=(lambda *h: heads.append(h)) if heads is not None else None)
    w.open()
    for i in range(n):
        w.append({"kind": "request", "time": "t", "request_id": str(i)})
    w.close()


def rehash_plain_from(path: Path, start: int, edit: dict[str, object]) -> None:
    """What anyone who can write the file can do to a plain chain: change line
    ``start`` (0-based) and recompute every later prev_sha256 (and every reference to a
    rewritten line) with plain SHA-256. The stale prev_hmac fields are kept (the rewriter
    cannot compute new ones)."""
    lines = path.read_bytes().splitlines()
    out: list[bytes] = []
    prev = GENESIS
    renamed: dict[str, str] = {}  # old line hash -> new: references (forwarding_sha256) follow
    for i, line in enumerate(lines):
        old = hashlib.sha256(line).hexdigest()
        if i >= start:
            obj = json.loads(line)
            if i == start:
                obj.update(edit)
            obj["prev_sha256"] = prev
            if obj.get("forwarding_sha256") in renamed:
                obj["forwarding_sha256"] = renamed[obj["forwarding_sha256"]]
            line = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        out.append(line)
        prev = renamed[old] = hashlib.sha256(line).hexdigest()
    path.write_bytes(b"\n".join(out) + b"\n")


def test_a_keyed_chain_verifies_with_its_key_and_says_which_mode(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    heads: list[tuple[int, int, str]] = []
    _write(path, 4, heads=heads)
    keyed = verify_chain(path, KEY)
    assert keyed.ok and keyed.mode == "hmac-sha256" and keyed.records == 4
    assert heads[-1] == (4, 4, keyed.last_hmac)  # the head reported is the file's head
    plain = verify_chain(path)
    assert plain.ok and plain.mode == "sha256" and plain.last_hmac is None and plain.hmac_lines == 4
    wrong = verify_chain(path, secrets.token_bytes(32))
    assert not wrong.ok and "HMAC-SHA256" in wrong.problems[0]


def test_a_consistent_plain_rewrite_passes_sha256_and_fails_the_mac(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    _write(path, 5)
    rehash_plain_from(path, 2, {"request_id": "99"})
    assert verify_chain(path).ok, "the rewrite must be consistent for the plain chain (else the test proves nothing)"
    keyed = verify_chain(path, KEY)
    assert not keyed.ok
    assert any(p.startswith("line 4: prev_hmac") and "without the key" in p for p in keyed.problems), keyed.problems


def test_records_without_a_mac_fail_a_keyed_check(tmp_path: Path) -> None:
    """An impersonating proxy without the key appends plain records to the run's file."""
    path = tmp_path / "e.jsonl"
    _write(path, 2)
    w = HashChainWriter(path)  # no key: extends the plain chain, as any other proxy could
    w.open()
    w.append({"kind": "request", "time": "t", "request_id": "forged"})
    w.close()
    assert verify_chain(path).ok
    keyed = verify_chain(path, KEY)
    assert keyed.problems == ["line 3: no prev_hmac: not written by the proxy holding the run key"]


def test_a_keyed_writer_refuses_to_extend_a_file_it_cannot_verify(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    _write(path, 2, key=None)
    with pytest.raises(TornChain):
        HashChainWriter(path, key=KEY).open()
    with pytest.raises(ChainError):
        HashChainWriter(tmp_path / "x.jsonl", key=b"short")
    own = tmp_path / "own.jsonl"
    _write(own, 2)
    _write(own, 1)  # reopened with the key: the chain goes on
    assert verify_chain(own, KEY).ok and verify_chain(own, KEY).records == 3


def test_rotation_keeps_working_keyed(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    w = HashChainWriter(path, key=KEY)
    w.open()
    w.append({"kind": "request", "time": "t", "request_id": "0"})
    path.rename(tmp_path / "e.1.jsonl")
    assert w.rotate({"kind": "log_sealed", "time": "t"},
                    lambda sha, n: {"kind": "log_continued", "time": "t", "continues_sha256": sha,
                                    "continues_records": n})
    w.append({"kind": "request", "time": "t", "request_id": "1"})
    w.close()
    files = [read_evidence_file(tmp_path / "e.1.jsonl", KEY), read_evidence_file(path, KEY)]
    assert [f.verdict.ok for f in files] == [True, True], [f.verdict.problems for f in files]
    assert all(f.verdict.mode == "hmac-sha256" for f in files)
    assert link_files(files).order == [[str(tmp_path / "e.1.jsonl"), str(path)]]


def test_the_head_channel_reports_every_write_and_marks_the_stop(tmp_path: Path) -> None:
    r, w = os.pipe()
    channel = HeadChannel(w, pid=4242)
    path = tmp_path / "e.jsonl"
    writer = HashChainWriter(path, key=KEY, on_head=channel.report)
    writer.open()
    writer.append({"kind": "proxy_start"})
    writer.append({"kind": "proxy_stop"})
    writer.close()
    assert channel.stop()
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    reports = [parse_report(line) for line in data.splitlines()]
    assert [(x.records, x.stop) for x in reports if not isinstance(x, str)] == [(1, False), (2, False), (2, True)]
    final = reports[-1]
    assert not isinstance(final, str) and final.head == verify_chain(path, KEY).last_hmac and final.pid == 4242
    assert isinstance(parse_report(b'{"records": 1}'), str)


def test_the_key_descriptor_is_read_once_and_bad_keys_are_named(tmp_path: Path) -> None:
    def fd_with(text: bytes) -> int:
        r, w = os.pipe()
        os.write(w, text)
        os.close(w)
        return r

    fd = fd_with(KEY.hex().encode())
    assert read_key_fd(fd) == KEY
    with pytest.raises(OSError):
        os.fstat(fd)  # closed after reading
    for text, words in ((b"zz", "hex key"), (b"00" * 8, "at least 16"), (b"0" * 200, "more than")):
        with pytest.raises(ValueError, match=words):
            read_key_fd(fd_with(text))


def test_verify_evidence_checks_the_macs_only_with_the_key_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    _write(path, 3)
    rehash_plain_from(path, 1, {"request_id": "7"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASE_PROXY_")}

    def verify(key: bytes | None) -> subprocess.CompletedProcess[str]:
        fds: tuple[int, ...] = ()
        e = dict(env)
        if key is not None:
            r, w = os.pipe()
            os.write(w, key.hex().encode())
            os.close(w)
            fds, e["CASE_PROXY_CHAIN_KEY_FD"] = (r,), str(r)
        try:
            return subprocess.run([sys.executable, "-m", "proxy", "verify-evidence", str(path)], env=e, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60, pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)

    plain = verify(None)
    assert plain.returncode == 0 and "were NOT checked" in plain.stdout, plain.stdout
    keyed = verify(KEY)
    assert keyed.returncode == 1 and "mode hmac-sha256" in keyed.stdout and "prev_hmac" in keyed.stdout, keyed.stdout
    assert KEY.hex() not in keyed.stdout + keyed.stderr


BASE_ENV = {"CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:8000/v1", "CASE_PROXY_TOKEN": "t" * 32,
            "CTO_HARNESS_CASE_DECISION_FILE": "/d.json", "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": "/a.json",
            "CASE_PROXY_EVIDENCE_FILE": "/e.jsonl"}


def _key_pipe() -> int:
    r, w = os.pipe()
    os.write(w, KEY.hex().encode())
    os.close(w)
    return r


def test_settings_read_the_key_once_and_never_show_it(tmp_path: Path) -> None:
    from proxy.settings import load_settings

    head_r, head_w = os.pipe()
    try:
        settings = load_settings(env={**BASE_ENV, "CASE_PROXY_CHAIN_KEY_FD": str(_key_pipe()),
                                      "CASE_PROXY_CHAIN_HEAD_FD": str(head_w)})
        assert settings.chain_key is not None and settings.chain_key.get_secret_value() == KEY
        assert settings.head_fd == head_w
        assert KEY.hex() not in repr(settings) and KEY.hex() in settings.secret_values()  # redacted if ever met
    finally:
        os.close(head_r)
        os.close(head_w)


@pytest.mark.parametrize("extra,words", [
    ({"CASE_PROXY_CHAIN_KEY_FD": "three"}, "CASE_PROXY_CHAIN_KEY_FD: 'three' is not a file descriptor number"),
    ({"CASE_PROXY_CHAIN_KEY_FD": "987"}, "CASE_PROXY_CHAIN_KEY_FD: cannot read descriptor 987"),
    ({"CASE_PROXY_CHAIN_HEAD_FD": "5"}, "head reports need a keyed chain"),
    ({"CASE_PROXY_CHAIN_HEAD_FD": "1", "key": ""}, "is a standard stream"),
    ({"CASE_PROXY_CHAIN_HEAD_FD": "file", "key": ""}, "is not a pipe or socket"),
    ({"CASE_PROXY_CHAIN_HEAD_FD": "pipe", "key": "", "CASE_PROXY_WORKERS": "2"}, "one worker only"),
])
def test_bad_chain_descriptors_are_named(tmp_path: Path, extra: dict[str, str], words: str) -> None:
    from proxy.settings import ConfigError, load_settings

    env = {**BASE_ENV, **{k: v for k, v in extra.items() if k != "key"}}
    opened: list[int] = []
    if "key" in extra:  # read and closed by load_settings: not ours to close afterwards
        env["CASE_PROXY_CHAIN_KEY_FD"] = str(_key_pipe())
    if env.get("CASE_PROXY_CHAIN_HEAD_FD") == "file":
        opened.append(os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT))
        env["CASE_PROXY_CHAIN_HEAD_FD"] = str(opened[-1])
    if env.get("CASE_PROXY_CHAIN_HEAD_FD") == "pipe":
        opened.extend(os.pipe())
        env["CASE_PROXY_CHAIN_HEAD_FD"] = str(opened[-1])
    try:
        with pytest.raises(ConfigError) as err:
            load_settings(env=env)
        assert any(words in p for p in err.value.problems), err.value.problems
        assert KEY.hex() not in str(err.value)
    finally:
        for fd in opened:
            os.close(fd)


async def test_a_keyed_proxy_rotates_on_sighup_and_reports_its_heads(scripted_backend: Any, tmp_path: Path) -> None:
    """`case-proxy serve` as the harness starts it (key and head pipe inherited): after a
    rename and SIGHUP both files verify under the key and link up, and the head reports
    end with a stop report naming the new file's last line."""
    import asyncio
    import signal

    import openai

    from tests.proxy_support import ADMITTED, proxy_env

    env = proxy_env(tmp_path, scripted_backend.base_url)
    evidence = Path(env["CASE_PROXY_EVIDENCE_FILE"])
    key_fd = _key_pipe()
    head_r, head_w = os.pipe()
    env.update({"CASE_PROXY_CHAIN_KEY_FD": str(key_fd), "CASE_PROXY_CHAIN_HEAD_FD": str(head_w)})
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "0"], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, pass_fds=(key_fd, head_w))
    os.close(key_fd)
    os.close(head_w)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        base_url = line.split()[1].decode()
        client = openai.AsyncOpenAI(base_url=base_url, api_key=env["CASE_PROXY_TOKEN"], max_retries=0)
        msgs: Any = [{"role": "user", "content": "hi"}]
        for _ in range(100):  # until ready
            try:
                await client.chat.completions.create(model=ADMITTED, messages=msgs)
                break
            except openai.APIStatusError:
                await asyncio.sleep(0.05)
        evidence.rename(tmp_path / "evidence.jsonl.1")
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if evidence.exists() and evidence.stat().st_size:
                break
            await asyncio.sleep(0.02)
        await client.chat.completions.create(model=ADMITTED, messages=msgs)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    data = b""
    while chunk := os.read(head_r, 65536):
        data += chunk
    os.close(head_r)
    assert code == 0
    files = [read_evidence_file(tmp_path / "evidence.jsonl.1", KEY), read_evidence_file(evidence, KEY)]
    assert [f.verdict.ok for f in files] == [True, True], [f.verdict.problems for f in files]
    assert link_files(files).order == [[str(tmp_path / "evidence.jsonl.1"), str(evidence)]]
    last = parse_report(data.splitlines()[-1])
    assert not isinstance(last, str) and last.stop and last.pid == proc.pid
    assert (last.records, last.head) == (files[1].verdict.records, files[1].verdict.last_hmac)
    assert last.total == files[0].verdict.records + files[1].verdict.records
    assert KEY.hex() not in (tmp_path / "proxy.log").read_text()


@pytest.mark.parametrize("size", [16, 32, 64, 65, 200])
def test_the_writers_fast_mac_is_hmac_sha256(size: int) -> None:
    from proxy.hashchain import LineMac, line_hmac

    key = secrets.token_bytes(size)
    for line in (b"", b"x", os.urandom(1000)):
        assert LineMac(key).hexdigest(line) == line_hmac(key, line)
