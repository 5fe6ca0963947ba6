"""The emulator's STT socket hears its own tone voices: real emulator on 127.0.0.1, real clients."""

from __future__ import annotations

import array
import asyncio
import json
import random
import time
import zlib
from typing import Any

import aiohttp
import pytest
import websockets
from cartesia import AsyncCartesia
from websockets.asyncio.client import ClientConnection

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, TONE_VOICES, Emulator, FaultSettings
from bridge.cartesia.emulator.cli import build_parser, settings_from_args
from bridge.cartesia.emulator.recognizer import StreamingRecognizer, recognize, to_linear16
from bridge.cartesia.emulator.stt import SttSettings
from bridge.cartesia.emulator.vocabulary import BUILTIN_WORDS, Vocabulary
from bridge.cartesia.emulator.voices import ToneSynth, normalize_word, tone_word_ms
from bridge.cartesia.protocol import OutputFormat
from telephony.simulator import MAX_SAY_BYTES, SILENCE_FRAME, SimulatedCall, fetch_speech
from tests import emulator_fixtures, test_agent_e2e
from tests.conftest import BridgeFactory
from tests.emulator_fixtures import EmulatorFactory
from tests.test_agent_e2e import AgentServer

emulator_factory = emulator_fixtures.emulator_factory  # the fixtures, shared
agent = test_agent_e2e.agent
pytestmark = pytest.mark.timeout(60)

FRAME = 160  # 20 ms of μ-law 8 kHz
MULAW_SILENCE = b"\xff"
SENTENCES = (
    "Hello, how are you today?",
    "I would like to pay my bill please.",
    "The quick brown fox jumps over the lazy dog",
)


def normalized(sentence: str) -> str:
    return " ".join(normalize_word(w) for w in sentence.split())


def sounds_distinct(words: list[str]) -> bool:
    """No two different tokens of ``words`` render as the same burst (a limit of tone voices)."""
    keys = {(tone_word_ms(w), zlib.crc32(w.lower().encode()) % 400): w.lower() for w in words}
    return len(keys) == len({w.lower() for w in words})


async def tts_bytes(emu: Emulator, text: str, voice_id: str = DEFAULT_VOICE_ID, *, encoding: str = "pcm_mulaw",
                    sample_rate: int = 8000, speed: float | None = None, api_key: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "model_id": "sonic-3", "transcript": text, "voice": {"mode": "id", "id": voice_id},
        "output_format": {"container": "raw", "encoding": encoding, "sample_rate": sample_rate},
    }
    if speed is not None:
        body["generation_config"] = {"speed": speed}
    headers = {"X-API-Key": api_key} if api_key else {}
    async with aiohttp.ClientSession() as http, http.post(f"{emu.http_url}/tts/bytes", json=body,
                                                          headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def tts_websocket(emu: Emulator, text: str, voice_id: str, speed: float) -> bytes:
    """Render through the TTS WebSocket, as a TTS client would."""
    msg = emulator_fixtures.request("ctx-1", text, voice={"mode": "id", "id": voice_id},
                                    generation_config={"speed": speed})
    ws = await emulator_fixtures.connect(emu)
    try:
        await emulator_fixtures.send(ws, msg)
        import base64

        audio = b""
        for m in await emulator_fixtures.collect(ws, {"ctx-1"}):
            if m["type"] == "chunk":
                audio += base64.b64decode(m["data"])
        return audio
    finally:
        await ws.close()


async def stt_connect(emu: Emulator, query: str = "encoding=pcm_mulaw&sample_rate=8000",
                      headers: dict[str, str] | None = None) -> ClientConnection:
    assert emu.url is not None
    return await websockets.connect(f"{emu.url}/stt/websocket?{query}", additional_headers=headers or {},
                                    max_size=None)


async def stream(ws: ClientConnection, audio: bytes, frame: int = FRAME) -> None:
    for pos in range(0, len(audio), frame):
        await ws.send(audio[pos : pos + frame])


async def until(ws: ClientConnection, kind: str, within: float = 5.0) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind``."""
    out: list[dict[str, Any]] = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), within))
        out.append(msg)
        if msg["type"] == kind:
            return out


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "transcript" and m["is_final"]]


# --------------------------------------------------------------------------- recogniser (no I/O)


def test_recognizer_every_voice_speed_encoding_and_split_points() -> None:
    synth, vocabulary, rnd = ToneSynth(), Vocabulary(), random.Random(3)
    for sentence in SENTENCES:
        vocabulary.add_rendered(sentence)
    for encoding, rate in (("pcm_mulaw", 8000), ("pcm_s16le", 16000)):
        for voice in TONE_VOICES:
            for speed in (0.6, 1.0, 1.25, 2.0):
                for sentence in SENTENCES:
                    audio = synth.render(sentence, OutputFormat(encoding, rate), voice, speed=speed).audio
                    rec = StreamingRecognizer(vocabulary, rate, encoding)
                    pos = 0
                    while pos < len(audio):  # arbitrary split points, odd ones included
                        step = rnd.randint(1, 500)
                        rec.feed(audio[pos : pos + step])
                        pos += step
                    rec.flush()
                    words = rec.commit()
                    assert " ".join(w.word for w in words) == normalized(sentence), (encoding, voice.name, speed)
                    assert all(a.end <= b.start for a, b in zip(words, words[1:], strict=False))


def test_vocabulary_prunes_identical_sounding_builtin_words_and_prefers_rendered() -> None:
    vocabulary = Vocabulary()
    assert len(vocabulary.builtin) < len(set(BUILTIN_WORDS))
    assert sounds_distinct(vocabulary.builtin)
    # "fox" and "two" render identically (3 letters, same crc32 % 400): the latest rendered wins.
    synth, fmt = ToneSynth(), OutputFormat("pcm_mulaw", 8000)
    vocabulary.add_rendered("fox")
    assert [w.word for w in recognize(synth.render("two", fmt, TONE_VOICES[0]).audio, "pcm_mulaw", 8000,
                                      vocabulary)] == ["fox"]
    assert vocabulary.rendered() == ["fox"]


def test_an_abrupt_tone_is_no_word_even_at_a_words_pitch_and_length() -> None:
    import audioop
    import math

    from bridge.cartesia.emulator.voices import tone_word_frequency
    from telephony.simulator import SPEECH_FRAME

    vocabulary, fmt = Vocabulary(), OutputFormat("pcm_mulaw", 8000)
    vocabulary.add_rendered("hello")
    word = ToneSynth().render("hello", fmt, TONE_VOICES[0])
    assert [w.word for w in recognize(word.audio, "pcm_mulaw", 8000, vocabulary)] == ["hello"]
    freq, n = tone_word_frequency("hello", 0), word.words[0][2]
    beep = array.array("h", [int(9000 * math.sin(2 * math.pi * freq * i / 8000)) for i in range(n)])
    assert recognize(audioop.lin2ulaw(beep.tobytes(), 2) + MULAW_SILENCE * 800, "pcm_mulaw", 8000, vocabulary) == []
    # The simulated caller's speak() tone (300 Hz, abrupt) is not heard, whatever the vocabulary.
    assert recognize(SPEECH_FRAME * 25 + MULAW_SILENCE * 800, "pcm_mulaw", 8000, vocabulary) == []


def test_noise_silence_and_clicks_give_no_words() -> None:
    import audioop

    rnd, vocabulary = random.Random(5), Vocabulary()
    noise = array.array("h", [rnd.randint(-9000, 9000) for _ in range(8000 * 3)]).tobytes()
    click = bytes(800) + array.array("h", [20000] * 40).tobytes() + bytes(800)
    assert recognize(audioop.lin2ulaw(noise, 2), "pcm_mulaw", 8000, vocabulary) == []
    assert recognize(MULAW_SILENCE * 24000, "pcm_mulaw", 8000, vocabulary) == []
    assert recognize(click, "pcm_s16le", 8000, vocabulary) == []
    with pytest.raises(ValueError, match="unsupported encoding"):
        to_linear16(b"\0\0", "pcm_u8")


# --------------------------------------------------------------------------- the socket


async def test_each_tone_voice_rendered_by_emulator_is_heard_over_the_socket(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    for voice in TONE_VOICES:
        ws = await stt_connect(emu)
        try:
            expected: list[str] = []
            lead = MULAW_SILENCE * 37  # shifts every burst off the 20 ms grid
            for sentence in SENTENCES:
                await stream(ws, lead + await tts_bytes(emu, sentence, voice.id) + MULAW_SILENCE * 4000)
                lead = b""
                expected.append(normalized(sentence))
            await ws.send("finalize")
            got = await until(ws, "flush_done")
            final = finals(got)
            assert len(final) == 1 and final[0]["text"] == " ".join(expected), voice.name
            interims = [m for m in got if m["type"] == "transcript" and not m["is_final"]]
            assert interims and interims[-1]["text"] == final[0]["text"]
            words = final[0]["words"]
            assert [w["word"] for w in words] == " ".join(expected).split()
            # Timestamps from the start of the socket's audio: the first word starts after the lead.
            assert words[0]["start"] == pytest.approx(37 / 8000, abs=0.002)
            assert all(w["start"] < w["end"] <= n["start"] for w, n in zip(words, words[1:], strict=False))
            assert final[0]["duration"] == pytest.approx(words[-1]["end"] + 0.54, abs=0.05)
            assert final[0]["language"] == "en" and final[0]["request_id"]
        finally:
            await ws.close()
    assert emu.stt.active == 0
    assert emu.stt.vocabulary.rendered()  # the voices fed it


async def test_speed_via_tts_websocket_and_pcm_s16le_16k(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    sentence = "Please cancel my appointment for tomorrow morning."
    audio = await tts_websocket(emu, sentence, TONE_VOICES[2].id, speed=1.4)
    ws = await stt_connect(emu)
    await stream(ws, audio)
    await ws.send("finalize")
    assert finals(await until(ws, "flush_done"))[0]["text"] == normalized(sentence)
    await ws.close()
    pcm = await tts_bytes(emu, sentence, TONE_VOICES[1].id, encoding="pcm_s16le", sample_rate=16000, speed=0.7)
    ws = await stt_connect(emu, "model=ink-whisper&encoding=pcm_s16le&sample_rate=16000&language=en")
    await stream(ws, pcm, 640)  # 20 ms of s16le 16 kHz
    await ws.send("finalize")
    assert finals(await until(ws, "flush_done"))[0]["text"] == normalized(sentence)
    await ws.close()


async def test_builtin_words_never_rendered_here_are_heard(emulator_factory: EmulatorFactory) -> None:
    speaker, listener = await emulator_factory(), await emulator_factory()
    sentence = "my friend will call you back tomorrow with the answer"
    assert all(w in listener.stt.vocabulary.builtin for w in sentence.split())
    audio = await tts_bytes(speaker, sentence, TONE_VOICES[1].id)
    assert listener.stt.vocabulary.rendered() == []
    ws = await stt_connect(listener)
    await stream(ws, audio)
    await ws.send("finalize")
    assert finals(await until(ws, "flush_done"))[0]["text"] == sentence
    await ws.close()


async def test_silence_and_noise_give_empty_finals_then_close_gives_done(emulator_factory: EmulatorFactory) -> None:
    import audioop

    emu = await emulator_factory()
    rnd = random.Random(9)
    noise = audioop.lin2ulaw(array.array("h", [rnd.randint(-6000, 6000) for _ in range(16000)]).tobytes(), 2)
    ws = await stt_connect(emu)
    await stream(ws, MULAW_SILENCE * 8000 + noise)
    await ws.send("finalize")
    got = await until(ws, "flush_done")
    assert [m["type"] for m in got] == ["transcript", "flush_done"]
    assert got[0]["is_final"] is True and got[0]["text"] == "" and got[0]["words"] == []
    await ws.send("close")
    assert [m["type"] for m in await until(ws, "done")] == ["done"]  # nothing pending: no transcript
    await asyncio.wait_for(ws.wait_closed(), 2)
    assert ws.close_code == 1000


async def test_segments_are_deltas_and_close_finalizes_what_is_pending(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    first, second = "hello there", "I need help with my bill"
    ws = await stt_connect(emu)
    await stream(ws, await tts_bytes(emu, first) + MULAW_SILENCE * 1600)
    await ws.send("finalize")
    one = finals(await until(ws, "flush_done"))[0]
    await stream(ws, await tts_bytes(emu, second))
    await ws.send("close")
    got = await until(ws, "done")
    two = finals(got)[0]
    assert one["text"] == first and two["text"] == " " + normalized(second)
    assert one["text"] + two["text"] == normalized(first + " " + second)  # finals concatenate as they are
    assert two["words"][0]["start"] > one["words"][-1]["end"] + 0.2  # socket time, not segment time
    await asyncio.wait_for(ws.wait_closed(), 2)


async def test_max_silence_finalizes_by_itself(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await stt_connect(emu, "model=ink-whisper&encoding=pcm_mulaw&sample_rate=8000&max_silence_duration_secs=0.3")
    await stream(ws, await tts_bytes(emu, "good morning") + MULAW_SILENCE * 1600)  # 0.2 s: not yet
    await asyncio.sleep(0.2)
    await stream(ws, MULAW_SILENCE * 1600)  # now 0.4 s of silence after speech
    got: list[dict[str, Any]] = []
    while not finals(got):
        got.append(json.loads(await asyncio.wait_for(ws.recv(), 2)))
    assert finals(got)[0]["text"] == "good morning"
    assert all(m["type"] == "transcript" for m in got)  # no flush_done without a finalize
    await ws.close()


async def test_bad_command_is_answered_with_an_error_and_the_socket_carries_on(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await stt_connect(emu)
    await ws.send('{"type": "flush"}')
    err = json.loads(await asyncio.wait_for(ws.recv(), 2))
    assert err["type"] == "error" and err["status_code"] == 400 and err["title"]
    assert err["title"] not in err["message"] and "finalize" in err["message"]
    await stream(ws, await tts_bytes(emu, "thank you"))
    await ws.send("finalize")
    assert finals(await until(ws, "flush_done"))[0]["text"] == "thank you"
    await ws.close()


async def test_handshake_validation_and_auth(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(api_key="sk-test")
    with pytest.raises(websockets.InvalidStatus) as info:
        await stt_connect(emu, "encoding=pcm_mulaw", {"X-API-Key": "sk-test"})
    assert info.value.response.status_code == 400
    body = json.loads(info.value.response.body or b"{}")
    assert "sample_rate" in body["message"] and body["title"] not in body["message"]
    for bad in ("encoding=opus&sample_rate=8000", "encoding=pcm_mulaw&sample_rate=8000&model=sonic-3"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await stt_connect(emu, bad, {"X-API-Key": "sk-test"})
        assert info.value.response.status_code == 400
    with pytest.raises(websockets.InvalidStatus) as info:
        await stt_connect(emu, headers={"X-API-Key": "wrong"})
    assert info.value.response.status_code == 401
    async with aiohttp.ClientSession() as http, http.post(f"{emu.http_url}/access-token", json={"expires_in": 60},
                                                          headers={"Authorization": "Bearer sk-test"}) as resp:
        token = (await resp.json())["token"]
    ws = await stt_connect(emu, f"encoding=pcm_mulaw&sample_rate=8000&access_token={token}",
                           {"Cartesia-Version": "2025-04-16"})
    await ws.send("close")
    assert [m["type"] for m in await until(ws, "done")] == ["done"]
    await ws.close()


async def test_idle_timeout_is_reset_by_audio_only(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(stt=SttSettings(idle_timeout_s=0.4))
    ws = await stt_connect(emu)
    t0 = time.monotonic()
    for _ in range(4):  # 0.6 s kept alive by audio
        await ws.send(MULAW_SILENCE * FRAME)
        await asyncio.sleep(0.15)
    await ws.send("finalize")  # a command is not audio: does not reset the timer
    await until(ws, "flush_done")
    await asyncio.wait_for(ws.wait_closed(), 2)
    assert ws.close_code == 1000 and ws.close_reason == "connection idle timeout"
    assert time.monotonic() - t0 >= 0.6
    assert emu.stt.active == 0


async def test_emulator_stop_closes_open_stt_sockets() -> None:
    emu = Emulator()
    await emu.start()
    ws, turns = await stt_connect(emu), await turns_connect(emu)
    await ws.send(MULAW_SILENCE * FRAME)
    await emu.stop()
    for sock in (ws, turns):
        await asyncio.wait_for(sock.wait_closed(), 5)
        assert sock.close_code == 1001
    assert emu.stt.active == 0


# --------------------------------------------------------------------------- faults


async def test_fault_close_after_n_transcripts(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(stt=SttSettings(faults=FaultSettings(close_after_chunks=2)))
    ws = await stt_connect(emu)
    await stream(ws, await tts_bytes(emu, "one three five seven"))
    got: list[dict[str, Any]] = []
    with pytest.raises(websockets.ConnectionClosedError):
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 2)))
    assert [m["type"] for m in got] == ["transcript", "transcript"]
    assert ws.close_code == 1011 and "after 2 transcripts" in ws.close_reason


async def test_fault_reject_429_and_stt_concurrency_limit(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults=FaultSettings(reject_429_fraction=1.0))  # --fault applies to STT too
    with pytest.raises(websockets.InvalidStatus) as info:
        await stt_connect(emu)
    assert info.value.response.status_code == 429
    # A fraction: deterministic under the seed, roughly that fraction.
    emu = await emulator_factory(seed=4, stt=SttSettings(faults=FaultSettings(reject_429_fraction=0.5)))
    outcomes = []
    for _ in range(40):
        try:
            ws = await stt_connect(emu)
            await ws.close()
            outcomes.append(True)
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 429
            outcomes.append(False)
    assert 8 <= outcomes.count(False) <= 32
    assert emu.stt.rejected == outcomes.count(False)
    # Concurrency: STT sockets counted apart from TTS; over the limit → 429 until one closes.
    emu = await emulator_factory(max_connections=1, stt=SttSettings(max_concurrency=2))
    tts = await emulator_fixtures.connect(emu)
    a, b = await stt_connect(emu), await stt_connect(emu)
    with pytest.raises(websockets.InvalidStatus) as info:
        await stt_connect(emu)
    assert info.value.response.status_code == 429
    assert json.loads(info.value.response.body or b"{}")["error_code"] == "concurrency_limited"
    await a.close()
    for _ in range(100):
        if emu.stt.active < 2:
            break
        await asyncio.sleep(0.01)
    c = await stt_connect(emu)
    for ws in (b, c, tts):
        await ws.close()


async def test_fault_delay_and_no_done(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(stt=SttSettings(faults=FaultSettings(delay_ms=300, delay_fraction=1.0)))
    audio = await tts_bytes(emu, "hello")
    ws = await stt_connect(emu)
    await stream(ws, audio + MULAW_SILENCE * 800)
    t0 = time.monotonic()
    await ws.send("finalize")
    got = await until(ws, "flush_done")
    assert finals(got)[0]["text"] == "hello" and time.monotonic() - t0 >= 0.3
    await ws.close()
    emu = await emulator_factory(stt=SttSettings(faults=FaultSettings(no_done_fraction=1.0)))
    ws = await stt_connect(emu)
    await stream(ws, await tts_bytes(emu, "hello"))
    await ws.send("finalize")
    got: list[dict[str, Any]] = []
    with pytest.raises(TimeoutError):
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 0.5)))
    assert finals(got)[0]["text"] == "hello"
    assert "flush_done" not in [m["type"] for m in got]
    await ws.send("close")
    await asyncio.wait_for(ws.wait_closed(), 2)  # closed without a done
    assert emu.stt.active == 0


def test_cli_flags() -> None:
    s = settings_from_args(build_parser().parse_args(
        ["--stt-max-concurrency", "3", "--stt-idle-timeout-s", "5", "--stt-fault", "reject-429=0.25"]))
    assert s.stt.max_concurrency == 3 and s.stt.idle_timeout_s == 5
    assert s.stt.faults is not None and s.stt.faults.reject_429_fraction == 0.25
    assert settings_from_args(build_parser().parse_args([])).stt.faults is None  # inherits --fault
    with pytest.raises(ValueError, match="idle_timeout_s"):
        settings_from_args(build_parser().parse_args(["--stt-idle-timeout-s", "0"]))


# --------------------------------------------------------------------------- the official SDK


async def test_official_sdk_manual_finalize(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(api_key="sk-sdk")
    sentence = "Thanks, I will check my email tonight."
    audio = await tts_bytes(emu, sentence, TONE_VOICES[0].id, api_key="sk-sdk")
    client = AsyncCartesia(api_key="sk-sdk", websocket_base_url=emu.url, base_url=emu.http_url)
    transcript = ""
    types: list[str] = []
    async with client.stt.manual_finalize.websocket(encoding="pcm_mulaw", model="ink-whisper",
                                                    sample_rate=8000, language="en") as conn:
        for pos in range(0, len(audio), FRAME):
            await conn.send_raw(audio[pos : pos + FRAME])
        await conn.send("finalize")
        async for event in conn:
            types.append(event.type)
            if event.type == "transcript" and event.is_final:
                transcript += event.text
                assert event.words and event.words[0].word == "thanks"
            if event.type == "flush_done":
                await conn.send("close")
            if event.type == "done":
                break
    await client.close()
    assert transcript == normalized(sentence)
    assert types[-2:] == ["flush_done", "done"] and "transcript" in types


# --------------------------------------------------------------------------- the simulated caller says it


async def test_say_queue_is_bounded(http: aiohttp.ClientSession) -> None:
    call = SimulatedCall("http://127.0.0.1:9", http)
    assert call.say(b"\x10" * 8000) == 1.0 and call.saying
    with pytest.raises(ValueError, match="exceed"):
        call.say(b"\x10" * MAX_SAY_BYTES)
    assert call._say_queue == bytearray(b"\x10" * 8000)  # the refused audio queued nothing
    frames = [call._next_said_frame() for _ in range(51)]
    assert frames[0] == b"\x10" * 160 and frames[-1] is None and not call.saying
    assert frames[49] == b"\x10" * 160 and call.said_frames == 50


async def test_caller_says_a_sentence_the_bridge_gets_it_in_order_and_stt_hears_it(
    make_bridge: BridgeFactory, agent: AgentServer
) -> None:
    bridge = await make_bridge({"AGENT_URL": agent.url})
    call = bridge.call()
    await call.place()
    await call.connect()
    await agent.next("setup")
    await agent.send({"type": "config", "media": True})  # the bridge forwards inbound frames to the agent
    assert await call.wait_until(lambda: any(m["type"] == "media" for m in agent.received), 5)
    sentence = "I would like to pay my bill please."
    assert bridge.emulator.http_url is not None
    speech = await fetch_speech(bridge.http, bridge.emulator.http_url, sentence, TONE_VOICES[1].id)
    call.say(speech)
    assert await call.wait_until(lambda: not call.saying, 10)
    await asyncio.sleep(0.3)  # the last frames' trip through the bridge
    import base64

    inbound = b"".join(base64.b64decode(m["payload"]) for m in agent.received if m["type"] == "media")
    padded = speech + SILENCE_FRAME[: -len(speech) % 160 or 0]
    assert len(padded) % 160 == 0 and call.said_frames == len(padded) // 160
    start = inbound.find(padded)
    assert start >= 0 and start % 160 == 0, "the said audio arrives whole, in order, frame-aligned"
    assert set(inbound[:start]) == {SILENCE_FRAME[0]}  # silence before it
    ws = await stt_connect(bridge.emulator)  # what the lead's STT wiring will do with these frames
    await stream(ws, inbound)
    await ws.send("finalize")
    assert finals(await until(ws, "flush_done"))[0]["text"] == normalized(sentence)
    await ws.close()
    await call.hangup()


# --------------------------------------------------------------------------- /stt/turns/websocket (ink-2)

TURNS = "model=ink-2&encoding=pcm_mulaw&sample_rate=8000"


async def turns_connect(emu: Emulator, query: str = TURNS) -> ClientConnection:
    assert emu.url is not None
    return await websockets.connect(f"{emu.url}/stt/turns/websocket?{query}", max_size=None)


async def test_turns_socket_start_update_end_config_and_close(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    first, second = "Hello, I need help", "with my bill please"
    ws = await turns_connect(emu, TURNS + "&turn_end_timeout_ms=2000")
    assert json.loads(await asyncio.wait_for(ws.recv(), 2))["type"] == "connected"
    await stream(ws, await tts_bytes(emu, first) + MULAW_SILENCE * 400)  # 50 ms pause: same turn
    await stream(ws, await tts_bytes(emu, second) + MULAW_SILENCE * 8000)  # 1 s: the turn ends
    got = await until(ws, "turn.end")
    kinds = [m["type"] for m in got]
    assert kinds[0] == "turn.start" and kinds.count("turn.start") == 1 and kinds[-1] == "turn.end"
    updates = [m["transcript"] for m in got if m["type"] == "turn.update"]
    assert updates[0] == "hello" and updates[-1] == normalized(first + " " + second)  # cumulative
    assert got[-1]["transcript"] == normalized(first + " " + second)
    # A config command is accepted silently; a bad one is an error and the socket carries on.
    await ws.send(json.dumps({"type": "config", "turn": {"end_timeout_ms": 700}}))
    await ws.send(json.dumps({"type": "config", "turn": {"end_timeout_ms": 50}}))
    err = json.loads(await asyncio.wait_for(ws.recv(), 2))
    assert err["type"] == "error" and "end_timeout_ms" in err["message"]
    await ws.send("finalize")  # not a command of this endpoint
    assert json.loads(await asyncio.wait_for(ws.recv(), 2))["type"] == "error"
    await stream(ws, await tts_bytes(emu, "thank you"))
    await ws.send(json.dumps({"type": "close"}))  # ends the open turn, then closes
    got = await until(ws, "turn.end")
    assert got[-1]["transcript"] == "thank you"
    await asyncio.wait_for(ws.wait_closed(), 2)
    assert ws.close_code == 1000 and emu.stt.active == 0
    with pytest.raises(websockets.InvalidStatus) as info:
        await turns_connect(emu, "model=ink-whisper&encoding=pcm_mulaw&sample_rate=8000")
    assert info.value.response.status_code == 400


async def test_official_sdk_auto_finalize_turns(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(api_key="sk-sdk")
    sentence = "Can you call me back tomorrow"
    audio = await tts_bytes(emu, sentence, TONE_VOICES[2].id, api_key="sk-sdk") + MULAW_SILENCE * 8000
    client = AsyncCartesia(api_key="sk-sdk", websocket_base_url=emu.url, base_url=emu.http_url)
    types: list[str] = []
    async with client.stt.auto_finalize.websocket(encoding="pcm_mulaw", model="ink-2", sample_rate=8000,
                                                  turn_end_timeout_ms=1000) as conn:
        for pos in range(0, len(audio), FRAME):
            await conn.send_raw(audio[pos : pos + FRAME])
        async for event in conn:
            types.append(event.type)
            if event.type == "turn.end":
                assert event.transcript == normalized(sentence)
                await conn.send({"type": "close"})
    await client.close()
    assert types[:2] == ["connected", "turn.start"] and types[-1] == "turn.end" and "turn.update" in types


def test_turn_codec_additions() -> None:
    from bridge.cartesia.stt_protocol import (
        CLOSE,
        SttProtocolError,
        SttTurnConfig,
        parse_stt_turn_config,
        parse_stt_turns_client_text,
    )

    assert parse_stt_turn_config({"turn_end_timeout_ms": "800", "turn_end_threshold": "0.1"}) == SttTurnConfig(
        end_threshold=0.1, end_timeout_ms=800.0)
    assert parse_stt_turns_client_text('{"type": "close"}') == CLOSE
    assert parse_stt_turns_client_text('{"type":"config","turn":{"eager_end_threshold":0.5}}') == SttTurnConfig(
        eager_end_threshold=0.5)
    for bad, field_name in (('{"type":"config","turn":{"end_timeout_ms":true}}', "end_timeout_ms"),
                            ('{"type":"config","turn":[]}', "turn"), ('{"type":"flush"}', "type"),
                            ("close", "command")):
        with pytest.raises(SttProtocolError) as info:
            parse_stt_turns_client_text(bad)
        assert info.value.field == field_name
    with pytest.raises(SttProtocolError, match="out of range"):
        parse_stt_turn_config({"turn_start_threshold": "1.5"})
