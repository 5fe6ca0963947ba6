"""A hostile Cartesia peer: speaks enough of the TTS and STT WebSocket protocols to be used,
and mixes in garbage.

``/tts/websocket``: each new ``context_id`` gets one trick, in turn, before (or instead of) a
plausible answer (a chunk of μ-law, word timestamps, ``done``):

* ``garbage``: a non-JSON text frame, a binary frame, a JSON array, a JSON string;
* ``unknown_context``: chunk, timestamps and ``done`` for a context nobody opened;
* ``oversized_chunk``: one 300 KB chunk of audio (under the 4 MiB frame cap: the bridge has to
  buffer, cut or drop it by its own limits);
* ``too_big_frame``: a 5 MiB text frame (over the bridge's 4 MiB cap: its socket closes 1009 and
  the pool reconnects), then nothing more for the context;
* ``bad_fields``: chunk data that is not base64, ``null`` data, timestamps of mismatched lengths
  and strings for numbers, ``status_code`` as a string, a ``done`` whose ``context_id`` is a number;
* ``plain``: just the plausible answer.

``/stt/websocket``: answers each ``finalize`` with a malformed transcript, an unknown type and a
non-JSON frame before a plausible ``flush_done``; every 100th audio frame gets a garbage reply.

It keeps no per-context state beyond a bounded set of ids (``MAX_CONTEXTS``); all tasks belong
to the aiohttp server and end with ``stop``.
"""

from __future__ import annotations

import base64
import itertools
from collections import Counter, OrderedDict
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from bridge.netutil import free_port

TRICKS: Final = ("garbage", "unknown_context", "oversized_chunk", "too_big_frame", "bad_fields", "plain")
MAX_CONTEXTS: Final = 10_000
OVERSIZED_CHUNK_BYTES: Final = 300_000
TOO_BIG_FRAME_BYTES: Final = 5 * 1024 * 1024
#: A plausible answer: this much μ-law audio per context (0.5 s).
PLAIN_AUDIO_BYTES: Final = 4000


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class HostileCartesia:
    """The server on 127.0.0.1; ``url`` is what a bridge's ``CARTESIA_URL`` is set to."""

    def __init__(self) -> None:
        self.url = ""
        self.tricks: Counter[str] = Counter()
        self.connections = 0
        self.stt_connections = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._next_trick = itertools.cycle(TRICKS)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/tts/websocket", self._tts)
        app.router.add_get("/stt/websocket", self._stt)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stats(self) -> dict[str, Any]:
        return {"tts_connections": self.connections, "stt_connections": self.stt_connections,
                "tricks": dict(self.tricks)}

    # ------------------------------------------------------------------ TTS

    async def _tts(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=8 << 20)
        await ws.prepare(request)
        self.connections += 1
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                req = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            ctx = req.get("context_id") if isinstance(req, dict) else None
            if not isinstance(ctx, str) or req.get("cancel") is True:
                continue
            if ctx in self._seen:
                if req.get("continue") is False:
                    await self._plain(ws, ctx, done=True)
                continue
            self._seen[ctx] = None
            while len(self._seen) > MAX_CONTEXTS:
                self._seen.popitem(last=False)
            trick = next(self._next_trick)
            self.tricks[trick] += 1
            try:
                await self._play_trick(ws, ctx, trick, done=req.get("continue") is not True)
            except (ConnectionError, RuntimeError):
                break
            if trick == "too_big_frame":
                break
        return ws

    async def _plain(self, ws: web.WebSocketResponse, ctx: str, *, done: bool) -> None:
        audio = bytes([0x55]) * PLAIN_AUDIO_BYTES
        await ws.send_str(_dumps({"type": "chunk", "context_id": ctx, "data": base64.b64encode(audio).decode(),
                                  "done": False, "status_code": 206, "step_time": 1.0}))
        await ws.send_str(_dumps({"type": "timestamps", "context_id": ctx, "done": False, "status_code": 206,
                                  "word_timestamps": {"words": ["hostile"], "start": [0.0], "end": [0.5]}}))
        if done:
            await ws.send_str(_dumps({"type": "done", "context_id": ctx, "done": True, "status_code": 206}))

    async def _play_trick(self, ws: web.WebSocketResponse, ctx: str, trick: str, *, done: bool) -> None:
        if trick == "garbage":
            await ws.send_str("this is not json {")
            await ws.send_bytes(b"\x00\xffbinary from cartesia")
            await ws.send_str("[1, 2, 3]")
            await ws.send_str('"just a string"')
        elif trick == "unknown_context":
            stranger = "nobody-opened-" + ctx[::-1]
            await self._plain(ws, stranger, done=True)
        elif trick == "oversized_chunk":
            audio = bytes([0x55]) * OVERSIZED_CHUNK_BYTES
            await ws.send_str(_dumps({"type": "chunk", "context_id": ctx, "data": base64.b64encode(audio).decode(),
                                      "done": False, "status_code": 206, "step_time": 1.0}))
        elif trick == "too_big_frame":
            await ws.send_str(_dumps({"type": "chunk", "context_id": ctx, "data": "A" * TOO_BIG_FRAME_BYTES}))
            return
        elif trick == "bad_fields":
            await ws.send_str(_dumps({"type": "chunk", "context_id": ctx, "data": "!!! not base64 !!!"}))
            await ws.send_str(_dumps({"type": "chunk", "context_id": ctx, "data": None}))
            await ws.send_str(_dumps({"type": "chunk", "context_id": ctx, "data": "AAA"}))  # bad padding
            await ws.send_str(_dumps({"type": "timestamps", "context_id": ctx,
                                      "word_timestamps": {"words": ["a", "b"], "start": ["0", 1], "end": [0.1]}}))
            await ws.send_str(_dumps({"type": "timestamps", "context_id": ctx,
                                      "word_timestamps": {"words": ["a", "b"], "start": [0.0], "end": [0.1, 0.2]}}))
            await ws.send_str(_dumps({"type": "error", "context_id": ctx, "status_code": "500"}))
            await ws.send_str(_dumps({"type": "done", "context_id": 12345}))
            return
        await self._plain(ws, ctx, done=done)

    # ------------------------------------------------------------------ STT

    async def _stt(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        self.stt_connections += 1
        frames = 0
        async for msg in ws:
            try:
                if msg.type == WSMsgType.BINARY:
                    frames += 1
                    if frames % 100 == 0:
                        await ws.send_str("garbage transcript {")
                        await ws.send_str(_dumps({"type": "transcript", "is_final": "yes", "text": 7}))
                elif msg.type == WSMsgType.TEXT and msg.data == "finalize":
                    await ws.send_str(_dumps({"type": "transcript", "is_final": True, "text": None,
                                              "words": "many"}))
                    await ws.send_str(_dumps({"type": "turn.sideways"}))
                    await ws.send_bytes(b"\x01\x02")
                    await ws.send_str(_dumps({"type": "transcript", "is_final": True, "text": "hostile words",
                                              "words": [{"word": "hostile", "start": 0, "end": 0.3}]}))
                    await ws.send_str(_dumps({"type": "flush_done", "request_id": "hostile"}))
                elif msg.type == WSMsgType.TEXT and msg.data == "close":
                    await ws.send_str(_dumps({"type": "done", "request_id": "hostile"}))
                    break
            except (ConnectionError, RuntimeError):
                break
        return ws
