"""The sans-IO stream check (proxy.stream_check), without a socket.

Two readers judge what the checker releases: a reference parser written here from the
SSE specification's text, and the official SDK's own decoder. Whatever a hostile backend
sends, no event either of them reads from the released bytes may name another model.
"""

from __future__ import annotations

import json
import random

import orjson
import pytest
from openai._streaming import SSEDecoder

from proxy.served_model import UsageTotals, check_json_body, has_duplicate_key
from proxy.stream_check import StreamChecker, StreamFault, StreamRefused

ADMITTED = "qwen3.6-35b-a3b"
OTHER = "claude-sonnet-4-6"


def chunk(model: str = ADMITTED, content: str = "hi", **extra: object) -> bytes:
    return orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}], **extra})


def ev(data: bytes, end: bytes = b"\n\n") -> bytes:
    return b"data: " + data + end


def spec_events(stream: bytes) -> list[str]:
    """The data of every event the SSE specification dispatches from ``stream``
    (WHATWG HTML 9.2.6), written from its text: BOM stripped, CRLF/LF/CR line ends,
    comments, field/value split, one leading space removed, data lines joined with LF,
    an event without data not dispatched, the trailing incomplete event discarded."""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    events: list[str] = []
    data = ""
    i = 0
    while True:
        ends = [j for j in (text.find("\r", i), text.find("\n", i)) if j >= 0]
        if not ends:
            return events  # the rest is an incomplete line: discarded with its event
        j = min(ends)
        line = text[i:j]
        i = j + 2 if text.startswith("\r\n", j) else j + 1
        if line == "":
            if data:
                events.append(data[:-1] if data.endswith("\n") else data)
            data = ""
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data += value + "\n"


def sdk_events(stream: bytes, cuts: list[int] | None = None) -> list[str]:
    """The data of every event the official SDK's decoder yields, fed in pieces."""
    cuts = cuts or []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return [sse.data for sse in SSEDecoder().iter_bytes(iter(pieces))]


def run(stream: bytes, cuts: list[int] | None = None,
        **limits: int) -> tuple[bytes, StreamRefused | None, StreamChecker]:
    """Feed ``stream`` cut at ``cuts``; (bytes released, the refusal or None, checker)."""
    checker = StreamChecker(ADMITTED, UsageTotals(), **limits)
    cuts = cuts or []
    out = bytearray()
    try:
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            out += checker.feed(stream[a:b])
        out += checker.finish()
    except StreamRefused as refused:
        return bytes(out) + refused.cleared, refused, checker
    return bytes(out), None, checker


def names_only_the_admitted_model(datas: list[str]) -> bool:
    """Every event a client could read names no model but the admitted one, whichever
    duplicate key its JSON parser keeps."""
    for data in datas:
        if data.startswith("[DONE]"):
            continue
        try:
            pairs = json.loads(data, object_pairs_hook=lambda p: p)  # every key, repeats kept
        except ValueError:
            continue  # a client cannot read it either
        if not isinstance(pairs, list):
            continue
        for key, value in pairs:
            if key == "model" and value != ADMITTED:
                return False
            if key == "response" and isinstance(value, list) and any(
                    k == "model" and v != ADMITTED for k, v in value):
                return False
    return True


# ---------------------------------------------------------------- the issue's bypasses

BYPASSES = {
    "escaped duplicate key": ev(chunk()[:-1] + b',"mod\\u0065l":"' + OTHER.encode() + b'"}'),
    "LF then CRLF": ev(chunk(), b"\n\r\n") + ev(chunk(OTHER)),
    "LF then CR": ev(chunk(), b"\n\r") + ev(chunk(OTHER)),
    "CRLF then CR": ev(chunk(), b"\r\n\r") + ev(chunk(OTHER)),
    "comment holding the model": b': "model":"' + ADMITTED.encode() + b'"\n' + ev(chunk(OTHER)),
    "nested model first": ev(b'{"choices":[{"index":0,"delta":{"content":"x"},"model":"' + ADMITTED.encode()
                             + b'"}],"model":"' + OTHER.encode() + b'"}'),
    "unnamed after verified": ev(chunk()) + ev(b'{"mod\\u0065l":"' + OTHER.encode() + b'","choices":[]}'),
    "not JSON after verified": ev(chunk()) + ev(b'{"mod\\u0065l":"' + OTHER.encode() + b'","t":NaN}'),
    "response.model repeated": ev(b'{"type":"response.created","response":{"model":"' + ADMITTED.encode()
                                  + b'","mod\\u0065l":"' + OTHER.encode() + b'"}}'),
}


@pytest.mark.parametrize("name", list(BYPASSES))
def test_each_bypass_of_the_issue_is_a_mismatch(name: str) -> None:
    stream = BYPASSES[name] + ev(b"[DONE]")
    out, refused, _ = run(stream)
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH
    assert names_only_the_admitted_model(sdk_events(out)) and names_only_the_admitted_model(spec_events(out))
    assert OTHER.encode() not in out
    # and each is a real bypass: a client reading the whole stream sees the other model
    assert not names_only_the_admitted_model(sdk_events(stream))


def test_a_client_that_accepts_nan_reads_the_not_json_event() -> None:
    """Python's json (the SDK's parser) reads NaN: the event would reach it as a chunk."""
    data = sdk_events(BYPASSES["not JSON after verified"])[1]
    assert json.loads(data)["model"] == OTHER


def test_the_mismatching_model_is_reported() -> None:
    _, refused, checker = run(BYPASSES["LF then CR"])
    assert refused is not None and checker.served_model == OTHER
    assert "other than the admitted" in refused.message


# ---------------------------------------------------------------- what passes, byte for byte

def test_an_ordinary_stream_is_forwarded_byte_for_byte_with_usage() -> None:
    stream = (ev(chunk(content="")) + ev(chunk(content="Hel")) + b": keep-alive\n\n" + ev(chunk(content="lo"))
              + ev(chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}))
              + ev(b"[DONE]"))
    for cuts in ([], [len(ev(chunk(content="")))], sorted(random.Random(7).sample(range(1, len(stream)), 20))):
        out, refused, checker = run(stream, cuts)
        assert refused is None and out == stream and checker.served_model == ADMITTED
        assert (checker.usage.prompt_tokens, checker.usage.completion_tokens, checker.usage.total_tokens) == (3, 2, 5)


def test_responses_events_are_checked_on_response_model_and_usage_is_read() -> None:
    created = b'{"type":"response.created","response":{"id":"r","model":"%s","output":[]}}'
    delta = b'{"type":"response.output_text.delta","delta":"hi"}'
    done = (b'{"type":"response.completed","response":{"id":"r","model":"%s","usage":'
            b'{"input_tokens":4,"output_tokens":6,"total_tokens":10}}}')
    ok = b"event: response.created\n" + ev(created % ADMITTED.encode()) + ev(delta) + ev(done % ADMITTED.encode())
    out, refused, checker = run(ok)
    assert refused is None and out == ok
    assert (checker.usage.prompt_tokens, checker.usage.completion_tokens) == (4, 6)
    bad = ev(created % ADMITTED.encode()) + ev(delta) + ev(done % OTHER.encode())
    out, refused, checker = run(bad)
    assert refused is not None and checker.served_model == OTHER and OTHER.encode() not in out


@pytest.mark.parametrize("end", [b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n", b"\n\r"])
def test_every_line_ending_mix_ends_an_event(end: bytes) -> None:
    stream = ev(chunk(), end) + ev(b"[DONE]", end)
    out, refused, _ = run(stream)
    assert refused is None and out == stream and sdk_events(out) == spec_events(out) == [chunk().decode(), "[DONE]"]


def test_a_crlf_cut_between_reads_is_one_line_end() -> None:
    """A CR ending one read and an LF starting the next: one line end, not a blank line
    (which would dispatch the event early, before its second data line)."""
    stream = b'data: {"model":"' + ADMITTED.encode() + b'",\r\ndata: "n":1}\r\n\r\n'
    cut = stream.index(b"\r\n") + 1
    out, refused, _ = run(stream, [cut])
    assert refused is None and out == stream
    assert spec_events(out) == sdk_events(out, [cut]) == ['{"model":"' + ADMITTED + '",\n"n":1}']


@pytest.mark.parametrize("line", [b": comment", b"id: 1", b"event: x", b"x-field: 1"])
def test_a_cr_ending_a_read_never_swallows_what_the_next_read_starts_with(line: bytes) -> None:
    """Only an LF after such a CR is its CRLF; a 'd' there is the start of a data line
    (skipping it would hide 'data: ...' as an unknown field 'ata')."""
    first = ev(chunk()) + line + b"\r"
    stream = first + ev(chunk(OTHER))
    out, refused, checker = run(stream, [len(first)])
    assert refused is not None and checker.served_model == OTHER and OTHER.encode() not in out
    stream = first + ev(chunk(content="next"))
    out, refused, _ = run(stream, [len(first)])
    assert refused is None and out == stream


def test_multi_line_data_is_joined_with_lf_and_checked_as_one() -> None:
    stream = b'data: {"model":\ndata:"' + OTHER.encode() + b'"}\n\n'
    _, refused, checker = run(stream)
    assert refused is not None and checker.served_model == OTHER


def test_a_block_released_before_a_refusal_in_the_same_read_is_kept() -> None:
    stream = ev(chunk()) + ev(chunk(content="x")) + ev(chunk(OTHER))
    out, refused, _ = run(stream)
    assert refused is not None and out == ev(chunk()) + ev(chunk(content="x"))


def test_unknown_fields_and_ids_pass_as_the_spec_ignores_them() -> None:
    stream = b"id: 1\nretry: 100\nerror: whatever\n" + ev(chunk()) + b"event: x\nid: 2\n" + ev(b"[DONE]")
    out, refused, _ = run(stream)
    assert refused is None and out == stream


# ---------------------------------------------------------------- refusals of what clients read differently

@pytest.mark.parametrize(("stream", "fault"), [
    (b"\xef\xbb\xbf" + ev(chunk()), StreamFault.PROTOCOL),
    (b"event: message\n\n" + ev(chunk()), StreamFault.PROTOCOL),
    (b": \xff\n" + ev(chunk()), StreamFault.PROTOCOL),
    (": a\u2028data: x\n".encode() + ev(chunk()), StreamFault.PROTOCOL),
    (b"x-field: \x0bdata: y\n" + ev(chunk()), StreamFault.PROTOCOL),
    (ev(b"[1,2]"), StreamFault.MODEL_MISMATCH),
    (ev(b""), StreamFault.MODEL_MISMATCH),
    (ev(b"[DONE] x"), StreamFault.MODEL_MISMATCH),
    (ev(chunk()[:-1] + b',"model":"' + ADMITTED.encode() + b'"}'), StreamFault.MODEL_MISMATCH),
    (ev(b'{"model":null}'), StreamFault.MODEL_MISMATCH),
    (ev(b'{"model":["' + ADMITTED.encode() + b'"]}'), StreamFault.MODEL_MISMATCH),
    (ev(b'{"response":{"model":"' + OTHER.encode() + b'"},"model":"' + ADMITTED.encode() + b'"}'),
     StreamFault.MODEL_MISMATCH),
], ids=["bom", "fields-without-data", "not-utf8", "u2028-in-comment", "vt-in-field", "array", "empty-data",
        "done-suffix", "repeated-same-key", "model-null", "model-array", "response-model-other"])
def test_what_clients_could_read_differently_is_refused(stream: bytes, fault: StreamFault) -> None:
    out, refused, _ = run(stream)
    assert refused is not None and refused.fault is fault and out == b""


def test_an_event_that_is_not_an_object_is_refused_after_verification_too() -> None:
    out, refused, _ = run(ev(chunk()) + ev(b'[{"model":"' + OTHER.encode() + b'"}]'))
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH and out == ev(chunk())


def test_a_bom_split_over_reads_is_still_refused() -> None:
    _, refused, _ = run(b"\xef\xbb\xbf" + ev(chunk()), [1, 2])
    assert refused is not None and refused.fault is StreamFault.PROTOCOL


def test_end_of_stream_in_the_middle_of_an_event_or_without_a_model() -> None:
    _, refused, _ = run(ev(chunk()) + b"data: [DONE]\n")
    assert refused is not None and refused.fault is StreamFault.PROTOCOL
    _, refused, _ = run(ev(b'{"choices":[]}') + ev(b"[DONE]"))
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH


# ---------------------------------------------------------------- bounds

def test_held_events_are_bounded_in_count() -> None:
    unnamed = ev(b'{"choices":[]}')
    out, refused, _ = run(unnamed * 3 + ev(chunk()), max_held_events=3)
    assert refused is None and out == unnamed * 3 + ev(chunk())
    out, refused, _ = run(unnamed * 4 + ev(chunk()), max_held_events=3)
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH and out == b""


def test_held_bytes_are_bounded() -> None:
    """A few large unverified events (the issue: 64 x 16 MiB could be held per stream)."""
    big = ev(b'{"choices":[],"pad":"' + b"x" * 4000 + b'"}')
    out, refused, _ = run(big * 2 + ev(chunk()), max_held_bytes=10_000)
    assert refused is None and out == big * 2 + ev(chunk())
    out, refused, _ = run(big * 3 + ev(chunk()), max_held_bytes=10_000)
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH and out == b""


def test_comment_blocks_count_towards_held_bytes() -> None:
    _, refused, _ = run(b": ping\n\n" * 2000 + ev(chunk()), max_held_bytes=10_000)
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH


def test_one_event_is_bounded_in_bytes() -> None:
    stream = ev(chunk(content="x" * 5000))
    assert run(stream, max_event_bytes=6000)[1] is None
    _, refused, _ = run(stream, [100], max_event_bytes=4000)
    assert refused is not None and refused.fault is StreamFault.PROTOCOL
    _, refused, _ = run(stream, max_event_bytes=4000)
    assert refused is not None and refused.fault is StreamFault.PROTOCOL


# ---------------------------------------------------------------- the duplicate-key test is exact

@pytest.mark.parametrize(("body", "repeats"), [
    (b'{"a":1,"b":2}', False),
    (b'{"a": 1, "b": {"a": 2}}', False),
    (b'{"a":1,"a":2}', True),
    (b'{"model":"x","mod\\u0065l":"y"}', True),
    (b'{"x":{"k":1,"\\u006b":2}}', True),
    (b'{"x":[{"k":1},{"k":2}]}', False),
    (b'{"a":"\\"a\\":1","a":2}', True),
    (b'{"b":1,"b":1,"x":1e6}', True),  # as long as its re-serialization: only an exact test sees it
])
def test_duplicate_keys_are_found_at_any_depth(body: bytes, repeats: bool) -> None:
    assert has_duplicate_key(body) is repeats
    assert (run(ev(b'{"model":"' + ADMITTED.encode() + b'","p":' + body + b"}"))[1] is not None) is repeats


def test_a_non_canonical_event_without_repeats_passes() -> None:
    """Spaces, escapes and float forms orjson would write differently take the slow,
    exact path and still pass."""
    stream = ev(b'{ "model" : "qwen3.6-35b-a3b", "x": 1e-05, "s": "\\u00e9\\/" }')
    out, refused, _ = run(stream)
    assert refused is None and out == stream


def test_non_streaming_bodies_refuse_repeated_and_escaped_model_keys() -> None:
    totals = UsageTotals()
    good = b'{"id":"c","model":"' + ADMITTED.encode() + b'","choices":[]}'
    assert check_json_body(good, ADMITTED, totals).ok
    for bad in (b'{"model":"' + ADMITTED.encode() + b'","mod\\u0065l":"' + OTHER.encode() + b'"}',
                b'{"mod\\u0065l":"' + OTHER.encode() + b'","model":"' + ADMITTED.encode() + b'"}',
                b'{"model":"' + ADMITTED.encode() + b'","model":"' + ADMITTED.encode() + b'"}',
                b'{"response":{"model":"' + OTHER.encode() + b'"},"model":"' + ADMITTED.encode() + b'"}',
                b'{"model":null}'):
        check = check_json_body(bad, ADMITTED, totals)
        assert not check.ok, bad


# ---------------------------------------------------------------- a hostile backend, at random

def _hostile_stream(rng: random.Random) -> bytes:
    ends = [b"\n", b"\r", b"\r\n"]
    parts: list[bytes] = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        e1, e2 = rng.choice(ends), rng.choice(ends)
        if kind < 0.4:
            parts.append(b"data: " + chunk(rng.choice([ADMITTED, ADMITTED, OTHER])) + e1 + e2)
        elif kind < 0.5:
            parts.append(b'data: {"mod\\u0065l":"' + OTHER.encode() + b'"}' + e1 + e2)
        elif kind < 0.6:
            parts.append(b': "model":"' + ADMITTED.encode() + b'"' + e1)
        elif kind < 0.7:
            parts.append(b'data: {"model":"' + ADMITTED.encode() + b'",' + e1 + b'data: "model":"'
                         + OTHER.encode() + b'"}' + e1 + e2)
        elif kind < 0.8:
            parts.append(b"data: " + chunk()[:-1] + b',"model":"' + OTHER.encode() + b'"}' + e1 + e2)
        elif kind < 0.9:
            parts.append(e1)
        else:
            parts.append(b"event: x" + e1 + b"data: " + chunk() + e1 + e2)
    return b"".join(parts)


def test_no_hostile_stream_shows_a_client_another_model() -> None:
    """Seeded (a failure reproduces): random mixes of the bypass shapes, line endings
    and read cuts. What is released reads, to the spec's parser and to the SDK, as
    events naming only the admitted model; a stream that is let through is byte-equal."""
    rng = random.Random(20261128)
    refused_count = 0
    for _ in range(3000):
        stream = _hostile_stream(rng)
        if rng.random() < 0.3:  # a read ending at every CR: the CRLF-across-reads rule at work
            cuts = [i + 1 for i, b in enumerate(stream[:-1]) if b == 13]
        else:
            cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
        out, refused, _ = run(stream, cuts)
        refused_count += refused is not None
        assert stream.startswith(out)
        assert names_only_the_admitted_model(spec_events(out)), stream
        assert names_only_the_admitted_model(sdk_events(out, [c for c in cuts if c < len(out)])), stream
        if refused is None:
            assert out == stream and spec_events(out) == sdk_events(out)
    assert 0 < refused_count < 3000


class _Recording(StreamChecker):
    """The checker, noting every event data it checked."""

    def __init__(self) -> None:
        super().__init__(ADMITTED, UsageTotals())
        self.checked: list[str] = []

    def _check(self, payload: bytes) -> None:
        self.checked.append(payload.decode("utf-8", "replace"))
        super()._check(payload)


_TOKENS = [b"\n", b"\r", b"\r\n", b"data:", b"data: ", b"data", b":", b": x", b"d", b"ata: ", b"id: 1", b"event: e",
           b"retry: 5", b" ", chunk(), chunk(), chunk(OTHER), b"[DONE]", b'{"choices":[]}', b"x"]


_LINES = [b"", b"", b"data: " + chunk(), b"data:" + chunk(), b": x", b"id: 1", b"event: e", b"retry: 5", b"data",
          b"data: [DONE]", b"x-y: z", b"data: " + chunk(OTHER)]


def test_the_events_a_client_reads_are_exactly_the_events_checked() -> None:
    """Differential, seeded: token soup of SSE syntax and line ends, cut at random
    reads. The events the specification dispatches from the released bytes are the
    first events the checker checked, in order and byte for byte: nothing reaches a
    client unchecked, however the lines and reads fall."""
    rng = random.Random(11)
    passed = 0
    for _ in range(4000):
        if rng.random() < 0.5:
            stream = b"".join(rng.choice(_TOKENS) for _ in range(rng.randint(2, 14)))
        else:  # whole lines, mostly events that pass, ending in a blank line
            lines = [rng.choice(_LINES) for _ in range(rng.randint(1, 10))] + [b""]
            stream = b"".join(line + rng.choice([b"\n", b"\r", b"\r\n"]) for line in lines)
        if len(stream) < 2:
            continue
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 5))))
        checker = _Recording()
        out = bytearray()
        try:
            for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                out += checker.feed(stream[a:b])
            out += checker.finish()
            passed += 1
        except StreamRefused as refused:
            out += refused.cleared
        seen = spec_events(bytes(out))
        assert seen == checker.checked[:len(seen)], stream
        assert names_only_the_admitted_model(seen), stream
        assert names_only_the_admitted_model(sdk_events(bytes(out), [c for c in cuts if c < len(out)])), stream
    assert passed > 150  # streams let through whole are part of the sample


def test_the_micro_benchmark_measures_streams_that_pass_whole() -> None:
    """bench.stream_check_micro times the passing path: each of its shapes must be
    forwarded byte for byte (a refused stream would time an early exit)."""
    from bench.stream_check_micro import MODEL, shapes

    assert MODEL == ADMITTED
    for name, reads in shapes().items():
        checker = StreamChecker(MODEL, UsageTotals())
        out = b"".join(checker.feed(r) for r in reads) + checker.finish()
        assert out == b"".join(reads) and checker.verified, name
