"""What a client gets when the backend answers with an error, as a pure function.

The official SDK reads `{"error": {"message", "type", "param", "code"}}`; an engine that
answers in that shape (vLLM's 400/404, llama.cpp's errors) is relayed byte for byte.
Two answers are not relayed as they are:

- 401/403 from the backend means it refused the PROXY's credentials (the client's token
  never travels upstream), so passing it on would tell the client its own token is wrong.
  It becomes a 502 `backend_auth_refused` that points at the proxy's configuration.
- Any other error body that is not the OpenAI shape (vLLM's `{"error":"Unauthorized"}`,
  an HTML page from something in between) is replaced by an OpenAI-shaped body with the
  same status and code `backend_error`; the backend's own text is not echoed.
"""

from __future__ import annotations

import orjson

from .codes import ErrorCode
from .errors import error_body, error_status

AUTH_REFUSED_MESSAGE = ("the backend refused the proxy's credentials; check the backend key "
                        "(CTO_HARNESS_CASE_LOCAL_API_KEY or ..._FILE) the proxy was started with")


def is_openai_error(body: bytes) -> bool:
    """Whether ``body`` is a JSON object whose `error` is an object with a string `message`."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str)


def client_error(status: int, body: bytes) -> tuple[int, bytes] | None:
    """The (status, body) to send instead of the backend's error answer, or None to
    relay the backend's answer unchanged."""
    if status in (401, 403):
        return error_status(ErrorCode.BACKEND_AUTH_REFUSED), error_body(ErrorCode.BACKEND_AUTH_REFUSED, AUTH_REFUSED_MESSAGE)
    if is_openai_error(body):
        return None
    kind = "invalid_request_error" if status < 500 else "api_error"
    message = f"the backend answered HTTP {status} without an OpenAI error body"
    return status, orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": ErrorCode.BACKEND_ERROR}})
