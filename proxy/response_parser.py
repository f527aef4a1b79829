"""The backend's HTTP/1.1 response, parsed by llhttp (Node's parser, through httptools),
sans-IO: bytes in, a head, body pieces and an end out, or ``BackendProtocolError``.

Why llhttp and not the hand-written parser this replaces: response framing (status line,
header lines, Content-Length, chunk sizes) is where request-smuggling bugs live, and the
hand-written one had them in small (``'²'.isdigit()`` accepted as a digit, a bare LF
hiding a header in the reason phrase). llhttp in its strict mode refuses bare LF and CR,
obsolete line folding, control characters in values, signs and non-digits in
Content-Length, duplicate Content-Length, Content-Length with Transfer-Encoding and
malformed or overflowing chunk sizes. Why httptools and not aiohttp's
``HttpResponseParser`` (also llhttp): aiohttp turns on llhttp's lenient header and
bare-LF modes for responses unless it runs in debug mode.

What llhttp leaves to the caller is checked here: the version (HTTP/1.0 or 1.1 only), the
status code (100 to 599; a 101 was never asked for; other 1xx answers are skipped), the
transfer coding (only ``chunked``), one response per request, and sizes, since llhttp
itself holds nothing but httptools joins each header's pieces in memory:

- the head: its status lines and header lines as parsed (every interim head counted) at
  most ``MAX_HEAD_BYTES``, checked on every header whether the head came in one read or
  many; and the raw bytes received before the head is complete, so a header line that
  never ends is refused once that much has come;
- trailers: at most ``MAX_HEAD_BYTES`` as parsed (then dropped, never relayed);
- after the head, reads that move nothing along (no body byte, no trailer, no end: an
  endless chunk extension, a trailer line that never ends) at most ``MAX_HEAD_BYTES``
  in a row.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import httptools

from .backend_failures import BackendProtocolError

MAX_HEAD_BYTES = 64 * 1024
# What a parsed line costs beyond the bytes its callback sees: "HTTP/1.1 200 " + CRLF for a
# status line, ": " + CRLF for a header line.
_STATUS_LINE_OVERHEAD = 15
_FIELD_OVERHEAD = 4
_VERSIONS = frozenset({"1.1", "1.0"})
_HEAD_TOO_LARGE = f"the backend's response head is too large (over {MAX_HEAD_BYTES} bytes)"


class ResponseHead(NamedTuple):
    """The final (non-1xx) response head, as the proxy uses it."""

    status: int
    headers: list[tuple[str, str]]
    content_type: str  # the last Content-Type, as a dict of the headers would keep it
    keep_alive: bool  # the connection may carry another request after this response
    until_close: bool  # the body ends when the backend closes the connection


class ResponseSink(Protocol):
    """Where a parser delivers what it parsed (the connection, or a test's collector)."""

    def on_head(self, head: ResponseHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...


class ResponseParser:
    """One response to one request. ``feed`` the bytes as they arrive and ``feed_eof``
    when the backend closes; both raise ``BackendProtocolError`` and nothing else, after
    which the parser refuses further bytes."""

    __slots__ = ("_sink", "_llhttp", "_headers", "_head", "_head_size", "_head_raw", "_trailer_size", "_stall",
                 "_progress", "_error", "complete", "failed")

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink
        # llhttp holds this parser's bound callbacks, so the two form a reference cycle:
        # release() breaks it, or every response would wait for the cycle collector.
        self._llhttp: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._head: ResponseHead | None = None
        self._head_size = 0  # parsed bytes of every head so far (interim ones included)
        self._head_raw = 0  # raw bytes received while the final head is incomplete
        self._trailer_size = 0
        self._stall = 0  # bytes of reads in a row, after the head, that moved nothing along
        self._progress = False
        self._error: BackendProtocolError | None = None
        self.complete = False
        self.failed = False

    @property
    def head(self) -> ResponseHead | None:
        return self._head

    # -- fed by the connection

    def release(self) -> None:
        """Done with this response: drop llhttp (and with it the cycle through its
        callbacks) so the parser is freed at once. Bytes fed afterwards are refused."""
        self._llhttp = None
        if not self.complete:
            self.failed = True

    def feed(self, data: bytes) -> None:
        if self.failed:
            raise self._error or BackendProtocolError("the backend's response was already refused")
        llhttp = self._llhttp
        if llhttp is None:
            raise BackendProtocolError("the backend sent data after its response was released")
        self._progress = False
        try:
            llhttp.feed_data(data)
        except Exception as exc:  # llhttp's refusal, or a check of ours raised in a callback
            self._fail(exc)
        if self._head is None:
            self._head_raw += len(data)
            if self._head_raw > MAX_HEAD_BYTES:
                self._refuse(_HEAD_TOO_LARGE)
        elif self._progress:
            self._stall = 0
        elif not self.complete:
            self._stall += len(data)
            if self._stall > MAX_HEAD_BYTES:
                self._refuse(f"the backend sent {MAX_HEAD_BYTES} bytes of chunk framing without body or end")

    def feed_eof(self) -> None:
        """The backend closed the connection: the end of a close-delimited body, else a
        response cut short."""
        if self.complete:
            return
        head = self._head
        if head is not None and head.until_close and not self.failed:
            self.complete = True
            self._sink.on_end()
            return
        self._refuse("the backend closed the connection before the response ended")

    def _fail(self, exc: Exception) -> None:
        error = self._error
        if error is None:
            reason = "".join(c for c in str(exc)[:80] if " " <= c <= "~")
            error = self._error = BackendProtocolError(f"the backend's response is not valid HTTP/1.1: {reason}")
        self.failed = True
        raise error from exc

    def _refuse(self, message: str) -> None:
        """Refuse the response (also from inside an llhttp callback, where the error is
        kept here because httptools replaces it with its own)."""
        error = self._error = self._error or BackendProtocolError(message)
        self.failed = True
        raise error

    # -- llhttp's callbacks (httptools looks them up by name)

    def on_message_begin(self) -> None:
        if self._head is not None:
            self._refuse("the backend sent more than one response")
        self._headers = []
        self._head_size += _STATUS_LINE_OVERHEAD

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason)
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse(_HEAD_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _FIELD_OVERHEAD
        if self._head is None:
            self._head_size += size
            if self._head_size > MAX_HEAD_BYTES:
                self._refuse(_HEAD_TOO_LARGE)
            # llhttp drops the blanks before a value, not those after it.
            self._headers.append((name.decode("latin-1"), value.rstrip(b" \t").decode("latin-1")))
        else:  # a trailer: bounded, then dropped (never relayed)
            self._progress = True
            self._trailer_size += size
            if self._trailer_size > MAX_HEAD_BYTES:
                self._refuse(f"the backend's trailers are too large (over {MAX_HEAD_BYTES} bytes)")

    def on_headers_complete(self) -> None:
        llhttp = self._llhttp
        assert llhttp is not None  # called by llhttp itself, from feed()
        if llhttp.get_http_version() not in _VERSIONS:
            self._refuse("the backend's status line is not HTTP/1.1 or HTTP/1.0")
        status = llhttp.get_status_code()
        if not 100 <= status <= 599:
            self._refuse(f"the backend's status code {status} is outside 100-599")
        if status < 200:
            if status == 101:
                self._refuse("the backend switched protocols, which was not asked for")
            return  # an interim answer (103 Early Hints): the real one follows
        head = self._head = _final_head(status, self._headers, llhttp.should_keep_alive())
        if head is None:
            self._refuse("the backend used a transfer coding other than chunked")
        else:
            self._progress = True
            self._sink.on_head(head)

    def on_body(self, data: bytes) -> None:
        self._progress = True
        self._sink.on_body(data)

    def on_message_complete(self) -> None:
        if self._head is not None:  # else the end of an interim answer
            self._progress = True
            self.complete = True
            self._sink.on_end()


def _final_head(status: int, headers: list[tuple[str, str]], keep_alive: bool) -> ResponseHead | None:
    """The head of a final response, or None when its transfer coding is not exactly
    ``chunked`` (a body the proxy cannot frame: gzip under chunked, chunked twice, a
    coding delimited by close). llhttp has already refused duplicate or malformed
    Content-Length and Content-Length beside Transfer-Encoding."""
    content_type = ""
    has_length = False
    codings: list[str] = []
    for name, value in headers:
        low = name.lower()
        if low == "content-type":
            content_type = value
        elif low == "content-length":
            has_length = True
        elif low == "transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(","))
    if codings and codings != ["chunked"]:
        return None
    until_close = not codings and not has_length and status not in (204, 304)
    return ResponseHead(status, headers, content_type, keep_alive and not until_close, until_close)
