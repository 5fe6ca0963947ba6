"""A ConversationRelay agent server whose behaviour is chosen per call, some of them hostile.

The bridge connects to ``url`` for every call (``AGENT_URL``); the call's behaviour is the
``chaosAgent`` custom parameter of its ``setup`` (set on the voice webhook's query string):

* ``echo``: the well-behaved agent: every final ``prompt`` is answered "You said <prompt>."
  streamed word by word;
* ``malformed``: first a burst of bad messages (not JSON, JSON that is not an object, ``text``
  without a token, wrong field types), then behaves as ``echo``;
* ``giant``: answers each prompt with a message over the bridge's 64 KiB agent-message limit,
  one 20 000-character token, and a second later a 300 KB message (over the bridge's socket cap
  for agent messages, so the bridge closes the agent socket);
* ``endless``: a token every 5 ms that never says ``last``, until the socket closes;
* ``unknown``: unknown ``type``s, a binary frame, extra fields, then ``echo``;
* ``silent``: accepts the socket and never sends anything.

Bounded: an endless stream stops when the bridge closes the socket (or after
``MAX_ENDLESS_TOKENS``); reply streams belong to their socket's handler, which cancels them when it ends.
Counts what it received per type and whether ``Authorization`` carried the expected token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from bridge.netutil import free_port

AGENT_MODES: Final = ("echo", "malformed", "giant", "endless", "unknown", "silent")
#: An endless stream ends after this many tokens even if the socket stays open (4000 x 5 ms = 20 s).
MAX_ENDLESS_TOKENS: Final = 4000
ENDLESS_TOKEN_INTERVAL_S: Final = 0.005
GIANT_TOKEN_CHARS: Final = 20_000
MAX_KEPT_ERRORS: Final = 2000
MALFORMED_MESSAGES: Final = (
    "{not json",
    "null",
    "[1, 2, 3]",
    '"a string"',
    '{"type": "text"}',
    '{"type": "text", "token": 5, "last": true}',
    '{"type": "text", "token": "x", "last": "maybe"}',
    '{"type": "play", "source": "http://169.254.169.254/latest/meta-data"}',
    '{"type": "sendDigits", "digits": "<script>"}',
    '{"type": "language", "ttsLanguage": 7}',
    '{"type": "end", "handoffData": ' + '"' + "x" * 70_000 + '"}',
)


class HostileAgent:
    """The agent server on 127.0.0.1 (``url``); ``stats()`` counts what happened."""

    def __init__(self, expected_token: str | None = None) -> None:
        self.expected_token = expected_token
        self.url = ""
        self.received: Counter[str] = Counter()
        self.sockets_by_mode: Counter[str] = Counter()
        self.bad_auth = 0
        self.open_sockets = 0
        #: callSid -> ``error``s saying speech failed or was interrupted (an utterance cut short).
        self.speech_errors: Counter[str] = Counter()
        #: Distinct ``error`` descriptions the bridge sent (at most ``MAX_KEPT_ERRORS``), for the secrets scan.
        self.error_texts: set[str] = set()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}/agent"

    async def stop(self) -> None:
        """Each socket's handler owns its reply streams and cancels them when it ends; cleanup ends
        the handlers."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stats(self) -> dict[str, Any]:
        return {"sockets_by_mode": dict(self.sockets_by_mode), "received_by_type": dict(self.received),
                "bad_auth": self.bad_auth, "open_sockets": self.open_sockets}

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        if self.expected_token is not None and request.headers.get("Authorization") != f"Bearer {self.expected_token}":
            self.bad_auth += 1
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        self.open_sockets += 1
        mode = "echo"
        call_sid = ""
        streams: list[asyncio.Task[None]] = []
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    self.received["<not json>"] += 1
                    continue
                kind = str(data.get("type")) if isinstance(data, dict) else "<not object>"
                self.received[kind] += 1
                if kind == "error" and isinstance(data, dict):
                    text = str(data.get("description", ""))
                    if len(self.error_texts) < MAX_KEPT_ERRORS:
                        self.error_texts.add(text)
                    if text.startswith(("speech failed", "speech interrupted")):
                        self.speech_errors[call_sid] += 1
                if kind == "setup":
                    call_sid = str(data.get("callSid", ""))
                    params = data.get("customParameters") or {}
                    mode = params.get("chaosAgent", "echo") if isinstance(params, dict) else "echo"
                    mode = mode if mode in AGENT_MODES else "echo"
                    self.sockets_by_mode[mode] += 1
                    if mode == "endless":
                        streams.append(asyncio.create_task(self._endless(ws)))
                    elif mode in ("malformed", "unknown"):
                        await self._opening_burst(ws, mode)
                elif kind == "prompt" and data.get("last") and mode != "silent":
                    text = str(data.get("voicePrompt", ""))
                    if mode == "giant":
                        streams.append(asyncio.create_task(self._giant(ws)))
                    elif mode != "endless" and text:
                        streams.append(asyncio.create_task(self._echo(ws, f"You said {text}.")))
                streams = [t for t in streams if not t.done()]
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.open_sockets -= 1
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        return ws

    @staticmethod
    async def _send(ws: web.WebSocketResponse, obj: dict[str, Any] | str) -> None:
        await ws.send_str(obj if isinstance(obj, str) else orjson.dumps(obj).decode())

    async def _opening_burst(self, ws: web.WebSocketResponse, mode: str) -> None:
        if mode == "malformed":
            for text in MALFORMED_MESSAGES:
                await self._send(ws, text)
        else:
            await self._send(ws, {"type": "dance", "moves": 3})
            await self._send(ws, {"type": "", "token": "x"})
            await self._send(ws, {"type": "TEXT", "token": "shouting", "last": True})
            await ws.send_bytes(b"\x00\x01binary agent frame")
            await self._send(ws, {"type": "info", "name": "agentSpeaking", "value": "on"})

    async def _echo(self, ws: web.WebSocketResponse, text: str) -> None:
        words = text.split(" ")
        with contextlib.suppress(ConnectionError, RuntimeError):
            for i, word in enumerate(words):
                last = i == len(words) - 1
                await self._send(ws, {"type": "text", "token": word if last else word + " ", "last": last})
                await asyncio.sleep(0.005)

    async def _giant(self, ws: web.WebSocketResponse) -> None:
        word = "more "
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(ws, {"type": "text", "token": "x" * 70_000, "last": False})  # over 64 KiB: refused
            await self._send(ws, {"type": "text", "token": word * (GIANT_TOKEN_CHARS // len(word)), "last": True})
            await asyncio.sleep(1.0)
            await self._send(ws, {"type": "text", "token": "y" * 300_000, "last": True})  # over the socket cap

    async def _endless(self, ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(MAX_ENDLESS_TOKENS):
                if ws.closed:
                    return
                await self._send(ws, {"type": "text", "token": "and ", "last": False})
                await asyncio.sleep(ENDLESS_TOKEN_INTERVAL_S)
