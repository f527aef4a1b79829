"""The stream relay's direct path (proxy.streaming.DirectRelay fed through
``BackendResponse.sink``), without sockets: which reads it may take (only while the
relay task waits with nothing buffered, so bytes keep their order), that it writes in a
callback of its own and not in the read callback, what it hands back while the client
is slow, the framing it writes, and how a refusal or a closing client hands the stream
back to the task. End to end it is exercised by the stream tests through the SDK
(tests/test_proxy_stream_bypass.py, tests/test_streaming.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from proxy.backend_http import BackendResponse
from proxy.served_model import UsageTotals
from proxy.stream_check import StreamChecker, StreamFault
from proxy.streaming import _DIRECT_WRITE_LIMIT, DirectRelay

ADMITTED = "qwen3.6-35b-a3b"
OTHER = "claude-sonnet-4-6"


def ev(model: str = ADMITTED, content: str = "hi") -> bytes:
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "model": model,
                                     "choices": [{"index": 0, "delta": {"content": content}}]}) + b"\n\n"


class FakeConn:
    """What a BackendResponse asks of its connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def finished(self, reuse: bool) -> None:
        pass


class FakeTransport:
    """The client's transport: records writes; its unsent bytes and closing are set by the test."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.unsent = 0
        self.closing = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Sink:
    """A sink that keeps what it takes, or hands it back (as DirectRelay does for a slow client)."""

    def __init__(self, resp: BackendResponse) -> None:
        self.got: list[bytes] = []
        self.resp = resp
        self.hand_back = False

    def __call__(self, data: bytes) -> None:
        self.got.append(data)
        if self.hand_back:
            self.resp.put_back(data)


def _response() -> BackendResponse:
    return BackendResponse(FakeConn(asyncio.get_running_loop()), 200, [], "text/event-stream",  # type: ignore[arg-type]
                           True)


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _waiting_reader(resp: BackendResponse) -> tuple[asyncio.Task[list[bytes]], list[bytes]]:
    """A reader task parked in ``chunks`` (as the relay task is), collecting what it is given."""
    got: list[bytes] = []

    async def read() -> list[bytes]:
        async for data in resp.chunks(30):
            got.append(data)
        return got

    task = asyncio.create_task(read())
    await _turns()
    return task, got


async def test_the_sink_takes_a_read_only_while_the_reader_waits_with_nothing_buffered() -> None:
    resp = _response()
    sink = resp.sink = Sink(resp)
    resp._feed(b"a")  # no reader waiting (the relay task is busy): buffered, not given to the sink
    assert sink.got == [] and resp.take() == b"a"
    task, got = await _waiting_reader(resp)
    resp._feed(b"b")  # the reader waits, nothing buffered: the sink takes it, the reader is not woken
    await _turns()
    assert sink.got == [b"b"] and got == []
    sink.hand_back = True
    resp._feed(b"c")  # handed back: buffered, and the reader woken for it
    resp._feed(b"d")  # something is buffered already: after it, never around it
    assert sink.got == [b"b", b"c"]
    resp._end()
    assert await asyncio.wait_for(task, 5) == [b"cd"] and got == [b"cd"]


async def test_interrupt_ends_the_readers_wait_after_what_is_buffered() -> None:
    resp = _response()
    task, got = await _waiting_reader(resp)
    resp.interrupt()
    assert await asyncio.wait_for(task, 5) == []
    assert not resp.complete()  # the body did not end: the relay acts on why it was interrupted


async def test_reads_the_sink_takes_keep_the_idle_watchdog_quiet() -> None:
    """The reader waits the whole time the sink takes reads; the backend is not quiet."""
    resp = _response()
    resp.sink = Sink(resp)
    got: list[bytes] = []

    async def read() -> None:
        async for data in resp.chunks(0.2):
            got.append(data)

    task = asyncio.create_task(read())
    for _ in range(6):
        await asyncio.sleep(0.1)
        resp._feed(b"x")
    resp._end()
    await asyncio.wait_for(task, 5)  # a TimeoutError here: the watchdog counted time the sink was fed
    assert got == []


async def _relay(chunked: bool = True) -> tuple[DirectRelay, FakeTransport, BackendResponse]:
    resp = _response()
    transport = FakeTransport()
    checker = StreamChecker(ADMITTED, UsageTotals())
    checker.feed(ev())  # the first event went out through the task, which then started the direct path
    relay = resp.sink = DirectRelay(checker, transport, chunked, resp)  # type: ignore[arg-type]
    return relay, transport, resp


@pytest.mark.parametrize("chunked", [True, False])
async def test_the_direct_path_writes_what_the_checker_releases_in_the_responses_framing(chunked: bool) -> None:
    relay, transport, _ = await _relay(chunked)
    one, two = ev(content="a"), ev(content="b")
    relay(one + two[:9])
    await _turns()
    relay(two[9:])
    await _turns()
    if chunked:  # HTTP/1.1: aiohttp's chunked framing, which its write_eof ends
        assert transport.written == [b"%x\r\n" % len(one) + one + b"\r\n", b"%x\r\n" % len(two) + two + b"\r\n"]
    else:  # HTTP/1.0: the body ends with the connection
        assert transport.written == [one, two]


async def test_reads_taken_before_the_callback_runs_are_checked_and_written_together() -> None:
    """Nothing is written inside the read callback itself (writing there made the gap
    p99 grow): the work waits for the loop's next turn, and takes every read since."""
    relay, transport, _ = await _relay()
    one, two = ev(content="a"), ev(content="b")
    relay(one)
    relay(two)
    assert transport.written == []
    await _turns()
    assert transport.written == [b"%x\r\n" % len(one + two) + one + two + b"\r\n"]


async def test_the_direct_path_hands_reads_back_while_the_client_is_slow() -> None:
    """Past the limit of unsent bytes the reads go back to the task, whose writes wait for
    the client: the direct path never grows the client's buffer past it."""
    relay, transport, resp = await _relay()
    task, got = await _waiting_reader(resp)
    transport.unsent = _DIRECT_WRITE_LIMIT + 1
    bad = ev(OTHER)
    relay(bad)
    await _turns()
    assert transport.written == [] and relay.refused is None  # not even checked: the task will do it
    assert got == [bad]  # handed to the task, which is woken for it
    transport.unsent = _DIRECT_WRITE_LIMIT
    relay(ev())
    await _turns()
    assert len(transport.written) == 1
    resp._end()
    await asyncio.wait_for(task, 5)


async def test_a_refusal_writes_what_was_cleared_and_hands_the_stream_back() -> None:
    relay, transport, resp = await _relay()
    task, _ = await _waiting_reader(resp)
    good = ev(content="ok")
    relay(good + ev(OTHER))
    await _turns()
    assert transport.written == [b"%x\r\n" % len(good) + good + b"\r\n"]  # the cleared event, never the other
    refused = relay.refused
    assert refused is not None and refused.fault is StreamFault.MODEL_MISMATCH and refused.cleared == b""
    assert resp.sink is None  # later reads go to the task, which ends the stream
    assert await asyncio.wait_for(task, 5) == []


async def test_a_closing_client_gets_nothing_more_and_the_task_is_told() -> None:
    relay, transport, resp = await _relay()
    task, _ = await _waiting_reader(resp)
    transport.closing = True
    relay(ev())
    await _turns()
    assert transport.written == [] and relay.gone and resp.sink is None
    assert await asyncio.wait_for(task, 5) == []


async def test_a_callback_due_after_the_relay_ended_writes_nothing() -> None:
    """The relay task clears the sink however it ends (cancelled by a client gone too):
    a read it took just before is then dropped, never written after the response."""
    relay, transport, resp = await _relay()
    relay(ev())
    resp.sink = None
    await _turns()
    assert transport.written == []


class _Breaks(StreamChecker):
    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        raise RuntimeError("a bug in the check")


async def test_a_check_that_fails_ends_the_stream_and_forwards_nothing() -> None:
    """A callback that raised would leave the stream to go on unchecked; it refuses it."""
    resp = _response()
    transport = FakeTransport()
    relay = resp.sink = DirectRelay(_Breaks(ADMITTED, UsageTotals()), transport, True, resp)  # type: ignore[arg-type]
    task, _ = await _waiting_reader(resp)
    relay(ev())
    await _turns()
    assert transport.written == [] and resp.sink is None
    assert relay.refused is not None and relay.refused.fault is StreamFault.PROTOCOL
    assert await asyncio.wait_for(task, 5) == []
