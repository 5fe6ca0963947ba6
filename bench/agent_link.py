"""CPU per agent message on the bridge's agent links: inline sink vs aiohttp's reader task (issue 18).

An agent server (a child process, so its CPU is not counted) streams ``--words``
ConversationRelay ``text`` tokens per link at ``--words-per-s`` (each its own
WebSocket message, as ``bridge/loadtest/agent_server.py`` does), on
``--links`` links opened by ``AgentConnector`` exactly as calls open them.
The links deliver into a counter. For each ``--mode`` it prints this
process's CPU time (``time.process_time``) per message, from the first
connect to the last message, and how many messages the inline sink took.

The machine is shared and noisy: for figures that do not move, count
instructions with callgrind at two lengths (``--words`` N and 2N) and take
``(I2N - IN) / (links × N)`` instructions per message (the child server is
not traced; setup cancels out)::

    python bench/agent_link.py --mode inline,plain
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python bench/agent_link.py --mode inline --words 100
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

from bridge.agent.connector import AgentConnector
from bridge.agent.link import AgentLink
from bridge.netutil import free_port
from metrics import BridgeMetrics


async def serve(port: int, words: int, words_per_s: float) -> None:
    """The agent: on each connection, ``words`` tokens paced at ``words_per_s``, then ``last``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the bridge's first message: start streaming
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(words):
            await asyncio.sleep(max(0.0, start + i / words_per_s - loop.time()))
            await ws.send_str(orjson.dumps({"type": "text", "token": f"word{i} ", "last": False}).decode())
        await ws.send_str(orjson.dumps({"type": "text", "token": "", "last": True}).decode())
        async for _msg in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/agent", handler)
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
    inline_taken = sum(int(getattr(getattr(link, "_ws", None), "inline_messages", 0)) for link in opened)
    await asyncio.gather(*(link.close() for link in opened))
    await connector.close()
    return cpu, delivered, inline_taken


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--links", type=int, default=20)
    p.add_argument("--words", type=int, default=250, help="tokens per link")
    p.add_argument("--words-per-s", type=float, default=50.0, help="tokens per second per link")
    p.add_argument("--mode", default="inline,plain", help="comma-separated: inline, plain")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.words, args.words_per_s))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--words", str(args.words),
                               "--words-per-s", str(args.words_per_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        url = f"ws://127.0.0.1:{port}/agent"
        print(f"{args.links} links x {args.words} tokens at {args.words_per_s:g}/s")
        print("mode    messages  inline  CPU ms  µs/message")
        for mode in args.mode.split(","):
            cpu, n, taken = asyncio.run(measure(url, args.links, args.words, mode == "inline"))
            print(f"{mode:7} {n:8}  {taken:6}  {cpu * 1000:6.0f}  {cpu / n * 1e6:9.1f}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
