"""``POST /tts/bytes`` and ``POST /tts/sse``: one whole transcript per request.

* ``/tts/bytes``: the audio as the body, ``raw`` or ``wav`` (``mp3`` → 400: no
  encoder is bundled).
* ``/tts/sse``: Server-Sent Events ``chunk`` (base64), ``timestamps``,
  ``phoneme_timestamps``, then ``done``; ``raw`` only.

Both apply the latency model (TTFB, then chunks ``chunk_ms × rtf`` apart) and
count against ``max_concurrency`` while they stream.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator
from typing import Final

import orjson
from aiohttp import web

from ..protocol import (
    Chunk,
    Done,
    GenerationRequest,
    OutputFormat,
    PhonemeTimestamps,
    RequestError,
    ServerMessage,
    WordTimestamps,
    encode_server_message,
    parse_http_tts_request,
)
from .connection import Services
from .httpapi import Authenticator, http_error
from .models import check_model
from .rendered import Rendered
from .versions import check_request
from .voices import Voice

WAV_FORMAT_TAGS: Final = {"pcm_s16le": 1, "pcm_f32le": 3, "pcm_alaw": 6, "pcm_mulaw": 7}
CONTENT_TYPES: Final = {"wav": "audio/wav", "raw": "application/octet-stream"}


def wav_header(fmt: OutputFormat, data_len: int) -> bytes:
    """A 44-byte RIFF/WAVE header for ``data_len`` bytes of ``fmt`` audio."""
    bps = fmt.bytes_per_sample
    return b"RIFF" + struct.pack("<I", 36 + data_len) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, WAV_FORMAT_TAGS[fmt.encoding], 1, fmt.sample_rate, fmt.sample_rate * bps, bps, bps * 8
    ) + b"data" + struct.pack("<I", data_len)


def sse_event(msg: ServerMessage, ctx_id: str | None, version: str) -> bytes:
    obj = encode_server_message(msg, version)
    if ctx_id is None:
        obj.pop("context_id", None)
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class HttpTts:
    """The two HTTP TTS routes of one emulator."""

    def __init__(self, services: Services, auth: Authenticator) -> None:
        self.services = services
        self.auth = auth

    async def parse(self, request: web.Request) -> tuple[GenerationRequest, Voice, str] | web.Response:
        """The request, its voice and the API version, or the error response to answer."""
        rules = self.auth.admit(request)
        if isinstance(rules, web.Response):
            return rules
        version = rules.version
        try:
            body = await request.json(loads=orjson.loads)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return http_error(400, f"invalid JSON body: {exc}", "invalid_json", "Invalid JSON", version)
        try:
            req = parse_http_tts_request(body)
            check_model(req.model_id, None)
            check_request(req, rules)
            voice = self.services.synth.voice_of(req)
        except RequestError as err:
            return http_error(err.status_code, err.message, err.error_code, err.title, version)
        if req.output_format.container == "mp3":
            return http_error(400, "output_format.container 'mp3' is not supported by the emulator "
                              "(no MP3 encoder); use raw or wav", "invalid_request", "Invalid request", version)
        limit = self.services.settings.max_concurrency
        if limit is not None and self.services.state.active_contexts >= limit:
            return http_error(429, "You have exceeded your plan's concurrency limit.",
                              "concurrency_limited", "Too many concurrent requests", version)
        return req, voice, version

    async def paced(self, rendered: Rendered, fmt: OutputFormat) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (start_byte, chunk) with the latency model applied (TTFB, RTF)."""
        s = self.services.settings
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

    async def tts_bytes(self, request: web.Request) -> web.StreamResponse:
        parsed = await self.parse(request)
        if isinstance(parsed, web.Response):
            return parsed
        req, voice, version = parsed
        fmt = req.output_format
        state = self.services.state
        state.context_started()
        try:
            rendered = await self.services.synth.render(req.transcript, fmt, voice, req)
            resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[fmt.container]})
            extra = 44 if fmt.container == "wav" else 0
            resp.content_length = len(rendered.audio) + extra
            await resp.prepare(request)
            if fmt.container == "wav":
                await resp.write(wav_header(fmt, len(rendered.audio)))
            async for _, data in self.paced(rendered, fmt):
                await resp.write(data)
            await resp.write_eof()
            return resp
        finally:
            state.context_finished(None)

    async def tts_sse(self, request: web.Request) -> web.StreamResponse:
        parsed = await self.parse(request)
        if isinstance(parsed, web.Response):
            return parsed
        req, voice, version = parsed
        fmt = req.output_format
        if fmt.container != "raw":
            return http_error(400, "output_format.container must be 'raw' for SSE", "invalid_request",
                              "Invalid request", version)
        ctx_id = req.context_id or None
        state = self.services.state
        state.context_started()
        try:
            rendered = await self.services.synth.render(req.transcript, fmt, voice, req)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            rate, bps = fmt.sample_rate, fmt.bytes_per_sample
            wi = pi = 0
            for_ts = ctx_id or ""
            async for pos, data in self.paced(rendered, fmt):
                chunk = Chunk(for_ts, base64.b64encode(data).decode("ascii"), 0.0)
                await resp.write(sse_event(chunk, ctx_id, version))
                upto = (pos + len(data)) // bps
                if req.add_timestamps:
                    words = [w for w in rendered.words[wi:] if w[1] < upto]
                    if words:
                        wi += len(words)
                        stamps = WordTimestamps(for_ts, [w[0] for w in words], [w[1] / rate for w in words],
                                                [w[2] / rate for w in words])
                        await resp.write(sse_event(stamps, ctx_id, version))
                if req.add_phoneme_timestamps:
                    phons = [p for p in rendered.phonemes[pi:] if p[1] < upto]
                    if phons:
                        pi += len(phons)
                        pstamps = PhonemeTimestamps(for_ts, [p[0] for p in phons], [p[1] / rate for p in phons],
                                                    [p[2] / rate for p in phons])
                        await resp.write(sse_event(pstamps, ctx_id, version))
            await resp.write(sse_event(Done(for_ts), ctx_id, version))
            await resp.write_eof()
            return resp
        finally:
            state.context_finished(None)
