"""Emulator settings: every CLI flag, with units and limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .faults import FaultSettings

VOICE_BACKENDS: Final = ("tone", "espeak")
#: Upper bound of ``words_per_s``: a 20 ms word keeps a 10 ms burst after its gap.
MAX_WORDS_PER_S: Final = 50.0


@dataclass(slots=True)
class SttSettings:
    """The STT side of the emulator. ``faults`` None = the emulator's TTS ``faults``."""

    #: Open STT sockets; more → HTTP 429 on the handshake (None = no limit).
    max_concurrency: int | None = None
    #: Seconds without audio before the socket is closed (Cartesia: 180).
    idle_timeout_s: float = 180.0
    faults: FaultSettings | None = None

    def validate(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ValueError("stt idle_timeout_s must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 0:
            raise ValueError("stt max_concurrency must be >= 0")


@dataclass(slots=True)
class EmulatorSettings:
    """All knobs of the emulator; defaults suit tests (fast, no limits).

    Latency model: ``ttfb_ms`` before the first chunk of every generation,
    then chunks of ``chunk_ms`` audio ``chunk_ms * rtf`` ms apart (``rtf`` 0 =
    as fast as possible), each delay plus ``uniform(0, jitter_ms)``; all
    randomness from ``random.Random(seed + crc32(context_id))``. A paced chunk
    (not the first of a generation) may leave up to ``pacing_slack_ms`` early,
    so that one scheduler turn sends every chunk due within that window: one
    wake-up and one socket write instead of one per chunk (at 300 contexts and
    2x real time this cut the emulator's CPU from 87 % to 16 % of a core). The
    schedule stays anchored, so the average rate is exact, and the first chunk
    (the TTFB) is never early.
    """

    api_key: str | None = None
    voice_backend: str = "tone"
    ttfb_ms: float = 0.0
    rtf: float = 0.0
    chunk_ms: int = 100
    jitter_ms: float = 0.0
    pacing_slack_ms: float = 5.0
    #: Tone voice word rate: each word lasts exactly 1/W s of audio (word timestamps at W per
    #: second); None = the tone voice's own timing (about 2.5 words/s). The STT recogniser cannot
    #: decode words rendered this way (it reads a word from its burst length): use it with STT off.
    words_per_s: float | None = None
    seed: int = 0
    #: Active (not yet finished) contexts across the emulator; over it → 429 ``concurrency_limited``.
    max_concurrency: int | None = None
    #: Open WebSockets; over it the upgrade is answered HTTP 429.
    max_connections: int | None = None
    idle_timeout_s: float = 300.0
    #: On cancel, a generation that already sent audio runs to its end (documented behaviour).
    cancel_emits_inflight: bool = True
    #: On cancel, answer ``done`` for the context.
    send_done_on_cancel: bool = True
    faults: FaultSettings = field(default_factory=FaultSettings)
    #: Contexts whose produced audio and transcript are kept for inspection (oldest evicted); 0 = none.
    record_contexts: int = 1000
    #: ``max_buffer_delay_ms`` when a request does not give one (current docs: 3000).
    default_buffer_delay_ms: int = 3000
    #: A finished context is remembered this long after its last audio (docs: 1 s).
    context_expiry_s: float = 1.0
    #: Unknown voice ids → 400 (True) or the backend's default voice (False).
    strict_voices: bool = True
    #: Client messages kept in ``Emulator.received``.
    received_cap: int = 10000
    #: The STT socket (/stt/websocket): concurrency, idle timeout, its own faults.
    stt: SttSettings = field(default_factory=SttSettings)

    def validate(self) -> None:
        if self.voice_backend not in VOICE_BACKENDS:
            raise ValueError(f"voice_backend must be one of {VOICE_BACKENDS}, got {self.voice_backend!r}")
        if not 10 <= self.chunk_ms <= 2000:
            raise ValueError("chunk_ms must be in [10, 2000]")
        if self.rtf < 0 or self.ttfb_ms < 0 or self.jitter_ms < 0:
            raise ValueError("rtf, ttfb_ms and jitter_ms must be >= 0")
        if not 0 <= self.pacing_slack_ms <= 50:
            raise ValueError("pacing_slack_ms must be in [0, 50]")
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        if self.words_per_s is not None and not 0 < self.words_per_s <= MAX_WORDS_PER_S:
            raise ValueError(f"words_per_s must be in (0, {MAX_WORDS_PER_S:g}]")
