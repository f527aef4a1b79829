"""Issue 18's stream bypasses (and the non-streaming twin), end to end: a hostile backend sends chosen bytes, the
official ``openai`` SDK reads the stream through the proxy.

The backend here is a test fixture (tests.hostile_backend: an aiohttp app that writes the
bytes each test chooses, no model behind it). Each variant was a bypass of the byte scan the proxy used
before proxy.stream_check: the SDK received chunks naming ``claude-sonnet-4-6`` while the
evidence said the admitted model served. Now the client never receives such a chunk, the
stream ends with the error event, and the evidence records a served-model mismatch.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from tests.hostile_backend import HostileBackend, hostile  # noqa: F401
from tests.proxy_support import ADMITTED, MakeProxy, ProxyUnderTest, make_proxy  # noqa: F401

OTHER = "claude-sonnet-4-6"
MSG = [{"role": "user", "content": "hi"}]


def chunk(model: str = ADMITTED, content: str = "hi") -> bytes:
    return orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


def escaped_only(model: str = OTHER, extra: bytes = b"") -> bytes:
    """A chunk whose only model key is written with an escape: a byte scan for
    '"model"' finds nothing, a JSON client reads the key ``model``."""
    return chunk(model).replace(b'"model"', b'"mod\\u0065l"')[:-1] + extra + b"}"


def ev(data: bytes, end: bytes = b"\n\n") -> bytes:
    return b"data: " + data + end


DONE = ev(b"[DONE]")
CHAT_VARIANTS: dict[str, bytes] = {
    "escaped duplicate key in one event":
        ev(chunk()[:-1] + b',"mod\\u0065l":"' + OTHER.encode() + b'"}'),
    "LF then CRLF ends the event": ev(chunk(), b"\n\r\n") + ev(chunk(OTHER)),
    "LF then CR ends the event": ev(chunk(), b"\n\r") + ev(chunk(OTHER)),
    "CRLF then CR ends the event": ev(chunk(), b"\r\n\r") + ev(chunk(OTHER)),
    "comment line holding the model": b': "model":"' + ADMITTED.encode() + b'"\n' + ev(chunk(OTHER)),
    "nested model before the top-level one":
        ev(b'{"id":"c1","object":"chat.completion.chunk","created":0,"choices":[{"index":0,"delta":'
           b'{"content":"hi"},"model":"' + ADMITTED.encode() + b'"}],"model":"' + OTHER.encode() + b'"}'),
    "after the first verified event, another model": ev(chunk()) + ev(escaped_only()),
    "after the first verified event, an event that is not JSON": ev(chunk()) + ev(escaped_only(extra=b',"t":NaN')),
}


async def _read_all(stream: Any) -> tuple[list[Any], BaseException | None]:
    got: list[Any] = []
    try:
        async for item in stream:
            got.append(item)
    except openai.APIError as exc:
        return got, exc
    return got, None


def _the_evidence_says_mismatch(proxy: ProxyUnderTest, endpoint: str, served: str | None = OTHER) -> None:
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["stream"]) == ("error", "served_model_mismatch", True)
    if served is not None:
        assert rec["served_model"] == served
    assert proxy.metric("case_proxy_served_model_mismatches_total", endpoint=endpoint) == 1


@pytest.mark.parametrize("variant", list(CHAT_VARIANTS))
async def test_a_stream_bypass_never_shows_the_sdk_another_model(make_proxy: MakeProxy,  # noqa: F811
                                                                 hostile: HostileBackend, variant: str) -> None:
    hostile.body = CHAT_VARIANTS[variant] + DONE
    proxy = await make_proxy(base_url=hostile.url)
    stream = await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, stream=True)
    got, error = await _read_all(stream)
    assert [c.model for c in got if c.model != ADMITTED] == []
    assert isinstance(error, openai.APIError) and error.code == "served_model_mismatch"
    # A repeated key or an unreadable event names no model for certain: none is recorded.
    unproven = variant.startswith("escaped duplicate") or variant.endswith("not JSON")
    _the_evidence_says_mismatch(proxy, "chat_completions", None if unproven else OTHER)


LATER_VARIANTS: dict[str, bytes] = {
    "another model": ev(chunk(OTHER)),
    "an escaped model key": ev(escaped_only()),
    "a repeated model key": ev(chunk()[:-1] + b',"mod\\u0065l":"' + OTHER.encode() + b'"}'),
    "an event that is not JSON": ev(b"{not json"),
}


@pytest.mark.parametrize("variant", list(LATER_VARIANTS))
async def test_a_bad_event_in_a_later_read_is_refused_after_what_was_checked(
        make_proxy: MakeProxy, hostile: HostileBackend, variant: str) -> None:  # noqa: F811
    """Reads after the first released event are checked and written without the relay
    task (proxy.streaming.DirectRelay). There the bad event comes in a later read behind a
    good one: the SDK gets every checked chunk before it, in order, then the error."""
    hostile.body = ev(chunk(content="a"))
    hostile.parts = [ev(chunk(content="b")), ev(chunk(content="c")) + LATER_VARIANTS[variant] + ev(chunk(content="d")),
                     DONE]
    proxy = await make_proxy(base_url=hostile.url)
    stream = await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, stream=True)
    got, error = await _read_all(stream)
    assert [(c.model, c.choices[0].delta.content) for c in got] == [(ADMITTED, "a"), (ADMITTED, "b"), (ADMITTED, "c")]
    assert isinstance(error, openai.APIError) and error.code == "served_model_mismatch"
    names_other = variant in ("another model", "an escaped model key")  # the others name no model for certain
    _the_evidence_says_mismatch(proxy, "chat_completions", OTHER if names_other else None)


async def test_an_honest_stream_with_mixed_line_endings_still_reaches_the_sdk_whole(
        make_proxy: MakeProxy, hostile: HostileBackend) -> None:  # noqa: F811
    """The check is not a refusal of everything unusual: every line ending the spec
    allows, comments and ids pass, byte for byte."""
    hostile.body = (ev(chunk(content="a"), b"\r\n\r\n") + b": ping\r" + b"id: 7\n" + ev(chunk(content="b"), b"\n\r")
                    + ev(chunk(content="c"), b"\r\r") + DONE)
    proxy = await make_proxy(base_url=hostile.url)
    stream = await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG, stream=True)
    got, error = await _read_all(stream)
    assert error is None and "".join(c.choices[0].delta.content for c in got) == "abc"
    rec = proxy.requests_evidence()[-1]
    assert (rec["reason"], rec["served_model"]) == ("ok", ADMITTED)


async def test_a_responses_stream_repeating_the_model_key_in_response_is_refused(
        make_proxy: MakeProxy, hostile: HostileBackend) -> None:  # noqa: F811
    created = (b'{"type":"response.created","sequence_number":0,"response":{"id":"r1","object":"response",'
               b'"created_at":0,"status":"in_progress","model":"' + ADMITTED.encode()
               + b'","mod\\u0065l":"' + OTHER.encode() + b'","output":[]}}')
    hostile.body = b"event: response.created\n" + ev(created)
    proxy = await make_proxy(base_url=hostile.url)
    stream = await proxy.client().responses.create(model=ADMITTED, input="x", stream=True)
    got, error = await _read_all(stream)
    assert [e for e in got if getattr(getattr(e, "response", None), "model", ADMITTED) != ADMITTED] == []
    assert isinstance(error, openai.APIError) and error.code == "served_model_mismatch"
    _the_evidence_says_mismatch(proxy, "responses", None)


async def test_a_non_streaming_body_repeating_the_model_key_is_withheld(
        make_proxy: MakeProxy, hostile: HostileBackend) -> None:  # noqa: F811
    """The non-streaming check is as strict. Here the escaped key comes first: a parser
    that keeps the last duplicate (orjson, Python's json) reads the admitted model, one
    that keeps the first reads the other, so the body proves nothing and is withheld."""
    hostile.content_type = "application/json"
    hostile.body = (b'{"id":"c1","object":"chat.completion","created":0,"mod\\u0065l":"' + OTHER.encode()
                    + b'","model":"' + ADMITTED.encode() + b'","choices":[{"index":0,"finish_reason":"stop",'
                    b'"message":{"role":"assistant","content":"hi"}}]}')
    proxy = await make_proxy(base_url=hostile.url)
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model=ADMITTED, messages=MSG)
    assert info.value.status_code == 502 and info.value.code == "served_model_mismatch"
    assert OTHER not in str(info.value.body)
    rec = proxy.requests_evidence()[-1]
    assert (rec["decision"], rec["reason"], rec["stream"]) == ("error", "served_model_mismatch", False)
