"""What the client gets for a backend's error answer (proxy.backend_errors), pure, plus
the wiring through the proxy in front of the scripted backend (a TEST FIXTURE)."""

from __future__ import annotations

import json

import openai
import orjson
import pytest

from proxy.backend_errors import client_error, is_openai_error
from tests.proxy_support import ADMITTED, ProxyUnderTest, make_proxy, proxy  # noqa: F401

VLLM_404 = orjson.dumps({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                   "param": "model", "code": 404}})


def test_openai_shaped_errors_are_relayed_unchanged() -> None:
    assert is_openai_error(VLLM_404)
    assert client_error(404, VLLM_404) is None
    assert client_error(500, VLLM_404) is None


@pytest.mark.parametrize("body", [b'{"error":"Unauthorized"}', b"<html>bad gateway</html>", b"", b"[1]",
                                  b'{"error": {"msg": "no message"}}', b'{"detail": "Not Found"}'])
def test_other_error_bodies_become_the_openai_shape_with_the_same_status(body: bytes) -> None:
    status, out = client_error(400, body)  # type: ignore[misc]
    assert status == 400
    err = json.loads(out)["error"]
    assert err["code"] == "backend_error" and err["type"] == "invalid_request_error"
    assert "400" in err["message"]
    assert client_error(503, body)[1] and json.loads(client_error(503, body)[1])["error"]["type"] == "api_error"  # type: ignore[index]


@pytest.mark.parametrize("status", [401, 403])
def test_a_backend_refusing_the_proxys_key_is_a_502_not_the_clients_fault(status: int) -> None:
    for body in (b'{"error":"Unauthorized"}', VLLM_404):
        code, out = client_error(status, body)  # type: ignore[misc]
        err = json.loads(out)["error"]
        assert code == 502 and err["code"] == "backend_auth_refused"
        assert "CTO_HARNESS_CASE_LOCAL_API_KEY" in err["message"]


async def test_hostile_backend_error_bodies_reach_the_sdk_in_its_shape(proxy: ProxyUnderTest) -> None:  # noqa: F811
    """A backend (the scripted fixture) answers 401 in vLLM's non-OpenAI shape: the SDK
    must not see an AuthenticationError, which would blame the client's own token."""
    backend = proxy.backend
    backend.fail_status, backend.fail_raw = 401, b'{"error":"Unauthorized"}'
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502 and info.value.code == "backend_auth_refused"
    backend.fail_status, backend.fail_raw = 429, b"slow down"
    with pytest.raises(openai.RateLimitError) as rl:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=[{"role": "user", "content": "x"}])
    assert rl.value.code == "backend_error"
    rec = proxy.requests_evidence()[-2]
    assert (rec["decision"], rec["reason"], rec["status"]) == ("admitted", "backend_status_401", 502)
