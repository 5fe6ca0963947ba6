"""A whole spoken conversation, offline: a ConversationRelay agent (ours, from Twilio's
reference) behind the bridge, the caller speaking the emulator's own voice, Cartesia STT
(the emulator) hearing it.

greeting → caller speaks → ``prompt`` with the right text → streamed reply spoken →
caller barges in → ``interrupt`` with the words heard → next prompt. Then every
ConversationRelay message the agent can send, each bad field answered with ``error``
while the call goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from metrics.scrape import value
from telephony.simulator import SimulatedCall, fetch_speech

from .conftest import Bridge, BridgeFactory
from .relay_agent import RelayAgent
from .test_call_e2e import wait_for

GREETING = "Welcome to the test line."
SECOND_VOICE = "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a02"


@pytest.fixture
async def relay_agent() -> AsyncIterator[RelayAgent]:
    agent = RelayAgent()
    await agent.start()
    yield agent
    await agent.stop()


async def _bridge(make_bridge: BridgeFactory, agent: RelayAgent, **env: str) -> Bridge:
    values = {"AGENT_URL": agent.url, "RELAY_WELCOME_GREETING": GREETING, "RELAY_SPEECH_TIMEOUT": "400",
              "RELAY_EVENTS": "agentSpeaking,clientSpeaking,tokensPlayed"}
    values.update(env)
    bridge = await make_bridge(values)
    agent.auth_token = bridge.token
    return bridge


async def _say(bridge: Bridge, call: SimulatedCall, text: str, voice: str = SECOND_VOICE) -> None:
    assert bridge.emulator.http_url is not None
    call.say(await fetch_speech(bridge.http, bridge.emulator.http_url, text, voice,
                                api_key="sk_car_test_key_never_logged"))


async def test_spoken_conversation_with_barge_in(make_bridge: BridgeFactory, relay_agent: RelayAgent) -> None:
    bridge = await _bridge(make_bridge, relay_agent)
    call = bridge.call(webhook_query={"callReference": "bar", "interruptSensitivity": "high"})
    await call.place()
    await call.connect()
    setup = await relay_agent.next("setup")
    assert relay_agent.signatures == [True], "the agent validated X-Twilio-Signature with RequestValidator"
    assert setup["sessionId"].startswith("VX") and setup["sessionId"] != setup["callSid"]
    assert setup["callSid"] == call.record.call_sid and setup["from"] == call.from_ and setup["to"] == call.to
    assert setup["customParameters"] == {"callReference": "bar"}
    for name in ("accountSid", "parentCallSid", "forwardedFrom", "callType", "callerName", "direction", "callStatus"):
        assert name in setup
    # The bridge speaks the welcome greeting itself; the agent hears it was played.
    played = await relay_agent.next("info", 10)
    assert played == {"type": "info", "name": "agentSpeaking", "value": "on", "ts": played["ts"]}
    assert await wait_for(lambda: any(m.get("name") == "tokensPlayed" and m.get("value") == GREETING
                                      for m in relay_agent.received), 10)

    await _say(bridge, call, "what time does the store open")
    prompt = await relay_agent.next("prompt", 10)
    assert prompt == {"type": "prompt", "voicePrompt": "what time does the store open", "lang": "en", "last": True}
    # The agent streams its reply; the caller hears it.
    heard_before = call.record.media_bytes
    assert await wait_for(lambda: any(m.get("name") == "tokensPlayed" and "You said what time" in m.get("value", "")
                                      for m in relay_agent.received), 15)
    assert call.record.media_bytes > heard_before

    # A long reply, and the caller talks over it.
    n = len(relay_agent.received)
    passage = " ".join(["the store opens at nine in the morning and closes at six in the evening"] * 4)
    words = passage.split(" ")
    for i, word in enumerate(words):
        last = i == len(words) - 1
        await relay_agent.send({"type": "text", "token": word if last else word + " ", "last": last})
    await relay_agent.next("info", 10, after=n)  # agentSpeaking on
    await asyncio.sleep(1.0)
    await _say(bridge, call, "stop please")
    interrupt = await relay_agent.next("interrupt", 10, after=n)
    heard = interrupt["utteranceUntilInterrupt"]
    assert heard and passage.startswith(heard), "the words heard are a prefix of what was sent"
    assert interrupt["durationUntilInterruptMs"] > 500
    assert call.record.clears >= 1
    second = await relay_agent.next("prompt", 10, after=n)
    assert second["voicePrompt"] == "stop please"
    assert relay_agent.of_type("prompt")[-1]["voicePrompt"] == "stop please"

    await call.hangup()
    samples = await bridge.metrics()
    assert value(samples, "bridge_stt_turns_total", outcome="prompt") >= 2
    assert value(samples, "bridge_stt_latency_seconds_count") >= 2
    assert value(samples, "bridge_turn_ttfa_seconds_count") >= 1
    assert await _gauge_settles(bridge, "bridge_stt_sockets", 0)
    assert await _gauge_settles(bridge, "bridge_active_calls", 0)


async def _gauge_settles(bridge: Bridge, name: str, target: float, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if value(await bridge.metrics(), name) == target:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_every_agent_message_and_bad_fields(make_bridge: BridgeFactory, relay_agent: RelayAgent) -> None:
    bridge = await _bridge(make_bridge, relay_agent, RELAY_WELCOME_GREETING="")
    call = bridge.call()
    await call.place()
    await call.connect()
    await relay_agent.next("setup")
    errors_before = 0

    async def expect_error(message: object, needle: str) -> None:
        nonlocal errors_before
        await relay_agent.send(message)  # type: ignore[arg-type]
        assert await wait_for(lambda: len(relay_agent.of_type("error")) > errors_before, 5), message
        errors_before = len(relay_agent.of_type("error"))
        assert needle in relay_agent.of_type("error")[-1]["description"]

    await expect_error("{not json", "malformed JSON")
    await expect_error({"type": "text", "token": "x", "interruptible": "sometimes"}, "interruptible")
    await expect_error({"type": "text", "token": "x", "lang": "tlh-KX"}, "tlh-KX")
    await expect_error({"type": "play", "source": "file:///etc/passwd"}, "source")
    await expect_error({"type": "play", "source": "https://cdn.example.com/a.wav"}, "play")
    await expect_error({"type": "sendDigits", "digits": "12x"}, "digits")
    await expect_error({"type": "language"}, "ttsLanguage")
    await expect_error({"type": "config", "interruptSensitivity": "extreme"}, "interruptSensitivity")
    await expect_error({"type": "teleport"}, "unknown message type")

    # language: Spanish (Mexico) for speech out, French for speech in: Cartesia gets es / fr.
    await relay_agent.send({"type": "language", "ttsLanguage": "es-MX", "transcriptionLanguage": "fr-FR"})
    await relay_agent.send({"type": "text", "token": "Hola, ", "last": False, "interruptible": "none",
                            "preemptible": True, "lang": "es-MX"})
    await relay_agent.send({"type": "text", "token": "buenos dias.", "last": True})
    assert await wait_for(lambda: any(obj.get("language") == "es" for _c, obj in bridge.emulator.received), 5)
    # sendDigits: in-band DTMF tones reach the caller.
    heard = call.record.media_bytes
    await relay_agent.send({"type": "sendDigits", "digits": "12#"})
    assert await wait_for(lambda: call.record.media_bytes >= heard + 8 * 500, 10)
    # hints and config change the STT socket (reopened with keyterms); the call goes on.
    await relay_agent.send({"type": "hints", "hints": "Cartesia,Twilio"})
    await relay_agent.send({"type": "config", "partialPrompts": True, "dtmfDetection": False})
    await call.send_dtmf("5")
    await asyncio.sleep(0.3)
    assert not relay_agent.of_type("dtmf"), "dtmfDetection false: digits are not reported"
    await relay_agent.send({"type": "end", "handoffData": '{"reason":"done"}'})
    assert await wait_for(lambda: call.closed.is_set(), 15)
    assert await _gauge_settles(bridge, "bridge_active_calls", 0)
    samples = await bridge.metrics()
    assert value(samples, "bridge_calls_total", outcome="agent_end") == 1
    assert value(samples, "bridge_stt_sockets") == 0


def _wav_16k_sine(seconds: float) -> bytes:
    import math
    import struct
    n = int(16000 * seconds)
    pcm = b"".join(struct.pack("<h", int(9000 * math.sin(2 * math.pi * 1000 * i / 16000))) for i in range(n))
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


async def test_play_fetches_allowlisted_audio_once(make_bridge: BridgeFactory, relay_agent: RelayAgent) -> None:
    from aiohttp import web

    from bridge.netutil import free_port

    hits: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=_wav_16k_sine(0.5), content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/audio/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        bridge = await _bridge(make_bridge, relay_agent, RELAY_WELCOME_GREETING="",
                               PLAY_URL_ALLOWLIST=f"http://127.0.0.1:{port}/audio/")
        call = bridge.call()
        await call.place()
        await call.connect()
        await relay_agent.next("setup")
        await relay_agent.send({"type": "play", "source": f"http://127.0.0.1:{port}/audio/hold.wav", "loop": 2})
        # 0.5 s played twice = 8000 bytes of μ-law at the caller.
        assert await wait_for(lambda: call.record.media_bytes >= 8000, 10)
        await relay_agent.send({"type": "play", "source": f"http://127.0.0.1:{port}/audio/hold.wav"})
        assert await wait_for(lambda: call.record.media_bytes >= 12000, 10)
        assert hits == ["/audio/hold.wav"], "fetched and transcoded once, then cached"
        await relay_agent.send({"type": "play", "source": f"http://127.0.0.1:{port}/private/x.wav"})
        error = await relay_agent.next("error", 5)
        assert "not on the play allowlist" in error["description"]
        assert hits == ["/audio/hold.wav"], "a URL off the allowlist is never fetched"
        await call.hangup()
    finally:
        await runner.cleanup()


async def test_stt_socket_lost_mid_turn_replays_the_turn(make_bridge: BridgeFactory,
                                                        relay_agent: RelayAgent) -> None:
    from bridge.cartesia.emulator import EmulatorSettings
    from bridge.cartesia.emulator.faults import parse_faults
    from bridge.cartesia.emulator.settings import SttSettings

    # Each STT socket is closed by the emulator after its 8th transcript: the long first turn's interims
    # and final use about 7, so the first socket dies in the middle of the short second turn, whose
    # replay on the next socket needs fewer than 8.
    settings = EmulatorSettings(ttfb_ms=5, rtf=0.05, stt=SttSettings(faults=parse_faults(["close-after-chunks=8"])))
    bridge = await make_bridge({"AGENT_URL": relay_agent.url, "RELAY_SPEECH_TIMEOUT": "400", "STT_SEND_INTERVAL_MS": "20"},
                               emulator_settings=settings)
    relay_agent.auth_token = bridge.token
    relay_agent.reply = lambda _prompt: None  # keep the line quiet: only the caller speaks
    call = bridge.call()
    await call.place()
    await call.connect()
    await relay_agent.next("setup")
    await _say(bridge, call, "please call me back tomorrow morning")
    first = await relay_agent.next("prompt", 15)
    assert first["voicePrompt"] == "please call me back tomorrow morning"
    n = len(relay_agent.received)
    await _say(bridge, call, "hello there")
    second = await relay_agent.next("prompt", 15, after=n)
    assert second["voicePrompt"] == "hello there", "the turn survived the lost socket"
    assert not relay_agent.of_type("error"), "nothing was lost, so the agent hears of no error"
    samples = await bridge.metrics()
    assert value(samples, "bridge_stt_reconnects_total") >= 1
    await call.hangup()


async def test_a_bad_relay_setting_on_the_webhook_is_refused_politely(make_bridge: BridgeFactory,
                                                                     relay_agent: RelayAgent) -> None:
    bridge = await _bridge(make_bridge, relay_agent)
    call = bridge.call(webhook_query={"interruptible": "sometimes"})
    stream = await call.place()
    assert stream is None, "no <Connect><Stream> for a call whose settings cannot be honoured"
    samples = await bridge.metrics()
    assert value(samples, "bridge_calls_refused_total", reason="bad_request") == 1
    assert relay_agent.received == []


async def test_stt_unavailable_tells_the_agent_and_the_call_goes_on(make_bridge: BridgeFactory,
                                                                   relay_agent: RelayAgent) -> None:
    from bridge.cartesia.emulator import EmulatorSettings
    from bridge.cartesia.emulator.settings import SttSettings

    # The emulator's STT takes no socket at all: every handshake is a 429.
    settings = EmulatorSettings(ttfb_ms=5, rtf=0.05, stt=SttSettings(max_concurrency=0))
    bridge = await make_bridge({"AGENT_URL": relay_agent.url}, emulator_settings=settings)
    relay_agent.auth_token = bridge.token
    call = bridge.call()
    await call.place()
    await call.connect()
    await relay_agent.next("setup")
    error = await relay_agent.next("error", 10)
    assert "speech recognition unavailable" in error["description"]
    await relay_agent.send({"type": "text", "token": "Still here.", "last": True})
    assert await wait_for(lambda: call.record.media_bytes > 0, 10), "the call still speaks"
    samples = await bridge.metrics()
    assert value(samples, "bridge_stt_errors_total", kind="handshake_429") >= 1
    assert value(samples, "bridge_stt_sockets") == 0
    await call.hangup()
