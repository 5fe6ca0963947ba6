"""An external agent for load tests: our own ConversationRelay-style WebSocket server, run as a process.

Every benchmark used to drive the bridge through its in-process demo agent;
a user's agent is another process behind ``AGENT_URL``. This server plays
that agent on ``ws://HOST:PORT/agent`` (any path), one WebSocket per call:

* ``setup``: greets (``customParameters.greeting``, else ``--greeting``);
* ``dtmf`` ``9``: the demo agent's long passage; ``0``: "Goodbye." then
  ``end``; any other digit: "You pressed N.";
* a final ``prompt`` (``last`` true, words in ``voicePrompt``): "You said
  <what the caller said>." (the built-in agent's answer, so the ``spoken``
  scenario checks either agent's prompts the same way);
* ``interrupt``: the turn being streamed stops before its next token and is
  closed with an empty ``last`` token, as an LLM agent would stop generating.

Text streams token by token (one word per ``text`` message) at
``--tokens-per-s`` (an LLM's pace, anchored so the average rate is exact; 0 =
every token at once, like the built-in agent). A call's turns are spoken one
after another; at most ``MAX_PENDING_TURNS`` wait, a turn beyond that is
dropped and counted. ``GET /stats`` answers the counters as JSON, ``GET
/healthz`` answers 200. Each call owns one speaker task, cancelled when its
socket closes.

    python -m bridge.loadtest.agent_server --port 8770 --tokens-per-s 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from bridge.agent.builtin import LONG_PASSAGE
from bridge.agent.protocol import MAX_AGENT_MESSAGE_BYTES
from bridge.logs import configure_logging, log_event

from .options import GREETING
from .processes import event_loop_factory

log = logging.getLogger("bridge.loadtest.agent")

#: Turns of one call that may wait behind the one being spoken; more are dropped (counted).
MAX_PENDING_TURNS: Final = 8
#: Default pace of the agent's tokens (words) per second: faster than speech, like an LLM.
DEFAULT_TOKENS_PER_S: Final = 50.0


@dataclass
class AgentStats:
    """Counters over the server's life (the load test reports them)."""

    connections_total: int = 0
    connections_active: int = 0
    messages_received: int = 0
    bad_messages: int = 0
    turns: int = 0
    turns_interrupted: int = 0
    turns_dropped: int = 0
    prompts: int = 0
    tokens_sent: int = 0
    ends_sent: int = 0


@dataclass(frozen=True, slots=True)
class Turn:
    """One thing to say; ``end`` sends ``end`` after it (the call is over)."""

    text: str
    end: bool = False


def reply_to(message: dict[str, Any], greeting: str) -> Turn | None:
    """What the agent says in answer to one bridge message (None: nothing)."""
    kind = message.get("type")
    if kind == "setup":
        params = message.get("customParameters") or {}
        return Turn(str(params.get("greeting") or greeting) if isinstance(params, dict) else greeting)
    if kind == "dtmf":
        digit = str(message.get("digit"))
        if digit == "9":
            return Turn(LONG_PASSAGE)
        if digit == "0":
            return Turn("Goodbye.", end=True)
        return Turn(f"You pressed {digit}.")
    if kind == "prompt" and message.get("last") is not False:
        heard = str(message.get("voicePrompt") or "").strip()
        return Turn(f"You said {heard}.") if heard else None
    return None


def tokens(text: str) -> list[str]:
    """Word tokens with their trailing space, as an LLM streams them (the last without)."""
    words = text.split(" ")
    return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]


class AgentCall:
    """One call's socket: parses what the bridge sends, speaks turns one at a time."""

    def __init__(self, ws: web.WebSocketResponse, stats: AgentStats, greeting: str, tokens_per_s: float) -> None:
        self.ws = ws
        self.stats = stats
        self.greeting = greeting
        self.token_interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self._turns: deque[Turn] = deque()
        self._wake = asyncio.Event()
        #: Bumped by every ``interrupt``: a turn that sees it change stops.
        self._interrupts = 0
        self._speaker = asyncio.create_task(self._speak_loop(), name="agent-speaker")

    def on_text(self, data: str) -> None:
        self.stats.messages_received += 1
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self.stats.bad_messages += 1
            log_event(log, "agent_bad_message", logging.WARNING, bytes=len(data))
            return
        if message.get("type") == "interrupt":
            self._interrupts += 1
            return
        if message.get("type") == "prompt":
            self.stats.prompts += 1
        turn = reply_to(message, self.greeting)
        if turn is None:
            return
        if len(self._turns) >= MAX_PENDING_TURNS:
            self.stats.turns_dropped += 1
            log_event(log, "agent_turn_dropped", logging.WARNING, pending=len(self._turns))
            return
        self._turns.append(turn)
        self._wake.set()

    async def _speak_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._turns:
                await self._speak(self._turns.popleft())

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(message).decode())

    async def _speak(self, turn: Turn) -> None:
        self.stats.turns += 1
        interrupts = self._interrupts
        parts = tokens(turn.text)
        start = time.monotonic()
        for i, token in enumerate(parts):
            if i and self.token_interval_s:
                delay = start + i * self.token_interval_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self._interrupts != interrupts:
                self.stats.turns_interrupted += 1
                await self._send({"type": "text", "token": "", "last": True})
                return
            await self._send({"type": "text", "token": token, "last": i == len(parts) - 1})
            self.stats.tokens_sent += 1
        if turn.end:
            await self._send({"type": "end"})
            self.stats.ends_sent += 1

    async def close(self) -> None:
        self._speaker.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._speaker


class AgentServer:
    """The aiohttp application: ``/healthz``, ``/stats`` and the agent WebSocket on every other path."""

    def __init__(self, greeting: str = GREETING, tokens_per_s: float = DEFAULT_TOKENS_PER_S) -> None:
        if tokens_per_s < 0:
            raise ValueError("tokens_per_s must be >= 0")
        self.greeting = greeting
        self.tokens_per_s = tokens_per_s
        self.stats = AgentStats()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/{path:.*}", self._agent)
        return app

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def _agent(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_AGENT_MESSAGE_BYTES)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text="WebSocket upgrade expected")
        await ws.prepare(request)
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        call = AgentCall(ws, self.stats, self.greeting, self.tokens_per_s)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    call.on_text(msg.data)
                elif msg.type != WSMsgType.BINARY:
                    break
        finally:
            await call.close()
            self.stats.connections_active -= 1
        return ws


async def serve(host: str, port: int, server: AgentServer) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"agent server listening on ws://{host}:{bound}/agent", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge.loadtest.agent_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--tokens-per-s", type=float, default=DEFAULT_TOKENS_PER_S,
                   help=f"pace of the streamed words (default {DEFAULT_TOKENS_PER_S:g}; 0 = all at once)")
    p.add_argument("--greeting", default=GREETING, help="said on setup unless customParameters.greeting is given")
    p.add_argument("--log-level", default="WARNING")
    ns = p.parse_args(argv)
    if ns.tokens_per_s < 0:
        p.error("--tokens-per-s must be >= 0")
    configure_logging(ns.log_level)
    server = AgentServer(ns.greeting, ns.tokens_per_s)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(ns.host, ns.port, server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
