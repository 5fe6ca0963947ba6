"""Benchmark: how many concurrent streaming contexts the emulator sustains on one core.

The emulator runs in a subprocess pinned to CPU 0 (``os.sched_setaffinity``);
this client runs pinned to CPU 1 (if there is one). For each N, N contexts
(spread over ``--sockets`` WebSockets) each ask for ``--audio-s`` seconds of
``tone`` audio (pcm_mulaw 8 kHz) at the given RTF. Reported per N:

* achieved RTF per context = (last chunk − first chunk arrival) / audio
  seconds, p50/p99 (target ≤ rtf · 1.1 or so);
* client-side chunk lateness = arrival − (first arrival + audio-so-far · rtf),
  p50/p99 in ms;
* server-side lateness (send time − scheduled time) from /emulator/stats;
* emulator CPU use (psutil, % of one core) and messages per second.

Usage::

    python bench/emulator_bench.py --counts 100,250,500,750 --rtf 0.1 --chunk-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import psutil

from bridge.cartesia.emulator import DEFAULT_VOICE_ID
from bridge.netutil import free_port
from bridge.stats import percentile

WORD = "emulate "  # 7 letters: 60 + 45*7 = 375 ms burst + 40 ms gap = 415 ms


def rounded(v: float | None, scale: float = 1.0, nd: int = 1) -> float | None:
    """``v * scale`` rounded to ``nd`` places; None stays None (a percentile of nothing)."""
    return None if v is None else round(v * scale, nd)


async def run_context(
    ws: aiohttp.ClientWebSocketResponse, cid: str, text: str, queue: asyncio.Queue[Any], rtf: float
) -> dict[str, Any]:
    msg = {
        "model_id": "sonic-3", "transcript": text, "voice": {"mode": "id", "id": DEFAULT_VOICE_ID},
        "output_format": {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000},
        "context_id": cid, "continue": False, "max_buffer_delay_ms": 0,
    }
    t_send = time.perf_counter()
    await ws.send_str(orjson.dumps(msg).decode())
    first = None
    audio = 0
    lateness: list[float] = []
    while True:
        t, kind, nbytes = await queue.get()
        if kind == "chunk":
            if first is None:
                first = t
            else:
                lateness.append(t - (first + audio / 8000 * rtf))
            audio += nbytes
        elif kind in ("done", "error"):
            break
    last = t
    return {
        "ttfb": (first or last) - t_send,
        "rtf": (last - (first or last)) / max(1e-9, audio / 8000),
        "lateness": lateness,
        "audio_s": audio / 8000,
        "error": kind == "error",
    }


async def reader(ws: aiohttp.ClientWebSocketResponse, queues: dict[str, asyncio.Queue[Any]], counter: list[int]) -> None:
    async for m in ws:
        if m.type != aiohttp.WSMsgType.TEXT:
            break
        t = time.perf_counter()
        obj = orjson.loads(m.data)
        counter[0] += 1
        kind = obj["type"]
        nbytes = len(obj["data"]) * 3 // 4 - obj["data"][-2:].count("=") if kind == "chunk" else 0
        q = queues.get(obj.get("context_id"))
        if q is not None:
            q.put_nowait((t, kind, nbytes))


async def one_round(http: str, ws_url: str, n: int, sockets: int, audio_s: float, rtf: float, ramp_s: float,
                    proc: psutil.Process) -> dict[str, Any]:
    words = max(1, round(audio_s / 0.415))
    text = WORD * words
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{http}/emulator/stats?reset=1") as r:
            await r.read()
        conns = [await session.ws_connect(f"{ws_url}/tts/websocket", max_msg_size=0) for _ in range(sockets)]
        queues: dict[str, asyncio.Queue[Any]] = {}
        counter = [0]
        readers = [asyncio.create_task(reader(ws, queues, counter)) for ws in conns]
        proc.cpu_percent(None)
        t0 = time.perf_counter()

        async def start(i: int) -> dict[str, Any]:
            await asyncio.sleep(ramp_s * i / n)
            cid = f"b{n}-{i}"
            queues[cid] = asyncio.Queue()
            return await run_context(conns[i % sockets], cid, text, queues[cid], rtf)

        results = await asyncio.gather(*(start(i) for i in range(n)))
        wall = time.perf_counter() - t0
        cpu = proc.cpu_percent(None)
        async with session.get(f"{http}/emulator/stats") as r:
            stats = await r.json()
        for ws in conns:
            await ws.close()
        for task in readers:
            task.cancel()
    rtfs = [r["rtf"] for r in results]
    late = [x for r in results for x in r["lateness"]]
    return {
        "contexts": n,
        "sockets": sockets,
        "audio_s_per_context": round(results[0]["audio_s"], 2),
        "errors": sum(r["error"] for r in results),
        "achieved_rtf_p50": rounded(percentile(rtfs, 0.5), nd=4),
        "achieved_rtf_p99": rounded(percentile(rtfs, 0.99), nd=4),
        "ttfb_ms_p50": rounded(percentile([r["ttfb"] for r in results], 0.5), scale=1000),
        "client_lateness_ms_p50": rounded(percentile(late, 0.5), scale=1000),
        "client_lateness_ms_p99": rounded(percentile(late, 0.99), scale=1000),
        "server_lateness_ms": stats["chunk_lateness_ms"],
        "emulator_cpu_pct": round(cpu, 1),
        "messages_per_s": round(counter[0] / wall),
        "wall_s": round(wall, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="100,250,500,750")
    ap.add_argument("--rtf", type=float, default=0.1)
    ap.add_argument("--chunk-ms", type=int, default=100)
    ap.add_argument("--audio-s", type=float, default=20.0, help="audio per context")
    ap.add_argument("--sockets", type=int, default=0, help="WebSockets (0 = one per 50 contexts, at least 2)")
    ap.add_argument("--ramp-s", type=float, default=1.0, help="spread context starts over this long")
    ap.add_argument("--port", type=int, default=0, help="emulator port (default: a free one)")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    emu_cpu = cpus[:1]
    client_cpus = cpus[1:] or cpus
    env = dict(os.environ)
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "bridge.cartesia.emulator.cli", "--port", str(port), "--rtf", str(args.rtf),
           "--chunk-ms", str(args.chunk_ms), "--record-contexts", "0", "--log-level", "WARNING",
           "--loop", "asyncio" if args.no_uvloop else "auto"]

    def pin() -> None:
        if emu_cpu:
            os.sched_setaffinity(0, emu_cpu)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pin)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ws_url = line.split()[4]
        http = ws_url.replace("ws://", "http://")
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        print(f"# emulator pid {proc.pid} on CPU {emu_cpu}, client on CPU {client_cpus}; {line.strip()}",
              file=sys.stderr)
        ps = psutil.Process(proc.pid)
        rows = []
        for n in (int(x) for x in args.counts.split(",")):
            sockets = args.sockets or max(2, n // 50)
            row = asyncio.run(one_round(http, ws_url, n, sockets, args.audio_s, args.rtf, args.ramp_s, ps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
