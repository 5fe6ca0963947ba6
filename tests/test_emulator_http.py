"""HTTP endpoints of the emulator: /tts/bytes, /tts/sse, /voices, errors."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import aiohttp
import pytest

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, TONE_VOICES
from bridge.cartesia.emulator.voices import CARTESIA_VOICES, ToneSynth
from bridge.cartesia.protocol import OutputFormat
from tests import emulator_fixtures
from tests.emulator_fixtures import MULAW_8K, EmulatorFactory

emulator_factory = emulator_fixtures.emulator_factory  # the fixture, shared
pytestmark = pytest.mark.timeout(30)


def body(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_id": "sonic-3",
        "transcript": "Hello web",
        "voice": {"mode": "id", "id": DEFAULT_VOICE_ID},
        "output_format": dict(MULAW_8K),
    }
    out.update(kw)
    return out


async def test_bytes_raw_and_wav(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emu.http_url}/tts/bytes", json=body()) as r:
            assert r.status == 200
            raw = await r.read()
        fmt = {"container": "wav", "encoding": "pcm_s16le", "sample_rate": 16000}
        async with s.post(f"{emu.http_url}/tts/bytes", json=body(output_format=fmt)) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "audio/wav"
            wav = await r.read()
    assert raw == ToneSynth().render("Hello web", OutputFormat("pcm_mulaw", 8000), TONE_VOICES[0]).audio
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    tag, channels, rate = struct.unpack("<HHI", wav[20:28])
    assert (tag, channels, rate) == (1, 1, 16000)
    assert struct.unpack("<I", wav[40:44])[0] == len(wav) - 44
    assert wav[44:] == ToneSynth().render("Hello web", OutputFormat("pcm_s16le", 16000), TONE_VOICES[0]).audio


@pytest.mark.parametrize(
    ("kw", "status", "needle"),
    [
        (
            {"output_format": {"container": "mp3", "sample_rate": 44100, "bit_rate": 128000}},
            400,
            "not supported by the emulator",
        ),
        ({"model_id": "tts-1"}, 400, "model_id"),
        ({"voice": {"mode": "id", "id": "nope"}}, 400, "voice"),
        (
            {"output_format": {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 9000}},
            400,
            "sample_rate",
        ),
        ({"language": "klingon"}, 400, "language"),
    ],
)
async def test_bytes_errors(
    emulator_factory: EmulatorFactory, kw: dict[str, Any], status: int, needle: str
) -> None:
    emu = await emulator_factory()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emu.http_url}/tts/bytes", json=body(**kw)) as r:
            assert r.status == status and r.content_type == "application/json"
            err = await r.json()
    assert needle in err["message"] and err["status_code"] == status


async def test_http_auth_bad_json_and_legacy_shape(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(api_key="k1")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emu.http_url}/tts/bytes", json=body()) as r:
            assert r.status == 401
        h = {"Authorization": "Bearer k1", "Cartesia-Version": "2024-11-13"}
        async with s.post(f"{emu.http_url}/tts/bytes", data=b"{oops", headers=h) as r:
            assert r.status == 400 and "error" in await r.json()
        async with s.post(f"{emu.http_url}/tts/bytes", json=body(), headers={"X-API-Key": "k1"}) as r:
            assert r.status == 200


async def test_sse_events(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(chunk_ms=50)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emu.http_url}/tts/sse", json=body(add_timestamps=True, context_id="sse1")) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            text = (await r.read()).decode()
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"] and data["context_id"] == "sse1"
        events.append(data)
    assert events[-1]["type"] == "done"
    audio = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "chunk")
    assert audio == ToneSynth().render("Hello web", OutputFormat("pcm_mulaw", 8000), TONE_VOICES[0]).audio
    assert [w for e in events if e["type"] == "timestamps" for w in e["word_timestamps"]["words"]] == [
        "Hello",
        "web",
    ]


async def test_voices(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{emu.http_url}/voices") as r:
            listing = await r.json()
        async with s.get(f"{emu.http_url}/voices/{DEFAULT_VOICE_ID}") as r:
            one = await r.json()
        async with s.get(f"{emu.http_url}/voices/does-not-exist") as r:
            assert r.status == 404
    assert [v["id"] for v in listing["data"]] == [v.id for v in (*TONE_VOICES, *CARTESIA_VOICES)]
    assert one["id"] == DEFAULT_VOICE_ID and one["name"] == "Tone Alto"
