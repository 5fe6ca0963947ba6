"""A real agent WebSocket server in the test drives calls through the bridge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from bridge.cartesia.emulator import EmulatorSettings
from bridge.demo import free_port
from metrics.scrape import value
from telephony.twiml import parse_connect_stream

from .conftest import Bridge, BridgeFactory
from .local_server import serve_locally
from .test_call_e2e import context_ids, wait_for


class AgentServer:
    """The customer's agent: records what the bridge sends, sends what the test says."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: dict[str, str] = {}
        self.connections = 0
        self.ws: web.WebSocketResponse | None = None
        self.connected = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        self.headers = dict(request.headers)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        self.connected.set()
        async for msg in ws:
            self.received.append(orjson.loads(msg.data))
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._handle)
        self._runner, port = await serve_locally(app)
        self.url = f"ws://127.0.0.1:{port}/agent"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def send(self, obj: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send_str(obj if isinstance(obj, str) else orjson.dumps(obj).decode())

    async def next(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for msg in self.received[seen:]:
                seen += 1
                if msg.get("type") == kind:
                    self.received.remove(msg)
                    return msg
            seen = 0
            await asyncio.sleep(0.01)
        raise AssertionError(f"agent never got {kind!r}; got {[m.get('type') for m in self.received]}")


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    server = AgentServer()
    await server.start()
    yield server
    await server.stop()


def requests_for(bridge: Bridge, ctx: str) -> list[dict[str, Any]]:
    return [obj for _c, obj in bridge.emulator.received if obj.get("context_id") == ctx]


async def test_setup_tokens_continuations_dtmf_config_and_end(make_bridge: BridgeFactory, agent: AgentServer) -> None:
    # No text hold: this checks the word-boundary cuts per token (tests/test_text_hold.py covers the hold).
    bridge = await make_bridge({"AGENT_URL": agent.url, "AGENT_TOKEN": "agent-bearer-1",
                                "HANDOFF_URL": "https://crm.example.com/handoff", "CARTESIA_TEXT_HOLD_MS": "0"})
    call = bridge.call()
    await call.place()
    await call.connect()
    setup = await agent.next("setup")
    assert agent.headers.get("Authorization") == "Bearer agent-bearer-1"
    assert setup["callSid"] == call.record.call_sid and setup["streamSid"] == call.record.stream_sid
    assert setup["from"] == call.from_ and setup["to"] == call.to and setup["direction"] == "inbound"
    assert setup["accountSid"] == call.account_sid and "from" not in setup["customParameters"]
    # Tokens a real LLM would space out: each is handled in its own loop turn, so nothing is joined.
    for token in ["Good ", "morn", "ing, how can", " I help?"]:
        await agent.send({"type": "text", "token": token, "last": False})
        await asyncio.sleep(0.05)
    await agent.send({"type": "text", "token": "", "last": True})
    assert await wait_for(lambda: len(context_ids(bridge)) == 1, 5)
    ctx = context_ids(bridge)[0]
    assert await wait_for(lambda: any(r.get("continue") is False for r in requests_for(bridge, ctx)), 5)
    sent = [(r["transcript"], r["continue"]) for r in requests_for(bridge, ctx)]
    # Sent at word boundaries; the held partial word goes with the next token. The last word and
    # the close (continue:false) are made in one turn, so they go as one input.
    assert sent == [("Good ", True), ("morning, how ", True), ("can I ", True), ("help?", False)]
    spoken = await agent.next("spoken", 10)
    assert spoken["text"] == "Good morning, how can I help?" and spoken["utteranceId"] == ctx
    assert spoken["durationMs"] > 0

    await call.send_dtmf("4")
    assert (await agent.next("dtmf"))["digit"] == "4"

    await agent.send({"type": "config", "voice": "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a02", "speed": 1.2})
    await agent.send({"type": "text", "token": "Second voice.", "last": True})
    assert await wait_for(lambda: len(context_ids(bridge)) == 2, 5)
    second = requests_for(bridge, context_ids(bridge)[1])[0]
    assert second["voice"] == {"mode": "id", "id": "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a02"}
    assert second["generation_config"] == {"speed": 1.2}

    await agent.send("{not json")
    await agent.send({"type": "teleport"})
    errors = [await agent.next("error"), await agent.next("error")]
    assert "malformed JSON" in errors[0]["description"] and "unknown message type" in errors[1]["description"]

    await agent.send({"type": "end", "handoffData": {"reason": "sales"}})
    assert await wait_for(lambda: call.closed.is_set(), 10), "the bridge closes the stream after end"
    action = await call.follow_action()
    assert action is not None
    assert "<Redirect" in action and "crm.example.com/handoff?HandoffData=" in action and "sales" in action
    samples = await bridge.metrics()
    assert value(samples, "bridge_calls_total", outcome="agent_end") == 1
    assert value(samples, "bridge_agent_connections") == 0


async def test_agent_unreachable_plays_fallback_and_ends(make_bridge: BridgeFactory) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/agent"
    bridge = await make_bridge({"AGENT_URL": dead, "FALLBACK_LINE": "Sorry, goodbye."})
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await wait_for(lambda: call.closed.is_set(), 10)
    assert call.record.media_bytes > 0, "the caller hears the fallback line"
    transcripts = "".join(obj.get("transcript", "") for _c, obj in bridge.emulator.received)
    assert transcripts == "Sorry, goodbye."
    action = await call.follow_action()
    assert action is not None and "<Hangup" in action
    samples = await bridge.metrics()
    assert value(samples, "bridge_agent_failures_total", reason="unreachable") == 1
    assert value(samples, "bridge_calls_total", outcome="agent_unreachable") == 1
    assert value(samples, "bridge_active_calls") == 0


async def test_agent_url_from_call_data_must_be_allowlisted(make_bridge: BridgeFactory, agent: AgentServer) -> None:
    bridge = await make_bridge({"AGENT_URL_ALLOWLIST": "ws://127.0.0.1:1/only-this"})
    call = bridge.call(webhook_query={"agentUrl": agent.url})
    stream = await call.place()
    assert stream is not None and stream.parameters["agentUrl"] == agent.url
    await call.connect()
    assert await wait_for(lambda: call.closed.is_set(), 10)
    assert agent.connections == 0, "a URL from call data that is not allowlisted is never dialled"
    samples = await bridge.metrics()
    assert value(samples, "bridge_agent_failures_total", reason="not_allowlisted") == 1

    allowed = await make_bridge({"AGENT_URL_ALLOWLIST": agent.url.rsplit("/", 1)[0] + "/"})
    call2 = allowed.call(webhook_query={"agentUrl": agent.url})
    await call2.place()
    await call2.connect()
    assert (await agent.next("setup"))["callSid"] == call2.record.call_sid
    await call2.hangup()


async def test_agent_disconnect_ends_the_call_cleanly(make_bridge: BridgeFactory, agent: AgentServer) -> None:
    bridge = await make_bridge({"AGENT_URL": agent.url})
    call = bridge.call()
    await call.place()
    await call.connect()
    await agent.next("setup")
    assert agent.ws is not None
    await agent.ws.close()
    assert await wait_for(lambda: call.closed.is_set(), 10)
    assert await wait_for(lambda: not bridge.server.calls, 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_calls_total", outcome="agent_disconnected") == 1


async def test_caller_barge_in_is_word_exact(make_bridge: BridgeFactory, agent: AgentServer) -> None:
    # 2x real time: Cartesia is still generating when the caller talks, so there is something to cancel.
    # The energy VAD is the barge-in source when speech recognition is off.
    bridge = await make_bridge({"AGENT_URL": agent.url, "VAD_ENABLED": "true", "VAD_MIN_SPEECH_MS": "60",
                                "STT_ENABLED": "false"},
                               emulator_settings=EmulatorSettings(ttfb_ms=5, rtf=0.5))
    call = bridge.call()
    await call.place()
    await call.connect()
    await agent.next("setup")
    passage = " ".join(f"word{i}" for i in range(60))
    await agent.send({"type": "text", "token": passage, "last": True})
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    await asyncio.sleep(1.0)  # let the caller hear about a second of it
    call.speak(0.5)
    interrupt = await agent.next("interrupt", 5)
    clear_at = call.record.first("clear")
    assert clear_at is not None and call.record.clears == 1
    ctx = context_ids(bridge)[0]
    assert await wait_for(lambda: any(o.get("cancel") for o in requests_for(bridge, ctx)), 2), "cancel sent"
    bytes_at_clear = sum(len(s.audio) for s in call.ear.segments)
    media_at_clear = call.record.media_bytes
    await asyncio.sleep(0.5)
    assert call.record.media_bytes == media_at_clear, "no frame of the cancelled context after clear"
    record = bridge.emulator.context_record(ctx)
    assert record is not None
    played_ms = interrupt["durationUntilInterruptMs"]
    expected = " ".join(w for w, end in zip(record.words, record.ends, strict=True) if end <= played_ms / 1000 + 1e-9)
    assert interrupt["utteranceUntilInterrupt"] == expected
    assert expected.startswith("word0 word1"), "about a second was heard"
    # The played cursor comes from mark echoes: never ahead of what the ear played.
    assert played_ms <= bytes_at_clear / 8 + 1
    assert played_ms >= bytes_at_clear / 8 - 100 - 60, "at most a mark interval (plus round trip) behind"
    samples = await bridge.metrics()
    assert value(samples, "bridge_interruptions_total", source="vad") == 1
    assert value(samples, "bridge_barge_in_latency_seconds_count") == 1
    assert value(samples, "bridge_cartesia_active_contexts") == 0
    await call.hangup()


async def test_agent_interrupt_and_non_interruptible_speech(make_bridge: BridgeFactory, agent: AgentServer) -> None:
    bridge = await make_bridge({"AGENT_URL": agent.url, "VAD_ENABLED": "true", "VAD_MIN_SPEECH_MS": "60"})
    call = bridge.call()
    await call.place()
    await call.connect()
    await agent.next("setup")
    await agent.send({"type": "text", "token": "Please hold while I check " * 4, "last": True,
                      "interruptible": False})
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    call.speak(0.4)
    await asyncio.sleep(0.6)
    assert call.record.clears == 0, "VAD does not cut an interruptible:false utterance"
    await agent.send({"type": "interrupt"})
    interrupt = await agent.next("interrupt", 5)
    assert call.record.clears == 1
    assert interrupt["durationUntilInterruptMs"] > 0
    samples = await bridge.metrics()
    assert value(samples, "bridge_interruptions_total", source="agent") == 1
    await call.hangup()


def test_builtin_demo_agent_twiml_has_no_agent_parameter() -> None:
    from telephony.twiml import connect_stream

    xml = connect_stream(stream_url="wss://x/twilio/media", status_callback=None, parameters={})
    parsed = parse_connect_stream(xml)
    assert parsed is not None and parsed.parameters == {}


async def test_a_caller_that_stops_reading_gets_every_frame_in_order_after_the_drain(
        make_bridge: BridgeFactory, agent: AgentServer) -> None:
    """Twilio's socket backs up: the bridge queues instead of writing past 64 KiB unsent, a drain
    task writes the queue once the transport empties, and the caller gets every frame in order."""
    import socket

    import aiohttp

    from telephony.stream_socket import TWILIO_WRITE_HIGH_WATER

    def small_receive_buffer(addr_info: Any) -> socket.socket:
        family, kind, proto, _name, _addr = addr_info
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window is small
        return sock

    bridge = await make_bridge({"AGENT_URL": agent.url, "PLAYOUT_LEAD_MS": "10000"})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as http:
        call = bridge.call()
        call.session = http
        await call.place()
        await call.connect()
        await agent.next("setup")
        (session,) = bridge.server.calls
        sock = session.twilio.ws._req.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # The caller stops reading: ~10 s of lead (~110 KB of media messages) cannot leave the bridge.
        client = call._ws._conn.transport  # type: ignore[union-attr]
        client.pause_reading()
        await agent.send({"type": "text", "token": " ".join(["backpressure"] * 40) + ".", "last": True})
        assert await wait_for(lambda: session.twilio.draining, 5), "the bridge never saw the socket back up"
        assert session.twilio.ws.write_buffer_size > TWILIO_WRITE_HIGH_WATER - 8192
        assert await wait_for(lambda: session.twilio.queued > 0, 5), "messages wait in the outbox, not the transport"
        client.resume_reading()
        assert await wait_for(lambda: call.record.media_bytes >= 9 * 8000, 10), "the queued lead never arrived"
        assert await wait_for(lambda: not session.twilio.draining, 5), "the drain task never finished"
        (ctx,) = context_ids(bridge)
        produced = bridge.emulator.produced_audio(ctx)
        assert produced is not None
        received = bytes(call.record.received_audio)
        assert received == produced[:len(received)], "every frame, in order, nothing lost or repeated"
        assert call.record.protocol_errors == []
        await call.hangup()
        assert await wait_for(lambda: not bridge.server.calls, 5)
