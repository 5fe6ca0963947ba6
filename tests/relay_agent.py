"""A ConversationRelay agent as its users write them (our own code, from Twilio's reference).

It validates ``X-Twilio-Signature`` on the WebSocket upgrade with the ``twilio``
package's ``RequestValidator`` (as Twilio tells ConversationRelay apps to), waits for
``setup``, answers every final ``prompt`` with a reply streamed as ``text`` tokens
(an LLM stand-in: "You said ..."), and records everything it receives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from twilio.request_validator import RequestValidator

from .local_server import serve_locally

Reply = Callable[[str], str | None]


def echo_reply(prompt: str) -> str:
    return f"You said {prompt}."


class RelayAgent:
    """One agent server on 127.0.0.1; ``url`` is what AGENT_URL points at."""

    def __init__(self, auth_token: str | None = None, reply: Reply = echo_reply, token_delay_s: float = 0.005) -> None:
        self.auth_token = auth_token
        self.reply = reply
        self.token_delay_s = token_delay_s
        self.received: list[dict[str, Any]] = []
        self.signatures: list[bool] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/relay", self._handle)
        self._runner, port = await serve_locally(app)
        self.url = f"ws://127.0.0.1:{port}/relay"

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        if self.auth_token is not None:
            url = f"ws://{request.host}{request.path_qs}"
            signature = request.headers.get("X-Twilio-Signature", "")
            valid = RequestValidator(self.auth_token).validate(url, {}, signature)
            self.signatures.append(valid)
            if not valid:
                raise web.HTTPForbidden(text="bad signature")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        async for msg in ws:
            data = orjson.loads(msg.data)
            self.received.append(data)
            if data.get("type") == "prompt" and data.get("last"):
                answer = self.reply(data["voicePrompt"])
                if answer:
                    task = asyncio.create_task(self._stream(ws, answer))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        return ws

    async def _stream(self, ws: web.WebSocketResponse, text: str) -> None:
        words = text.split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            await ws.send_str(orjson.dumps({"type": "text", "token": word if last else word + " ", "last": last}).decode())
            await asyncio.sleep(self.token_delay_s)

    async def send(self, obj: dict[str, Any] | str, index: int = -1) -> None:
        await self.sockets[index].send_str(obj if isinstance(obj, str) else orjson.dumps(obj).decode())

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("type") == kind]

    async def next(self, kind: str, timeout: float = 8.0, *, after: int = 0) -> dict[str, Any]:
        """The first message of ``kind`` at index ``after`` or later in ``received``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.received[after:]:
                if msg.get("type") == kind:
                    return msg
            await asyncio.sleep(0.01)
        raise AssertionError(f"agent never got {kind!r}; got {[m.get('type') for m in self.received]}")
