"""The emulator's aiohttp application: WebSocket, HTTP TTS, voices, introspection.

Routes:

* ``GET /tts/websocket`` — the Cartesia TTS WebSocket (see ``engine``).
* ``POST /tts/bytes`` — audio body (``raw`` or ``wav``; ``mp3`` → 400, no encoder).
* ``POST /tts/sse`` — Server-Sent Events: ``chunk`` (base64), ``timestamps``,
  ``phoneme_timestamps``, then ``done``.
* ``GET /voices``, ``GET /voices/{id}`` — the emulator's voice catalogue.
* ``POST /access-token`` — mints a short-lived token accepted as ``?access_token=``.
* ``GET /`` — ``{"ok": true, "version": …}``.
* ``GET /emulator/stats``, ``GET /emulator/contexts/{context_id}`` — introspection.

Auth: ``Authorization: Bearer``, ``X-API-Key``, ``?api_key=``, ``?access_token=``.
Without ``settings.api_key`` anything (even nothing) is accepted; with it,
anything else is answered 401 before the upgrade. Keys are never logged.
Version: ``?cartesia_version=`` first, then the ``Cartesia-Version`` header.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import struct
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from ...logs import log_event
from ..protocol import (
    DEFAULT_VERSION,
    Chunk,
    Done,
    ErrorMessage,
    GenerationRequest,
    OutputFormat,
    PhonemeTimestamps,
    RequestError,
    WordTimestamps,
    encode_server_message,
    parse_http_tts_request,
    uses_structured_errors,
)
from .engine import OUTBOX_HIGH_WATER, Connection, Context, ContextRecord
from .settings import EmulatorSettings, valid_model
from .stt import RecordingToneSynth, SttService
from .voices import EspeakSynth, Rendered, ToneSynth, Voice, catalogue

logger = logging.getLogger("bridge.cartesia.emulator")

#: Max size of one client WebSocket message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Lateness samples kept for stats (chunks; oldest dropped).
LATENESS_CAP = 200_000

_WAV_FORMAT_TAGS = {"pcm_s16le": 1, "pcm_f32le": 3, "pcm_alaw": 6, "pcm_mulaw": 7}
_CONTENT_TYPES = {"wav": "audio/wav", "raw": "application/octet-stream"}


def wav_header(fmt: OutputFormat, data_len: int) -> bytes:
    """A 44-byte RIFF/WAVE header for ``data_len`` bytes of ``fmt`` audio."""
    bps = fmt.bytes_per_sample
    return b"RIFF" + struct.pack("<I", 36 + data_len) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, _WAV_FORMAT_TAGS[fmt.encoding], 1, fmt.sample_rate, fmt.sample_rate * bps, bps, bps * 8
    ) + b"data" + struct.pack("<I", data_len)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]


class Emulator:
    """A local Cartesia TTS server, embeddable on the caller's event loop."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self.settings.validate()
        self.stt = SttService(self.settings, self._authorize)  # /stt/websocket; its vocabulary hears self.tone
        self.tone: ToneSynth = RecordingToneSynth(self.stt.vocabulary)
        #: Loaded at construction so a broken espeak fails at start, clearly.
        self.espeak: EspeakSynth | None = EspeakSynth() if self.settings.voice_backend == "espeak" else None
        self.voices: dict[str, Voice] = catalogue(self.settings.voice_backend)
        self.default_voice = next(iter(self.voices.values()))
        self.handshakes = 0
        self.active_connections = 0
        self.active_contexts = 0
        self.contexts_total = 0
        self.chunks_total = 0
        self.rejected_connections = 0
        self.received: deque[tuple[int, Any]] = deque(maxlen=self.settings.received_cap)
        self._records: OrderedDict[str, ContextRecord] = OrderedDict()
        self._lateness: deque[float] = deque(maxlen=LATENESS_CAP)
        #: The same, for first chunks only: how far the emulator's TTFB overshot its setting.
        self._first_lateness: deque[float] = deque(maxlen=LATENESS_CAP)
        self._connections: dict[int, Connection] = {}
        self._next_conn_id = 0
        self._tokens: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        self._http_tasks: set[asyncio.Task[Any]] = set()
        self.url: str | None = None
        self.http_url: str | None = None

    # ------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        if self._app is None:
            app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
            app.router.add_get("/", self._root)
            app.router.add_get("/tts/websocket", self._ws_handler)
            app.router.add_post("/tts/bytes", self._tts_bytes)
            app.router.add_post("/tts/sse", self._tts_sse)
            app.router.add_get("/voices", self._list_voices)
            app.router.add_get("/voices/", self._list_voices)
            app.router.add_get("/voices/{voice_id}", self._get_voice)
            app.router.add_post("/access-token", self._access_token)
            app.router.add_get("/emulator/stats", self._stats)
            app.router.add_get("/emulator/contexts/{context_id}", self._context)
            self.stt.add_routes(app)
            app.on_shutdown.append(self._on_shutdown)
            self._app = app
        return self._app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = ephemeral); return ``ws://host:PORT``."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        real_port = sockets[0].getsockname()[1] if sockets else port
        self.url = f"ws://{host}:{real_port}"
        self.http_url = f"http://{host}:{real_port}"
        log_event(logger, "emulator_started", url=self.url, voice_backend=self.settings.voice_backend,
                  auth_required=self.settings.api_key is not None)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.espeak is not None:
            self.espeak.close()
            self.espeak = None

    async def _on_shutdown(self, app: web.Application) -> None:
        for conn in list(self._connections.values()):
            conn.close_all()
            if not conn.ws.closed:
                await conn.ws.close(code=1001, message=b"server shutting down")
        for task in list(self._http_tasks):
            task.cancel()

    # -------------------------------------------------------- introspection

    def produced_audio(self, context_id: str) -> bytes | None:
        rec = self._records.get(context_id)
        return bytes(rec.audio) if rec is not None else None

    def context_record(self, context_id: str) -> ContextRecord | None:
        return self._records.get(context_id)

    @property
    def records(self) -> list[ContextRecord]:
        """Recorded contexts in creation order (at most ``record_contexts``, oldest evicted)."""
        return list(self._records.values())

    def lateness_ms(self, *, first_chunks: bool = False) -> dict[str, float | None]:
        """Send time minus scheduled time of chunks (or of first chunks only): p50/p99/max, ms."""
        values = list(self._first_lateness if first_chunks else self._lateness)
        return {
            "p50": _ms(_percentile(values, 0.5)),
            "p99": _ms(_percentile(values, 0.99)),
            "max": _ms(max(values) if values else None),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "handshakes": self.handshakes,
            "active_connections": self.active_connections,
            "active_contexts": self.active_contexts,
            "contexts_total": self.contexts_total,
            "chunks_total": self.chunks_total,
            "rejected_connections": self.rejected_connections,
            "received": len(self.received),
            "recorded_contexts": len(self._records),
            "chunk_lateness_ms": self.lateness_ms(),
            "first_chunk_lateness_ms": self.lateness_ms(first_chunks=True),
            "tone_cache": {"hits": self.tone.cache_hits, "misses": self.tone.cache_misses},
            "voice_backend": self.settings.voice_backend,
        }

    def reset_lateness(self) -> None:
        self._lateness.clear()
        self._first_lateness.clear()

    # ------------------------------------------------- engine callbacks (sync)

    def _new_record(self, ctx: Context, req: GenerationRequest) -> ContextRecord | None:
        cap = self.settings.record_contexts
        if cap <= 0:
            return None
        rec = ContextRecord(ctx.id, ctx.conn.id, req.model_id, ctx.voice.id, req.output_format)
        self._records[ctx.id] = rec
        self._records.move_to_end(ctx.id)
        while len(self._records) > cap:
            self._records.popitem(last=False)
        return rec

    def _context_started(self, ctx: Context) -> None:
        self.active_contexts += 1
        self.contexts_total += 1

    def _context_finished(self, ctx: Context) -> None:
        self.active_contexts -= 1
        if ctx.record is not None:
            ctx.record.finished_at = time.time()

    def _chunk_sent(self, lateness: float, *, first: bool = False) -> None:
        self.chunks_total += 1
        self._lateness.append(lateness)
        if first:
            self._first_lateness.append(lateness)

    def _received(self, conn_id: int, obj: Any) -> None:
        self.received.append((conn_id, obj))

    def voice_for(self, voice_id: str, context_id: str | None) -> Voice:
        voice = self.voices.get(voice_id)
        if voice is None:
            if not self.settings.strict_voices:
                return self.default_voice
            raise RequestError(
                f"voice {voice_id!r} not found (GET /voices lists the emulator's voices)",
                field="voice", context_id=context_id, error_code="voice_not_found", title="Invalid voice",
            )
        return voice

    async def render(self, text: str, fmt: OutputFormat, voice: Voice, req: GenerationRequest) -> Rendered:
        gc = req.generation_config or {}
        speed = float(gc.get("speed", 1.0)) * {"slow": 0.8, "fast": 1.25}.get(req.speed or "", 1.0)
        volume = float(gc.get("volume", 1.0))
        if not text.strip():
            return Rendered(b"", 0)
        if voice.backend == "espeak" and self.espeak is not None:
            return await self.espeak.render(text, fmt, voice, speed=speed, volume=volume,
                                            phonemes=req.add_phoneme_timestamps)
        return self.tone.render(text, fmt, voice, speed=speed, volume=volume, phonemes=req.add_phoneme_timestamps)

    # ---------------------------------------------------------------- auth

    def _authorize(self, request: web.Request, version: str) -> web.Response | None:
        expected = self.settings.api_key
        if expected is None:
            return None
        presented: list[str] = []
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            presented.append(auth[7:].strip())
        for value in (request.headers.get("X-API-Key"), request.query.get("api_key"),
                      request.query.get("access_token")):
            if value:
                presented.append(value)
        now = time.monotonic()
        for key in presented:
            if secrets.compare_digest(key.encode(), expected.encode()):
                return None
            exp = self._tokens.get(key)
            if exp is not None and exp > now:
                return None
        log_event(logger, "emulator_auth_rejected", path=request.path, presented=len(presented))
        return _http_error(401, "Invalid or missing API key.", "unauthorized", "Unauthorized", version)

    # ------------------------------------------------------------ WebSocket

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        version = _version(request)
        denied = self._authorize(request, version)
        if denied is not None:
            return denied
        limit = self.settings.max_connections
        if limit is not None and self.active_connections >= limit:
            self.rejected_connections += 1
            return _http_error(429, f"Too many WebSocket connections (limit {limit}).",
                               "connection_limited", "Too many connections", version)
        # compress=False: frames are written pre-built (see Connection.run_scheduler).
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=True, compress=False)
        self.active_connections += 1
        try:
            await ws.prepare(request)
        except BaseException:
            self.active_connections -= 1
            raise
        self.handshakes += 1
        self._next_conn_id += 1
        conn = Connection(self, ws, self._next_conn_id, version)
        transport = request.transport
        # uvloop's transports are not asyncio.Transport subclasses; what matters is the interface.
        conn.transport = transport if hasattr(transport, "get_write_buffer_size") else None
        self._connections[conn.id] = conn
        conn.scheduler = asyncio.create_task(conn.run_scheduler(), name=f"emulator-conn-{conn.id}")
        log_event(logger, "emulator_connection_open", connection_id=conn.id, version=version)
        loop = asyncio.get_running_loop()
        idle = self.settings.idle_timeout_s
        reason = "client closed"
        try:
            while True:
                timeout = max(0.005, conn.last_activity + idle - loop.time())
                try:
                    msg = await ws.receive(timeout=timeout)
                except TimeoutError:
                    if conn.scheduler.done():
                        reason = "server closed"
                        break
                    if loop.time() - conn.last_activity >= idle and not conn.has_work():
                        reason = "idle timeout"
                        await ws.close(code=1000, message=b"connection idle timeout")
                        break
                    continue
                if msg.type == WSMsgType.TEXT:
                    conn.handle_text(msg.data)
                    if len(conn.outbox) > OUTBOX_HIGH_WATER:
                        await conn.wait_drained()
                elif msg.type == WSMsgType.BINARY:
                    conn.last_activity = loop.time()
                    conn.emit_error(ErrorMessage(None, 400, "binary frames are not supported; send JSON text",
                                                 "invalid_request", "Invalid request"))
                else:  # CLOSE, CLOSING, CLOSED, ERROR
                    break
        finally:
            conn.close_all()
            conn.scheduler.cancel()
            try:
                await conn.scheduler
            except (asyncio.CancelledError, Exception):
                pass
            if not ws.closed:
                await ws.close()
            self._connections.pop(conn.id, None)
            self.active_connections -= 1
            log_event(logger, "emulator_connection_closed", connection_id=conn.id, reason=reason,
                      chunks=conn.chunks_sent)
        return ws

    # ----------------------------------------------------------------- HTTP

    async def _parse_http(self, request: web.Request, version: str) -> tuple[GenerationRequest, Voice] | web.Response:
        denied = self._authorize(request, version)
        if denied is not None:
            return denied
        try:
            body = await request.json(loads=orjson.loads)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _http_error(400, f"invalid JSON body: {exc}", "invalid_json", "Invalid JSON", version)
        try:
            req = parse_http_tts_request(body)
            if not valid_model(req.model_id):
                raise RequestError(f"Invalid model: model_id {req.model_id!r} is not a valid model ID",
                                   field="model_id", error_code="model_not_found", title="Invalid model")
            voice = self.voice_for(req.voice_id, None)
        except RequestError as err:
            return _http_error(err.status_code, err.message, err.error_code, err.title, version)
        if req.output_format.container == "mp3":
            return _http_error(400, "output_format.container 'mp3' is not supported by the emulator "
                               "(no MP3 encoder); use raw or wav", "invalid_request", "Invalid request", version)
        limit = self.settings.max_concurrency
        if limit is not None and self.active_contexts >= limit:
            return _http_error(429, "You have exceeded your plan's concurrency limit.",
                               "concurrency_limited", "Too many concurrent requests", version)
        return req, voice

    async def _paced(self, rendered: Rendered, fmt: OutputFormat) -> Any:
        """Yield (start_byte, chunk) with the latency model applied (TTFB, RTF)."""
        s = self.settings
        if s.ttfb_ms:
            await asyncio.sleep(s.ttfb_ms / 1000.0)
        step = max(fmt.bytes_per_sample, s.chunk_ms * fmt.sample_rate // 1000 * fmt.bytes_per_sample)
        audio = rendered.audio
        loop = asyncio.get_running_loop()
        due = loop.time()
        for pos in range(0, len(audio), step):
            data = audio[pos : pos + step]
            yield pos, data
            if s.rtf:
                due += len(data) / fmt.bytes_per_second * s.rtf
                await asyncio.sleep(max(0.0, due - loop.time()))

    async def _tts_bytes(self, request: web.Request) -> web.StreamResponse:
        version = _version(request)
        parsed = await self._parse_http(request, version)
        if isinstance(parsed, web.Response):
            return parsed
        req, voice = parsed
        fmt = req.output_format
        self.active_contexts += 1
        self.contexts_total += 1
        try:
            rendered = await self.render(req.transcript, fmt, voice, req)
            resp = web.StreamResponse(headers={"Content-Type": _CONTENT_TYPES[fmt.container]})
            extra = 44 if fmt.container == "wav" else 0
            resp.content_length = len(rendered.audio) + extra
            await resp.prepare(request)
            if fmt.container == "wav":
                await resp.write(wav_header(fmt, len(rendered.audio)))
            async for _, data in self._paced(rendered, fmt):
                await resp.write(data)
            await resp.write_eof()
            return resp
        finally:
            self.active_contexts -= 1

    async def _tts_sse(self, request: web.Request) -> web.StreamResponse:
        version = _version(request)
        parsed = await self._parse_http(request, version)
        if isinstance(parsed, web.Response):
            return parsed
        req, voice = parsed
        fmt = req.output_format
        if fmt.container != "raw":
            return _http_error(400, "output_format.container must be 'raw' for SSE", "invalid_request",
                               "Invalid request", version)
        ctx_id = req.context_id or None
        self.active_contexts += 1
        self.contexts_total += 1
        try:
            rendered = await self.render(req.transcript, fmt, voice, req)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            rate, bps = fmt.sample_rate, fmt.bytes_per_sample
            wi = pi = 0
            for_ts = ctx_id or ""
            async for pos, data in self._paced(rendered, fmt):
                await resp.write(_sse(Chunk(for_ts, base64.b64encode(data).decode("ascii"), 0.0), ctx_id, version))
                upto = (pos + len(data)) // bps
                if req.add_timestamps:
                    words = [w for w in rendered.words[wi:] if w[1] < upto]
                    if words:
                        wi += len(words)
                        await resp.write(_sse(WordTimestamps(for_ts, [w[0] for w in words], [w[1] / rate for w in words],
                                                             [w[2] / rate for w in words]), ctx_id, version))
                if req.add_phoneme_timestamps:
                    phons = [p for p in rendered.phonemes[pi:] if p[1] < upto]
                    if phons:
                        pi += len(phons)
                        await resp.write(_sse(PhonemeTimestamps(for_ts, [p[0] for p in phons], [p[1] / rate for p in phons],
                                                                [p[2] / rate for p in phons]), ctx_id, version))
            await resp.write(_sse(Done(for_ts), ctx_id, version))
            await resp.write_eof()
            return resp
        finally:
            self.active_contexts -= 1

    async def _list_voices(self, request: web.Request) -> web.Response:
        version = _version(request)
        denied = self._authorize(request, version)
        if denied is not None:
            return denied
        voices = list(self.voices.values())
        ids = [v.id for v in voices]
        try:
            limit = max(1, min(100, int(request.query.get("limit", "10"))))
        except ValueError:
            return _http_error(400, "limit must be an integer in [1, 100]", "invalid_request", "Invalid request", version)
        after, before = request.query.get("starting_after"), request.query.get("ending_before")
        if after:
            start = ids.index(after) + 1 if after in ids else len(ids)
            page = voices[start : start + limit]
            has_more = start + limit < len(voices)
        elif before:
            end = ids.index(before) if before in ids else 0
            page = voices[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            page = voices[:limit]
            has_more = limit < len(voices)
        data = [v.to_api() for v in page]
        return web.json_response({"data": data, "has_more": has_more, "next_page": data[-1]["id"] if has_more else None},
                                 dumps=_dumps)

    async def _get_voice(self, request: web.Request) -> web.Response:
        version = _version(request)
        denied = self._authorize(request, version)
        if denied is not None:
            return denied
        voice = self.voices.get(request.match_info["voice_id"])
        if voice is None:
            return _http_error(404, "Voice not found", "not_found", "Not found", version)
        return web.json_response(voice.to_api(), dumps=_dumps)

    async def _access_token(self, request: web.Request) -> web.Response:
        version = _version(request)
        denied = self._authorize(request, version)
        if denied is not None:
            return denied
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            body = {}
        expires = body.get("expires_in", 60) if isinstance(body, dict) else 60
        expires = float(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else 60.0
        token = "emu_tok_" + secrets.token_urlsafe(18)
        self._tokens[token] = time.monotonic() + max(1.0, min(expires, 3600.0))
        if len(self._tokens) > 10000:
            now = time.monotonic()
            self._tokens = {k: v for k, v in self._tokens.items() if v > now}
        return web.json_response({"token": token}, dumps=_dumps)

    async def _root(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": DEFAULT_VERSION, "emulator": True}, dumps=_dumps)

    async def _stats(self, request: web.Request) -> web.Response:
        """``GET /emulator/stats`` (``?reset=1`` clears the lateness samples after reading)."""
        stats = self.stats()
        if request.query.get("reset") in ("1", "true"):
            self.reset_lateness()
        return web.json_response(stats, dumps=_dumps)

    async def _context(self, request: web.Request) -> web.Response:
        rec = self._records.get(request.match_info["context_id"])
        if rec is None:
            return _http_error(404, "context not recorded", "not_found", "Not found", DEFAULT_VERSION)
        return web.json_response(rec.to_json(), dumps=_dumps)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _version(request: web.Request) -> str:
    return request.query.get("cartesia_version") or request.headers.get("Cartesia-Version") or DEFAULT_VERSION


def _http_error(status: int, message: str, code: str | None, title: str | None, version: str) -> web.Response:
    """JSON error body: structured (≥2026-03-01) or legacy ``{"error": …}`` by version."""
    body: dict[str, Any]
    if uses_structured_errors(version):
        body = {"error_code": code, "title": title or "Error", "message": message,
                "request_id": str(uuid.uuid4()), "status_code": status}
    else:
        body = {"error": f"{title}: {message}" if title else message, "status_code": status}
    return web.json_response(body, status=status, dumps=_dumps)


def _sse(msg: Any, ctx_id: str | None, version: str) -> bytes:
    obj = encode_server_message(msg, version)
    if ctx_id is None:
        obj.pop("context_id", None)
    kind = str(obj["type"])
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"
