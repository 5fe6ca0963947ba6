"""The emulator's aiohttp application: one route table, start/stop, introspection.

Routes (``Emulator.route_table``):

* ``GET /tts/websocket``: the Cartesia TTS WebSocket (``connection``).
* ``POST /tts/bytes``, ``POST /tts/sse``: HTTP TTS (``http_tts``).
* ``GET /voices``, ``GET /voices/{id}``, ``…/{id}/preview``: the voice catalogue (``voices_api``).
* ``POST /access-token``: mints a short-lived token accepted as ``?access_token=``.
* ``GET /``: ``{"ok": true, "version": …}``.
* ``GET /emulator/stats``, ``GET /emulator/contexts/{context_id}``: introspection.

More routes (e.g. speech-to-text) join with one ``Emulator.add_route`` call
before ``start``/``app``; their handlers use ``Emulator.auth`` and
``httpapi.version_of`` like the built-in ones.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ...logs import log_event
from ..protocol import DEFAULT_VERSION
from .connection import MAX_MESSAGE_BYTES, Connection, Services, serve_websocket
from .http_tts import HttpTts
from .httpapi import Authenticator, http_error, json_response
from .settings import EmulatorSettings
from .state import ContextRecord, EmulatorState
from .stt import RecordingToneSynth, SttService
from .synth import Synthesizer
from .voices import EspeakSynth, ToneSynth, Voice
from .voices_api import VoicesApi

logger = logging.getLogger("bridge.cartesia.emulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (HTTP method, path, handler).
Route = tuple[str, str, Handler]


class Emulator:
    """A local Cartesia TTS server, embeddable on the caller's event loop.

    Limits come from ``EmulatorSettings`` (connections, contexts, records);
    counters and records live in ``state`` (``EmulatorState``).
    """

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self.settings.validate()
        #: Loaded at construction so a broken espeak fails at start, clearly.
        self.synth = Synthesizer(self.settings.voice_backend, strict_voices=self.settings.strict_voices)
        self.state = EmulatorState(self.settings.record_contexts, self.settings.received_cap)
        self.auth = Authenticator(self.settings.api_key)
        # /stt/websocket; its vocabulary hears every word the tone voices render.
        self.stt = SttService(self.settings, self.auth.check)
        self.synth.tone = RecordingToneSynth(self.stt.vocabulary)
        self.synth.tone.words_per_s = self.settings.words_per_s
        self.services = Services(self.settings, self.state, self.synth)
        self.http_tts = HttpTts(self.services, self.auth)
        self.voices_api = VoicesApi(self.synth, self.auth)
        self.live: dict[int, Connection] = {}
        self.extra_routes: list[Route] = []
        self.next_connection_id = 0
        self.runner: web.AppRunner | None = None
        self.application: web.Application | None = None
        self.url: str | None = None
        self.http_url: str | None = None

    # ------------------------------------------------------------ routes

    def route_table(self) -> list[Route]:
        """Every route the app serves, built-in ones first, then ``add_route``'s."""
        return [
            ("GET", "/", self.root),
            ("GET", "/tts/websocket", self.tts_websocket),
            ("POST", "/tts/bytes", self.http_tts.tts_bytes),
            ("POST", "/tts/sse", self.http_tts.tts_sse),
            ("GET", "/voices", self.voices_api.list_voices),
            ("GET", "/voices/", self.voices_api.list_voices),
            ("GET", "/voices/{voice_id}", self.voices_api.get_voice),
            ("GET", "/voices/{voice_id}/preview", self.voices_api.preview),
            ("POST", "/access-token", self.access_token),
            ("GET", "/emulator/stats", self.stats_route),
            ("GET", "/emulator/contexts/{context_id}", self.context_route),
            *self.extra_routes,
        ]

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``handler`` at ``method path`` too; call before ``app()``/``start()``."""
        if self.application is not None:
            raise RuntimeError("add_route after the app was built: add routes before start()")
        self.extra_routes.append((method, path, handler))

    def app(self) -> web.Application:
        if self.application is None:
            app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
            for method, path, handler in self.route_table():
                app.router.add_route(method, path, handler)
            self.stt.add_routes(app)
            app.on_shutdown.append(self.on_shutdown)
            self.application = app
        return self.application

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = ephemeral); return ``ws://host:PORT``."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self.runner = runner
        real_port = next((addr[1] for addr in runner.addresses if isinstance(addr, tuple)), port)
        self.url = f"ws://{host}:{real_port}"
        self.http_url = f"http://{host}:{real_port}"
        log_event(logger, "emulator_started", url=self.url, voice_backend=self.settings.voice_backend,
                  auth_required=self.settings.api_key is not None)
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.synth.close()

    async def on_shutdown(self, app: web.Application) -> None:
        for conn in list(self.live.values()):
            conn.close_all()
            if not conn.ws.closed:
                await conn.ws.close(code=1001, message=b"server shutting down")

    # -------------------------------------------------------- introspection

    @property
    def connections(self) -> list[Connection]:
        """Open WebSocket connections."""
        return list(self.live.values())

    @property
    def records(self) -> list[ContextRecord]:
        """Recorded contexts in creation order (at most ``record_contexts``, oldest evicted)."""
        return list(self.state.records.values())

    def context_record(self, context_id: str) -> ContextRecord | None:
        return self.state.records.get(context_id)

    def produced_audio(self, context_id: str) -> bytes | None:
        rec = self.state.records.get(context_id)
        return bytes(rec.audio) if rec is not None else None

    @property
    def received(self) -> Any:
        """(connection id, JSON) of the last client messages (``received_cap`` kept)."""
        return self.state.received

    @property
    def handshakes(self) -> int:
        return self.state.handshakes

    @property
    def active_contexts(self) -> int:
        return self.state.active_contexts

    @property
    def chunks_total(self) -> int:
        return self.state.chunks_total

    @property
    def voices(self) -> dict[str, Voice]:
        return self.synth.voices

    @property
    def tone(self) -> ToneSynth:
        return self.synth.tone

    @property
    def espeak(self) -> EspeakSynth | None:
        return self.synth.espeak

    def voice_for(self, voice_id: str, context_id: str | None) -> Voice:
        return self.synth.voice_for(voice_id, context_id)

    def lateness_ms(self, *, first_chunks: bool = False) -> dict[str, float | int | None]:
        """Send time minus scheduled time of chunks (or of first chunks only): n, p50/p99/max, ms."""
        return self.state.lateness_ms(first_chunks=first_chunks)

    def reset_lateness(self) -> None:
        self.state.reset_lateness()

    def stats(self) -> dict[str, Any]:
        tone = self.synth.tone
        return {
            **self.state.snapshot(),
            "tone_cache": {"hits": tone.cache_hits, "misses": tone.cache_misses},
            "voice_backend": self.settings.voice_backend,
        }

    # --------------------------------------------------------------- handlers

    async def tts_websocket(self, request: web.Request) -> web.StreamResponse:
        rules = self.auth.admit(request)
        if isinstance(rules, web.Response):
            return rules
        version = rules.version
        limit = self.settings.max_connections
        if limit is not None and self.state.active_connections >= limit:
            self.state.rejected_connections += 1
            return http_error(429, f"Too many WebSocket connections (limit {limit}).",
                              "connection_limited", "Too many connections", version)
        self.next_connection_id += 1
        return await serve_websocket(self.services, request, self.next_connection_id, rules, self.live)

    async def access_token(self, request: web.Request) -> web.Response:
        version = self.auth.admit_any_version(request)
        if isinstance(version, web.Response):
            return version
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            body = {}
        expires = body.get("expires_in", 60) if isinstance(body, dict) else 60
        seconds = float(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else 60.0
        return json_response({"token": self.auth.mint_token(seconds)})

    async def root(self, request: web.Request) -> web.Response:
        return json_response({"ok": True, "version": DEFAULT_VERSION, "emulator": True})

    async def stats_route(self, request: web.Request) -> web.Response:
        """``GET /emulator/stats`` (``?reset=1`` clears the lateness samples after reading)."""
        stats = self.stats()
        if request.query.get("reset") in ("1", "true"):
            self.reset_lateness()
        return json_response(stats)

    async def context_route(self, request: web.Request) -> web.Response:
        rec = self.state.records.get(request.match_info["context_id"])
        if rec is None:
            return http_error(404, "context not recorded", "not_found", "Not found", DEFAULT_VERSION)
        return json_response(rec.to_json())
