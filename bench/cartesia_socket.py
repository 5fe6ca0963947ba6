"""CPU cost of the bridge's Cartesia socket layer per server message (issue 18).

The emulator runs in a subprocess pinned to the last CPU; this process (pinned
to CPU 0) holds a ``CartesiaPool`` and keeps ``--contexts`` contexts speaking
(a new one starts when one is done), with ``--chunk-ms`` chunks at ``--rtf``
and word timestamps at ``--words-per-s``, like the capacity bench's Cartesia
peer. For each socket layer (``inline``: ``bridge.wsclient``, messages handled
in the data callback; ``websockets``: the library client with a reader task,
the path used behind a proxy) it prints this process's CPU time per message
received (µs, over the steady window) and messages per second. Only the pool
and the listeners run here, so the difference is the socket layer's.

    python bench/cartesia_socket.py --contexts 200 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bridge.cartesia import client as cartesia_client
from bridge.cartesia.emulator import DEFAULT_VOICE_ID
from bridge.cartesia.protocol import Done, ErrorMessage, GenerationRequest, ServerMessage
from bridge.netutil import free_port
from metrics import BridgeMetrics

TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 4) + "."


class Speaker:
    """Keeps one context speaking: a new one as soon as the last is done."""

    def __init__(self, pool: cartesia_client.CartesiaPool, name: str, counts: list[int]) -> None:
        self.pool = pool
        self.name = name
        self.counts = counts
        self.n = 0
        self.done = asyncio.Event()

    def on_cartesia_message(self, msg: ServerMessage, received_at: float) -> None:
        self.counts[0] += 1
        if isinstance(msg, (Done, ErrorMessage)):
            self.done.set()

    def on_context_lost(self, context_id: str, reason: str) -> None:
        self.done.set()

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            self.n += 1
            cid = f"{self.name}-{self.n}"
            self.done.clear()
            lease = await self.pool.open_context(cid, self, 10.0)
            lease.send(GenerationRequest(cid, TEXT, "sonic-3", DEFAULT_VOICE_ID, add_timestamps=True))
            await self.done.wait()
            lease.abandon()


async def measure(layer: str, url: str, contexts: int, seconds: float) -> tuple[float, float]:
    if layer == "websockets":
        cartesia_client.proxy_for = lambda _url: "forced"  # type: ignore[assignment]
    pool = cartesia_client.CartesiaPool(url=url, api_key=None, version="2026-03-01", metrics=BridgeMetrics(),
                                        size=2, max_concurrency=contexts + 10)
    assert await pool.prewarm(10), "emulator not reachable"
    counts = [0]
    warmup = 3.0
    until = time.monotonic() + warmup + seconds + 1.0
    tasks = [asyncio.create_task(Speaker(pool, f"c{i}", counts).run(until)) for i in range(contexts)]
    await asyncio.sleep(warmup)
    cpu0, n0, t0 = time.process_time(), counts[0], time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, n1, t1 = time.process_time(), counts[0], time.monotonic()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()
    messages = n1 - n0
    return (cpu1 - cpu0) / max(1, messages) * 1e6, messages / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, default=200)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--chunk-ms", type=int, default=40)
    p.add_argument("--rtf", type=float, default=0.5)
    p.add_argument("--words-per-s", type=float, default=15.0)
    p.add_argument("--layers", default="inline,websockets,inline,websockets")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    port = free_port()
    emulator = subprocess.Popen(
        ["taskset", "-c", str(cpus[-1]), sys.executable, "-m", "bridge.cli", "emulator", "--port", str(port),
         "--ttfb-ms", "50", "--rtf", str(args.rtf), "--chunk-ms", str(args.chunk_ms), "--jitter-ms", "0",
         "--words-per-s", str(args.words_per_s), "--log-level", "WARNING"])
    os.sched_setaffinity(0, {cpus[0]})
    try:
        async def wait_up() -> None:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/voices") as resp:
                            if resp.status < 500:
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
            raise RuntimeError("emulator did not start")

        asyncio.run(wait_up())
        original = cartesia_client.proxy_for
        for layer in args.layers.split(","):
            cartesia_client.proxy_for = original
            loop_factory: Any = None
            try:
                import uvloop
                loop_factory = uvloop.new_event_loop
            except ImportError:
                pass
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                us, rate = runner.run(measure(layer, f"ws://127.0.0.1:{port}", args.contexts, args.seconds))
            print(f"{layer:>10}: {us:6.1f} µs CPU per message, {rate:8.0f} messages/s "
                  f"({args.contexts} contexts, {args.chunk_ms} ms chunks, rtf {args.rtf}, "
                  f"{args.words_per_s} words/s)", flush=True)
    finally:
        emulator.terminate()
        emulator.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
