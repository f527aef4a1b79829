"""Property tests of proxy.response_parser (llhttp through httptools), sans-IO: no socket,
the parser is fed bytes cut at points Hypothesis picks.

- a valid response, however it is cut, yields the same status, headers and body;
- arbitrary bytes, and valid responses with a byte changed, inserted or dropped, never
  raise anything but BackendProtocolError;
- each kind of hostile head named in issue 18 is refused, however it is cut.

Examples are bounded (``max_examples``, no deadline) so the file stays well under 20 s on
a loaded 2-core machine; no example database is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.backend_failures import BackendProtocolError
from proxy.response_parser import MAX_HEAD_BYTES, ResponseHead, ResponseParser

PROPS = settings(max_examples=120, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Names the framing is built from; the generated headers never use them.
FRAMING = {"content-length", "transfer-encoding", "connection", "proxy-connection", "upgrade", "keep-alive"}


@dataclass
class Collector:
    """A ResponseSink that keeps what it was given."""

    heads: list[ResponseHead] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ends: int = 0

    def on_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_end(self) -> None:
        self.ends += 1


def feed_cut(wire: bytes, cuts: list[int], sink: Collector | None = None,
             eof: bool = True) -> tuple[ResponseParser, Collector]:
    """Feed ``wire`` in pieces cut at ``cuts``, then (``eof``) the end of the connection."""
    sink = sink or Collector()
    parser = ResponseParser(sink)
    points = sorted({c for c in cuts if 0 < c < len(wire)})
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        parser.feed(wire[a:b])
    if eof:
        parser.feed_eof()
    return parser, sink


def cuts_of(wire: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(wire)), max_size=12)


# --- valid responses

names = st.text(TOKEN, min_size=1, max_size=16).filter(lambda n: n.lower() not in FRAMING)
# A field value: visible ASCII and obs-text, blanks only inside (llhttp drops the blanks
# before a value, the parser those after it).
_vchar = st.sampled_from([bytes([b]) for b in [*range(0x21, 0x7F), *range(0x80, 0x100)]])
values = st.one_of(
    st.just(b""),
    st.tuples(_vchar, st.lists(st.one_of(_vchar, st.sampled_from([b" ", b"\t"])), max_size=30), _vchar)
    .map(lambda t: t[0] + b"".join(t[1]) + t[2]),
    _vchar)


@dataclass
class Valid:
    wire: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool
    until_close: bool


@st.composite
def valid_responses(draw: st.DrawFn) -> Valid:
    version = draw(st.sampled_from(["1.1", "1.0"]))
    status = draw(st.integers(200, 599))
    framing = draw(st.sampled_from(["length", "chunked", "close"] if version == "1.1" else ["length", "close"]))
    if status in (204, 304):
        framing = draw(st.sampled_from(["length", "none"]))
    body = b"" if status in (204, 304) else draw(st.binary(max_size=600))
    reason = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz", max_size=20))
    headers = [(n, v.decode("latin-1")) for n, v in draw(st.lists(st.tuples(names, values), max_size=8))]
    if framing == "length":
        headers.append(("Content-Length", str(len(body) if status not in (204, 304) else draw(st.integers(0, 99)))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked", "chunked "]))))
    wire = b""
    if draw(st.booleans()):  # an interim answer first
        wire += b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    wire += f"HTTP/{version} {status} {reason}\r\n".encode()
    for name, value in headers:
        sep = draw(st.sampled_from([": ", ":", ":\t", ":  "]))
        wire += name.encode() + sep.encode() + value.encode("latin-1") + b"\r\n"
    wire += b"\r\n"
    if framing == "chunked":
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6)))) if body else []
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
            if b > a:
                ext = draw(st.sampled_from([b"", b";x=1", b';name="q"']))
                wire += b"%x%s\r\n%s\r\n" % (b - a, ext, body[a:b])
        wire += b"0\r\n"
        for name, value in draw(st.lists(st.tuples(names, values), max_size=3)):  # trailers, dropped
            wire += name.encode() + b": " + value + b"\r\n"
        wire += b"\r\n"
    elif framing in ("length", "close"):
        wire += body
    headers = [(n, v.rstrip(" \t")) for n, v in headers]
    keep_alive = version == "1.1" and framing != "close"
    return Valid(wire, status, headers, body, keep_alive, framing == "close")


@PROPS
@given(st.data())
def test_a_valid_response_cut_anywhere_parses_the_same(data: st.DataObject) -> None:
    valid = data.draw(valid_responses())
    parser, sink = feed_cut(valid.wire, data.draw(cuts_of(valid.wire)))
    assert parser.complete and sink.ends == 1 and len(sink.heads) == 1
    head = sink.heads[0]
    assert (head.status, head.headers, bytes(sink.body)) == (valid.status, valid.headers, valid.body)
    assert (head.keep_alive, head.until_close) == (valid.keep_alive, valid.until_close)


@PROPS
@given(st.data())
def test_a_response_followed_by_another_is_refused_wherever_cut(data: st.DataObject) -> None:
    """One request, one response: a second response behind the first (a smuggled answer
    for the next request) is refused, whatever reads carry it."""
    first = data.draw(valid_responses().filter(lambda v: not v.until_close))
    second = data.draw(valid_responses())
    wire = first.wire + second.wire
    with pytest.raises(BackendProtocolError):
        feed_cut(wire, data.draw(cuts_of(wire)))


# --- nothing but BackendProtocolError

def _only_protocol_errors(wire: bytes, cuts: list[int]) -> None:
    try:
        parser, sink = feed_cut(wire, cuts)
    except BackendProtocolError:
        return
    # Accepted: then it was one whole response.
    assert parser.complete and sink.ends == 1 and len(sink.heads) == 1
    assert 200 <= sink.heads[0].status <= 599


@PROPS
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=300).map(lambda b: b"HTTP/1.1 200 OK\r\n" + b)),
       st.lists(st.integers(0, 400), max_size=8))
def test_arbitrary_bytes_raise_only_protocol_errors(wire: bytes, cuts: list[int]) -> None:
    _only_protocol_errors(wire, cuts)


@PROPS
@given(st.data())
def test_a_damaged_valid_response_raises_only_protocol_errors(data: st.DataObject) -> None:
    wire = bytearray(data.draw(valid_responses()).wire)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(wire)))
        what = data.draw(st.sampled_from(["set", "insert", "drop"]))
        byte = data.draw(st.sampled_from([0, 9, 10, 13, 32, 43, 45, 48, 58, 59, 0x7F, 0xB2, 0xFF])
                         | st.integers(0, 255))
        if what == "insert":
            wire[at:at] = bytes([byte])
        elif at < len(wire):
            wire[at:at + 1] = b"" if what == "drop" else bytes([byte])
    _only_protocol_errors(bytes(wire), data.draw(cuts_of(bytes(wire))))


# --- hostile heads, each refused

def _refused(wire: bytes, cuts: list[int]) -> None:
    """Refused by the bytes themselves (the connection stays open: no refusal comes from
    its ending before the response did), and no response ended."""
    sink = Collector()
    with pytest.raises(BackendProtocolError):
        feed_cut(wire, cuts, sink, eof=False)
    assert not sink.ends


def _ok(status: bytes = b"200", extra: bytes = b"", body: bytes = b"{}") -> bytes:
    return (b"HTTP/1.1 " + status + b" OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


# Characters Python calls digits that are not ASCII digits (superscripts, Arabic-Indic,
# fullwidth, ...), as one latin-1 byte where they have one, else in UTF-8.
unicode_digits = st.characters(categories=["Nd", "No"]).filter(lambda c: c.isdigit() and not c.isascii())


def _wire_of(c: str) -> bytes:
    try:
        return c.encode("latin-1")
    except UnicodeEncodeError:
        return c.encode("utf-8")


@PROPS
@given(st.data())
def test_status_codes_outside_100_to_599_are_refused(data: st.DataObject) -> None:
    code = data.draw(st.integers(0, 99) | st.integers(600, 999))
    wire = _ok(b"%03d" % code)
    _refused(wire, data.draw(cuts_of(wire)))


@PROPS
@given(st.data())
def test_unicode_digits_in_the_status_or_content_length_are_refused(data: st.DataObject) -> None:
    digit = _wire_of(data.draw(unicode_digits))
    pos = data.draw(st.integers(0, 2))
    if data.draw(st.booleans()):
        status = bytearray(b"200")
        wire = _ok(bytes(status[:pos]) + digit + bytes(status[pos + 1:]))
    else:
        length = data.draw(st.sampled_from([b"", b"1", b"12"]))
        wire = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + length[:pos] + digit + length[pos:] + b"\r\n\r\n" + b"x" * 200)
    _refused(wire, data.draw(cuts_of(wire)))


@PROPS
@given(st.data())
def test_a_bare_lf_or_cr_anywhere_in_the_head_is_refused(data: st.DataObject) -> None:
    """A bare LF after the status line used to hide the next header in the reason phrase."""
    wire = _ok(extra=b"X-Served-Model: other\r\nX-A: 1\r\n")
    head_end = wire.index(b"\r\n\r\n") + 2  # every CRLF of the head, the blank line's included
    ends = [i for i in range(head_end + 1) if wire[i:i + 2] == b"\r\n"]
    at = data.draw(st.sampled_from(ends))
    lone = data.draw(st.sampled_from([b"\n", b"\r"]))
    damaged = wire[:at] + lone + wire[at + 2:]
    _refused(damaged, data.draw(cuts_of(damaged)))


@PROPS
@given(st.data())
def test_an_oversize_head_is_refused_in_one_read_or_many(data: st.DataObject) -> None:
    """Past MAX_HEAD_BYTES the head is refused, also when it arrives whole in one read
    (the hand-written parser checked only while the blank line was missing)."""
    count = data.draw(st.integers(1, 200))
    size = MAX_HEAD_BYTES // count + data.draw(st.integers(1, 400))
    extra = b"".join(b"X-%d: " % i + b"v" * size + b"\r\n" for i in range(count))
    wire = _ok(extra=extra)
    _refused(wire, data.draw(st.just([]) | cuts_of(wire)))


@PROPS
@given(st.data())
def test_an_interim_flood_or_a_header_line_that_never_ends_is_refused(data: st.DataObject) -> None:
    """Interim heads count toward the limit; a line that never ends is refused once the
    limit has come in, while the connection is still open."""
    if data.draw(st.booleans()):
        wire = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * (MAX_HEAD_BYTES // 30) + _ok()
    else:
        wire = b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES + 10)
    _refused(wire, data.draw(cuts_of(wire)))


BAD_LENGTHS = [b"+2", b"-2", b"2a", b"0x2", b"2 2", b"2, 2", b"2,2", b"", b"2.0", b"1e1", b"\xb2",
               b"99999999999999999999999"]


@PROPS
@given(st.data())
def test_bad_content_lengths_are_refused(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["bad", "duplicate that differs"]))
    if kind == "bad":
        extra = b"Content-Length: " + data.draw(st.sampled_from(BAD_LENGTHS)) + b"\r\n"
    else:
        a = data.draw(st.integers(0, 50))
        b = data.draw(st.integers(0, 50).filter(lambda n: n != a))
        extra = b"Content-Length: %d\r\nContent-Length: %d\r\n" % (a, b)
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"\r\n" + b"x" * 60
    _refused(wire, data.draw(cuts_of(wire)))


BAD_CHUNK_SIZES = [b"+3", b"-3", b"0x3", b" 3", b"3 ", b"\t3", b"3\t", b"g", b"3g", b"", b"3.0",
                   b"1" + b"0" * 16, b"f" * 17, b"\xb3"]


@PROPS
@given(st.data())
def test_bad_chunk_sizes_are_refused(data: st.DataObject) -> None:
    size = data.draw(st.sampled_from(BAD_CHUNK_SIZES))
    before = data.draw(st.sampled_from([b"", b"2\r\nab\r\n"]))
    wire = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + before + size + b"\r\nabc\r\n0\r\n\r\n")
    _refused(wire, data.draw(cuts_of(wire)))


@PROPS
@given(st.data())
def test_content_length_with_transfer_encoding_and_other_codings_are_refused(data: st.DataObject) -> None:
    te = data.draw(st.sampled_from([b"chunked", b"gzip", b"gzip, chunked", b"chunked, chunked", b"identity"]))
    both = data.draw(st.booleans()) or te == b"chunked"
    fields = [b"Transfer-Encoding: " + te + b"\r\n"] + ([b"Content-Length: 3\r\n"] if both else [])
    if data.draw(st.booleans()):
        fields.reverse()
    wire = b"HTTP/1.1 200 OK\r\n" + b"".join(fields) + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    _refused(wire, data.draw(cuts_of(wire)))


@PROPS
@given(st.data())
def test_versions_other_than_1_0_and_1_1_and_a_101_are_refused(data: st.DataObject) -> None:
    wire = data.draw(st.sampled_from([
        b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ]))
    _refused(wire, data.draw(cuts_of(wire)))


@PROPS
@given(st.data())
def test_oversize_trailers_and_endless_chunk_framing_are_refused(data: st.DataObject) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"
    if data.draw(st.booleans()):
        tail = b"0\r\n" + b"".join(b"T-%d: " % i + b"t" * 1000 + b"\r\n" for i in range(70)) + b"\r\n"
    else:
        tail = b"1;ext=" + b"e" * (2 * MAX_HEAD_BYTES)
    wire = head + tail
    # In reads of at most 32 KiB, as a socket delivers them (one read holding it all
    # is bounded by the read's size instead).
    cuts = sorted({*data.draw(cuts_of(wire)), *range(len(head), len(wire), 32 * 1024)})
    _refused(wire, cuts)


def test_after_a_refusal_the_parser_refuses_everything() -> None:
    sink = Collector()
    parser = ResponseParser(sink)
    with pytest.raises(BackendProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\nX: y\r\n\r\n")
    with pytest.raises(BackendProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(BackendProtocolError):
        parser.feed_eof()
    assert not sink.heads and not parser.complete
