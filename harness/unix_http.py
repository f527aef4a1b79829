"""HTTP/1.1 over a unix socket, for the harness's own calls to the run's proxy.

In a sandboxed run the proxy listens only on a unix socket in a harness-private
directory; the harness reaches it there for ``/readyz`` and the ``/metrics`` scrape.
"""

from __future__ import annotations

import http.client
import socket
import struct
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

    def peer_pid(self) -> int | None:
        """The pid of the process that accepted the connection (SO_PEERCRED, set by the
        kernel at connect): which process answered, not which one says it did."""
        if self.sock is None:
            return None
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        return struct.unpack("3i", raw)[0] or None


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
    status, body, _ = unix_http_get_peer(socket_path, path, headers=headers, timeout_s=timeout_s,
                                         max_bytes=max_bytes)
    return status, body


def unix_http_get_peer(socket_path: str, path: str, *, headers: Mapping[str, str] | None = None,
                       timeout_s: float = 5.0, max_bytes: int = 4 * 1024 * 1024) -> tuple[int, bytes, int | None]:
    """``unix_http_get`` plus the answering process's pid (see ``peer_pid``)."""
    deadline = time.monotonic() + timeout_s
    conn = UnixHTTPConnection(socket_path, timeout_s)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        peer = conn.peer_pid()
        resp = conn.getresponse()
        return resp.status, read_bounded(resp, deadline, max_bytes), peer
    except (OSError, http.client.HTTPException) as exc:
        raise OSError(f"request failed ({type(exc).__name__})") from None
    finally:
        conn.close()
