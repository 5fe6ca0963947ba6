"""``media-bridge``: serve | emulator | demo | loadtest | chaos."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
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


#: A worker adds its calls' batched counts to the shared metric files this often (seconds), so a
#: scrape answered by a sibling is at most this stale for this worker's live calls.
WORKER_METRICS_FLUSH_S = 1.0


async def _flush_metrics_periodically(hooks: list[Callable[[], Any]]) -> None:
    while True:
        await asyncio.sleep(WORKER_METRICS_FLUSH_S)
        for hook in hooks:
            hook()


async def _serve(config: Config, host: str, port: int, worker_index: int | None = None,
                 shared_socket: socket.socket | None = None) -> int:
    """One bridge process: the whole bridge, or worker ``worker_index`` of ``serve --workers N``
    (listening on ``shared_socket``, bound with ``SO_REUSEPORT``)."""
    from aiohttp import web

    from bridge.registry import CallRegistry
    from bridge.server import BridgeServer
    from bridge.session import CallSession

    registry: CallRegistry[CallSession] | None = None
    if worker_index is not None:
        from bridge.shared_registry import SharedCallRegistry
        from bridge.workers import SHARED_DIR_ENV

        registry = SharedCallRegistry(Path(os.environ[SHARED_DIR_ENV]), max_entries=2 * config.max_calls)
    server = BridgeServer(config, registry=registry)
    runner = server.make_runner(handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    # Workers share the port (SO_REUSEPORT): the kernel spreads new connections over their sockets.
    site: web.BaseSite = (web.SockSite(runner, shared_socket, backlog=1024) if shared_socket is not None
                          else web.TCPSite(runner, host, port, backlog=1024))
    await site.start()
    flusher = None
    if worker_index is not None:
        flusher = asyncio.get_running_loop().create_task(
            _flush_metrics_periodically(server.metrics.before_render), name="metrics-flush")
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
    if flusher is not None:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
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
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT), one per core; MAX_CALLS, "
                            "CARTESIA_MAX_CONCURRENCY and CARTESIA_STT_MAX_CONCURRENCY are shared out among them "
                            "(default 1: one process, no supervisor)")
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor

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
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    configure_logging(config.log_level)
    if args.worker_index is not None:
        from bridge.workers import SHARED_DIR_ENV

        if not os.environ.get(SHARED_DIR_ENV):
            parser.error("--worker-index is set by `serve --workers N` for its workers only")
        return _run_worker(config, args.host, args.port, args.worker_index)
    if args.workers > 1:
        from bridge.workers import Supervisor

        return Supervisor(config, args.workers, args.host, args.port).run()
    # One process: metrics stay in memory, whatever the environment says.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    _install_uvloop()
    return asyncio.run(_serve(config, args.host, args.port))


def _run_worker(config: Config, host: str, port: int, worker_index: int) -> int:
    """Worker ``worker_index`` of ``serve --workers N`` (started by the supervisor, bridge/workers.py)."""
    from bridge.workers import bind_shared_port

    _tag_log_lines(worker_index)
    # Bound before the heavy imports and start-up, so a port held by another program fails at once
    # (no Cartesia sockets opened for nothing); it listens only once started, so no connection
    # reaches a cold worker.
    try:
        shared_socket = bind_shared_port(host, port)
    except OSError as exc:
        log_event(log, "worker_bind_failed", logging.ERROR, host=host, port=port, error=str(exc))
        return 1
    _install_uvloop()
    return asyncio.run(_serve(config, host, port, worker_index, shared_socket))


def _tag_log_lines(worker_index: int) -> None:
    """Every log line of a worker says which worker wrote it (``worker``, ``worker_pid``)."""
    pid = os.getpid()

    def tag(record: logging.LogRecord) -> bool:
        record.worker = worker_index
        record.worker_pid = pid
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


if __name__ == "__main__":
    sys.exit(main())
