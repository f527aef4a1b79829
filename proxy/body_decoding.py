"""Request body decoding done by the proxy itself (issue 18).

aiohttp's server decodes ``Content-Encoding`` on its own and answers what it cannot
decode (zstd, br without the module, a corrupt gzip) with a plain-text 400 or a 500
before any proxy code runs: no record, no metric, not the OpenAI error shape. The proxy
turns that off (``auto_decompress=False`` in proxy.server) and decodes here, so every
request is seen and recorded, and the body limit applies to the DECODED size (a
decompression bomb stops at the limit, it is never inflated in full). Pure functions:
no socket, no aiohttp.
"""

from __future__ import annotations

import zlib

import brotli

from .codes import ErrorCode
from .redact import clip

try:  # Python 3.14 has it in the standard library
    from compression.zstd import ZstdDecompressor, ZstdError  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports.zstd import ZstdDecompressor, ZstdError

SUPPORTED: tuple[str, ...] = ("gzip", "deflate", "br", "zstd")
# More than this many stacked codings is not something a client needs.
MAX_CODINGS = 2


class DecodeError(Exception):
    """Why a body could not be decoded: an error code from proxy.errors, a message
    that names the problem (never body bytes), and the encoding label for metrics
    (one of SUPPORTED or ``unsupported``)."""

    def __init__(self, code: ErrorCode, message: str, encoding: str) -> None:
        super().__init__(message)
        self.code, self.message, self.encoding = code, message, encoding


def parse_content_encoding(header: str | None) -> list[str]:
    """The codings in the order they were applied (``identity`` dropped), lower-case;
    raises DecodeError for an unknown coding or too many of them."""
    if not header:
        return []
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    for c in codings:
        if c not in SUPPORTED:
            shown = clip("".join(ch if " " < ch < "\x7f" else "?" for ch in c), 32)
            raise DecodeError(ErrorCode.UNSUPPORTED_CONTENT_ENCODING,
                              f"Content-Encoding '{shown}' is not supported; use one of "
                              f"{', '.join(SUPPORTED)}, or none", "unsupported")
    if len(codings) > MAX_CODINGS:
        raise DecodeError(ErrorCode.UNSUPPORTED_CONTENT_ENCODING,
                          f"at most {MAX_CODINGS} stacked content codings are accepted", "unsupported")
    return codings


def encoding_label(codings: list[str]) -> str | None:
    """One bounded label for records and metrics: the outermost coding, or None."""
    return codings[-1] if codings else None


def decode_body(raw: bytes, codings: list[str], limit: int) -> bytes:
    """``raw`` with its codings undone (last applied, first undone), never producing
    more than ``limit`` bytes at any step: raises DecodeError when the decoded body
    would exceed it or the data is corrupt or truncated."""
    data = raw
    for coding in reversed(codings):
        data = _decode_one(data, coding, limit)
    return data


def _too_large(coding: str, limit: int) -> DecodeError:
    return DecodeError(ErrorCode.REQUEST_TOO_LARGE,
                       f"request body exceeds the limit of {limit} bytes once decoded ({coding})", coding)


def _corrupt(coding: str, what: str) -> DecodeError:
    return DecodeError(ErrorCode.INVALID_CONTENT_ENCODING, f"request body is not valid {coding} data: {what}", coding)


def _decode_one(data: bytes, coding: str, limit: int) -> bytes:
    if coding == "gzip":
        return _zlib(data, zlib.MAX_WBITS | 16, coding, limit)
    if coding == "deflate":
        # RFC 9110 says zlib-wrapped; some clients send raw deflate. The zlib header's
        # check bits tell them apart.
        wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
        return _zlib(data, zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS, coding, limit)
    if coding == "br":
        return _brotli(data, limit)
    if coding == "zstd":
        return _zstd(data, limit)
    raise _corrupt(coding, "unknown coding")  # parse_content_encoding lets none through


def _zlib(data: bytes, wbits: int, coding: str, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error:
        raise _corrupt(coding, "corrupt stream") from None
    if len(out) > limit:
        raise _too_large(coding, limit)
    if not d.eof:
        raise _corrupt(coding, "truncated stream")
    if d.unused_data:
        raise _corrupt(coding, "data after the end of the stream")
    return out


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    try:
        out = d.process(data, output_buffer_limit=limit + 1)
    except brotli.error:
        raise _corrupt("br", "corrupt stream") from None
    if len(out) > limit or not d.can_accept_more_data():
        raise _too_large("br", limit)
    if not d.is_finished():
        raise _corrupt("br", "truncated stream")
    return out


def _zstd(data: bytes, limit: int) -> bytes:
    d = ZstdDecompressor()
    try:
        out = d.decompress(data, limit + 1)
    except (ZstdError, EOFError):
        raise _corrupt("zstd", "corrupt stream") from None
    if len(out) > limit:
        raise _too_large("zstd", limit)
    if not d.eof:
        raise _corrupt("zstd", "truncated stream")
    if d.unused_data:
        raise _corrupt("zstd", "data after the end of the frame")
    return out
