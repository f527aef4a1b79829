"""The served-model check of an SSE stream, sans-IO: bytes in, checked bytes out.

A backend must not be able to show the client an event the proxy did not check. So the
checker reads the stream exactly as the SSE specification (WHATWG HTML, "Interpreting an
event stream") and the official SDK do: CR, LF and CRLF each end a line, in any mix and
across reads; a blank line dispatches; ``:`` starts a comment; ``data`` values are
joined with LF; other fields carry no data. Every dispatched event's data must be a JSON
object (or exactly ``[DONE]``) without a repeated key, and every ``model`` it names (at
the top level, or ``response.model`` in Responses API events) must be the admitted one.

Only whole blocks (up to and including their blank line) are released, byte for byte as
received: the output is a prefix of the input cut where every SSE parser is between
events, so a client parsing it sees exactly the events that were checked. Events before
the first one that names the model are held back, bounded in count and bytes.

What the specification and common clients read differently is refused rather than
guessed at: a byte order mark at the start (the spec strips it, the SDK does not);
``event``/``id``/``retry`` fields in a block without data (the SDK dispatches an event
there, the spec does not); invalid UTF-8 or a character some line splitters end lines at
(``str.splitlines``: VT, FF, FS, GS, RS, NEL, U+2028, U+2029) outside ``data`` lines.
"""

from __future__ import annotations

import re
from enum import StrEnum

import orjson

from .codes import ErrorCode
from .redact import clip
from .served_model import UsageTotals, find_usage, has_duplicate_key

# What a stream may hold back before an event names its model (issue 18: it was 64 x 16 MiB).
MAX_HELD_EVENTS = 64
MAX_HELD_BYTES = 1024 * 1024
# One event (the block being read) may not grow past this.
MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_DONE = b"[DONE]"
_ABSENT = object()
# Characters str.splitlines() ends a line at beyond CR and LF (httpx's line decoder does too).
_EXTRA_LINE_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


class StreamFault(StrEnum):
    """Why a stream was ended; the value is the record's reason code."""

    MODEL_MISMATCH = ErrorCode.SERVED_MODEL_MISMATCH.value  # the served model is another, or not proven
    PROTOCOL = ErrorCode.BACKEND_PROTOCOL_ERROR.value  # the bytes are not a stream the check can read


class StreamRefused(Exception):
    """The checker refuses the stream from this point. ``cleared`` are the bytes checked
    and released by the same ``feed`` before the fault (forward them, then the error)."""

    def __init__(self, fault: StreamFault, message: str, cleared: bytes = b"") -> None:
        super().__init__(message)
        self.fault = fault
        self.message = message
        self.cleared = cleared


class StreamChecker:
    """Feed it the backend's body bytes as they arrive; forward what ``feed`` returns;
    call ``finish`` at the end of the body. Raises ``StreamRefused`` to end the stream."""

    __slots__ = ("admitted", "usage", "served_model", "verified", "max_event_bytes", "max_held_events",
                 "max_held_bytes", "_buf", "_pos", "_scanned", "_skip_lf", "_started", "_data", "_fields", "_held",
                 "_held_events")

    def __init__(self, admitted: str, usage: UsageTotals, *, max_event_bytes: int = MAX_EVENT_BYTES,
                 max_held_events: int = MAX_HELD_EVENTS, max_held_bytes: int = MAX_HELD_BYTES) -> None:
        self.admitted = admitted
        self.usage = usage
        self.served_model: str | None = None  # the model the stream named (the offending one on a mismatch)
        self.verified = False
        self.max_event_bytes = max_event_bytes
        self.max_held_events = max_held_events
        self.max_held_bytes = max_held_bytes
        self._buf = bytearray()  # bytes after the last released block
        self._pos = 0  # where the next unread line starts in _buf
        self._scanned = 0  # _buf[_pos:_scanned] holds no CR or LF (an unfinished line already searched)
        self._skip_lf = False  # the last line ended in a CR at the end of the input: an LF next is its CRLF
        self._started = False  # past the first bytes (the byte order mark check)
        self._data: list[bytes] | None = None  # the current block's data values
        self._fields = False  # the current block has an event, id or retry field
        self._held = bytearray()
        self._held_events = 0

    # ------------------------------------------------------------------ input

    def feed(self, data: bytes) -> bytes:
        """Checked bytes to forward now (possibly empty)."""
        n = len(data)
        # The usual read is one whole single-line event: 'data: {...}' LF LF, no CR.
        if (not self._buf and self._started and self._data is None and not self._fields and n > 7
                and n <= self.max_event_bytes and data.startswith(b"data:") and data.find(b"\n") == n - 2
                and data[-1] == 10 and b"\r" not in data):
            self._skip_lf = False
            self._check(data[6:-2] if data[5] == 32 else data[5:-2])
            if self.verified:
                if self._held:
                    return self._flush_held() + data
                return data
            self._hold(data, True)
            return b""
        return self._feed_lines(data)

    def finish(self) -> bytes:
        """The end of the body: anything not a whole block, or a stream that never named
        the admitted model, is refused. Returns what is still to forward (normally b"")."""
        if self._buf:
            raise StreamRefused(StreamFault.PROTOCOL, "the backend stream ended in the middle of an event")
        if not self.verified:
            raise StreamRefused(StreamFault.MODEL_MISMATCH,
                                "the backend stream does not name the model that serves it")
        return b""

    # ------------------------------------------------------------------ lines and blocks

    def _feed_lines(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        if not self._started:
            if len(buf) < 3 and _BOM.startswith(buf):
                return b""
            if buf.startswith(_BOM):
                raise StreamRefused(StreamFault.PROTOCOL,
                                    "the backend stream starts with a byte order mark (clients differ on it)")
            self._started = True
        pos = self._pos
        if self._skip_lf and data:
            self._skip_lf = False
            if buf[pos] == 10:  # the LF of a CRLF cut between two reads
                pos += 1
        out: list[bytes] = []
        cut = 0
        size = len(buf)
        # The next CR and LF at or after pos (size: none), each searched again only once
        # passed, so a block costs two C scans of its bytes, not a regex per line; an
        # unfinished line is not searched again from its start on every read.
        scan = self._scanned if self._scanned > pos else pos
        self._scanned = 0
        cr = buf.find(b"\r", scan)
        if cr < 0:
            cr = size
        lf = buf.find(b"\n", scan)
        if lf < 0:
            lf = size
        try:
            while pos < size:
                if cr < pos:
                    cr = buf.find(b"\r", pos)
                    if cr < 0:
                        cr = size
                if lf < pos:
                    lf = buf.find(b"\n", pos)
                    if lf < 0:
                        lf = size
                if lf < cr:
                    end = lf
                    nxt = lf + 1
                    if (nxt < size and buf[nxt] == 10 and buf.startswith(b"data:", pos) and self._data is None
                            and not self._fields):
                        # the usual block: one data line, then a blank line (LF LF)
                        self._data = [bytes(buf[pos + 6 if buf[pos + 5] == 32 else pos + 5:end])]
                        nxt += 1
                        self._block_end(bytes(buf[cut:nxt]), out)
                        cut = pos = nxt
                        continue
                elif cr < size:
                    end = cr
                    nxt = cr + 2 if lf == cr + 1 < size else cr + 1  # CRLF is one line end
                else:  # an unfinished line: wait for more, and do not search it again
                    self._scanned = size - cut
                    break
                if end == pos:  # a blank line: the block up to here is complete
                    self._block_end(bytes(buf[cut:nxt]), out)
                    cut = nxt
                else:
                    self._line(buf, pos, end)
                pos = nxt
        except StreamRefused as refused:
            refused.cleared = b"".join(out)
            raise
        # A CR that ended the input ended a line; an LF arriving next belongs to it.
        self._skip_lf = pos == size and size > 0 and buf[size - 1] == 13
        if cut:
            del buf[:cut]
        self._pos = pos - cut
        if len(buf) > self.max_event_bytes:
            raise StreamRefused(StreamFault.PROTOCOL, "the backend sent an SSE event larger than the limit",
                                b"".join(out))
        return b"".join(out)

    def _line(self, buf: bytearray, start: int, end: int) -> None:
        """One non-blank line, as the specification processes it."""
        colon = buf.find(b":", start, end)
        if colon == start:  # a comment
            self._plain(buf, start, end)
            return
        name = bytes(buf[start:end if colon < 0 else colon])
        if name == b"data":
            if colon < 0:
                value = b""
            else:  # after the colon, less one leading space
                value = bytes(buf[colon + 2 if colon + 1 < end and buf[colon + 1] == 32 else colon + 1:end])
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
            return
        self._plain(buf, start, end)
        if name in (b"event", b"id", b"retry"):
            self._fields = True
        # any other field is ignored, as the specification says

    @staticmethod
    def _plain(buf: bytearray, start: int, end: int) -> None:
        """A line that carries no data must still read the same to every client."""
        try:
            text = buf[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise StreamRefused(StreamFault.PROTOCOL, "the backend stream holds a line that is not UTF-8") from None
        if _EXTRA_LINE_BREAKS.search(text):
            raise StreamRefused(StreamFault.PROTOCOL,
                                "the backend stream holds a line break some clients split lines at")

    def _block_end(self, block: bytes, out: list[bytes]) -> None:
        if len(block) > self.max_event_bytes:
            raise StreamRefused(StreamFault.PROTOCOL, "the backend sent an SSE event larger than the limit")
        data, self._data = self._data, None
        fields, self._fields = self._fields, False
        if data is None:
            if fields:
                raise StreamRefused(StreamFault.PROTOCOL,
                                    "the backend stream has an event with fields but no data (clients differ on it)")
            # comments and blank lines only: nothing is dispatched
            if self.verified:
                out.append(block)
            else:
                self._hold(block, False)
            return
        self._check(data[0] if len(data) == 1 else b"\n".join(data))
        if self.verified:
            if self._held:
                out.append(self._flush_held())
            out.append(block)
        else:
            self._hold(block, True)

    def _hold(self, block: bytes, event: bool) -> None:
        self._held += block
        self._held_events += event
        if self._held_events > self.max_held_events or len(self._held) > self.max_held_bytes:
            raise StreamRefused(StreamFault.MODEL_MISMATCH,
                                f"the backend stream does not name its model within {self.max_held_events} events "
                                f"or {self.max_held_bytes} bytes")

    def _flush_held(self) -> bytes:
        held = bytes(self._held)
        self._held.clear()
        self._held_events = 0
        return held

    # ------------------------------------------------------------------ one event's data

    def _check(self, payload: bytes) -> None:
        """One dispatched event: a JSON object without repeated keys whose named models
        are all the admitted one (``[DONE]`` excepted)."""
        if payload == _DONE:
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamRefused(StreamFault.MODEL_MISMATCH,
                                "the backend stream holds an event whose data is not JSON") from None
        if type(obj) is not dict:
            raise StreamRefused(StreamFault.MODEL_MISMATCH,
                                "the backend stream holds an event that is not a JSON object")
        # Exact: a body equal to the serialization of its parse has no repeated key; only
        # a body that differs pays for the parse that sees every key.
        if orjson.dumps(obj) != payload and has_duplicate_key(payload):
            raise StreamRefused(StreamFault.MODEL_MISMATCH, "the backend stream holds an event that repeats a key")
        model = obj.get("model", _ABSENT)
        # (once verified, the usual event names the admitted model: no call needed)
        if model is not _ABSENT and (not self.verified or model != self.admitted or type(model) is not str):
            self._named(model)
        response = obj.get("response")
        if response is not None and type(response) is dict:
            model = response.get("model", _ABSENT)
            if model is not _ABSENT:
                self._named(model)
        if "usage" in obj or response is not None:  # most chunks carry neither
            usage = find_usage(obj)
            if usage is not None:
                self.usage.take(usage)

    def _named(self, model: object) -> None:
        if model == self.admitted and type(model) is str:
            self.served_model = self.admitted
            self.verified = True
            return
        self.served_model = clip(model if isinstance(model, str) else orjson.dumps(model).decode(), 200)
        raise StreamRefused(StreamFault.MODEL_MISMATCH,
                            "the backend reports a model other than the admitted one; stream ended")
