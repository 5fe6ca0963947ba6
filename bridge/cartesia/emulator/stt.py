"""The emulator's Cartesia STT WebSocket (``GET /stt/websocket``): hears its own tone voices.

Wire protocol as Cartesia's (codec: ``bridge.cartesia.stt_protocol``):

* Handshake query: ``model``, ``language``, ``encoding``, ``sample_rate`` (required),
  ``min_volume``, ``max_silence_duration_secs``, ``keyterm`` (repeated). Auth and
  ``Cartesia-Version`` exactly as the emulator's TTS socket (``Emulator._authorize``).
  Bad parameters → HTTP 400 before the upgrade; over ``SttSettings.max_concurrency``
  open STT sockets → HTTP 429 (counted apart from TTS, as Cartesia does).
* Binary frames: audio in ``encoding`` at ``sample_rate`` (any split points).
  Interim ``transcript`` (``is_final`` false, the words of the current segment so far)
  each time a word is recognised.
* TEXT ``finalize`` → a final ``transcript`` (``text`` = what was said since the last
  final, with a leading space when something was said before it, so the finals
  concatenate; ``words`` with start/end seconds from the start of the socket's audio;
  ``duration`` = seconds of audio in the segment), then ``flush_done``.
  TEXT ``close`` → a final transcript if anything is pending, ``done``, close (1000).
  Anything else → ``error`` (400) and the socket carries on.
* ``max_silence_duration_secs``: the segment is finalized by the server after that much
  silence (audio time) following speech (ink-whisper endpointing; no ``flush_done``).
* Idle: no audio for ``SttSettings.idle_timeout_s`` (Cartesia: 3 minutes) → close 1000
  ``connection idle timeout``.
* ``GET /stt/turns/websocket`` (``ink-2``, automatic turns): ``connected``, then
  ``turn.start`` / ``turn.update`` / ``turn.end`` (see ``SttTurnSession``); commands are
  JSON ``{"type":"close"}`` and ``{"type":"config","turn":{...}}``.

Only the emulator's tone voices are recognised (``recognizer``); the vocabulary is
what they rendered in this emulator (``RecordingToneSynth``) plus built-in words.

Faults (``--fault`` for TTS and STT alike, or ``--stt-fault`` for STT alone), by the
socket's key ``stt-<n>`` (n-th handshake) under the emulator's seed:
``close-after-chunks=N`` closes the socket (1011) after its N-th transcript;
``reject-429=P`` answers a fraction P of handshakes HTTP 429; ``no-done=P``: a fraction
P of sockets never get ``flush_done`` nor ``done``; ``delay-ms=MS[:P]`` holds a fraction
P of transcripts MS ms (order kept: later messages wait behind it). On the turns socket
``turn.update``/``turn.end`` count as transcripts and ``no-done`` has nothing to drop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from ...logs import log_event
from ..protocol import DEFAULT_VERSION, OutputFormat, uses_structured_errors
from ..stt_protocol import (
    CLOSE,
    STT_PATH,
    STT_TURNS_PATH,
    SttDone,
    SttError,
    SttFlushDone,
    SttParams,
    SttProtocolError,
    SttServerMessage,
    SttTranscript,
    SttTurnConfig,
    SttTurnEvent,
    SttWord,
    encode_stt_server_message,
    parse_stt_client_text,
    parse_stt_params,
    parse_stt_turn_config,
    parse_stt_turns_client_text,
)
from .faults import FAULT_HELP, FaultSettings, context_seed, hits, parse_faults
from .recognizer import DEFAULT_MIN_RMS, RecognizedWord, StreamingRecognizer, Vocabulary
from .rendered import Rendered
from .settings import EmulatorSettings, SttSettings
from .voices import ToneSynth, Voice

logger = logging.getLogger("bridge.cartesia.emulator.stt")

#: Largest binary (audio) frame accepted; a 20 ms frame is 160 bytes of μ-law.
MAX_AUDIO_FRAME_BYTES: Final = 1 << 20
#: Words per segment before the server finalizes by itself (bounds the pending bursts).
MAX_SEGMENT_WORDS: Final = 500
STATS_PATH: Final = "/emulator/stt/stats"
#: /stt/turns/websocket: silence (ms, audio time) after the last word that ends a turn, capped
#: by the client's ``turn_end_timeout_ms`` (a tone voice's end is certain: no end-of-turn model).
TURN_END_SILENCE_MS: Final = 640.0

Authorize = Callable[[web.Request, str], "web.Response | None"]


def add_stt_arguments(parser: argparse.ArgumentParser) -> None:
    d = SttSettings()
    g = parser.add_argument_group("Cartesia emulator: STT (/stt/websocket)")
    g.add_argument("--stt-max-concurrency", type=int, default=None, help="open STT sockets; more → HTTP 429")
    g.add_argument("--stt-idle-timeout-s", type=float, default=d.idle_timeout_s,
                   help="close an STT socket after this long without audio")
    g.add_argument("--stt-fault", action="append", default=None, metavar="NAME=VALUE",
                   help="STT-only faults (default: the --fault ones); chunks count transcripts. " + FAULT_HELP)


def stt_settings_from_args(ns: argparse.Namespace) -> SttSettings:
    settings = SttSettings(
        max_concurrency=ns.stt_max_concurrency, idle_timeout_s=ns.stt_idle_timeout_s,
        faults=parse_faults(ns.stt_fault) if ns.stt_fault else None,
    )
    settings.validate()
    return settings


class RecordingToneSynth(ToneSynth):
    """``ToneSynth`` that adds every token it renders to ``vocabulary`` (what STT can hear)."""

    def __init__(self, vocabulary: Vocabulary, cache_size: int = 4096) -> None:
        super().__init__(cache_size)
        self.vocabulary = vocabulary

    def render(self, text: str, fmt: OutputFormat, voice: Voice, *, speed: float = 1.0, volume: float = 1.0,
               phonemes: bool = False) -> Rendered:
        self.vocabulary.add_rendered(text)
        return super().render(text, fmt, voice, speed=speed, volume=volume, phonemes=phonemes)


class SttSession:
    """One STT socket's protocol state (no I/O): audio and commands in, messages out."""

    def __init__(self, params: SttParams, vocabulary: Vocabulary, request_id: str) -> None:
        self.params = params
        self.request_id = request_id
        min_rms = DEFAULT_MIN_RMS if params.min_volume is None else max(1, round(params.min_volume * 32768))
        self.recognizer = StreamingRecognizer(vocabulary, params.sample_rate, params.encoding, min_rms,
                                              max_pending=MAX_SEGMENT_WORDS)
        self.segment_start = 0  # stream sample where the current segment began
        self.said_before = False
        self.last_interim: list[str] = []
        self.finals = 0
        self.words_total = 0

    @property
    def audio_s(self) -> float:
        return self.recognizer.samples / self.params.sample_rate

    def on_audio(self, audio: bytes) -> list[SttServerMessage]:
        rec = self.recognizer
        out: list[SttServerMessage] = []
        if rec.feed(audio):
            words = rec.pending_words()
            if [w.word for w in words] != self.last_interim:
                self.last_interim = [w.word for w in words]
                out.append(self._transcript(words, is_final=False))
        silence = self.params.max_silence_duration_secs
        ended = silence is not None and rec.pending and rec.silence_samples() >= silence * self.params.sample_rate
        if ended or len(rec.pending) >= MAX_SEGMENT_WORDS:
            out.append(self._final())
        return out

    def opening(self) -> list[SttServerMessage]:
        return []

    def on_text(self, text: str) -> tuple[list[SttServerMessage], bool]:
        """A TEXT command → (messages, whether the socket closes after them); raises
        ``SttProtocolError`` for anything but ``finalize``/``close``."""
        if parse_stt_client_text(text) == CLOSE:
            return self.close(), True
        return self.finalize(), False

    def finalize(self) -> list[SttServerMessage]:
        self.recognizer.flush()
        return [self._final(), SttFlushDone(self.request_id)]

    def close(self) -> list[SttServerMessage]:
        self.recognizer.flush()
        out: list[SttServerMessage] = [self._final()] if self.recognizer.pending else []
        return [*out, SttDone(self.request_id)]

    def _final(self) -> SttTranscript:
        words = self.recognizer.commit()
        msg = self._transcript(words, is_final=True)
        self.segment_start = self.recognizer.samples
        self.last_interim = []
        self.finals += 1
        self.words_total += len(words)
        if words:
            self.said_before = True
        return msg

    def _transcript(self, words: list[RecognizedWord], *, is_final: bool) -> SttTranscript:
        text = " ".join(w.word for w in words)
        if text and self.said_before:
            text = " " + text
        duration = (self.recognizer.samples - self.segment_start) / self.params.sample_rate
        return SttTranscript(
            is_final=is_final, text=text, words=tuple(SttWord(w.word, w.start, w.end) for w in words),
            duration=duration, language=self.params.language, request_id=self.request_id,
        )


class SttTurnSession:
    """One ``/stt/turns/websocket`` socket (no I/O): ``connected``, then per turn
    ``turn.start`` (at its first recognised word), ``turn.update`` (cumulative text, each
    new word), ``turn.end`` after ``TURN_END_SILENCE_MS`` of silence (audio time). The preview
    events ``turn.eager_end``/``turn.resume`` are not sent. ``{"type":"close"}`` ends an
    open turn, then the socket closes; ``{"type":"config","turn":{...}}`` changes the timeout."""

    def __init__(self, params: SttParams, turn: SttTurnConfig, vocabulary: Vocabulary, request_id: str,
                 end_silence_ms: float) -> None:
        self.params = params
        self.request_id = request_id
        self.default_end_silence_ms = end_silence_ms
        self.end_silence_ms = end_silence_ms
        self.configure(turn)
        self.recognizer = StreamingRecognizer(vocabulary, params.sample_rate, params.encoding,
                                              max_pending=MAX_SEGMENT_WORDS)
        self.in_turn = False
        self.last_text = ""
        self.finals = 0
        self.words_total = 0

    @property
    def audio_s(self) -> float:
        return self.recognizer.samples / self.params.sample_rate

    def configure(self, turn: SttTurnConfig) -> None:
        if turn.end_timeout_ms is not None:
            self.end_silence_ms = min(self.default_end_silence_ms, turn.end_timeout_ms)

    def opening(self) -> list[SttServerMessage]:
        return [SttTurnEvent("connected", request_id=self.request_id)]

    def on_audio(self, audio: bytes) -> list[SttServerMessage]:
        rec = self.recognizer
        out: list[SttServerMessage] = []
        if rec.feed(audio):
            out.extend(self._update())
        if self.in_turn and rec.silence_samples() * 1000 >= self.end_silence_ms * self.params.sample_rate:
            out.append(self._end())
        elif len(rec.pending) >= MAX_SEGMENT_WORDS:
            out.append(self._end())
        return out

    def on_text(self, text: str) -> tuple[list[SttServerMessage], bool]:
        command = parse_stt_turns_client_text(text)
        if command == CLOSE:
            self.recognizer.flush()
            out = self._update()
            if self.in_turn:
                out.append(self._end())
            return out, True
        assert isinstance(command, SttTurnConfig)
        self.configure(command)
        return [], False

    def _update(self) -> list[SttServerMessage]:
        text = " ".join(w.word for w in self.recognizer.pending_words())
        out: list[SttServerMessage] = []
        if text and not self.in_turn:
            self.in_turn = True
            out.append(SttTurnEvent("turn.start", request_id=self.request_id))
        if text and text != self.last_text:
            self.last_text = text
            out.append(SttTurnEvent("turn.update", text, self.request_id))
        return out

    def _end(self) -> SttServerMessage:
        words = self.recognizer.commit()
        self.in_turn = False
        self.last_text = ""
        self.finals += 1
        self.words_total += len(words)
        return SttTurnEvent("turn.end", " ".join(w.word for w in words), self.request_id)


def _carries_text(msg: SttServerMessage) -> bool:
    """Transcripts and turn updates/ends: what ``delay-ms`` holds and ``close-after-chunks`` counts."""
    return isinstance(msg, SttTranscript) or (isinstance(msg, SttTurnEvent) and msg.kind in ("turn.update", "turn.end"))


_Session = SttSession | SttTurnSession


class _FaultySender:
    """Sends one socket's messages in order, applying its faults."""

    def __init__(self, ws: web.WebSocketResponse, faults: FaultSettings, seed: int, key: str) -> None:
        self.ws = ws
        self.faults = faults
        self.key = key
        self.rng = random.Random(context_seed(seed, key))
        self.no_done = hits(seed, "stt-no-done", key, faults.no_done_fraction)
        self.transcripts = 0
        self.killed = False

    async def send(self, msg: SttServerMessage) -> None:
        faults = self.faults
        if isinstance(msg, SttFlushDone | SttDone) and self.no_done:
            log_event(logger, "emulator_stt_fault_no_done", logging.DEBUG, stt_socket=self.key)
            return
        if _carries_text(msg) and faults.delay_ms and self.rng.random() < faults.delay_fraction:
            await asyncio.sleep(faults.delay_ms / 1000.0)
        await self.ws.send_str(encode_stt_server_message(msg))
        if _carries_text(msg):
            self.transcripts += 1
            limit = faults.close_after_chunks
            if limit is not None and self.transcripts >= limit:
                self.killed = True
                log_event(logger, "emulator_stt_fault_close", stt_socket=self.key, transcripts=self.transcripts)
                await self.ws.close(code=1011, message=f"emulator fault: close after {limit} transcripts".encode())


class SttService:
    """Serves ``/stt/websocket`` for one ``Emulator``; owns the vocabulary and the counters."""

    def __init__(self, settings: EmulatorSettings, authorize: Authorize) -> None:
        self.emulator_settings = settings
        self.settings: SttSettings = settings.stt
        self.settings.validate()
        self._authorize = authorize
        self.vocabulary = Vocabulary()
        self.handshakes = 0
        self.active = 0
        self.rejected = 0
        self.transcripts_total = 0
        self.finals_total = 0
        self.words_total = 0
        self._sockets: set[web.WebSocketResponse] = set()

    @property
    def faults(self) -> FaultSettings:
        return self.settings.faults if self.settings.faults is not None else self.emulator_settings.faults

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(STT_PATH, self._handle)
        app.router.add_get(STT_TURNS_PATH, self._handle_turns)
        app.router.add_get(STATS_PATH, self._stats)
        app.on_shutdown.append(self._on_shutdown)

    def stats(self) -> dict[str, Any]:
        return {
            "handshakes": self.handshakes, "active": self.active, "rejected": self.rejected,
            "transcripts_total": self.transcripts_total, "finals_total": self.finals_total,
            "words_total": self.words_total, "vocabulary_rendered": len(self.vocabulary.rendered()),
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(), dumps=lambda o: orjson.dumps(o).decode())

    async def _on_shutdown(self, app: web.Application) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"server shutting down")

    async def _handle_turns(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, turns=True)

    async def _handle(self, request: web.Request, *, turns: bool = False) -> web.StreamResponse:
        version = request.query.get("cartesia_version") or request.headers.get("Cartesia-Version") or DEFAULT_VERSION
        denied = self._authorize(request, version)
        if denied is not None:
            return denied
        try:
            params = parse_stt_params(request.query, request.query.getall("keyterm", []), turns=turns)
            turn = parse_stt_turn_config(request.query) if turns else SttTurnConfig()
        except SttProtocolError as exc:
            return _http_error(400, str(exc), "invalid_request", "Invalid request", version)
        self.handshakes += 1
        key = f"stt-{self.handshakes}"
        limit = self.settings.max_concurrency
        faults = self.faults
        if limit is not None and self.active >= limit:
            self.rejected += 1
            log_event(logger, "emulator_stt_rejected", stt_socket=key, reason="concurrency", limit=limit)
            return _http_error(429, f"You have exceeded your plan's STT concurrency limit ({limit} streams).",
                               "concurrency_limited", "Too many concurrent requests", version)
        if hits(self.emulator_settings.seed, "stt-reject-429", key, faults.reject_429_fraction):
            self.rejected += 1
            log_event(logger, "emulator_stt_rejected", stt_socket=key, reason="fault")
            return _http_error(429, "You have exceeded your plan's STT concurrency limit.",
                               "concurrency_limited", "Too many concurrent requests", version)
        ws = web.WebSocketResponse(max_msg_size=MAX_AUDIO_FRAME_BYTES, autoping=True)
        self.active += 1
        self._sockets.add(ws)
        try:
            await ws.prepare(request)
            request_id = str(uuid.uuid4())
            session: _Session = (
                SttTurnSession(params, turn, self.vocabulary, request_id, TURN_END_SILENCE_MS)
                if turns else SttSession(params, self.vocabulary, request_id)
            )
            await self._serve(ws, session, key, faults)
        finally:
            self._sockets.discard(ws)
            self.active -= 1
        return ws

    async def _serve(self, ws: web.WebSocketResponse, session: _Session, key: str, faults: FaultSettings) -> None:
        params = session.params
        sender = _FaultySender(ws, faults, self.emulator_settings.seed, key)
        log_event(logger, "emulator_stt_open", stt_socket=key, request_id=session.request_id,
                  model=params.model, encoding=params.encoding, sample_rate=params.sample_rate)
        idle = self.settings.idle_timeout_s
        last_audio = time.monotonic()
        reason = "client closed"
        try:
            for message in session.opening():
                await sender.send(message)
            while not sender.killed:
                try:
                    msg = await ws.receive(timeout=max(0.001, last_audio + idle - time.monotonic()))
                except TimeoutError:
                    reason = "idle timeout"
                    await ws.close(code=1000, message=b"connection idle timeout")
                    break
                if msg.type == WSMsgType.BINARY:
                    last_audio = time.monotonic()
                    out = session.on_audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    try:
                        out, closing = session.on_text(msg.data)
                    except SttProtocolError as exc:
                        log_event(logger, "emulator_stt_bad_command", stt_socket=key, error=str(exc))
                        out = [SttError(str(exc), "Invalid request", 400, "invalid_request",
                                        request_id=session.request_id)]
                    else:
                        if closing:
                            reason = "close command"
                else:  # CLOSE, CLOSING, CLOSED, ERROR
                    break
                for message in out:
                    await sender.send(message)
                    if _carries_text(message):
                        self.transcripts_total += 1
                        self.finals_total += (message.kind == "turn.end" if isinstance(message, SttTurnEvent)
                                              else isinstance(message, SttTranscript) and message.is_final)
                    if sender.killed:
                        reason = "fault close"
                        break
                if reason == "close command":
                    await ws.close(code=1000)
                    break
        except (ConnectionResetError, RuntimeError) as exc:
            reason = f"send failed: {exc!r}"
        finally:
            self.words_total += session.words_total
            log_event(logger, "emulator_stt_closed", stt_socket=key, reason=reason, audio_s=round(session.audio_s, 3),
                      finals=session.finals, words=session.words_total, bursts=session.recognizer.bursts_total,
                      skipped_bursts=session.recognizer.skipped_total, request_id=session.request_id)
            if not ws.closed:
                await ws.close()


def _http_error(status: int, message: str, code: str, title: str, version: str) -> web.Response:
    """The emulator's HTTP error body (structured since 2026-03-01, legacy before)."""
    body: dict[str, Any]
    if uses_structured_errors(version):
        body = {"error_code": code, "title": title, "message": message, "request_id": str(uuid.uuid4()),
                "status_code": status}
    else:
        body = {"error": f"{title}: {message}", "status_code": status}
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())
