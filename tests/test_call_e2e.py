"""End to end over real sockets: simulated Twilio -> bridge -> emulator -> back."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
import pytest
from twilio.twiml.voice_response import VoiceResponse  # noqa: F401  (the TwiML under test is built with it)

from metrics.scrape import value
from telephony.media import FRAME_BYTES
from telephony.signature import sign
from telephony.twiml import parse_connect_stream

from .conftest import Bridge, BridgeFactory


def context_ids(bridge: Bridge) -> list[str]:
    """Context ids the emulator saw, in order of first appearance."""
    seen: list[str] = []
    for _conn, obj in bridge.emulator.received:
        ctx = obj.get("context_id") if isinstance(obj, dict) else None
        if ctx and ctx not in seen:
            seen.append(ctx)
    return seen


def strip_padding(heard: bytes, produced: bytes) -> bytes:
    """The bridge pads only an utterance's last frame with 0xFF."""
    padded_len = -(-len(produced) // FRAME_BYTES) * FRAME_BYTES
    assert len(heard) == padded_len
    assert heard[len(produced):] == b"\xff" * (padded_len - len(produced))
    return heard[: len(produced)]


async def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


async def test_signed_call_plays_emulator_audio_byte_for_byte(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge()
    call = bridge.call()
    stream = await call.place()
    assert stream is not None
    port = bridge.base_url.rsplit(":", 1)[1]
    assert stream.url == f"ws://127.0.0.1:{port}/twilio/media"
    assert stream.status_callback == f"{bridge.base_url}/twilio/stream-status"
    assert stream.parameters["from"] == call.from_
    assert call.twiml is not None and call.twiml.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect')
    await call.connect()
    # The greeting is one utterance; wait until its end mark has been echoed (played).
    assert await wait_for(lambda: len(context_ids(bridge)) == 1 and bridge.emulator.context_record(
        context_ids(bridge)[0]) is not None and bridge.emulator.context_record(context_ids(bridge)[0]).done, 5)
    ctx = context_ids(bridge)[0]
    produced = bridge.emulator.produced_audio(ctx)
    assert produced
    assert await call.wait_until(lambda: call.record.media_bytes >= len(produced), 5)
    assert await call.wait_until(lambda: call.ear.buffer_end < time.monotonic() - 0.05, 10)
    assert all(size % FRAME_BYTES == 0 for size in call.record.payload_sizes)
    heard = call.ear.heard()
    assert strip_padding(heard, produced) == produced
    assert call.record.protocol_errors == []
    assert call.record.marks_echoed > 0
    samples = await bridge.metrics()
    assert value(samples, "bridge_mark_round_trip_seconds_count") > 0
    assert value(samples, "bridge_tts_ttfb_seconds_count") == 1
    assert value(samples, "bridge_text_to_first_frame_seconds_count") == 1
    assert value(samples, "bridge_twilio_frames_out_total") == len(heard) // FRAME_BYTES
    assert value(samples, "bridge_active_calls") == 1
    # The exact Cartesia requests: one context, continuations, pcm_mulaw 8 kHz, timestamps asked.
    requests = [obj for _c, obj in bridge.emulator.received if obj.get("context_id") == ctx]
    assert requests[-1]["continue"] is False
    assert all(r["continue"] is True for r in requests[:-1])
    assert all(r["output_format"] == {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}
               for r in requests)
    assert all(r["add_timestamps"] is True for r in requests)
    assert "".join(r["transcript"] for r in requests) == "Hello there caller, welcome to the bridge."
    await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_active_calls") == 0
    assert value(samples, "bridge_cartesia_active_contexts") == 0
    assert value(samples, "bridge_agent_connections") == 0
    assert value(samples, "bridge_calls_total", outcome="caller_hangup") == 1


async def test_pacing_keeps_lead_bounded_by_marks(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"PLAYOUT_LEAD_MS": "200", "PLAYOUT_MARK_INTERVAL_MS": "100",
                                "GREETING": " ".join(["pacing"] * 30)})
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    worst = 0.0
    for _ in range(100):
        now = time.monotonic()
        # Audio queued at the caller beyond what has played = the bridge's lead.
        worst = max(worst, call.ear.buffer_end - now)
        await asyncio.sleep(0.01)
    assert worst <= 0.200 + 0.045, f"caller buffer held {worst * 1000:.0f} ms > lead"
    await call.hangup()


async def test_bad_webhook_signature_is_refused_and_counted(make_bridge: BridgeFactory, http: aiohttp.ClientSession
                                                            ) -> None:
    bridge = await make_bridge()
    form = {"CallSid": "CA" + "0" * 32, "From": "+1555", "To": "+1666"}
    bad = sign("not-the-token", bridge.base_url + "/twilio/voice", form)
    async with http.post(bridge.base_url + "/twilio/voice", data=form, headers={"X-Twilio-Signature": bad}) as r:
        assert r.status == 403
    async with http.post(bridge.base_url + "/twilio/voice", data=form) as r:
        assert r.status == 403
    # Signed for a different URL than the configured public one (e.g. the proxy's view): refused too.
    other = sign(bridge.token or "", "http://internal:9999/twilio/voice", form)
    async with http.post(bridge.base_url + "/twilio/voice", data=form, headers={"X-Twilio-Signature": other}) as r:
        assert r.status == 403
    samples = await bridge.metrics()
    assert value(samples, "bridge_signature_failures_total", endpoint="voice") == 3


async def test_bad_websocket_signature_is_refused_before_upgrade(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge()
    call = bridge.call()
    stream = await call.place()
    assert stream is not None
    # Signed over the https URL (what a framework reports) instead of the wss one: refused.
    wrong = sign(bridge.token or "", stream.url.replace("ws://", "http://"), {})
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await call.connect(signature=wrong)
    assert info.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await call.connect(signature="")
    samples = await bridge.metrics()
    assert value(samples, "bridge_signature_failures_total", endpoint="media") == 2
    # The right signature still works.
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    await call.hangup()


async def test_unsigned_mode_warns_once_and_accepts(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
                                                    ) -> None:
    with caplog.at_level(logging.WARNING):
        bridge = await make_bridge(signed=False)
    assert sum("SIGNATURES_NOT_ENFORCED" in r.getMessage() for r in caplog.records) == 1
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    await call.hangup()


async def test_secrets_never_reach_the_logs(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        bridge = await make_bridge()
        call = bridge.call()
        await call.place()
        await call.connect()
        assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
        await call.hangup()
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "sk_car_test_key_never_logged" not in text
    assert bridge.token and bridge.token not in text


BAD_INPUTS = [
    ("malformed_json", "{not json"),
    ("unknown_event", '{"event":"dance","streamSid":"MZx"}'),
    ("invalid_base64", None),  # filled in with the right streamSid
    ("wrong_stream_sid", None),
    ("oversized", '{"event":"media","pad":"' + "x" * 70_000 + '"}'),
    ("not_an_object", "[1,2,3]"),
]


async def test_bad_inputs_are_counted_and_the_call_continues(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"GREETING": "one"})
    call = bridge.call(send_inbound_audio=False)
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    sid = call.record.stream_sid
    for kind, text in BAD_INPUTS:
        if kind == "invalid_base64":
            text = '{"event":"media","streamSid":"' + sid + '","media":{"payload":"@@@not-base64","chunk":"1","timestamp":"1"}}'
        elif kind == "wrong_stream_sid":
            text = '{"event":"media","streamSid":"MZ000","media":{"payload":"/w==","chunk":"1","timestamp":"1"}}'
        await call.send_raw(text)
    await call.send_raw(b"\x00\x01binary")
    # Still alive: DTMF gets a spoken answer.
    before = call.record.media_bytes
    await call.send_dtmf("5")
    assert await call.wait_until(lambda: call.record.media_bytes > before, 5), "call stopped working"
    samples = await bridge.metrics()
    for kind, _ in BAD_INPUTS:
        assert value(samples, "bridge_bad_input_total", source="twilio", kind=kind) == 1, kind
    assert value(samples, "bridge_bad_input_total", source="twilio", kind="binary_frame") == 1
    await call.hangup()


async def test_a_message_over_the_socket_cap_ends_the_call_with_the_close_code_logged(
        make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    bridge = await make_bridge({"GREETING": "one"})
    call = bridge.call(send_inbound_audio=False)
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    with caplog.at_level(logging.WARNING, logger="bridge"):
        await call.send_raw('{"event":"media","pad":"' + "x" * 1_100_000 + '"}')  # over aiohttp's 1 MiB cap
        assert await wait_for(lambda: not bridge.server.calls, 5)
    details = [r.__dict__.get("detail", "") for r in caplog.records if r.__dict__.get("kind") == "socket_error"]
    assert details and "1009" in details[0], details
    samples = await bridge.metrics()
    assert value(samples, "bridge_bad_input_total", source="twilio", kind="socket_error") == 1
    assert value(samples, "bridge_active_calls") == 0


async def test_media_before_start_is_counted_and_nothing_is_sent(make_bridge: BridgeFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    bridge = await make_bridge()
    call = bridge.call()
    stream = await call.place()
    assert stream is not None
    ws = await http.ws_connect(stream.url, headers={"X-Twilio-Signature": sign(bridge.token or "", stream.url, {})})
    await ws.send_str('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    await ws.send_str('{"event":"media","streamSid":"MZ1","media":{"payload":"/w==","chunk":"1","timestamp":"0"}}')
    with pytest.raises(asyncio.TimeoutError):
        await ws.receive(timeout=0.3)  # the bridge never sends before start
    await ws.close()
    samples = await bridge.metrics()
    assert value(samples, "bridge_bad_input_total", source="twilio", kind="media_before_start") == 1


async def test_cartesia_error_for_a_context_keeps_the_call(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"CARTESIA_MODEL": "not-a-model"})
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await wait_for(lambda: bool(bridge.server.calls), 5)
    session = next(iter(bridge.server.calls))
    assert await wait_for(lambda: any(m.get("type") == "error" for m in getattr(session.agent, "received", [])), 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_cartesia_errors_total", status="400") >= 1
    assert value(samples, "bridge_cartesia_active_contexts") == 0
    assert not call.closed.is_set(), "a failed utterance must not end the call"
    await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 5)


async def test_two_calls_share_one_prewarmed_cartesia_socket(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"CARTESIA_POOL_SIZE": "1"})
    handshakes = bridge.emulator.handshakes
    assert handshakes == 1, "the pool connects at start"
    calls = [bridge.call(), bridge.call()]
    for c in calls:
        await c.place()
        await c.connect()
    for c in calls:
        assert await c.wait_until(lambda c=c: c.record.media_bytes > 0, 5)
    assert bridge.emulator.handshakes == 1, "no handshake on the call path"
    assert len(context_ids(bridge)) == 2
    assert len({conn for conn, _ in bridge.emulator.received}) == 1
    for c in calls:
        await c.hangup()


async def test_socket_drop_ends_the_call_cleanly_and_cancels_contexts(make_bridge: BridgeFactory,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    bridge = await make_bridge({"GREETING": " ".join(["long"] * 200)})
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5)
    ctx = context_ids(bridge)[0]
    with caplog.at_level(logging.INFO, logger="bridge"):
        await call.close()  # TCP close without `stop`
        assert await wait_for(lambda: not bridge.server.calls, 5)
    # The log says which context the hang-up cut (its audio is only a prefix of the text's).
    (ended,) = [r for r in caplog.records if r.getMessage() == "call_ended"]
    assert ended.__dict__["contexts_cancelled_at_end"] == [ctx]
    assert await wait_for(lambda: bridge.server.pool.active_contexts == 0, 5)
    cancels = [obj for _c, obj in bridge.emulator.received if obj.get("cancel") and obj.get("context_id") == ctx]
    assert len(cancels) == 1
    samples = await bridge.metrics()
    assert value(samples, "bridge_active_calls") == 0
    assert value(samples, "bridge_calls_total", outcome="twilio_disconnected") == 1


async def test_health_and_readiness(make_bridge: BridgeFactory, http: aiohttp.ClientSession) -> None:
    bridge = await make_bridge()
    async with http.get(bridge.base_url + "/healthz") as r:
        assert r.status == 200
    async with http.get(bridge.base_url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    bridge.server.draining = True
    async with http.get(bridge.base_url + "/readyz") as r:
        assert r.status == 503
    call = bridge.call()
    stream = await call.place()
    assert stream is None, "a draining bridge answers with a polite refusal"
    assert call.twiml is not None and "<Say>" in call.twiml and "<Hangup" in call.twiml


def test_twiml_is_built_by_the_twilio_library() -> None:
    from telephony.twiml import connect_stream

    xml = connect_stream(stream_url="wss://b.example.com/twilio/media",
                         status_callback="https://b.example.com/twilio/stream-status",
                         parameters={"from": "+1555"}, action="https://b.example.com/twilio/connect-action")
    parsed = parse_connect_stream(xml)
    assert parsed is not None
    assert parsed.url == "wss://b.example.com/twilio/media"
    assert parsed.parameters == {"from": "+1555"}
    assert parsed.action == "https://b.example.com/twilio/connect-action"
    with pytest.raises(ValueError):
        connect_stream(stream_url="wss://b/x?q=1", status_callback=None, parameters={})


async def test_webhooks_whose_stream_never_comes_do_not_fill_the_bridge(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"MAX_CALLS": "2"})
    bridge.server.registry.pending_ttl_s = 0.3
    for _ in range(2):  # rang, then hung up before the stream opened
        assert await bridge.call().place() is not None
    refused = bridge.call()
    assert await refused.place() is None, "within the TTL they still hold their places"
    await asyncio.sleep(0.4)
    late = bridge.call()
    assert await late.place() is not None, "after the TTL they no longer count"
    await late.connect()
    assert await late.wait_until(lambda: late.record.media_bytes > 0, 5)
    await late.hangup()


async def test_a_burst_of_tokens_goes_to_cartesia_as_few_inputs_with_the_same_text(make_bridge: BridgeFactory) -> None:
    """The built-in agent delivers its long passage word by word in one loop turn (~100 tokens).
    They are joined into one input per sentence, each written as soon as its sentence ends (where
    Cartesia starts generating), never changing the text."""
    from bridge.agent.builtin import LONG_PASSAGE
    from bridge.cartesia.contexts import MAX_MERGED_CHARS

    bridge = await make_bridge({"GREETING": "Hi."})
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await wait_for(lambda: len(context_ids(bridge)) == 1, 5)
    await call.send_dtmf("9")
    assert await wait_for(lambda: len(context_ids(bridge)) == 2 and any(
        r.get("continue") is False for _c, r in bridge.emulator.received if r.get("context_id") == context_ids(bridge)[1]), 5)
    requests = [obj for _c, obj in bridge.emulator.received if obj.get("context_id") == context_ids(bridge)[1]]
    sentences = re.findall(r".*?[.!?] |.+$", LONG_PASSAGE)
    assert [r["transcript"] for r in requests] == sentences, "one input per sentence"
    assert all(r["continue"] for r in requests[:-1]) and requests[-1]["continue"] is False
    assert all(len(r["transcript"]) <= MAX_MERGED_CHARS for r in requests)
    await call.hangup()


async def test_buffered_audio_gauge_follows_the_playout_and_returns_to_zero(make_bridge: BridgeFactory) -> None:
    """The emulator delivers the greeting 20x faster than it plays: the audio the bridge holds
    behind the 300 ms lead shows in bridge_playout_buffered_bytes, and the gauge is 0 after the call."""
    bridge = await make_bridge({"GREETING": " ".join(["buffered"] * 40)})
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await wait_for(lambda: bool(bridge.server.calls), 5)
    (session,) = bridge.server.calls
    assert await wait_for(lambda: session.core.playout.buffered_bytes > 8000, 5), "a second of audio waits"
    samples = await bridge.metrics()
    held = session.core.playout.buffered_bytes
    gauge = value(samples, "bridge_playout_buffered_bytes")
    assert gauge > 8000 and abs(gauge - held) <= 8000, (gauge, held)  # the scrape flushed this call's share
    await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 5)
    assert value(await bridge.metrics(), "bridge_playout_buffered_bytes") == 0
