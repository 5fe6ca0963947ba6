"""What the emulator remembers across connections: counters, context records, lateness samples.

No I/O and no asyncio: connections, contexts and the HTTP routes report into one
``EmulatorState``; tests, ``GET /emulator/stats`` and the load tester read it.

Bounded structures and their policy when full:

* ``records``: at most ``record_cap`` contexts (``EmulatorSettings.record_contexts``),
  oldest evicted first.
* ``received``: the last ``received_cap`` client messages, oldest dropped.
* lateness samples: the last ``LATENESS_CAP`` chunks (and first chunks), oldest dropped.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Final

from ...stats import percentile
from ..protocol import OutputFormat

#: Lateness samples kept for stats (chunks; oldest dropped).
LATENESS_CAP: Final = 200_000


@dataclass(slots=True)
class ContextRecord:
    """What a context produced, for tests and the load tester (times: ``time.time()`` seconds)."""

    context_id: str
    connection_id: int
    model_id: str
    voice_id: str
    output_format: OutputFormat
    transcript_parts: list[str] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    words: list[str] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    flush_dones: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def transcript(self) -> str:
        return "".join(self.transcript_parts)

    def to_json(self) -> dict[str, Any]:
        """The ``GET /emulator/contexts/{id}`` body (audio as base64 plus its SHA-256)."""
        audio = bytes(self.audio)
        return {
            "context_id": self.context_id,
            "connection_id": self.connection_id,
            "model_id": self.model_id,
            "voice_id": self.voice_id,
            "output_format": self.output_format.to_wire(),
            "transcript": self.transcript,
            "bytes": len(audio),
            "sha256": hashlib.sha256(audio).hexdigest(),
            "chunks": self.chunks,
            "cancelled": self.cancelled,
            "done": self.done,
            "error": self.error,
            "flush_dones": list(self.flush_dones),
            "word_timestamps": {"words": self.words, "start": self.starts, "end": self.ends},
            "audio_b64": base64.b64encode(audio).decode("ascii"),
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


class EmulatorState:
    """Counters and records shared by every connection and HTTP request of one emulator.

    ``active_contexts`` counts contexts (WebSocket or HTTP) not yet finished; it
    is what ``max_concurrency`` is checked against. Lateness is the send time
    minus the scheduled time of a chunk, in seconds.
    """

    def __init__(self, record_cap: int, received_cap: int) -> None:
        self.record_cap = record_cap
        self.handshakes = 0
        self.active_connections = 0
        self.rejected_connections = 0
        self.active_contexts = 0
        self.contexts_total = 0
        self.chunks_total = 0
        #: (connection id, decoded JSON) of the last client messages.
        self.received: deque[tuple[int, Any]] = deque(maxlen=received_cap)
        self.records: OrderedDict[str, ContextRecord] = OrderedDict()
        self.lateness: deque[float] = deque(maxlen=LATENESS_CAP)
        #: The same, for first chunks only: how far the emulator's TTFB overshot its setting.
        self.first_lateness: deque[float] = deque(maxlen=LATENESS_CAP)

    def open_record(
        self, context_id: str, connection_id: int, model_id: str, voice_id: str, fmt: OutputFormat
    ) -> ContextRecord | None:
        """A new record for a context (``None`` when recording is off)."""
        if self.record_cap <= 0:
            return None
        rec = ContextRecord(context_id, connection_id, model_id, voice_id, fmt)
        self.records[context_id] = rec
        self.records.move_to_end(context_id)
        while len(self.records) > self.record_cap:
            self.records.popitem(last=False)
        return rec

    def context_started(self) -> None:
        self.active_contexts += 1
        self.contexts_total += 1

    def context_finished(self, record: ContextRecord | None) -> None:
        self.active_contexts -= 1
        if record is not None:
            record.finished_at = time.time()

    def chunk_sent(self, lateness: float, *, first: bool) -> None:
        self.chunks_total += 1
        self.lateness.append(lateness)
        if first:
            self.first_lateness.append(lateness)

    def message_received(self, connection_id: int, obj: Any) -> None:
        self.received.append((connection_id, obj))

    def lateness_ms(self, *, first_chunks: bool = False) -> dict[str, float | int | None]:
        """Chunk lateness (or first chunks' only): sample count ``n``, p50/p99/max in ms."""
        values = list(self.first_lateness if first_chunks else self.lateness)
        return {
            "n": len(values),
            "p50": _ms(percentile(values, 0.5)),
            "p99": _ms(percentile(values, 0.99)),
            "max": _ms(max(values) if values else None),
        }

    def reset_lateness(self) -> None:
        self.lateness.clear()
        self.first_lateness.clear()

    def snapshot(self) -> dict[str, Any]:
        """Counters and lateness, as ``GET /emulator/stats`` serves them."""
        return {
            "handshakes": self.handshakes,
            "active_connections": self.active_connections,
            "active_contexts": self.active_contexts,
            "contexts_total": self.contexts_total,
            "chunks_total": self.chunks_total,
            "rejected_connections": self.rejected_connections,
            "received": len(self.received),
            "recorded_contexts": len(self.records),
            "chunk_lateness_ms": self.lateness_ms(),
            "first_chunk_lateness_ms": self.lateness_ms(first_chunks=True),
        }
