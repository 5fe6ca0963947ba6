"""``media-bridge``: serve | emulator | demo | loadtest | chaos."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from typing import Any

from bridge.config import Config, ConfigError, env_help
from bridge.logs import configure_logging, log_event

log = logging.getLogger("bridge.cli")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, host: str, port: int) -> int:
    from aiohttp import web

    from bridge.server import BridgeServer

    server = BridgeServer(config)
    runner = server.make_runner(handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    # Startup objects (modules, classes, the app) live as long as the process: freezing them keeps
    # full collections from walking them again, so GC pauses scale with what the calls hold.
    gc.collect()
    gc.freeze()
    log_event(log, "listening", host=host, port=port, public_url=config.public_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(log, "sigterm_received", calls=len(server.calls), grace_s=config.drain_grace_s)
    ended = await server.drain(config.drain_grace_s)
    calls_gauges = _call_gauges(server)  # before cleanup closes the pool: what the calls left behind
    await runner.cleanup()
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    # What a leak looks like at exit: tasks no owner cancelled, gauges no call brought back to 0.
    log_event(log, "stopped", ended_calls=ended, tasks_left=len(left),
              task_names=sorted({t.get_name() for t in left})[:20] or None, gauges=calls_gauges)
    return 0


#: Gauges that count what calls hold; each must be 0 once every call has ended.
CALL_GAUGES = ("bridge_active_calls", "bridge_cartesia_active_contexts", "bridge_cartesia_admission_queue",
               "bridge_agent_connections", "bridge_stt_sockets", "bridge_playout_buffered_bytes")


def _call_gauges(server: Any) -> dict[str, float]:
    from prometheus_client import generate_latest

    from metrics.scrape import parse_samples, value

    samples = parse_samples(generate_latest(server.metrics.registry).decode())
    return {name: value(samples, name) for name in CALL_GAUGES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="media-bridge", description="Twilio Media Streams <-> Cartesia TTS bridge")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the bridge", epilog=env_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)

    sub.add_parser("emulator", help="run the local Cartesia emulator (see `media-bridge emulator --help`)",
                   add_help=False)

    demo = sub.add_parser("demo", help="one simulated call through bridge + emulator, no account needed")
    demo.add_argument("--wav", default="out/demo-call.wav", help="where to write what the caller heard")
    demo.add_argument("--voice-backend", choices=("auto", "tone", "espeak"), default="auto")
    demo.add_argument("--ttfb-ms", type=float, default=90.0, help="emulated Cartesia time to first byte")

    sub.add_parser("loadtest", help="many simulated calls; JSON + HTML report (see `media-bridge loadtest --help`)",
                   add_help=False)

    sub.add_parser("chaos", help="faults, hostile peers and a drain in one run (see `media-bridge chaos --help`)",
                   add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "emulator":
        from bridge.cartesia.emulator.cli import main as emulator_main

        return emulator_main(rest)
    if args.command == "chaos":
        from bridge.chaos.cli import main as chaos_main

        return chaos_main(rest)
    if args.command == "loadtest":
        from bridge.loadtest import main as loadtest_main

        return loadtest_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from bridge.demo import run_demo

        configure_logging("WARNING")
        _install_uvloop()
        return asyncio.run(run_demo(args.wav, args.voice_backend, args.ttfb_ms))
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"media-bridge: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    _install_uvloop()
    return asyncio.run(_serve(config, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
