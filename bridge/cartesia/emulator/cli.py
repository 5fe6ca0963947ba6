"""``media-bridge emulator``: run the local Cartesia on a port.

``add_arguments`` and ``settings_from_args`` are shared with the load tester.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from ...logs import configure_logging
from .faults import FAULT_HELP, parse_faults
from .settings import VOICE_BACKENDS, EmulatorSettings
from .stt import add_stt_arguments, stt_settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's flags (everything but --host/--port)."""
    d = EmulatorSettings()
    g = parser.add_argument_group("Cartesia emulator")
    g.add_argument("--voice-backend", choices=VOICE_BACKENDS, default=d.voice_backend,
                   help="tone: deterministic tone bursts (pure Python); espeak: real speech (needs the 'speech' extra)")
    g.add_argument("--ttfb-ms", type=float, default=d.ttfb_ms, help="delay before the first chunk of each generation")
    g.add_argument("--rtf", type=float, default=d.rtf,
                   help="real-time factor of chunk pacing: chunks are chunk_ms*rtf apart (0 = no pacing, 0.1 = 10x real time)")
    g.add_argument("--chunk-ms", type=int, default=d.chunk_ms, help="audio per chunk, ms")
    g.add_argument("--pacing-slack-ms", type=float, default=d.pacing_slack_ms,
                   help="a paced chunk (not a first chunk) may leave this much early, batching wake-ups")
    g.add_argument("--words-per-s", type=float, default=None,
                   help="tone voice: every word lasts exactly 1/W s (word timestamps at W per second; "
                        "default: the voice's own timing, about 2.5/s); STT cannot decode such words")
    g.add_argument("--jitter-ms", type=float, default=d.jitter_ms, help="extra uniform(0, N) ms on TTFB and chunk gaps")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of all randomness (jitter, faults)")
    g.add_argument("--api-key", default=None,
                   help="require this key (Bearer, X-API-Key, ?api_key=, ?access_token=); others get 401")
    g.add_argument("--max-concurrency", type=int, default=None, help="active contexts; more → 429 concurrency_limited")
    g.add_argument("--max-connections", type=int, default=None, help="open WebSockets; more → HTTP 429 on upgrade")
    g.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s,
                   help="close idle sockets with 1000 'connection idle timeout'")
    g.add_argument("--cancel-stops-inflight", action="store_true",
                   help="on cancel, stop the generation in flight too (default: it runs to its end)")
    g.add_argument("--no-done-on-cancel", action="store_true", help="do not answer 'done' after a cancel")
    g.add_argument("--default-buffer-delay-ms", type=int, default=d.default_buffer_delay_ms,
                   help="max_buffer_delay_ms when a request gives none")
    g.add_argument("--record-contexts", type=int, default=d.record_contexts,
                   help="contexts whose audio is kept for GET /emulator/contexts/{id} (0 = none)")
    g.add_argument("--lenient-voices", action="store_true", help="unknown voice ids use the default voice instead of 400")
    g.add_argument("--fault", action="append", default=[], metavar="NAME=VALUE", help=FAULT_HELP)
    add_stt_arguments(parser)


def settings_from_args(ns: argparse.Namespace) -> EmulatorSettings:
    settings = EmulatorSettings(
        api_key=ns.api_key,
        voice_backend=ns.voice_backend,
        ttfb_ms=ns.ttfb_ms,
        rtf=ns.rtf,
        chunk_ms=ns.chunk_ms,
        pacing_slack_ms=ns.pacing_slack_ms,
        words_per_s=ns.words_per_s,
        jitter_ms=ns.jitter_ms,
        seed=ns.seed,
        max_concurrency=ns.max_concurrency,
        max_connections=ns.max_connections,
        idle_timeout_s=ns.idle_timeout_s,
        cancel_emits_inflight=not ns.cancel_stops_inflight,
        send_done_on_cancel=not ns.no_done_on_cancel,
        faults=parse_faults(ns.fault),
        record_contexts=ns.record_contexts,
        default_buffer_delay_ms=ns.default_buffer_delay_ms,
        strict_voices=not ns.lenient_voices,
        stt=stt_settings_from_args(ns),
    )
    settings.validate()
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="media-bridge emulator",
        description="A local Cartesia TTS (WebSocket /tts/websocket, POST /tts/bytes, /tts/sse, GET /voices).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop (auto = uvloop when importable)")
    add_arguments(parser)
    return parser


async def _serve(host: str, port: int, settings: EmulatorSettings) -> None:
    from .server import Emulator

    emulator = Emulator(settings)
    url = await emulator.start(host, port)
    print(f"Cartesia emulator listening on {url} (HTTP {emulator.http_url})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        settings = settings_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(ns.log_level)
    from .voices import EspeakUnavailable

    runner = asyncio.run
    if ns.loop != "asyncio":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            if ns.loop == "uvloop":
                parser.error("--loop uvloop: uvloop is not installed")
    try:
        runner(_serve(ns.host, ns.port, settings))
    except EspeakUnavailable as exc:
        print(f"error: {exc}")
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {ns.host}:{ns.port}: {exc}")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
