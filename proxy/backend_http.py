"""A lean HTTP/1.1 client for the one pinned backend, with a keep-alive pool.

Why not ``aiohttp.ClientSession``: per request it builds a ClientRequest, merges header
sets, looks the body up in a payload registry and runs trace, cookie and timer hooks;
py-spy put that at a fifth of the proxy's CPU per request. The backend is one host,
checked by the upstream pin, answering HTTP/1.1 with a Content-Length, chunked or
close-delimited body: this module does exactly that. No redirects are followed, no
content coding is undone, no request is retried (a POST reaching the backend twice
would run a generation twice).

Connections are made only to addresses ``check_resolved_address`` allows for the target
(no DNS rebinding onto another host). Responses are parsed by llhttp
(``proxy.response_parser``); malformed or broken ones raise ``BackendProtocolError``;
failures to connect raise ``BackendUnreachable`` or ``AddressRefused``; a connect that
takes too long raises ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import cast

from .backend_failures import AddressRefused, BackendError, BackendProtocolError, BackendUnreachable
from .response_parser import ResponseHead, ResponseParser
from .upstream_policy import UpstreamTarget, check_resolved_address

__all__ = ["AddressRefused", "BackendError", "BackendPool", "BackendProtocolError", "BackendResponse",
           "BackendUnreachable", "BodyTooLarge"]

# Body bytes buffered ahead of the reader before the socket is paused.
_HIGH_WATER = 1024 * 1024


class BodyTooLarge(ValueError):
    """A body read whole was longer than the reader's limit."""


class BackendResponse:
    """Status and headers as soon as the head has arrived; the body as it arrives."""

    __slots__ = ("status", "headers", "content_type", "sink", "_conn", "_pieces", "_buffered", "_done", "_error",
                 "_waiter", "_reusable", "_finished", "_waiting_since", "_idle_s", "_idle_timer", "_interrupted")

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[str, str]], content_type: str,
                 reusable: bool) -> None:
        self.status = status
        self.headers = headers
        self.content_type = content_type
        # Takes body bytes as they arrive while the reader waits in ``chunks`` with
        # nothing buffered (so order is kept); what it cannot pass on it ``put_back``s.
        self.sink: Callable[[bytes], None] | None = None
        self._conn = conn
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reusable = reusable
        self._finished = False
        self._waiting_since = 0.0
        self._idle_s = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._interrupted = False

    # -- fed by the connection

    def _feed(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and self._waiter is not None and not self._pieces:
            self._waiting_since = self._conn.loop.time()  # the backend is not quiet
            sink(data)
            return
        self.put_back(data)

    def put_back(self, data: bytes) -> None:
        """Buffer ``data`` for the reader (and wake it). The sink's way to hand back bytes
        it took: nothing is buffered after them, since it took them only when nothing was."""
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _end(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the proxy

    def interrupt(self) -> None:
        """End ``chunks`` early (after what is buffered): the sink has stopped the body."""
        self._interrupted = True
        self._wake()

    def complete(self) -> bool:
        """The whole body is here (no waiting needed to read it)."""
        return self._done

    def take(self) -> bytes:
        """Everything buffered so far, as one bytes object."""
        pieces = self._pieces
        if len(pieces) == 1:
            data = pieces.popleft()
        else:
            data = b"".join(pieces)
            pieces.clear()
        if self._buffered > _HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    async def read(self, limit: int | None = None, idle_s: float | None = None) -> bytes:
        """The whole body; BodyTooLarge past ``limit`` bytes, TimeoutError after ``idle_s``
        spent waiting for the backend (see ``chunks``)."""
        if self._done:  # it all came with the head: no wait, so no timer
            data = self.take()
            if limit is not None and len(data) > limit:
                raise BodyTooLarge("backend response exceeds the size limit")
            return data
        parts: list[bytes] = []
        size = 0
        async for data in self.chunks(idle_s):
            size += len(data)
            if limit is not None and size > limit:
                raise BodyTooLarge("backend response exceeds the size limit")
            parts.append(data)
        return b"".join(parts)

    async def chunks(self, idle_s: float | None = None) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (chunked framing removed), until the body ends.
        With ``idle_s``, TimeoutError once the reader has waited that long for the
        backend. One watchdog timer per response, re-armed only when it fires, instead
        of a deadline moved on every chunk (a timer cancelled and made per event)."""
        loop = self._conn.loop
        if idle_s is not None:
            self._idle_s = idle_s
            self._idle_timer = loop.call_at(loop.time() + idle_s, self._watch_idle)
        try:
            while True:
                if self._pieces:
                    yield self.take()
                elif self._interrupted:
                    return
                elif self._done:
                    return
                elif self._error is not None:
                    raise self._error
                else:
                    self._waiting_since = loop.time()
                    self._waiter = loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        finally:
            self._stop_watch()

    def _watch_idle(self) -> None:
        """Time is counted only while the reader waits for the backend: a reader that is
        busy (writing to a slow client) is not the backend going quiet."""
        now = self._conn.loop.time()
        if self._waiter is not None and now - self._waiting_since >= self._idle_s:
            self._idle_timer = None
            self._fail(TimeoutError("the backend sent nothing for the idle limit"))
            return
        since = self._waiting_since if self._waiter is not None else now
        self._idle_timer = self._conn.loop.call_at(since + self._idle_s, self._watch_idle)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the body was
        read to the end and the backend keeps connections open, else it is closed."""
        if self._finished:
            return
        self._finished = True
        self._stop_watch()
        if self._done and not self._pieces and self._reusable:
            self._conn.finished(reuse=True)
        else:
            self._conn.finished(reuse=False)

    def close(self) -> None:
        """Abandon the response (and its connection): the backend sees the connection
        close, so a generation nobody reads stops."""
        if not self._finished:
            self._finished = True
            self._stop_watch()
            self._conn.finished(reuse=False)

    def _stop_watch(self) -> None:
        # Also here, not only when chunks() ends: a reader that stops iterating early
        # leaves the generator to be closed later.
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class _Connection(asyncio.Protocol):
    """One connection (one request at a time); its response is parsed by a
    ``ResponseParser`` made per request, which delivers here (``on_head`` and so on)."""

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: ResponseParser | None = None  # None between requests
        self._head_waiter: asyncio.Future[BackendResponse] | None = None
        self._response: BackendResponse | None = None
        self._paused = False
        self.idle_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or parser.complete:
            # Bytes nobody asked for (between requests): the connection cannot be trusted.
            self._abort(BackendProtocolError("the backend sent data outside a response"))
            return
        try:
            parser.feed(data)
        except BackendProtocolError as exc:
            self._abort(exc)

    def eof_received(self) -> bool:
        parser = self._parser
        if parser is not None and not parser.complete:
            try:
                parser.feed_eof()  # the end of a close-delimited body
            except BackendProtocolError:
                pass  # a response cut short: connection_lost, which follows, says so
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        parser = self._parser
        if parser is not None and not parser.complete:
            self._parser = None
            parser.release()
            err = BackendProtocolError("the backend closed the connection before the response ended")
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_exception(err)
            if self._response is not None:
                self._response._fail(err)

    # -- the parser's sink

    def on_head(self, head: ResponseHead) -> None:
        resp = self._response = BackendResponse(self, head.status, head.headers, head.content_type,
                                                head.keep_alive)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)

    def on_body(self, data: bytes) -> None:
        if self._response is not None:
            self._response._feed(data)

    def on_end(self) -> None:
        if self._response is not None:
            self._response._end()

    # -- flow control, used by the response

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # -- one exchange

    def send(self, head: bytes, body: bytes) -> asyncio.Future[BackendResponse]:
        assert self.transport is not None and self._parser is None
        self._parser, self._response = ResponseParser(self), None
        waiter = self._head_waiter = self.loop.create_future()
        if len(body) > 65536:
            self.transport.writelines((head, body))  # no copy of a large body
        else:
            self.transport.write(head + body)  # one send for the usual small request
        return waiter

    def finished(self, reuse: bool) -> None:
        parser = self._parser
        self._parser = self._response = self._head_waiter = None
        if parser is not None:
            parser.release()
        if reuse and parser is not None and parser.complete and not self.closed and not self._paused:
            self._pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if self._parser is not None:
            self._parser.release()
            self._parser = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self._pool.forget(self)

    def _abort(self, exc: BaseException) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
        if self._response is not None:
            self._response._fail(exc)
        self.close()

def _expire(waiter: asyncio.Future[BackendResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no response head from the backend in time"))


class BackendPool:
    """Keep-alive connections to the pinned target; most recently used first. Made
    inside the event loop it serves, which it keeps: on Python 3.11 every
    ``asyncio.get_running_loop()`` is a getpid system call (three per request here)."""

    def __init__(self, target: UpstreamTarget, connect_timeout_s: float, keepalive_s: float = 4.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        # keepalive_s: an idle connection is closed by us before the engines' own 5 s
        # keep-alive limit (uvicorn under vLLM and SGLang, cpp-httplib under llama.cpp)
        # closes it, so a request is never sent on a connection the backend is closing.
        self.target = target
        # The configured path as a request target: anything outside RFC 3986's path
        # characters is percent-encoded (existing escapes kept).
        self._base_path = urllib.parse.quote(target.base_path, safe="/:@!$&'()*+,;=-._~%")
        self._authority = target.authority
        self._connect_timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        # https: certificates and host names verified against the system's trust store.
        self._ssl = (ssl_context or ssl.create_default_context()) if target.scheme == "https" else None
        # An address literal needs no resolver round trip (the pin checked it already,
        # and checks it again here so the rule lives in one place).
        try:
            ipaddress.ip_address(target.host)
        except ValueError:
            self._literal: list[tuple[str, int]] = []
        else:
            self._literal = [(target.host, target.port)] if check_resolved_address(target, target.host) else []

    async def request(self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes = b"",
                      head_timeout_s: float | None = None) -> BackendResponse:
        """Send one request and wait for the response head, within ``head_timeout_s``
        (connecting included) or raise TimeoutError. The caller must ``release`` or
        ``close`` the response."""
        head = self._head(method, path, headers, body)
        loop = self.loop
        deadline = None if head_timeout_s is None else loop.time() + head_timeout_s
        conn = self._idle_connection()
        if conn is None:
            async with asyncio.timeout_at(deadline):
                conn = await self._connect()
        waiter = conn.send(head, body)
        # A timer on the waiter, not asyncio.timeout: that one took a tenth of a
        # request's CPU at one connection (profiled), for a timer that almost never fires.
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            conn.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _head(self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"{method} {self._base_path}{path} HTTP/1.1\r\nHost: {self._authority}\r\n"]
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # Header values never carry line breaks (the server side refuses them, the
        # configured key is checked at start-up); checked again so nothing is injected.
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            raise ValueError("a header holds a line break; request not sent")
        return text.encode("utf-8", "surrogateescape")

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = self.loop
        target = self.target
        async with asyncio.timeout(self._connect_timeout):
            addresses = self._literal or [
                info[4] for info in await self._resolve(loop) if check_resolved_address(target, str(info[4][0]))]
            if not addresses:
                raise AddressRefused("the backend name resolved to an address outside the upstream pin")
            last: OSError | None = None
            for addr in addresses:
                conn = _Connection(self)
                try:
                    await loop.create_connection(
                        lambda c=conn: c, host=str(addr[0]), port=int(addr[1]), ssl=self._ssl,
                        server_hostname=target.host if self._ssl is not None else None)
                except OSError as exc:
                    last = exc
                    continue
                self._all.add(conn)
                sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
                if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
        raise BackendUnreachable("cannot connect to the backend") from last

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list:  # type: ignore[type-arg]
        try:
            return await loop.getaddrinfo(self.target.host, self.target.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise BackendUnreachable("the backend name does not resolve") from exc

    def put_back(self, conn: _Connection) -> None:
        conn.idle_handle = self.loop.call_later(self._keepalive, conn.close)
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn.idle_handle is not None:
            conn.idle_handle.cancel()
            conn.idle_handle = None
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks
