"""HTTP/1.1 over a unix socket, for the harness's own calls to the run's proxy.

In a sandboxed run the proxy listens only on a unix socket in a harness-private
directory; the harness reaches it there for ``/readyz`` and the ``/metrics`` scrape.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Mapping


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` with the TCP connect replaced by a unix socket connect."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def read_bounded(resp: http.client.HTTPResponse, deadline: float, max_bytes: int) -> bytes:
    """The response body, read within ``deadline`` (monotonic) and ``max_bytes``: a slow
    or endless answer raises (``TimeoutError``, ``OSError``) instead of holding a run."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("response too slow")
        data = resp.read1(65536)
        if not data:
            return b"".join(chunks)
        size += len(data)
        if size > max_bytes:
            raise OSError("response too large")
        chunks.append(data)


def unix_http_get(socket_path: str, path: str, *, headers: Mapping[str, str] | None = None,
                  timeout_s: float = 5.0, max_bytes: int = 4 * 1024 * 1024) -> tuple[int, bytes]:
    """GET ``path`` with a total deadline and a size limit; errors raise ``OSError``."""
    deadline = time.monotonic() + timeout_s
    conn = UnixHTTPConnection(socket_path, timeout_s)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, read_bounded(resp, deadline, max_bytes)
    except (OSError, http.client.HTTPException) as exc:
        raise OSError(f"request failed ({type(exc).__name__})") from None
    finally:
        conn.close()
