"""``media-bridge demo``: one call through bridge + emulator, offline, no account.

Starts the bridge (with its embedded Cartesia emulator) on 127.0.0.1, places
one simulated Twilio call (signed webhook, signed media stream, an ear that
echoes marks as it plays), lets the built-in agent greet, presses 1 (read
back), says a sentence (the emulator's tone voice, heard by the emulator's
Cartesia STT; the agent repeats it), presses 9 (a long passage) and talks over
it (barge-in from the recognised words), then hangs up. Writes what the caller heard to a WAV file (8 kHz mu-law) and prints a
timeline with the latency figures scraped from the bridge's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import struct
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bridge.config import Config
from bridge.netutil import free_port
from bridge.server import BridgeServer, emulator_settings_from
from metrics.scrape import parse_samples, summarize, value
from telephony.media import MULAW_SILENCE
from telephony.simulator import EarModel, SimulatedCall, fetch_speech


def mulaw_wav(audio: bytes, sample_rate: int = 8000) -> bytes:
    """A WAV file (format 7, G.711 mu-law) around raw mu-law bytes."""
    fmt = struct.pack("<HHIIHHH", 7, 1, sample_rate, sample_rate, 1, 8, 0)
    fact = struct.pack("<I", len(audio))
    pad = b"\x00" if len(audio) % 2 else b""
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
            + b"data" + struct.pack("<I", len(audio)) + audio + pad)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def heard_timeline(ear: EarModel, start: float, end: float) -> bytes:
    """What the caller heard from ``start`` to ``end``, silence in the gaps."""
    out = bytearray()
    cursor = start
    for seg in ear.segments:
        if seg.start > cursor:
            out += bytes([MULAW_SILENCE]) * int((seg.start - cursor) * 8000)
        out += seg.audio
        cursor = max(cursor, seg.end)
    if end > cursor:
        out += bytes([MULAW_SILENCE]) * int((end - cursor) * 8000)
    return bytes(out)


def _espeak_available() -> bool:
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        return False
    return True


async def run_demo(wav_path: str, voice_backend: str = "auto", ttfb_ms: float = 90.0) -> int:
    backend = voice_backend if voice_backend != "auto" else ("espeak" if _espeak_available() else "tone")
    port = free_port()
    token = secrets.token_hex(16)  # signatures are checked for real, with a throwaway token
    emulator_settings = emulator_settings_from(f"--voice-backend {backend} --ttfb-ms {ttfb_ms} --rtf 0.25")
    from bridge.cartesia.emulator import DEFAULT_ESPEAK_VOICE_ID, DEFAULT_VOICE_ID

    voice = DEFAULT_ESPEAK_VOICE_ID if backend == "espeak" else DEFAULT_VOICE_ID
    config = Config.from_env({
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TWILIO_AUTH_TOKEN": token,
        "CARTESIA_VOICE_ID": voice,
        "GREETING": "Hello! This call runs through the media bridge and a local Cartesia. "
                    "Press 1 to hear it read back, or 9 for a longer passage.",
        "LOG_LEVEL": "WARNING",
        "STT_ENABLED": "true",  # the built-in agent listens too: a spoken two-way turn
        "RELAY_SPEECH_TIMEOUT": "500",
    })
    server = BridgeServer(config, emulator_settings=emulator_settings)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    print(f"bridge on {base} (Cartesia emulator embedded, voice backend: {backend}, TTFB {ttfb_ms:.0f} ms)")
    t0 = time.monotonic()
    marks: list[tuple[float, str]] = []

    def mark(label: str) -> None:
        marks.append((time.monotonic(), label))

    async with aiohttp.ClientSession() as http:
        call = SimulatedCall(base, http, auth_token=token)
        mark("webhook sent (signed)")
        stream = await call.place()
        if stream is None:
            print("the bridge refused the call")
            return 1
        mark("TwiML <Connect><Stream> received")
        await call.connect()
        mark("media stream started (signed upgrade)")
        await asyncio.wait_for(call.got_media.wait(), 10)
        mark("first audio at the caller")
        # Let the greeting play to its end (the ear plays in real time).
        await call.wait_until(lambda: call.ear.buffer_end and time.monotonic() > call.ear.buffer_end + 0.3, 20)
        mark("greeting heard")
        await call.send_dtmf("1")
        mark("caller pressed 1")
        before = call.record.media_bytes
        await call.wait_until(lambda: call.record.media_bytes > before, 10)
        await call.wait_until(lambda: time.monotonic() > call.ear.buffer_end + 0.3, 10)
        mark("read-back heard")
        emulator = server.emulator
        assert emulator is not None and emulator.http_url is not None, "the demo runs the embedded emulator"
        caller_voice = DEFAULT_VOICE_ID  # a tone voice: what the emulator's STT recognises
        said = "what are your opening hours"
        call.say(await fetch_speech(http, emulator.http_url, said, caller_voice))
        mark(f"caller says {said!r}")
        await call.wait_until(lambda: not call.saying, 10)
        mark("caller stopped talking")
        before = call.record.media_bytes
        await call.wait_until(lambda: call.record.media_bytes > before, 10)
        mark("agent's spoken reply starts (it heard the prompt)")
        await call.wait_until(lambda: time.monotonic() > call.ear.buffer_end + 0.3, 15)
        mark("reply heard")
        await call.send_dtmf("9")
        mark("caller pressed 9 (long passage)")
        before = call.record.media_bytes
        await call.wait_until(lambda: call.record.media_bytes > before, 10)
        await asyncio.sleep(2.5)
        call.say(await fetch_speech(http, emulator.http_url, "wait a moment please", caller_voice))
        mark("caller starts talking over the agent")
        await call.wait_until(lambda: call.record.clears > 0, 5)
        mark("bridge sent clear (barge-in)")
        await asyncio.sleep(1.0)
        await call.hangup()
        mark("caller hung up")
        end = time.monotonic()
        await asyncio.sleep(0.2)
        metrics_text = await (await http.get(base + "/metrics")).text()

    audio = heard_timeline(call.ear, call.record.first("stream_started") or t0, end)
    Path(wav_path).parent.mkdir(parents=True, exist_ok=True)
    Path(wav_path).write_bytes(mulaw_wav(audio))
    await runner.cleanup()

    print("\ntimeline (ms since webhook):")
    for t, label in marks:
        print(f"  {1000 * (t - marks[0][0]):8.1f}  {label}")
    samples = parse_samples(metrics_text)

    def ms(v: float | None) -> str:
        return "   n/a" if v is None else f"{1000 * v:6.1f}"

    print("\nlatency (bridge /metrics, ms):           count    p50    p99")
    for name, label in (
        ("bridge_tts_ttfb_seconds", "text -> first Cartesia chunk (TTFB)"),
        ("bridge_text_to_first_frame_seconds", "text -> first frame to Twilio"),
        ("bridge_forwarding_delay_seconds", "chunk received -> frame sent"),
        ("bridge_mark_round_trip_seconds", "mark sent -> echo (playout)"),
        ("bridge_barge_in_latency_seconds", "caller speech onset -> clear"),
        ("bridge_stt_latency_seconds", "end of caller speech -> transcript"),
        ("bridge_turn_ttfa_seconds", "end of caller speech -> reply audio"),
    ):
        h = summarize(samples, name)
        print(f"  {label:<38} {h.count:5d} {ms(h.p50)} {ms(h.p99)}")
    frames = value(samples, "bridge_twilio_frames_out_total")
    late = value(samples, "bridge_late_chunks_dropped_total")
    print(f"\nframes sent: {int(frames)}, late chunks dropped after barge-in: {int(late)}, "
          f"protocol errors seen by the simulated Twilio: {len(call.record.protocol_errors)}")
    print(f"caller heard {len(audio) / 8000:.1f} s of audio -> {os.path.abspath(wav_path)}")
    return 0 if not call.record.protocol_errors else 1
