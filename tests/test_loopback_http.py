"""harness.run.http_request: loopback HTTP for probes and the bench that never goes
through a proxy named by the environment. Real sockets on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.run import http_get, http_request


class _Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = self.command.encode() + b" " + self.headers.get("Authorization", "").encode() + b" " + body
        self.send_response(201)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"no")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_post_and_get_reach_the_server_and_ignore_env_proxies(echo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: using it would fail
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert http_request("POST", echo_url + "/x", body=b'{"a":1}', headers={"Authorization": "Bearer t"}) == (
        201, b'POST Bearer t {"a":1}')
    assert http_get(echo_url + "/missing") == (404, b"no")


def test_failures_never_carry_the_url(echo_url: str) -> None:
    with pytest.raises(OSError) as info:
        http_request("POST", "http://127.0.0.1:9/secret-path", body=b"x")
    assert "secret-path" not in str(info.value) and "127.0.0.1" not in str(info.value)
    with pytest.raises(OSError):
        http_get(echo_url + "/big", max_bytes=1)  # "no" is two bytes
