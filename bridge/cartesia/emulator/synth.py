"""The emulator's voices as one service: the catalogue, voice lookup and rendering.

WebSocket contexts and the HTTP routes both render through one ``Synthesizer``,
so a voice id, the legacy ``speed`` words and ``generation_config`` mean the
same everywhere. Tone voices render synchronously (microseconds, cached);
espeak voices render on espeak's worker thread and come back as a future.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from typing import Final

from ..protocol import GenerationRequest, OutputFormat, RequestError
from .rendered import Rendered
from .voices import EspeakSynth, ToneSynth, Voice, catalogue

#: The legacy top-level ``speed`` words as factors on ``generation_config.speed``.
LEGACY_SPEED_FACTORS: Final[dict[str, float]] = {"slow": 0.8, "normal": 1.0, "fast": 1.25}


def voice_controls(req: GenerationRequest) -> tuple[float, float]:
    """``(speed, volume)`` factors for a request: ``generation_config`` times the legacy ``speed``."""
    config = req.generation_config or {}
    speed = float(config.get("speed", 1.0)) * LEGACY_SPEED_FACTORS.get(req.speed or "normal", 1.0)
    return speed, float(config.get("volume", 1.0))


class Synthesizer:
    """Voice catalogue plus renderers for one emulator.

    ``strict_voices``: an unknown voice id is a 400 ``voice_not_found`` (True)
    or speaks with ``default_voice`` (False). espeak is loaded at construction,
    so a broken install fails when the emulator is built, not mid-call.
    """

    def __init__(self, backend: str, *, strict_voices: bool = True) -> None:
        self.tone = ToneSynth()
        self.espeak: EspeakSynth | None = EspeakSynth() if backend == "espeak" else None
        self.voices: dict[str, Voice] = catalogue(backend)
        self.default_voice = next(iter(self.voices.values()))
        self.strict_voices = strict_voices

    def voice_for(self, voice_id: str, context_id: str | None) -> Voice:
        voice = self.voices.get(voice_id)
        if voice is not None:
            return voice
        if not self.strict_voices:
            return self.default_voice
        raise RequestError(
            f"voice {voice_id!r} not found (GET /voices lists the emulator's voices)",
            field="voice", context_id=context_id, error_code="voice_not_found", title="Invalid voice",
        )

    def voice_of(self, req: GenerationRequest) -> Voice:
        """The voice a request names: by id, or derived from its embedding."""
        if req.voice_embedding is not None:
            return self.voice_for_embedding(req.voice_embedding)
        return self.voice_for(req.voice_id, req.context_id or None)

    def voice_for_embedding(self, embedding: tuple[float, ...]) -> Voice:
        """A tone voice derived from an embedding: same floats, same voice (pitch from their crc32)."""
        crc = zlib.crc32(struct.pack(f"<{len(embedding)}d", *embedding))
        # Odd offsets in -119..+239 Hz: the catalogue's span, never one of its (even) pitches.
        pitch = 2 * (crc % 180) - 119
        return Voice(f"embedding-{crc:08x}", "Embedding voice", "tone", "derived from a voice embedding",
                     "gender_neutral", param=str(pitch))

    def renders_in_thread(self, voice: Voice) -> bool:
        """True when ``voice`` renders on espeak's thread (``render_later``), else ``render_now``."""
        return voice.backend == "espeak" and self.espeak is not None

    def render_now(self, text: str, fmt: OutputFormat, voice: Voice, req: GenerationRequest) -> Rendered:
        """A tone voice's audio for ``text`` (blank text → no audio)."""
        if not text.strip():
            return Rendered(b"", 0)
        speed, volume = voice_controls(req)
        return self.tone.render(text, fmt, voice, speed=speed, volume=volume, phonemes=req.add_phoneme_timestamps)

    def render_later(
        self, text: str, fmt: OutputFormat, voice: Voice, req: GenerationRequest
    ) -> asyncio.Future[Rendered]:
        """An espeak voice's audio for ``text``, rendered on espeak's thread."""
        assert self.espeak is not None, "render_later needs the espeak backend"
        speed, volume = voice_controls(req)
        return asyncio.ensure_future(
            self.espeak.render(text, fmt, voice, speed=speed, volume=volume, phonemes=req.add_phoneme_timestamps)
        )

    async def render(self, text: str, fmt: OutputFormat, voice: Voice, req: GenerationRequest) -> Rendered:
        if text.strip() and self.renders_in_thread(voice):
            return await self.render_later(text, fmt, voice, req)
        return self.render_now(text, fmt, voice, req)

    def close(self) -> None:
        if self.espeak is not None:
            self.espeak.close()
            self.espeak = None
