"""proxy.backend_http, the lean HTTP/1.1 client to the backend, against a raw asyncio
server on 127.0.0.1 that answers with scripted bytes (so framing edge cases, broken
responses and connection reuse can be produced exactly; no HTTP library in between)."""

from __future__ import annotations

import asyncio
import random
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from proxy.backend_http import (
    AddressRefused,
    BackendPool,
    BackendProtocolError,
    BackendResponse,
    BackendUnreachable,
)
from proxy.upstream_policy import UpstreamTarget, classify_upstream
from tests.proxy_support import read_http_request


@dataclass
class RawBackend:
    """Reads each request (head plus Content-Length body), then writes the next scripted
    answer: a list of byte pieces, each sent with a short pause, then optionally closes."""

    answers: list[tuple[list[bytes] | None, bool]] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def target(self) -> UpstreamTarget:
        target = classify_upstream(f"http://127.0.0.1:{self.port}/v1")
        assert isinstance(target, UpstreamTarget)
        return target

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head, body = await read_http_request(reader)
                self.requests.append(head + body)
                pieces, close = self.answers.pop(0)
                if pieces is None:  # silent: answer nothing until the client hangs up (bounded)
                    await asyncio.wait_for(reader.read(), 5)
                    break
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawBackend]:
    backend = RawBackend()
    await backend.start()
    yield backend
    await backend.stop()


async def _body(resp: BackendResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.chunks()])


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n%s" % (
        len(body), body)


EVENTS = [b'data: {"a":1}\n\n', b'data: {"b":22}\n\n']
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x;ext=1\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0]) + b"%X\r\n%s\r\n" % (len(EVENTS[1]), EVENTS[1])
           + b"0\r\nX-Trailer: t\r\n\r\n")
CHUNKED_BODY = b"".join(EVENTS)


async def test_request_is_sent_as_written_and_the_connection_is_reused(raw: RawBackend) -> None:
    raw.answers = [([_ok(b'{"x":1}')], False), ([_ok(b'{"y":2}')], False)]
    pool = BackendPool(raw.target(), 5)
    try:
        for expected in (b'{"x":1}', b'{"y":2}'):
            resp = await pool.request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], b"{}")
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await _body(resp) == expected
            resp.release()
        assert raw.connections == 1  # kept alive and reused
        assert raw.requests[0] == (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}" % raw.port)
    finally:
        await pool.close()


async def test_chunked_body_is_decoded_wherever_the_reads_cut_it(raw: RawBackend) -> None:
    """Every cut of the response into pieces yields the same body: the parser keeps
    partial chunk-size lines, payloads and CRLFs across reads (seeded)."""
    rng = random.Random(20261125)
    cuts_list = [sorted(rng.sample(range(1, len(CHUNKED)), k)) for k in (1, 3, 8, 20) for _ in range(3)]
    cuts_list.append(list(range(1, len(CHUNKED))))  # one byte at a time
    raw.answers = [([CHUNKED[a:b] for a, b in zip([0, *cuts], [*cuts, len(CHUNKED)], strict=True)], False)
                   for cuts in cuts_list]
    pool = BackendPool(raw.target(), 5)
    try:
        for _ in cuts_list:
            resp = await pool.request("POST", "/v1/chat/completions", [], b"{}")
            assert await _body(resp) == CHUNKED_BODY
            assert resp.complete()
            resp.release()
        assert raw.connections == 1
    finally:
        await pool.close()


async def test_close_delimited_and_bodiless_answers(raw: RawBackend) -> None:
    raw.answers = [([b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil", b" close"], True),
                   ([b"HTTP/1.1 204 No Content\r\n\r\n"], False),
                   ([b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", _ok(b"after hints")], False)]
    pool = BackendPool(raw.target(), 5)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"until close"
        resp.release()
        resp = await pool.request("GET", "/v1/models", [])
        assert resp.status == 204 and resp.complete() and await _body(resp) == b""
        resp.release()
        resp = await pool.request("GET", "/v1/models", [])
        assert resp.status == 200 and await _body(resp) == b"after hints"
        resp.release()
        assert raw.connections == 2  # the close-delimited answer used up its connection
    finally:
        await pool.close()


async def test_connection_close_and_leftover_bytes_mean_no_reuse(raw: RawBackend) -> None:
    raw.answers = [([_ok(b"a", b"Connection: close\r\n")], False), ([_ok(b"b") + b"junk"], False),
                   ([_ok(b"c")], False)]
    pool = BackendPool(raw.target(), 5)
    try:
        for expected in (b"a", b"b", b"c"):
            resp = await pool.request("GET", "/v1/models", [])
            assert await _body(resp) == expected
            await asyncio.sleep(0.01)  # let any bytes after the response arrive
            resp.release()
        assert raw.connections == 3
    finally:
        await pool.close()


@pytest.mark.parametrize("answer", [
    b"SMTP/1.0 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",            # NUL in a value
    b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\nContent-Length: 0\r\n\r\n",           # bare LF
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 0\r\n\r\n",        # obsolete line folding
])
async def test_malformed_heads_are_protocol_errors(raw: RawBackend, answer: bytes) -> None:
    raw.answers = [([answer], False)]
    pool = BackendPool(raw.target(), 5)
    try:
        with pytest.raises(BackendProtocolError):
            resp = await pool.request("GET", "/v1/models", [])
            await _body(resp)
        assert pool.open_connections == 0
    finally:
        await pool.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",      # not hex
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",  # no CRLF after data
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",                      # closed early
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",              # closed mid-chunk
])
async def test_broken_bodies_are_protocol_errors(raw: RawBackend, answer: bytes) -> None:
    raw.answers = [([answer], True)]
    pool = BackendPool(raw.target(), 5)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        with pytest.raises(BackendProtocolError):
            await _body(resp)
        resp.close()
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_a_close_before_the_head_is_a_protocol_error(raw: RawBackend) -> None:
    raw.answers = [([], True)]
    pool = BackendPool(raw.target(), 5)
    try:
        with pytest.raises(BackendProtocolError):
            await pool.request("POST", "/v1/chat/completions", [], b"{}")
    finally:
        await pool.close()


async def test_idle_connection_closed_by_the_backend_is_not_reused(raw: RawBackend) -> None:
    raw.answers = [([_ok(b"1")], True), ([_ok(b"2")], False)]  # the backend closes after the first
    pool = BackendPool(raw.target(), 5)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"1"
        resp.release()
        await asyncio.sleep(0.05)  # the FIN arrives: the pool drops the connection
        assert pool.open_connections == 0
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"2"
        resp.release()
        assert raw.connections == 2
    finally:
        await pool.close()


async def test_cancelled_wait_closes_the_connection(raw: RawBackend) -> None:
    """A request given up while the backend is silent (client gone, first-byte timeout)
    must close its connection so the backend sees it and stops."""
    raw.answers = [(None, False)]  # reads the request, answers nothing
    pool = BackendPool(raw.target(), 5)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await pool.request("POST", "/v1/chat/completions", [], b"{}")
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_large_body_is_paused_and_resumed_without_loss(raw: RawBackend) -> None:
    body = bytes(range(256)) * (4 * 4096 + 3)  # about 4 MiB: past the high-water mark
    raw.answers = [([_ok(body)], False)]
    pool = BackendPool(raw.target(), 5)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        await asyncio.sleep(0.2)  # the reader is away: the body piles up to the mark, then reading pauses
        assert await _body(resp) == body
        resp.release()
    finally:
        await pool.close()


async def test_connect_failures_and_the_pin() -> None:
    closed = classify_upstream("http://127.0.0.1:9/v1")  # discard port: nothing listens
    assert isinstance(closed, UpstreamTarget)
    pool = BackendPool(closed, 2)
    with pytest.raises(BackendUnreachable):
        await pool.request("GET", "/v1/models", [])
    # A name pinned to loopback that resolves elsewhere never gets a connection.
    local = classify_upstream("http://localhost:9/v1")
    assert isinstance(local, UpstreamTarget)
    pool = BackendPool(local, 2)
    real_resolve = pool._resolve

    async def resolve_elsewhere(loop):  # type: ignore[no-untyped-def]
        return [(*info[:4], ("10.0.0.1", 9)) for info in await real_resolve(loop)]

    pool._resolve = resolve_elsewhere  # type: ignore[method-assign]
    with pytest.raises(AddressRefused):
        await pool.request("GET", "/v1/models", [])


async def test_a_header_with_a_line_break_is_never_sent(raw: RawBackend) -> None:
    pool = BackendPool(raw.target(), 5)
    try:
        with pytest.raises(ValueError):
            await pool.request("POST", "/v1/chat/completions", [("X-Note", "a\r\nX-Injected: 1")], b"{}")
        assert raw.requests == [] and raw.connections == 0
    finally:
        await pool.close()


@pytest.fixture
def tls_files(tmp_path):  # type: ignore[no-untyped-def]
    """A throwaway self-signed certificate for 127.0.0.1 (openssl, from install-system-deps)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_https_backend_is_verified(tls_files) -> None:  # type: ignore[no-untyped-def]
    """An https backend is reached over TLS with the certificate checked: trusted, the
    request goes through; untrusted (the system store), no connection is made."""
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_ok(b"over tls"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    target = classify_upstream(f"https://127.0.0.1:{port}/v1")
    assert isinstance(target, UpstreamTarget)
    try:
        pool = BackendPool(target, 5, ssl_context=ssl.create_default_context(cafile=str(cert)))
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"over tls"
        resp.close()
        await pool.close()
        untrusting = BackendPool(target, 5)
        with pytest.raises(BackendUnreachable):
            await untrusting.request("GET", "/v1/models", [])
        await untrusting.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_base_path_is_encoded_and_idle_connections_expire(raw: RawBackend) -> None:
    """A configured path prefix reaches the backend as a valid request target; a pooled
    connection idle past the keep-alive limit is closed by the proxy, not reused."""
    raw.answers = [([_ok(b"1")], False), ([_ok(b"2")], False)]
    target = classify_upstream(f"http://127.0.0.1:{raw.port}/my models/v1")
    assert isinstance(target, UpstreamTarget)
    pool = BackendPool(target, 5, keepalive_s=0.05)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"1"
        resp.release()
        assert pool.open_connections == 1
        await asyncio.sleep(0.2)
        assert pool.open_connections == 0
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"2"
        resp.release()
        assert raw.connections == 2
        assert raw.requests[0].startswith(b"GET /my%20models/v1/models HTTP/1.1\r\n")
    finally:
        await pool.close()


async def test_oversized_heads_and_chunk_lines_are_refused(raw: RawBackend) -> None:
    """Bytes without the line end they need are taken only up to a limit: a header line
    that never ends, and chunk framing (a chunk-size line with an endless extension)
    that never yields a body byte. llhttp holds none of it, but a backend sending it
    would hold the connection forever with the idle watchdog content."""
    raw.answers = [([b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024)], False),
                   ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1;x="]
                    + [b"a" * (16 * 1024)] * 8, False)]
    pool = BackendPool(raw.target(), 5)
    try:
        with pytest.raises(BackendProtocolError, match="head is too large"):
            await pool.request("GET", "/v1/models", [])
        resp = await pool.request("GET", "/v1/models", [])
        async with asyncio.timeout(10):  # bounds the test if the limit were lost
            with pytest.raises(BackendProtocolError, match="chunk framing without body"):
                await _body(resp)
        resp.close()
    finally:
        await pool.close()


async def test_head_timeout_covers_the_wait_and_closes_the_connection(raw: RawBackend) -> None:
    raw.answers = [(None, False)]  # reads the request, answers nothing
    pool = BackendPool(raw.target(), 5)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/v1/chat/completions", [], b"{}", head_timeout_s=0.2)
        assert 0.15 < asyncio.get_running_loop().time() - started < 2
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_ipv6_loopback_backend() -> None:
    """An IPv6 literal backend: connected by address, Host header in brackets."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(_ok(b"v6"))
        await writer.drain()
        writer.close()

    try:
        server = await asyncio.start_server(answer, "::1", 0)
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    port = server.sockets[0].getsockname()[1]
    target = classify_upstream(f"http://[::1]:{port}/v1")
    assert isinstance(target, UpstreamTarget)
    pool = BackendPool(target, 5)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        assert await _body(resp) == b"v6"
        resp.release()
        assert seen[0].startswith(b"GET /v1/models HTTP/1.1\r\nHost: [::1]:%d\r\n" % port)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_idle_limit_counts_only_time_spent_waiting_for_the_backend(raw: RawBackend) -> None:
    """A backend that goes quiet mid-body times out; a reader that is itself slow between
    reads (a slow client downstream) while the backend keeps sending does not; and the
    watchdog that fired while the reader was busy is re-armed, so a backend that goes
    quiet after that still times out."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw.answers = [([head + b"2\r\nab\r\n"], False),                      # then silence
                   ([head] + [b"1\r\nx\r\n"] * 5 + [b"0\r\n\r\n"], False),
                   ([head + b"1\r\ny\r\n"], False),                        # then silence
                   (None, False)]  # keeps the connection open: waits for a request never sent
    pool = BackendPool(raw.target(), 5)
    try:
        resp = await pool.request("GET", "/v1/models", [])
        got = []
        with pytest.raises(TimeoutError):
            async for chunk in resp.chunks(0.2):
                got.append(chunk)
        assert got == [b"ab"]
        resp.close()
        resp = await pool.request("GET", "/v1/models", [])
        body = b""
        async for chunk in resp.chunks(0.2):
            body += chunk
            await asyncio.sleep(0.3)  # busy longer than the idle limit after every read
        assert body == b"xxxxx"
        resp.release()
        resp = await pool.request("GET", "/v1/models", [])
        chunks = resp.chunks(0.2)
        assert await anext(chunks) == b"y"
        await asyncio.sleep(0.3)  # the watchdog fires while the reader is busy
        async with asyncio.timeout(5):  # bounds the test if the watchdog were lost
            with pytest.raises(TimeoutError, match="the backend sent nothing for the idle limit"):
                await anext(chunks)
        resp.close()
    finally:
        await pool.close()


async def test_readiness_probe_reads_at_most_a_bounded_model_listing(raw: RawBackend, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A backend whose /v1/models answer never ends in size cannot make the probe hold it
    all: past the limit the backend is not ready, and says why."""
    from proxy.readiness import MAX_LISTING_BYTES, Readiness
    from proxy.settings import ProxySettings
    from proxy.upstream import Upstream

    listing = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
    huge = b'{"object":"list","data":[' + b'{"id":"x"},' * (MAX_LISTING_BYTES // 10) + b'{"id":"m"}]}'
    raw.answers += [([_ok(listing)], False), ([_ok(huge)], False), ([_ok(listing)], False)]
    settings = ProxySettings(decision_file=tmp_path / "d", admission_file=tmp_path / "a", evidence_file=tmp_path / "e",
                             base_url=f"http://127.0.0.1:{raw.port}/v1", proxy_token="t" * 16)
    upstream = Upstream(raw.target(), settings)
    await upstream.start()
    readiness = Readiness(upstream, "m", interval_s=60, timeout_s=10)
    try:
        assert (await readiness.check_once()).ready
        state = await readiness.check_once()
        assert not state.ready and state.reason == f"backend /v1/models answer is larger than {MAX_LISTING_BYTES} bytes"
        assert (await readiness.check_once()).ready
        assert raw.connections == 2  # the oversized answer's connection was closed, not reused
    finally:
        await upstream.close()


@pytest.mark.parametrize("shape", ["JSON answer, 1 KiB, one read", "SSE stream, 200 events, 8 per read"])
def test_the_parser_micro_bench_reads_its_responses_whole(shape: str) -> None:
    """bench.response_parser_micro times whole responses on a reused connection: its
    check (body read whole, connection back in the pool) holds for each shape."""
    from bench.response_parser_micro import seconds_per_response, shapes
    from proxy import backend_http

    reads, expected = shapes()[shape]
    assert seconds_per_response(backend_http, reads, expected, count=3, repeats=1) > 0
    with pytest.raises(AssertionError):  # a body cut short is noticed, not timed
        seconds_per_response(backend_http, [*reads[:-1], reads[-1][:-1]], expected, count=1, repeats=1)


async def test_each_responses_parser_is_freed_without_the_cycle_collector(raw: RawBackend) -> None:
    """llhttp holds the parser's bound callbacks (a reference cycle); unbroken, every
    response's parser waited for the cycle collector, which cost about a fifth of the
    proxy's CPU per request at 64 connections. With the collector off, none may pile up."""
    import gc

    from proxy.response_parser import ResponseParser

    def parsers() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, ResponseParser))

    raw.answers = [([_ok(b'{"x":1}')], False) for _ in range(20)]
    pool = BackendPool(raw.target(), 5)
    gc.collect()
    gc.disable()
    try:
        before = parsers()
        for _ in range(20):
            resp = await pool.request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], b"{}")
            assert await _body(resp) == b'{"x":1}'
            resp.release()
        assert parsers() - before <= 1  # at most the one in use
    finally:
        gc.enable()
        await pool.close()
