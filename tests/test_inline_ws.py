"""The Twilio socket's fast path (telephony.inline_ws) over real sockets.

Checks what the optimisation must not break: message order across the inline
and queued paths, frame encoding at every length class, ping/pong and close
handled by aiohttp, no data frame after close; and that a real call's media
actually takes the inline path (so an aiohttp upgrade cannot silently drop it).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType, web

import bridge.call
from bridge.netutil import free_port
from bridge.sink_queue import source_fingerprint
from bridge.wsframe import frame_text
from metrics.scrape import value
from telephony.inline_ws import (
    INLINE_RECEIVE,
    INLINE_RECEIVE_REASON,
    KNOWN_POST_START,
    InlineWebSocketResponse,
    check_hook,
    post_start_fingerprint,
    self_test,
)

from .build_mode import skip_if_compiled
from .conftest import BridgeFactory
from .test_call_e2e import wait_for


class Harness:
    """One aiohttp server whose handler holds its InlineWebSocketResponse."""

    def __init__(self) -> None:
        self.ws: InlineWebSocketResponse | None = None
        self.ready = asyncio.Event()
        self.go = asyncio.Event()  # the handler starts receive() only when set
        self.received: list[str] = []
        self.inline: list[str] = []
        self.done = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def sink(self, text: str) -> bool:
        if text.startswith("x"):
            self.inline.append(text)
            return True
        return False

    async def handler(self, request: web.Request) -> web.StreamResponse:
        ws = InlineWebSocketResponse()
        await ws.prepare(request)
        ws.set_sink(self.sink)
        self.ws = ws
        self.ready.set()
        await self.go.wait()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.received.append(msg.data)
        self.done.set()
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self.handler)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}/ws"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def harness() -> Harness:
    h = Harness()
    await h.start()
    yield h  # type: ignore[misc]
    await h.stop()


#: On an aiohttp the guard does not know, the bridge runs the plain path (tested below with
#: TWILIO_FAST_PATH=false); these tests then skip and say why instead of failing the suite.
requires_fast_path = pytest.mark.skipif(
    not INLINE_RECEIVE, reason=f"aiohttp {aiohttp.__version__}: fast path off ({INLINE_RECEIVE_REASON})")


@requires_fast_path
def test_the_installed_aiohttp_has_the_inline_hook() -> None:
    assert post_start_fingerprint() in KNOWN_POST_START
    assert check_hook() == (True, "aiohttp internals as verified")


class _Original:
    def _post_start(self, request, protocol, writer):  # type: ignore[no-untyped-def]
        self._writer = writer
        request.protocol.keep_alive(False)


class _SameCodeOtherLayout:
    def _post_start(self, request, protocol, writer):  # type: ignore[no-untyped-def]
        # a comment, a blank line and other spacing change nothing
        self._writer = writer

        request.protocol.keep_alive( False )


class _ChangedCode:
    def _post_start(self, request, protocol, writer):  # type: ignore[no-untyped-def]
        self._writer = writer
        request.protocol.keep_alive(True)


def test_the_guard_accepts_only_a_known_post_start() -> None:
    known = source_fingerprint(_Original._post_start)
    assert source_fingerprint(_SameCodeOtherLayout._post_start) == known
    assert source_fingerprint(_ChangedCode._post_start) != known
    assert check_hook(_SameCodeOtherLayout._post_start, frozenset({known})) == (True, "aiohttp internals as verified")
    ok, reason = check_hook(_ChangedCode._post_start, frozenset({known}))
    assert not ok and "_post_start changed" in reason
    ok, reason = check_hook(None, frozenset())
    assert not ok and "_post_start changed" in reason, "the installed aiohttp is refused when it is not listed"


@requires_fast_path
async def test_the_self_test_sees_the_inline_path() -> None:
    status = await self_test()
    assert status.active and status.aiohttp_version == aiohttp.__version__


async def test_the_self_test_reports_the_plain_path_when_it_runs() -> None:
    status = await self_test(inline=False)
    assert not status.active and status.reason


def test_frame_text_length_classes() -> None:
    assert frame_text(b"hi") == b"\x81\x02hi"
    assert frame_text(b"a" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert frame_text(b"a" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")


@requires_fast_path
async def test_sink_takes_messages_inline_and_order_is_kept_behind_queued_ones(harness: Harness) -> None:
    async with websockets.connect(harness.url) as client:
        await asyncio.wait_for(harness.ready.wait(), 5)
        # receive() is not running yet: a declined message waits in the queue, and
        # everything after it must wait behind it even if the sink would take it.
        await client.send("x-inline-1")
        await client.send("slow-1")
        await client.send("x-behind-slow")
        await client.send("slow-2")
        assert await wait_for(lambda: len(harness.ws._reader._buffer) == 3, 5)  # type: ignore[union-attr]
        assert harness.inline == ["x-inline-1"]
        harness.go.set()
        assert await wait_for(lambda: len(harness.received) == 3, 5)
        assert harness.received == ["slow-1", "x-behind-slow", "slow-2"]
        # Queue drained: the sink takes its messages again.
        await client.send("x-inline-2")
        await client.send("slow-3")
        assert await wait_for(lambda: harness.received[-1:] == ["slow-3"], 5)
        assert harness.inline == ["x-inline-1", "x-inline-2"]
        assert harness.ws is not None and harness.ws.inline_messages == 2
        # aiohttp still answers pings.
        pong = await client.ping()
        await asyncio.wait_for(pong, 5)


async def test_send_texts_writes_every_length_class_in_order(harness: Harness) -> None:
    texts = ["a", "b" * 125, "c" * 126, "d" * 65535, "e" * 65536, "f" * 200_000, '{"event":"mark"}']
    async with websockets.connect(harness.url, max_size=1 << 20) as client:
        await asyncio.wait_for(harness.ready.wait(), 5)
        harness.go.set()
        assert harness.ws is not None
        harness.ws.send_texts(texts)
        got = [await asyncio.wait_for(client.recv(), 5) for _ in texts]
        assert got == texts
        await client.close()
        await asyncio.wait_for(harness.done.wait(), 5)
    # After the close handshake no data frame may follow: send_texts refuses.
    with pytest.raises(ConnectionResetError):
        harness.ws.send_texts(["late"])


@requires_fast_path
async def test_a_real_call_takes_the_inline_path_for_media_and_marks(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"GREETING": " ".join(["inline"] * 20)})
    assert bridge.server.fast_path.active
    assert value(await bridge.metrics(), "bridge_twilio_fast_path") == 1
    call = bridge.call(send_inbound_audio=False)
    await call.place()
    await call.connect()
    assert await wait_for(lambda: bool(bridge.server.calls), 5)
    session = next(iter(bridge.server.calls))
    assert await call.wait_until(lambda: call.record.marks_echoed >= 3, 10)
    assert call._factory is not None  # noqa: SLF001
    for n in range(40):
        await call.send_raw(call._factory.media(b"\xff" * 160, n * 20))  # noqa: SLF001
    echoed = call.record.marks_echoed
    assert await wait_for(lambda: session.twilio.ws.inline_messages >= 40 + echoed, 5), session.twilio.ws.inline_messages
    await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 5)
    # Inline-handled frames are counted like any other.
    samples = await bridge.metrics()
    assert value(samples, "bridge_twilio_frames_in_total") == 40
    assert value(samples, "bridge_twilio_bytes_in_total") == 40 * 160


@skip_if_compiled(bridge.call, "replaces CallCore.on_media with a failing one")
@pytest.mark.parametrize("fast_path", ["true", "false"])
async def test_a_bug_in_the_media_handler_ends_that_call_only(make_bridge: BridgeFactory, fast_path: str) -> None:
    bridge = await make_bridge({"GREETING": "still here", "TWILIO_FAST_PATH": fast_path})
    broken, healthy = bridge.call(send_inbound_audio=False), bridge.call(send_inbound_audio=False)
    for call in (broken, healthy):
        await call.place()
        await call.connect()
    assert await wait_for(lambda: len(bridge.server.calls) == 2, 5)
    victim = next(s for s in bridge.server.calls if s.core.stream_sid == broken.record.stream_sid)

    def explode(*_args: object) -> list[object]:
        raise ZeroDivisionError("simulated bug")

    victim.core.on_media = explode  # type: ignore[method-assign]
    assert broken._factory is not None  # noqa: SLF001
    await broken.send_raw(broken._factory.media(b"\xff" * 160, 0))  # noqa: SLF001
    await asyncio.wait_for(broken.closed.wait(), 5)
    assert await wait_for(lambda: len(bridge.server.calls) == 1, 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_internal_errors_total") == 1
    assert value(samples, "bridge_calls_total", outcome="internal_error") == 1
    # The neighbour still works: DTMF gets a spoken answer.
    before = healthy.record.media_bytes
    await healthy.send_dtmf("5")
    assert await healthy.wait_until(lambda: healthy.record.media_bytes > before, 5)
    await healthy.hangup()


async def test_the_plain_path_carries_a_whole_call(make_bridge: BridgeFactory) -> None:
    """TWILIO_FAST_PATH=false (what an unknown aiohttp gets): every message takes receive(); the
    call is the same: greeting heard, marks echoed, DTMF answered, frames counted, metric 0."""
    bridge = await make_bridge({"GREETING": " ".join(["plain"] * 10), "TWILIO_FAST_PATH": "false"})
    assert not bridge.server.fast_path.active
    call = bridge.call(send_inbound_audio=False)
    await call.place()
    await call.connect()
    assert await wait_for(lambda: bool(bridge.server.calls), 5)
    session = next(iter(bridge.server.calls))
    assert await call.wait_until(lambda: call.record.marks_echoed >= 3, 10)
    assert call._factory is not None  # noqa: SLF001
    for n in range(20):
        await call.send_raw(call._factory.media(b"\xff" * 160, n * 20))  # noqa: SLF001
    before = call.record.media_bytes
    await call.send_dtmf("3")
    assert await call.wait_until(lambda: call.record.media_bytes > before, 5), "DTMF read back"
    assert session.twilio.ws.inline_messages == 0
    await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_twilio_fast_path") == 0
    assert value(samples, "bridge_twilio_frames_in_total") == 20
    assert value(samples, "bridge_calls_total", outcome="caller_hangup") == 1
    assert call.record.protocol_errors == []
