"""An external agent for load tests: our own ConversationRelay-style WebSocket server, run as a process.

Every benchmark used to drive the bridge through its in-process demo agent;
a user's agent is another process behind ``AGENT_URL``. This server plays
that agent on ``ws://HOST:PORT/agent`` (any path), one WebSocket per call:

* ``setup``: greets (``customParameters.greeting``, else ``--greeting``), the
  whole line in one ``text`` message (a prepared greeting is not generated);
* ``dtmf`` ``9``: the demo agent's long passage; ``0``: "Goodbye." then
  ``end``; any other digit: "You pressed N.";
* a final ``prompt`` (``last`` true, words in ``voicePrompt``): "You said
  <what the caller said>." (the built-in agent's answer, so the ``spoken``
  scenario checks either agent's prompts the same way);
* ``interrupt``: the turn being streamed stops before its next token and is
  closed with an empty ``last`` token, as an LLM agent would stop generating.

Other turns stream token by token (one word per ``text`` message) at
``--tokens-per-s`` (an LLM's pace, anchored so the average rate is exact; 0 =
every token at once, like the built-in agent). A call's turns are spoken one
after another; at most ``MAX_PENDING_TURNS`` wait, a turn beyond that is
dropped and counted. ``GET /stats`` answers the counters as JSON, ``GET
/healthz`` answers 200. One ``TokenClock`` task (owned by the server,
cancelled on shutdown) sends every call's due tokens, each its own WebSocket
message and socket write, at most ``TOKEN_TICK_S`` late; a turn's first token
goes out at once. (A task and a timer per token cost this process as much as
the bridge spent on the same messages: it shares the load core.)

    python -m bridge.loadtest.agent_server --port 8770 --tokens-per-s 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
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
from bridge.wsframe import frame_text

from .options import GREETING
from .processes import event_loop_factory

log = logging.getLogger("bridge.loadtest.agent")

#: Turns of one call that may wait behind the one being spoken; more are dropped (counted).
MAX_PENDING_TURNS: Final = 8
#: Default pace of the agent's tokens (words) per second: faster than speech, like an LLM.
DEFAULT_TOKENS_PER_S: Final = 50.0
#: ``TokenClock`` wakes this often; a token leaves at most this late (s).
TOKEN_TICK_S: Final = 0.005


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
    """One thing to say; ``end`` sends ``end`` after it (the call is over); ``whole`` sends the
    text as one ``text`` message (a prepared line, not generated), else word by word."""

    text: str
    end: bool = False
    whole: bool = False


def reply_to(message: dict[str, Any], greeting: str) -> Turn | None:
    """What the agent says in answer to one bridge message (None: nothing)."""
    kind = message.get("type")
    if kind == "setup":
        params = message.get("customParameters") or {}
        # A greeting is a prepared line: sent at once, as a real agent sends its welcome text.
        return Turn(str(params.get("greeting") or greeting) if isinstance(params, dict) else greeting, whole=True)
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


class TokenClock:
    """Sends the due tokens of every call from one task: a heap of (due, tie-break, call).

    Wakes every ``tick_s`` while a turn is being spoken, sleeps on an event otherwise.
    The owner (``AgentServer``) closes it on shutdown.
    """

    def __init__(self, tick_s: float = TOKEN_TICK_S) -> None:
        self.tick_s = tick_s
        self._heap: list[tuple[float, int, AgentCall]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, call: AgentCall, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), call))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="agent-token-clock")
        self._wake.set()

    async def _run(self) -> None:
        heap = self._heap
        next_tick = time.monotonic()
        while True:
            if not heap:
                self._wake.clear()
                await self._wake.wait()
                next_tick = time.monotonic()
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _due, _n, call = heapq.heappop(heap)
                nxt = call.send_due(now)
                if nxt is not None:
                    heapq.heappush(heap, (nxt, next(self._seq), call))
            next_tick = max(next_tick + self.tick_s, time.monotonic())
            await asyncio.sleep(next_tick - time.monotonic())

    async def close(self) -> None:
        self._heap.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class AgentCall:
    """One call's socket: parses what the bridge sends, speaks turns one at a time.

    Writes go straight to the socket's transport (whole frames, synchronously, so they never
    interleave with aiohttp's own control frames); a closed socket drops them.
    """

    def __init__(self, ws: web.WebSocketResponse, transport: Any, stats: AgentStats, greeting: str,
                 tokens_per_s: float, clock: TokenClock) -> None:
        self.ws = ws
        self.transport = transport
        self.stats = stats
        self.greeting = greeting
        self.token_interval_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.clock = clock
        self._turns: deque[Turn] = deque()
        #: The turn being spoken: its tokens, the next one's index, its start, the interrupt count at its start.
        self._turn: Turn | None = None
        self._parts: list[str] = []
        self._next = 0
        self._start = 0.0
        self._interrupts_at_start = 0
        #: Bumped by every ``interrupt``: a turn that sees it change stops.
        self._interrupts = 0
        self.closed = False

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
        if self._turn is None:
            nxt = self.send_due(time.monotonic())  # the first token goes out now
            if nxt is not None:
                self.clock.add(self, nxt)

    def _send(self, message: dict[str, Any]) -> None:
        if self.closed or self.ws.closed or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(frame_text(orjson.dumps(message)))

    def send_due(self, now: float) -> float | None:
        """Send every token due by ``now`` (starting queued turns); return when the next is due."""
        while not self.closed:
            if self._turn is None:
                if not self._turns:
                    return None
                self._turn = self._turns.popleft()
                self._parts = [self._turn.text] if self._turn.whole else tokens(self._turn.text)
                self._next, self._start, self._interrupts_at_start = 0, now, self._interrupts
                self.stats.turns += 1
            i = self._next
            if i and self.token_interval_s:
                due = self._start + i * self.token_interval_s
                if due > now:
                    return due
            if self._interrupts != self._interrupts_at_start:
                self.stats.turns_interrupted += 1
                self._send({"type": "text", "token": "", "last": True})
                self._turn = None
                continue
            last = i == len(self._parts) - 1
            self._send({"type": "text", "token": self._parts[i], "last": last})
            self.stats.tokens_sent += 1
            self._next = i + 1
            if last:
                if self._turn.end:
                    self._send({"type": "end"})
                    self.stats.ends_sent += 1
                self._turn = None
        return None

    def close(self) -> None:
        self.closed = True
        self._turns.clear()
        self._turn = None


class AgentServer:
    """The aiohttp application: ``/healthz``, ``/stats`` and the agent WebSocket on every other path."""

    def __init__(self, greeting: str = GREETING, tokens_per_s: float = DEFAULT_TOKENS_PER_S) -> None:
        if tokens_per_s < 0:
            raise ValueError("tokens_per_s must be >= 0")
        self.greeting = greeting
        self.tokens_per_s = tokens_per_s
        self.stats = AgentStats()
        self.clock: TokenClock | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/{path:.*}", self._agent)
        app.on_cleanup.append(self._close_clock)
        return app

    async def _close_clock(self, _app: web.Application) -> None:
        if self.clock is not None:
            await self.clock.close()

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def _agent(self, request: web.Request) -> web.StreamResponse:
        # compress=False: frames are written pre-built (AgentCall._send).
        ws = web.WebSocketResponse(max_msg_size=MAX_AGENT_MESSAGE_BYTES, compress=False)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text="WebSocket upgrade expected")
        await ws.prepare(request)
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        if self.clock is None:
            self.clock = TokenClock()
        call = AgentCall(ws, request.transport, self.stats, self.greeting, self.tokens_per_s, self.clock)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    call.on_text(msg.data)
                elif msg.type != WSMsgType.BINARY:
                    break
        finally:
            call.close()
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
