"""The official SDK 3.x (``cartesia==3.5.1``, API 2025-11-04) against the emulator.

Run as ``python cartesia3_client.py WS_BASE_URL VOICE_ID`` with the SDK on
``sys.path`` (its own ``pip --target`` directory). Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

from cartesia import AsyncCartesia

FMT = {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}


async def run(ws_url: str, voice_id: str) -> dict[str, Any]:
    client = AsyncCartesia(api_key="sdk3-key", websocket_base_url=ws_url)
    out: dict[str, Any] = {}
    async with client.tts.websocket_connect() as conn:
        # Model, timestamps, buffering: the SDK's defaults (sonic-latest when push() gets no model).
        ctx = conn.context(voice={"mode": "id", "id": voice_id}, output_format=FMT, add_timestamps=True)
        await ctx.push("Hello from SDK three.")
        await ctx.no_more_inputs()
        audio, words, types = b"", [], []
        async for ev in ctx.receive():
            types.append(ev.type)
            if ev.type == "chunk":
                audio += ev.audio
            elif ev.type == "timestamps":
                words += ev.word_timestamps.words
        out["plain"] = {"audio": base64.b64encode(audio).decode(), "words": words, "last": types[-1]}
        bad = conn.context(model_id="sonic-nope", voice={"mode": "id", "id": voice_id}, output_format=FMT)
        await bad.push("x", continue_=False)
        errors = [ev for ev in [e async for e in bad.receive()] if ev.type == "error"]
        out["error"] = {"title": errors[0].title, "message": errors[0].message, "code": errors[0].error_code}
    await client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], sys.argv[2]))))
