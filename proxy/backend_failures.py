"""The ways talking to the backend can fail, in one place so the HTTP client
(``proxy.backend_http``) and its response parser (``proxy.response_parser``) raise the
same classes, which ``proxy.upstream.upstream_error_kind`` maps to error codes."""

from __future__ import annotations


class BackendError(Exception):
    """Talking to the backend failed."""


class BackendUnreachable(BackendError):
    """No connection could be made to any allowed address of the backend."""


class BackendProtocolError(BackendError):
    """The backend sent something that is not a valid HTTP/1.1 response, or the
    connection ended before the response did."""


class AddressRefused(BackendError):
    """The backend name resolved only to addresses the pin does not allow."""
