"""The official SDK 2.x (``cartesia==2.0.17``, API 2024-11-13) against the emulator.

Run as ``python cartesia2_client.py WS_BASE_URL VOICE_ID`` with the SDK on
``sys.path`` (its own ``pip --target`` directory, see ``tests/client_envs.py``).
Prints one JSON object: per scenario the audio (base64), words and flush ids.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

from cartesia import AsyncCartesia, Cartesia

FMT = {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def async_scenarios(base: str, voice_id: str) -> dict[str, Any]:
    client = AsyncCartesia(api_key="sdk2-key", base_url=base)
    ws = await client.tts.websocket()
    voice = {"mode": "id", "id": voice_id}
    out: dict[str, Any] = {}
    # One context, no flush: the whole stream arrives on the context's only queue.
    ctx = ws.context("plain")
    await ctx.send(model_id="sonic-2", transcript="Hello from the old SDK.", output_format=FMT, voice=voice,
                   continue_=True, add_timestamps=True)
    await ctx.no_more_inputs()
    audio, words = b"", []
    async for item in ctx.receive():
        if item.audio is not None:
            audio += item.audio
        if item.word_timestamps is not None:
            words += item.word_timestamps.words
    out["plain"] = {"audio": b64(audio), "words": words}
    # Flushes: each flush() hands back a receiver for the text sent before it.
    ctx = ws.context("flushed")
    receivers = []
    for text in ("First part.", "Second part."):
        await ctx.send(model_id="sonic-2", transcript=text, output_format=FMT, voice=voice, continue_=True)
        receivers.append(await ctx.flush())
    await ctx.no_more_inputs()
    parts = []
    for receiver in receivers:
        part, flush_ids = b"", []
        async for item in receiver():
            if item.audio is not None:
                part += item.audio
            elif item.flush_done:
                flush_ids.append(item.flush_id)
        parts.append({"audio": b64(part), "flush_ids": flush_ids})
    out["flushed"] = parts
    # An embedding voice (this API version still had them).
    for name, value in (("emb_a", 0.25), ("emb_a_again", 0.25), ("emb_b", -0.5)):
        ctx = ws.context(name)
        await ctx.send(model_id="sonic-2", transcript="Embedded voice.", output_format=FMT,
                       voice={"mode": "embedding", "embedding": [value] * 192})
        audio = b""
        async for item in ctx.receive():
            audio += item.audio or b""
        out[name] = b64(audio)
    # An error reaches the caller as the SDK's RuntimeError around the legacy `error` string.
    ctx = ws.context("bad")
    await ctx.send(model_id="sonic-nope", transcript="x", output_format=FMT, voice=voice)
    try:
        async for _ in ctx.receive():
            pass
        out["error"] = None
    except RuntimeError as exc:
        out["error"] = str(exc)
    await ws.close()
    await client.close()
    return out


def sync_scenario(base: str, voice_id: str) -> dict[str, Any]:
    client = Cartesia(api_key="sdk2-key", base_url=base)
    ws = client.tts.websocket()
    result = ws.send(model_id="sonic-2", transcript="Sync and whole.", output_format=FMT,
                     voice={"mode": "id", "id": voice_id}, stream=False, add_timestamps=True)
    ws.close()
    return {"audio": b64(result.audio), "words": result.word_timestamps.words}


def main() -> None:
    base, voice_id = sys.argv[1], sys.argv[2]
    out = asyncio.run(async_scenarios(base, voice_id))
    out["sync"] = sync_scenario(base, voice_id)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
