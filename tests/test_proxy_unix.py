"""`case-proxy serve --unix PATH`: the harness's per-run proxy listens on a unix socket in
a private directory, never on a TCP port any local user could reach.

The backend is the scripted test fixture (harness.scripted_backend), in-process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp

from harness.unix_http import unix_http_get
from tests.proxy_support import ADMITTED, ROOT, cli, proxy_env


def _tcp_listen_inodes(pid: int) -> set[str]:
    """Socket inodes of ``pid`` that are TCP listeners (IPv4 or IPv6)."""
    fd_inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            fd_inodes.add(target[8:-1])
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # TCP_LISTEN
                listening.add(cols[9])
    return fd_inodes & listening


async def test_serve_on_a_unix_socket_only_owner_reachable_and_removed_at_stop(scripted_backend,
                                                                               tmp_path: Path) -> None:
    env = proxy_env(tmp_path, scripted_backend.base_url)
    sock = tmp_path / "proxy.sock"
    log = open(tmp_path / "proxy.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--unix", str(sock)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == f"CASE_PROXY_LISTENING unix:{sock}"
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode)
        # A hostile local user gets nothing: no bit for group or others, from the start.
        assert stat.S_IMODE(mode) & 0o077 == 0, oct(stat.S_IMODE(mode))
        assert _tcp_listen_inodes(proc.pid) == set()
        for _ in range(200):
            status, _ = await asyncio.to_thread(unix_http_get, str(sock), "/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        conn = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.post("http://127.0.0.1:8787/v1/chat/completions",
                              headers={"Authorization": f"Bearer {env['CASE_PROXY_TOKEN']}"},
                              json={"model": ADMITTED, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == ADMITTED
        status, body = await asyncio.to_thread(unix_http_get, str(sock), "/metrics")
        assert status == 200 and b"case_proxy_" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        log.close()
    assert code == 0
    assert not sock.exists()


def test_unix_usage_errors_are_named(tmp_path: Path) -> None:
    env = proxy_env(tmp_path, "http://127.0.0.1:8000/v1")
    taken = tmp_path / "taken.sock"
    taken.write_text("")
    cases = [
        (["--unix", "relative.sock"], "not an absolute path"),
        (["--unix", str(taken)], "already exists"),
        (["--unix", str(tmp_path / "x.sock"), "--port", "0"], "not both"),
        (["--unix", str(tmp_path / "x.sock"), "--workers", "2"], "one worker only"),
        (["--unix", str(tmp_path / "missing" / "x.sock")], "does not exist"),
        (["--unix", "/" + "d" * 120 + "/x.sock"], "longer than 107 bytes"),
    ]
    for args, message in cases:
        out = cli("serve", *args, env=env)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
    assert taken.read_text() == ""
