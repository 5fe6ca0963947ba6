"""The official ``cartesia`` SDK (4.2.0, websockets 15) as an independent client of the emulator."""

from __future__ import annotations

import asyncio
import base64

import pytest
from cartesia import AsyncCartesia, Cartesia

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, TONE_VOICES
from bridge.cartesia.emulator.voices import ToneSynth
from bridge.cartesia.protocol import OutputFormat
from tests import emulator_fixtures
from tests.emulator_fixtures import MULAW_8K, EmulatorFactory

emulator_factory = emulator_fixtures.emulator_factory  # the fixture, shared
pytestmark = pytest.mark.timeout(30)
VOICE = {"mode": "id", "id": DEFAULT_VOICE_ID}


def tone(text: str) -> bytes:
    return ToneSynth().render(text, OutputFormat("pcm_mulaw", 8000), TONE_VOICES[0]).audio


def clients(emu: object) -> AsyncCartesia:
    return AsyncCartesia(api_key="test", websocket_base_url=emu.url, base_url=emu.http_url)  # type: ignore[attr-defined]


async def test_async_context_push_receive_timestamps_done(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(api_key="test")
    client = clients(emu)
    async with client.tts.websocket_connect() as conn:
        ctx = conn.context(
            model_id="sonic-3",
            voice=VOICE,
            output_format=MULAW_8K,
            add_timestamps=True,
            max_buffer_delay_ms=0,
        )
        await ctx.push("Hello there, ")
        await ctx.push("general Kenobi.")
        await ctx.no_more_inputs()
        audio = b""
        words: list[str] = []
        types = []
        async for ev in ctx.receive():
            types.append(ev.type)
            if ev.type == "chunk":
                audio += ev.audio
            elif ev.type == "timestamps":
                words += ev.word_timestamps.words
        assert types[-1] == "done"
        assert words == ["Hello", "there,", "general", "Kenobi."]
        assert audio == tone("Hello there, ") + tone("general Kenobi.")
    await client.close()
    # The SDK authenticates with a Bearer header and sends its own version.
    assert emu.handshakes == 1


async def test_async_flush_and_cancel(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rtf=1.0, chunk_ms=20)
    client = clients(emu)
    async with client.tts.websocket_connect() as conn:
        ctx = conn.context(model_id="sonic-3", voice=VOICE, output_format=MULAW_8K, max_buffer_delay_ms=3000)
        await ctx.push("flushed text")
        await ctx.push("", flush=True)
        flush_ids = []
        async for ev in ctx.receive():
            if ev.type == "flush_done":
                flush_ids.append(ev.flush_id)
                break
        assert flush_ids == [1]
        # Cancel: a second context, cancelled after its first chunk.
        ctx2 = conn.context(model_id="sonic-3", voice=VOICE, output_format=MULAW_8K, max_buffer_delay_ms=0)
        await ctx2.push("a fairly long sentence to be cancelled midway")
        async for ev in ctx2.receive():
            assert ev.type == "chunk"
            break
        cid = ctx2._context_id
        await ctx2.cancel()
        for _ in range(100):
            rec = emu.context_record(cid)
            if rec is not None and rec.done:
                break
            await asyncio.sleep(0.05)
        assert rec is not None and rec.cancelled and rec.done
    await client.close()


async def test_async_generate_bytes_and_sse(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    client = clients(emu)
    resp = await client.tts.generate(
        model_id="sonic-3", transcript="bytes please", voice=VOICE, output_format=MULAW_8K
    )
    assert await resp.read() == tone("bytes please")
    wav = await (
        await client.tts.generate(
            model_id="sonic-3",
            transcript="wav",
            voice=VOICE,
            output_format={"container": "wav", "encoding": "pcm_mulaw", "sample_rate": 8000},
        )
    ).read()
    assert wav[:4] == b"RIFF" and wav[44:] == tone("wav")
    stream = await client.tts.generate_sse(
        model_id="sonic-3", transcript="sse here", voice=VOICE, output_format=MULAW_8K, add_timestamps=True
    )
    audio, words, last = b"", [], None
    async for ev in stream:
        last = ev.type
        if ev.type == "chunk":
            audio += base64.b64decode(ev.data)
        elif ev.type == "timestamps":
            words += ev.word_timestamps.words
    assert audio == tone("sse here") and words == ["sse", "here"] and last == "done"
    names = [v.name async for v in await client.voices.list()]
    assert names == [v.name for v in emu.voices.values()]  # the SDK pages through them all
    assert (await client.voices.get(DEFAULT_VOICE_ID)).id == DEFAULT_VOICE_ID
    await client.close()


async def test_sync_client_context_and_backcompat(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()

    def run() -> tuple[bytes, bytes, bytes]:
        client = Cartesia(api_key="test", websocket_base_url=emu.url, base_url=emu.http_url)
        with client.tts.websocket_connect() as conn:
            ctx = conn.context(model_id="sonic-3", voice=VOICE, output_format=MULAW_8K, max_buffer_delay_ms=0)
            ctx.push("sync client")
            ctx.no_more_inputs()
            audio = b"".join(ev.audio for ev in ctx.receive() if ev.type == "chunk")
        ws = client.tts.websocket()
        out = ws.send(
            model_id="sonic-3", transcript="back compat", voice=VOICE, output_format=MULAW_8K, stream=False
        )
        ws.close()
        data = b"".join(
            client.tts.generate(
                model_id="sonic-3", transcript="sync bytes", voice=VOICE, output_format=MULAW_8K
            ).iter_bytes()
        )
        client.close()
        return audio, out.audio, data  # type: ignore[union-attr]

    audio, compat, data = await asyncio.to_thread(run)
    assert audio == tone("sync client")
    assert compat == tone("back compat")
    assert data == tone("sync bytes")
