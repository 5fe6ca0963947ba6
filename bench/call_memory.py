"""Bridge memory per speaking call, by allocation site (RSS and ``tracemalloc``).

Starts the Cartesia emulator in this process (``--emulator-args``, default as
``bench/capacity.py``: 50 ms TTFB, 2x real time, 100 ms chunks, no jitter) and a
bridge (``media-bridge serve``, built-in agent, STT off) as a child process on
127.0.0.1, then:

1. ``--warmup`` calls for ``--warmup-s`` seconds, hung up (one-time costs: imports,
   caches, the first Cartesia sockets), and a snapshot ``zero``;
2. ``--calls`` N simulated callers (``telephony.simulator``), placed over
   ``--ramp-s``, each in the load test's ``talk`` scenario (greeting, then DTMF 9
   for a long passage whenever it goes quiet; inbound audio every 20 ms), and,
   ``--settle-s`` after the last one connected, a snapshot ``calls``;
3. half the callers hang up, 1 s later a snapshot ``half`` (is an ended call's memory freed while
   the others still speak?); then the rest hang up, 3 s later a snapshot ``after``.

``--bridge-cpu 0 --load-cpus 1`` pins the bridge and this process as ``bench/capacity.py`` does.
Speaking memory grows with call age (the bridge holds the audio the emulator sends ahead at 2x
real time: ``bridge/playout.py`` ``utt.pending``), so compare runs with the same ``--ramp-s`` and
``--settle-s``.

A snapshot is taken inside the bridge by a thread of this script's child wrapper
(no route or code in the bridge is needed, so any commit can be measured): a full
``gc.collect()``, the bridge's RSS (bytes), and with ``--frames`` > 0 a
``tracemalloc`` snapshot (the child runs with ``PYTHONTRACEMALLOC=frames``; RSS is
then inflated by tracemalloc's own bookkeeping: take RSS figures from a run
with ``--frames 0``).

It prints RSS and traced bytes per call (``calls`` - ``zero``) / N, and the
top sites of the traced growth per call, grouped by the innermost frame in the
project's own code (``bridge/``, ``telephony/``, ``metrics/``) with the
innermost frame overall (the library line that allocated), and by project file.
``--tree DIR`` runs the bridge from another checkout (e.g. an old commit made
with ``git worktree add --detach /tmp/mb-6dd30b8 6dd30b8``) with this
worktree's interpreter: the child gets ``PYTHONPATH=DIR``; the emulator and the
callers stay this checkout's. ``--json`` writes every figure and site.

    .venv/bin/python bench/call_memory.py --calls 100 --frames 0            # RSS only
    .venv/bin/python bench/call_memory.py --calls 40 --frames 12 --top 30  # by site (slow: tracemalloc)
    .venv/bin/python bench/call_memory.py --tree /tmp/mb-6dd30b8 --calls 40 --frames 6 --json out/m-6dd.json
    .venv/bin/python bench/call_memory.py --calls 200 --ramp-s 8 --settle-s 12 --frames 0 --bridge-cpu 0 --load-cpus 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import linecache
import os
import random
import shlex
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

PROJECT_DIRS = ("bridge", "telephony", "metrics")
EMULATOR_ARGS = "--ttfb-ms 50 --rtf 0.5 --chunk-ms 100 --jitter-ms 0"


# ----------------------------------------------------------------- child side (inside the bridge)

def child_main(snap_dir: Path, serve_args: list[str]) -> int:
    """Run ``media-bridge serve`` with a thread that answers snapshot requests in ``snap_dir``:
    ``<label>.req`` -> ``<label>.json`` (RSS after a full GC) and ``<label>.snap`` (tracemalloc)."""
    import gc
    import threading

    import psutil

    def answer(label: str) -> None:
        # First as the bridge is (cyclic garbage not yet collected), then after a full collection.
        info: dict[str, Any] = {"rss_nogc": psutil.Process().memory_info().rss}
        if tracemalloc.is_tracing():
            info["traced_nogc"] = tracemalloc.get_traced_memory()[0]
            tracemalloc.take_snapshot().dump(str(snap_dir / f"{label}-nogc.snap"))
        info["gc_unreachable"] = gc.collect()
        info["twilio_sockets"] = twilio_socket_queues(gc)
        info["rss"] = psutil.Process().memory_info().rss
        if tracemalloc.is_tracing():
            info["traced"] = tracemalloc.get_traced_memory()[0]
            tracemalloc.take_snapshot().dump(str(snap_dir / f"{label}.snap"))
        (snap_dir / f"{label}.json.tmp").write_text(json.dumps(info))
        (snap_dir / f"{label}.json.tmp").rename(snap_dir / f"{label}.json")

    def watch() -> None:
        while True:
            for req in snap_dir.glob("*.req"):
                req.unlink()
                answer(req.stem)
            time.sleep(0.05)

    threading.Thread(target=watch, name="call-memory-snapshots", daemon=True).start()
    from bridge.cli import main

    return main(serve_args)


def twilio_socket_queues(gc: Any) -> dict[str, int]:
    """Over the bridge's live Twilio sockets (``InlineWebSocketResponse``): messages waiting in
    aiohttp's receive queue (declined by the inline path, not yet read), their bytes, and the
    messages the inline path took so far."""
    totals = {"sockets": 0, "queued_messages": 0, "queued_bytes": 0, "inline_messages": 0}
    for obj in gc.get_objects():
        if type(obj).__name__ != "InlineWebSocketResponse":
            continue
        totals["sockets"] += 1
        queue = getattr(obj, "_sink_queue", None) or getattr(obj, "_reader", None)
        if queue is not None:
            totals["queued_messages"] += len(getattr(queue, "_buffer", ()))
            totals["queued_bytes"] += int(getattr(queue, "_size", 0))
            totals["inline_messages"] += int(getattr(queue, "inline_messages", 0))
    return totals


# ----------------------------------------------------------------- parent side (emulator, callers)

async def request_snapshot(snap_dir: Path, label: str, limit_s: float = 120.0) -> dict[str, Any]:
    """Ask the child for snapshot ``label``; its JSON figures."""
    (snap_dir / f"{label}.req").write_text("")
    done = snap_dir / f"{label}.json"
    deadline = time.monotonic() + limit_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no snapshot {label} after {limit_s:.0f} s")
        await asyncio.sleep(0.1)
    figures: dict[str, Any] = json.loads(done.read_text())
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from bridge.cartesia.emulator import Emulator
    from bridge.cartesia.emulator.cli import add_arguments, settings_from_args
    from bridge.loadtest.options import GREETING, VOICE_ID
    from bridge.loadtest.results import CallResult
    from bridge.loadtest.scenarios import run_scenario
    from bridge.netutil import free_port
    from telephony.simulator import CallerClock, SimulatedCall

    out = Path(args.work_dir).resolve()  # the child runs in the tree's directory
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        if old.suffix in (".req", ".json", ".snap", ".tmp"):
            old.unlink()
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(shlex.split(args.emulator_args)))
    emulator = Emulator(settings)
    cartesia_url = str(await emulator.start("127.0.0.1", 0))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = "call-memory-token"
    tree = Path(args.tree).resolve() if args.tree else Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARTESIA_", "AGENT_", "TWILIO_", "PYTHON"))}
    env.update({
        "PYTHONPATH": str(tree), "PUBLIC_URL": base, "TWILIO_AUTH_TOKEN": token, "CARTESIA_URL": cartesia_url,
        "CARTESIA_API_KEY": "call-memory", "CARTESIA_VOICE_ID": VOICE_ID, "CARTESIA_MAX_CONCURRENCY": "100000",
        "MAX_CALLS": str(args.calls + args.warmup + 10), "GREETING": GREETING, "LOG_LEVEL": "WARNING",
        "DRAIN_GRACE_S": "2", "STT_ENABLED": "false",
    })
    if args.frames > 0:
        env["PYTHONTRACEMALLOC"] = str(args.frames)
    for item in args.bridge_env:
        name, _, value = item.partition("=")
        env[name] = value
    # The child is this file (``--child``) run in the tree, so it imports that tree's bridge.
    pin = ["taskset", "-c", args.bridge_cpu] if args.bridge_cpu else []
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    proc, log = start_child([*pin, sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--", "serve",
                             "--host", "127.0.0.1", "--port", str(port)], env, tree, out / "bridge.log")
    result: dict[str, Any] = {"tree": str(tree), "calls": args.calls, "frames": args.frames}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await wait_ready(http, f"{base}/readyz", proc)
            clock = CallerClock()

            async def one_call(index: int, start_at: float, connected: list[int]) -> SimulatedCall:
                await asyncio.sleep(max(0.0, start_at - time.monotonic()))
                call = SimulatedCall(base, http, auth_token=token, public_url=base, clock=clock)
                if await call.place() is None:
                    raise RuntimeError("the bridge refused a call")
                await call.connect()
                connected.append(index)
                return call

            async def talk(call: SimulatedCall, index: int) -> None:
                res = CallResult(index=index, t_started=time.monotonic())
                await run_scenario("talk", call, res, time.monotonic() + 3600, random.Random(index))

            async def session(n: int, ramp_s: float, hold_s: float | None, label: str | None) -> None:
                connected: list[int] = []
                t0 = time.monotonic()
                calls = await asyncio.gather(*(one_call(i, t0 + i * ramp_s / max(1, n), connected) for i in range(n)))
                talks = [asyncio.create_task(talk(c, i)) for i, c in enumerate(calls)]
                await asyncio.sleep(hold_s if hold_s is not None else args.settle_s)
                if label is not None:
                    live = [c for c in calls if not c.closed.is_set()]
                    result[label] = await request_snapshot(out, label)
                    result[label]["live_calls"] = len(live)
                for t in talks:
                    t.cancel()
                await asyncio.gather(*talks, return_exceptions=True)
                if label is not None:
                    # Half the callers hang up; 1 s later: what do the ended calls still hold?
                    await asyncio.gather(*(c.hangup() for c in calls[: n // 2]), return_exceptions=True)
                    await asyncio.sleep(1.0)
                    result["half"] = await request_snapshot(out, "half")
                await asyncio.gather(*(c.hangup() for c in calls), return_exceptions=True)

            if args.warmup:
                await session(args.warmup, 0.5, args.warmup_s, None)
            await asyncio.sleep(3.0)
            result["zero"] = await request_snapshot(out, "zero")
            await session(args.calls, args.ramp_s, None, "calls")
            await asyncio.sleep(3.0)
            result["after"] = await request_snapshot(out, "after")
            await clock.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(Exception):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
        await emulator.stop()
    n = args.calls
    result["rss_kb_per_call"] = round((result["calls"]["rss"] - result["zero"]["rss"]) / n / 1024, 1)
    result["rss_kb_left_per_call"] = round((result["after"]["rss"] - result["zero"]["rss"]) / n / 1024, 1)
    result["rss_nogc_kb_per_call"] = round((result["calls"]["rss_nogc"] - result["zero"]["rss"]) / n / 1024, 1)
    result["gc_unreachable_per_call"] = round(result["calls"]["gc_unreachable"] / n, 1)
    if args.frames > 0:
        result["traced_nogc_kb_per_call"] = round((result["calls"]["traced_nogc"] - result["zero"]["traced"]) / n / 1024, 1)
        result["garbage_sites"], _ = sites(out / "calls.snap", out / "calls-nogc.snap", tree, n)
        # Traced bytes freed per ended call 1 s after n // 2 callers hung up (about traced KB/call when nothing is held).
        ended = n // 2
        result["traced_kb_freed_1s_after_hangup"] = round(
            (result["calls"]["traced"] - result["half"]["traced"]) / max(1, ended) / 1024, 1)
        result["half_sites"], _ = sites(out / "half.snap", out / "calls.snap", tree, max(1, ended))
        result["traced_kb_per_call"] = round((result["calls"]["traced"] - result["zero"]["traced"]) / n / 1024, 1)
        result["traced_kb_left_per_call"] = round((result["after"]["traced"] - result["zero"]["traced"]) / n / 1024, 1)
        result["sites"], result["files"] = sites(out / "zero.snap", out / "calls.snap", tree, n)
    return result


def start_child(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """The bridge child (own session), stdout and stderr to ``log_path``; the caller closes the log."""
    log = open(log_path, "wb")  # noqa: SIM115 -- closed by the caller
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


async def wait_ready(http: Any, url: str, proc: Any, limit_s: float = 180.0) -> None:
    import aiohttp

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bridge exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError("bridge not ready")


def where(frame: tracemalloc.Frame, tree: Path) -> str:
    """``path:line`` relative to the tree (or to site-packages/the stdlib)."""
    name = frame.filename
    with contextlib.suppress(ValueError):
        name = str(Path(name).relative_to(tree))
    for marker in ("site-packages/", "/lib/python3"):
        if marker in name:
            name = name.split(marker, 1)[1]
    return f"{name}:{frame.lineno}"


def is_project(frame: tracemalloc.Frame, tree: Path) -> bool:
    try:
        rel = Path(frame.filename).relative_to(tree)
    except ValueError:
        return False
    return rel.parts[0] in PROJECT_DIRS


def sites(before: Path, after: Path, tree: Path, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Traced growth ``before`` -> ``after`` per call, grouped by (innermost project frame, innermost frame),
    and by project file."""
    diff = tracemalloc.Snapshot.load(str(after)).compare_to(tracemalloc.Snapshot.load(str(before)), "traceback")
    by_site: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    by_file: dict[str, int] = defaultdict(int)
    for stat in diff:
        if not stat.size_diff:
            continue
        frames = list(reversed(stat.traceback))  # a Traceback runs oldest -> most recent
        own = next((f for f in frames if is_project(f, tree)), None)
        key = (where(own, tree) if own else "-", where(frames[0], tree))
        by_site[key][0] += stat.size_diff
        by_site[key][1] += stat.count_diff
        by_file[key[0].rsplit(":", 1)[0]] += stat.size_diff
    site_rows = []
    for (own_at, alloc_at), (size, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0]):
        path, _, line = own_at.rpartition(":")
        source = linecache.getline(str(tree / path), int(line)).strip() if path else ""
        site_rows.append({"project_frame": own_at, "source": source, "allocated_at": alloc_at,
                          "bytes_per_call": round(size / n), "blocks_per_call": round(count / n, 2)})
    file_rows = [{"file": f, "bytes_per_call": round(s / n)} for f, s in sorted(by_file.items(), key=lambda kv: -kv[1])]
    return site_rows, file_rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(Path(argv[1]), argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=100, help="simulated speaking calls (N)")
    p.add_argument("--ramp-s", type=float, default=4.0, help="the N calls are placed over this many seconds")
    p.add_argument("--settle-s", type=float, default=8.0, help="seconds after the last call was placed, then snapshot")
    p.add_argument("--warmup", type=int, default=5, help="calls before the zero snapshot (one-time costs)")
    p.add_argument("--warmup-s", type=float, default=4.0)
    p.add_argument("--frames", type=int, default=12, help="tracemalloc frames in the bridge (0: RSS only)")
    p.add_argument("--tree", default=None, help="checkout the bridge runs from (default: this one)")
    p.add_argument("--bridge-cpu", default=None, help="pin the bridge (taskset -c), as bench/capacity.py: 0")
    p.add_argument("--load-cpus", default=None, help="pin the emulator and callers (this process), e.g. 1")
    p.add_argument("--emulator-args", default=EMULATOR_ARGS)
    p.add_argument("--bridge-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--top", type=int, default=25, help="sites printed")
    p.add_argument("--work-dir", default="out/call_memory", help="snapshots and the bridge's log")
    p.add_argument("--json", default=None, help="write every figure and site here")
    args = p.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(run(args))
    print(f"tree {result['tree']}: {args.calls} calls, live at snapshot {result['calls']['live_calls']}")
    print(f"RSS KB/call {result['rss_kb_per_call']} (left after hang-up {result['rss_kb_left_per_call']})"
          + (" [tracemalloc on: RSS inflated]" if args.frames else ""))
    print(f"RSS KB/call before the full GC {result['rss_nogc_kb_per_call']}; "
          f"gc.collect() found {result['gc_unreachable_per_call']} unreachable objects per call")
    print(f"Twilio sockets at the snapshot: {result['calls']['twilio_sockets']}")
    if args.frames:
        print(f"traced KB/call before the full GC {result['traced_nogc_kb_per_call']}; cyclic garbage by site:")
        for s in result["garbage_sites"][:args.top // 2]:
            print(f"{s['bytes_per_call']:>8} {s['blocks_per_call']:>8}  {s['project_frame']} -> {s['allocated_at']}"
                  f"\n{'':>19}{s['source'][:100]}")
        print(f"traced KB/call {result['traced_kb_per_call']} (left after hang-up {result['traced_kb_left_per_call']})")
        print(f"traced KB freed per ended call 1 s after hang-up {result['traced_kb_freed_1s_after_hangup']} "
              "(of the traced KB/call); freed by site:")
        for s in result["half_sites"][:args.top // 2]:
            print(f"{s['bytes_per_call']:>8} {s['blocks_per_call']:>8}  {s['project_frame']} -> {s['allocated_at']}"
                  f"\n{'':>19}{s['source'][:100]}")
        print(f"\n{'B/call':>8} {'blk/call':>8}  project frame -> allocated at")
        for s in result["sites"][:args.top]:
            print(f"{s['bytes_per_call']:>8} {s['blocks_per_call']:>8}  {s['project_frame']} -> {s['allocated_at']}"
                  f"\n{'':>19}{s['source'][:100]}")
        print(f"\n{'B/call':>8}  project file")
        for f in result["files"][:args.top]:
            print(f"{f['bytes_per_call']:>8}  {f['file']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
