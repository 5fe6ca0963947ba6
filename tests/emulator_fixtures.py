"""Helpers for emulator tests: start an emulator on 127.0.0.1:0, talk raw JSON to it.

Import these in test modules (``from tests.emulator_fixtures import ...``); the
``emulator_factory`` fixture stops every emulator it started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest_asyncio
import websockets
from websockets.asyncio.client import ClientConnection

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings

MULAW_8K = {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}

EmulatorFactory = Callable[..., Coroutine[Any, Any, Emulator]]


@pytest_asyncio.fixture
async def emulator_factory() -> AsyncIterator[EmulatorFactory]:
    started: list[Emulator] = []

    async def make(**kwargs: Any) -> Emulator:
        emu = Emulator(EmulatorSettings(**kwargs))
        await emu.start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        await emu.stop()


def request(context_id: str, transcript: str, *, cont: bool = False, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "model_id": "sonic-3",
        "transcript": transcript,
        "voice": {"mode": "id", "id": DEFAULT_VOICE_ID},
        "output_format": dict(MULAW_8K),
        "context_id": context_id,
        "continue": cont,
    }
    msg.update(extra)
    return msg


async def connect(emu: Emulator, query: str = "", headers: dict[str, str] | None = None) -> ClientConnection:
    assert emu.url is not None
    url = f"{emu.url}/tts/websocket" + (f"?{query}" if query else "")
    return await websockets.connect(url, additional_headers=headers or {}, max_size=None)


async def send(ws: ClientConnection, msg: dict[str, Any]) -> None:
    await ws.send(json.dumps(msg))


async def recv(ws: ClientConnection, within: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), within)
    obj = json.loads(raw)
    assert isinstance(obj, dict)
    return obj


async def collect(ws: ClientConnection, context_ids: set[str], within: float = 10.0) -> list[dict[str, Any]]:
    """Read until every context in ``context_ids`` got ``done`` or ``error``."""
    out: list[dict[str, Any]] = []
    pending = set(context_ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while pending:
        msg = await recv(ws, max(0.01, deadline - loop.time()))
        out.append(msg)
        if msg.get("type") in ("done", "error") and msg.get("context_id") in pending:
            pending.discard(msg["context_id"])
    return out


async def drain_for(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """Everything that arrives within ``seconds``."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return out
        try:
            out.append(await recv(ws, left))
        except TimeoutError:
            return out


def audio_of(msgs: list[dict[str, Any]], context_id: str) -> bytes:
    import base64

    return b"".join(
        base64.b64decode(m["data"])
        for m in msgs
        if m.get("type") == "chunk" and m.get("context_id") == context_id
    )
