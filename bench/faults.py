"""Fault run: N calls speak while the emulator injects one fault; print what survived.

    python bench/faults.py --calls 20 --fault close-after-chunks=60
    python bench/faults.py --calls 20 --fault reject-429=0.3
    python bench/faults.py --calls 20 --fault no-done=0.3 --context-timeout-s 1
    python bench/faults.py --calls 20 --fault delay-ms=150:0.3

Every call's greeting has words unique to the call, so each Cartesia context
can be traced to its call. A call is *intact* when what the caller heard is
the chain of its contexts' audio cut at word boundaries (``bridge.integrity``):
nothing repeated, nothing missing. Bounded: at most 200 calls, 120 s.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings, parse_faults  # noqa: E402
from bridge.config import Config  # noqa: E402
from bridge.integrity import explain_heard  # noqa: E402
from bridge.logs import configure_logging  # noqa: E402
from bridge.netutil import free_port  # noqa: E402
from bridge.server import BridgeServer  # noqa: E402
from metrics.scrape import parse_samples, value  # noqa: E402
from telephony.simulator import SimulatedCall  # noqa: E402

WORDS = 8


async def run(calls: int, faults: list[str], context_timeout_s: float) -> int:
    emulator = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05, chunk_ms=100, seed=7, faults=parse_faults(faults)))
    await emulator.start()
    port, token = free_port(), secrets.token_hex(8)
    server = BridgeServer(Config.from_env({
        "PUBLIC_URL": f"http://127.0.0.1:{port}", "CARTESIA_URL": str(emulator.url), "CARTESIA_API_KEY": "bench",
        "CARTESIA_VOICE_ID": DEFAULT_VOICE_ID, "TWILIO_AUTH_TOKEN": token, "VAD_ENABLED": "false",
        "CARTESIA_CONTEXT_TIMEOUT_S": str(context_timeout_s), "LOG_LEVEL": "ERROR"}))
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        sims = [SimulatedCall(base, http, auth_token=token,
                              webhook_query={"greeting": " ".join(f"c{i}w{j}" for j in range(WORDS))})
                for i in range(calls)]
        for sim in sims:
            await sim.place()
            await sim.connect()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(server.calls) == calls and all(not s.core.is_speaking for s in server.calls) and all(
                    s.record.media_bytes for s in sims):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        lost_calls = sum(1 for s in sims if s.closed.is_set())
        intact = 0
        heard_s = 0.0
        for i, sim in enumerate(sims):
            order: list[str] = []
            for _conn, obj in emulator.received:
                ctx, words = obj.get("context_id"), (obj.get("transcript") or "").split()
                if ctx and ctx not in order and words and words[0].startswith(f"c{i}w"):
                    order.append(ctx)
            chain = []
            for ctx in order:
                rec = emulator.context_record(ctx)
                chain.append((bytes(rec.audio), list(rec.starts) + list(rec.ends)) if rec else (b"", []))
            heard = sim.ear.heard()
            heard_s += len(heard) / 8000
            intact += explain_heard(heard, chain)
        samples = parse_samples(await (await http.get(base + "/metrics")).text())
        for sim in sims:
            await sim.hangup()
    await asyncio.sleep(0.5)
    leftover_contexts = server.pool.active_contexts
    await runner.cleanup()
    await emulator.stop()
    print(f"faults: {' '.join(faults) or 'none'}   calls: {calls}   wall: {time.monotonic() - started:.1f} s")
    print(f"  injected/observed: socket replacements {int(value(samples, 'bridge_cartesia_reconnects_total'))}, "
          f"429s {int(value(samples, 'bridge_cartesia_errors_total', status='429'))}, "
          f"context deadlines {int(value(samples, 'bridge_cartesia_context_timeouts_total'))}")
    print(f"  utterances resumed on a new context: socket_lost "
          f"{int(value(samples, 'bridge_cartesia_context_retries_total', reason='socket_lost'))}, "
          f"429 {int(value(samples, 'bridge_cartesia_context_retries_total', reason='429'))}, "
          f"no_done {int(value(samples, 'bridge_cartesia_context_retries_total', reason='no_done'))}; "
          f"given up: {int(value(samples, 'bridge_utterances_failed_total'))}")
    print(f"  calls lost: {lost_calls}   calls with audio lost or repeated: {calls - intact}   "
          f"audio heard: {heard_s:.1f} s   contexts left open: {leftover_contexts}")
    return 0 if lost_calls == 0 and intact == calls and leftover_contexts == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--fault", action="append", default=[])
    parser.add_argument("--context-timeout-s", type=float, default=1.0)
    args = parser.parse_args()
    if not 1 <= args.calls <= 200:
        parser.error("--calls must be in [1, 200]")
    configure_logging("ERROR")
    return asyncio.run(asyncio.wait_for(run(args.calls, args.fault, args.context_timeout_s), 120))


if __name__ == "__main__":
    sys.exit(main())
