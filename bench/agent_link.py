"""CPU per agent message on the bridge's agent links (issue 18).

An agent server (a child process, so its CPU is not counted) streams ``--words``
ConversationRelay ``text`` tokens per link at ``--words-per-s`` (each its own
WebSocket message in the layout ``bridge/loadtest/agent_server.py`` writes,
``{"type":"text","token":"word ","last":false}``), on ``--links`` links opened
by ``AgentConnector`` exactly as calls open them. For each ``--mode`` it prints
this process's CPU time (``time.process_time``) per message, from the first
connect to the last message, and how many messages the inline sink took:

* ``inline`` / ``plain``: the links deliver into a counter (the socket, the
  inline sink vs aiohttp's reader task, nothing after it);
* ``session``: the whole path a call takes. Each link delivers into a real
  ``CallSession`` (``_deliver_from_agent``: the agent codec, ``CallCore``, the
  call's ``CallContexts`` with its ``CARTESIA_TEXT_HOLD_MS`` joining, the lease
  and the Cartesia socket's write) on a real ``CartesiaPool`` connected to a
  second child process that reads and discards (no audio comes back, so
  nothing else runs); its Twilio side is an in-memory socket. The agent
  streams the demo agent's long passage word by word (``last: true`` on its
  final word, then the next utterance), and ``--words`` should be a multiple
  of its ``PASSAGE_TOKENS`` so every run ends on a whole utterance. It also
  prints the Cartesia inputs written (the hold's joining: the same before and
  after a change that keeps behaviour).
* ``direct``: the same calls without the agent socket, and deterministic: one
  task hands each link's message texts to ``RemoteAgentLink._take_inline``
  (where the socket's data callback enters the bridge), one message per link
  per ``1 / --words-per-s`` of *virtual* time (asyncio's loop with a clock the
  driver advances, so the ``CARTESIA_TEXT_HOLD_MS`` timers fire at the same
  messages in every run and under callgrind), yielding to the loop after each
  round. Only the Cartesia peer is a child process.

The machine is shared and noisy: for figures that do not move, count
instructions with callgrind at two lengths (``--words`` N and 2N) and take
``(I2N - IN) / (links × N)`` instructions per message (the child servers are
not traced; setup cancels out)::

    python bench/agent_link.py --mode inline,plain
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python bench/agent_link.py --mode inline --words 100
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python bench/agent_link.py --mode session --loop uvloop --links 4 --words 190   # and --words 380
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python bench/agent_link.py --mode direct --links 20 --words 190   # and --words 380
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from typing import Any

import orjson
from aiohttp import web

from bridge.agent.builtin import LONG_PASSAGE
from bridge.agent.connector import AgentConnector
from bridge.agent.link import AgentLink
from bridge.loadtest.agent_server import tokens
from bridge.loadtest.processes import event_loop_factory
from bridge.netutil import free_port
from bridge.wsframe import frame_text
from metrics import BridgeMetrics

#: Tokens in one utterance of the ``session`` mode (the demo agent's long passage, word by word).
PASSAGE_TOKENS = len(tokens(LONG_PASSAGE))


def token_stream(words: int, passage: bool) -> list[tuple[str, bool]]:
    """(token, last) per message: ``word<i> `` then an empty ``last``; or the passage, repeated."""
    if not passage:
        return [(f"word{i} ", False) for i in range(words)] + [("", True)]
    parts = tokens(LONG_PASSAGE)
    return [(parts[i % len(parts)], i % len(parts) == len(parts) - 1) for i in range(words)]


async def serve(port: int, words: int, words_per_s: float, passage: bool) -> None:
    """The agent: on each connection, ``words`` tokens paced at ``words_per_s``."""
    stream = [orjson.dumps({"type": "text", "token": token, "last": last}).decode()
              for token, last in token_stream(words, passage)]

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the bridge's first message: start streaming
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, text in enumerate(stream):
            await asyncio.sleep(max(0.0, start + i / words_per_s - loop.time()))
            await ws.send_str(text)
        async for _msg in ws:
            pass
        return ws

    await _run_app(port, "/agent", handler)


async def serve_discard(port: int) -> None:
    """A Cartesia peer for the ``session`` mode: accepts the TTS socket, reads every input, answers nothing."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for _msg in ws:
            pass
        return ws

    await _run_app(port, "/tts/websocket", handler)


async def _run_app(port: int, path: str, handler: Any) -> None:
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def measure(url: str, links: int, words: int, inline: bool) -> tuple[float, int, int]:
    """(CPU seconds, messages delivered, messages taken inline) for one run."""
    connector = AgentConnector(agent_url=url, allowlist=(), token=None, connect_timeout_s=10.0, greeting="",
                               max_links=links, metrics=BridgeMetrics(), inline_receive=inline)
    expected = links * (words + 1)
    delivered = 0
    done = asyncio.get_running_loop().create_future()

    def deliver(message: str | dict[str, Any]) -> None:
        nonlocal delivered
        delivered += 1
        if delivered == expected and not done.done():
            done.set_result(None)

    cpu0 = time.process_time()
    opened: list[AgentLink] = list(await asyncio.gather(
        *(connector.connect(None, deliver, lambda reason: None) for _ in range(links))))
    for link in opened:
        link.send({"type": "setup"})
    await asyncio.wait_for(done, 60 + words)
    cpu = time.process_time() - cpu0
    inline_taken = _inline_taken(opened)
    await asyncio.gather(*(link.close() for link in opened))
    await connector.close()
    return cpu, delivered, inline_taken


def _inline_taken(links: list[AgentLink]) -> int:
    return sum(int(getattr(getattr(link, "_ws", None), "inline_messages", 0)) for link in links)


class MemoryTwilio:
    """The calls' Twilio side in the ``session`` mode: keeps what the stream writes (framed)."""

    closed = False
    write_buffer_size = 0

    def __init__(self) -> None:
        self.bytes = 0

    def set_sink(self, sink: object) -> bool:
        return True

    def send_texts(self, texts: list[str]) -> None:
        self.bytes += sum(len(frame_text(t.encode())) for t in texts)


class Calls:
    """``links`` started ``CallSession`` objects on one ``CartesiaPool`` (the discarding peer at
    ``cartesia_url``), as the server makes them; the Twilio side of each is a ``MemoryTwilio``."""

    def __init__(self, cartesia_url: str, links: int, words: int, agent_url: str | None) -> None:
        from bridge.call import CallSettings
        from bridge.cartesia.client import CartesiaPool
        from bridge.cartesia.contexts import DEFAULT_TEXT_HOLD_MS, CallContexts
        from bridge.registry import CallRegistry
        from bridge.session import CallServices, CallSession
        from telephony.media import Start

        self.metrics = metrics = BridgeMetrics()
        self.pool = CartesiaPool(url=cartesia_url, api_key=None, version="2026-03-01", metrics=metrics, size=2,
                                 max_concurrency=links * (words // PASSAGE_TOKENS + 2))
        self.connector = AgentConnector(agent_url=agent_url, allowlist=(), token=None, connect_timeout_s=10.0,
                                        greeting="", max_links=links, metrics=metrics)
        settings = CallSettings(model_id="sonic-3", voice_id="v", language="en", max_buffer_delay_ms=300)
        services = CallServices(
            settings=settings, metrics=metrics, registry=CallRegistry(links + 1), agents=self.connector,
            tts=CallContexts.factory(self.pool, metrics, admission_timeout_s=5.0, context_timeout_s=600.0,
                                     text_hold_ms=DEFAULT_TEXT_HOLD_MS),
            fallback_line="")
        self.sessions: list[CallSession] = []
        for n in range(links):
            session = CallSession(services, MemoryTwilio())  # type: ignore[arg-type]
            session.core.on_start(Start(f"MZ{n}", f"CA{n}", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0)
            session.started = True
            session.twilio.bind(f"CA{n}", f"MZ{n}")
            self.sessions.append(session)

    async def start(self) -> None:
        if not await self.pool.prewarm(10):
            raise SystemExit("the discarding Cartesia peer did not accept the pool's sockets")

    @property
    def inputs(self) -> int:
        """Cartesia inputs written so far (``bridge_cartesia_text_inputs_total``)."""
        return int(self.metrics.cartesia_text_inputs._value.get())

    async def close(self) -> None:
        for session in self.sessions:
            session.closed = True
            session.tts.close()
            if session.agent is not None:
                await session.agent.close()
        await self.connector.close()
        await self.pool.close()


async def measure_sessions(url: str, cartesia_url: str, links: int, words: int) -> tuple[float, int, int, int]:
    """(CPU seconds, messages delivered, taken inline, Cartesia inputs written) with ``links`` calls."""
    calls = Calls(cartesia_url, links, words, url)
    await calls.start()
    cpu0 = time.process_time()
    opened: list[AgentLink] = []
    for session in calls.sessions:
        session.agent = await calls.connector.connect(None, session._deliver_from_agent, session._agent_closed)
        opened.append(session.agent)
    for link in opened:
        link.send({"type": "setup"})
    deadline = time.monotonic() + 60 + words
    while _inline_taken(opened) < links * words and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the last hold timers fire
    cpu = time.process_time() - cpu0
    taken = _inline_taken(opened)
    inputs = calls.inputs
    await calls.close()
    return cpu, taken, taken, inputs


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio's loop whose ``time()`` is ``virtual`` while that is set (the ``direct`` mode's clock)."""

    virtual: float | None = None

    def time(self) -> float:
        return super().time() if self.virtual is None else self.virtual


async def measure_direct(cartesia_url: str, links: int, words: int, words_per_s: float) -> tuple[float, int, int]:
    """(CPU seconds, messages delivered, Cartesia inputs written): ``links`` calls, messages handed to
    each link's ``_take_inline`` on a virtual clock (see the module docstring)."""
    from bridge.agent.link import RemoteAgentLink

    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    calls = Calls(cartesia_url, links, words, None)
    await calls.start()
    stream = [orjson.dumps({"type": "text", "token": token, "last": last}).decode()
              for token, last in token_stream(words, passage=True)]
    takes = []
    for session in calls.sessions:
        link = RemoteAgentLink("ws://127.0.0.1:9/agent", None, None, 1.0)  # type: ignore[arg-type]
        link._deliver = session._deliver_from_agent  # as start() does when the socket has the hook
        session.agent = link
        takes.append(link._take_inline)
    delivered = 0
    cpu0 = time.process_time()
    loop.virtual = loop.time()
    step = 1.0 / words_per_s
    for text in stream:
        for take in takes:
            delivered += take(text)
        await asyncio.sleep(0)  # end of the loop turn: held inputs marked for it are written
        loop.virtual += step
        # Hold timers now due: moved to the ready queue behind this task's step, run after it.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    for _ in range(int(0.2 / step) + 1):  # the last hold timers fire
        loop.virtual += step
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    cpu = time.process_time() - cpu0
    loop.virtual = None
    inputs = calls.inputs
    await calls.close()
    return cpu, delivered, inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--links", type=int, default=20)
    p.add_argument("--words", type=int, default=250, help="tokens per link")
    p.add_argument("--words-per-s", type=float, default=50.0, help="tokens per second per link")
    p.add_argument("--mode", default="inline,plain", help="comma-separated: inline, plain, session, direct")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop (the server runs uvloop; asyncio is what earlier figures used)")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--serve-discard", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--passage", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.words, args.words_per_s, args.passage))
        return
    if args.serve_discard:
        asyncio.run(serve_discard(args.serve_discard))
        return
    print(f"{args.links} links x {args.words} tokens at {args.words_per_s:g}/s")
    print("mode     messages  inline  CPU ms  µs/message  Cartesia inputs")
    for mode in args.mode.split(","):
        servers: list[subprocess.Popen[str]] = []
        try:
            port = free_port()
            if mode != "direct":
                cmd = [sys.executable, __file__, "--serve", str(port), "--words", str(args.words),
                       "--words-per-s", str(args.words_per_s)]
                servers.append(subprocess.Popen(cmd + (["--passage"] if mode == "session" else []),
                                                stdout=subprocess.PIPE, text=True))
            cartesia_port = free_port()
            if mode in ("session", "direct"):
                servers.append(subprocess.Popen([sys.executable, __file__, "--serve-discard", str(cartesia_port)],
                                                stdout=subprocess.PIPE, text=True))
            for server in servers:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            url = f"ws://127.0.0.1:{port}/agent"
            cartesia_url = f"ws://127.0.0.1:{cartesia_port}"
            inputs = ""
            if mode == "direct":
                with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
                    cpu, n, written = runner.run(measure_direct(cartesia_url, args.links, args.words,
                                                                args.words_per_s))
                taken, inputs = n, str(written)
            else:
                with asyncio.Runner(loop_factory=event_loop_factory() if args.loop == "uvloop" else None) as runner:
                    if mode == "session":
                        cpu, n, taken, written = runner.run(measure_sessions(url, cartesia_url, args.links,
                                                                             args.words))
                        inputs = str(written)
                    else:
                        cpu, n, taken = runner.run(measure(url, args.links, args.words, mode == "inline"))
            print(f"{mode:8} {n:8}  {taken:6}  {cpu * 1000:6.0f}  {cpu / n * 1e6:9.1f}  {inputs:>15}")
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)

if __name__ == "__main__":
    main()
