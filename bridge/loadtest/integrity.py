"""Audio integrity on the load tester's side: split what a caller heard into emulator contexts' audio.

With the local emulator every context's audio is recorded (``AudioIndex``).
A caller's received byte stream must then be a sequence of utterances, each
starting on a 160-byte frame and being exactly one context's audio plus 0xFF
(mu-law silence) padding to the frame; a ``clear`` ends an utterance, and the
last utterance before a clear (or before the hang-up) may be a prefix.
Anything else is a ``mismatch`` span. The fault bench's check of resumed
contexts (a chain cut at word boundaries) is ``bridge.integrity``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from telephony.media import FRAME_BYTES, MULAW_SILENCE

PAD: Final = bytes([MULAW_SILENCE])


class ContextAudio(Protocol):
    """What the index needs of an emulator context record."""

    @property
    def context_id(self) -> str: ...
    @property
    def audio(self) -> bytes | bytearray: ...
    @property
    def cancelled(self) -> bool: ...


@dataclass(slots=True)
class Blob:
    """Distinct audio produced by one or more emulator contexts."""

    audio: bytes
    contexts: list[str] = field(default_factory=list)


class AudioIndex:
    """Emulator contexts' audio, looked up by their first (0xFF-padded) frame.

    Identical audio (the same text in the same voice) is stored once; memory is
    the distinct audio of the run (the emulator's ``--record-contexts`` bounds it).
    """

    def __init__(self) -> None:
        self.by_head: dict[bytes, list[Blob]] = {}
        self._by_hash: dict[bytes, Blob] = {}
        self.contexts = 0
        self.cancelled = 0

    @classmethod
    def from_records(cls, records: Iterable[ContextAudio]) -> AudioIndex:
        index = cls()
        for rec in records:
            index.add(rec.context_id, bytes(rec.audio), cancelled=bool(rec.cancelled))
        return index

    @staticmethod
    def head(audio: bytes) -> bytes:
        first = audio[:FRAME_BYTES]
        return first + PAD * (FRAME_BYTES - len(first))

    def add(self, context_id: str, audio: bytes, *, cancelled: bool = False) -> None:
        self.contexts += 1
        self.cancelled += int(cancelled)
        if not audio:
            return
        digest = hashlib.sha1(audio).digest()
        blob = self._by_hash.get(digest)
        if blob is None:
            blob = self._by_hash[digest] = Blob(audio)
            cands = self.by_head.setdefault(self.head(audio), [])
            cands.append(blob)
            cands.sort(key=lambda b: -len(b.audio))
        blob.contexts.append(context_id)

    def blobs(self) -> Iterable[Blob]:
        """Every distinct audio, in the order first seen."""
        return self._by_hash.values()


@dataclass(slots=True)
class Span:
    """One utterance in a call's received stream: bytes ``[start, end)``."""

    start: int
    end: int
    status: str  # "ok" | "interrupted" (clear) | "cut" (stream ended) | "mismatch"
    audio_bytes: int = 0  # without padding


def _full_match(stream: bytes, p: int, end: int, blob: Blob) -> int | None:
    """Bytes taken when ``blob`` + its padding starts at ``p`` (within ``end``), else None."""
    n = len(blob.audio)
    padded = n + (-n % FRAME_BYTES)
    if p + padded > end or stream[p:p + n] != blob.audio:
        return None
    if padded != n and stream[p + n:p + padded] != PAD * (padded - n):
        return None
    return padded


def split_utterances(stream: bytes, clear_offsets: list[int], index: AudioIndex) -> list[Span]:
    """Split a call's received audio into utterances matched against ``index``.

    A ``clear`` always ends an utterance. Within a stretch between clears,
    utterances follow each other back to back; each must be a context's
    audio plus 0xFF padding to the frame, except the stretch's last one,
    which may be a prefix (interrupted by the clear, or cut by the hang-up).
    Bytes matching nothing form a ``mismatch`` span up to the next frame
    where a full match starts again.
    """
    spans: list[Span] = []
    bounds = sorted({o for o in clear_offsets if 0 < o < len(stream)}) + [len(stream)]
    start = 0
    for end in bounds:
        cut_status = "interrupted" if end != len(stream) else "cut"
        p = start
        while p < end:
            cands = index.by_head.get(stream[p:p + FRAME_BYTES], [])
            span = _match_at(stream, p, end, cands, cut_status)
            if span is None:
                # Resynchronise on the next frame where some context's whole audio starts.
                q = p + FRAME_BYTES
                while q < end and not any(
                    _full_match(stream, q, end, b) is not None for b in index.by_head.get(stream[q:q + FRAME_BYTES], [])
                ):
                    q += FRAME_BYTES
                span = Span(p, min(q, end), "mismatch")
                p = q
            else:
                p = span.end
            spans.append(span)
        start = end
    return spans


def _match_at(stream: bytes, p: int, end: int, cands: list[Blob], cut_status: str) -> Span | None:
    """The utterance starting at ``p``: a whole context's audio, else a prefix reaching ``end``."""
    for blob in cands:
        n = _full_match(stream, p, end, blob)
        if n is not None:
            return Span(p, p + n, "ok", len(blob.audio))
    rest = end - p
    for blob in cands:
        if rest < len(blob.audio) and stream[p:end] == blob.audio[:rest]:
            return Span(p, end, cut_status, rest)
    return None


def explain_mismatch(stream: bytes, span: Span, index: AudioIndex) -> dict[str, Any]:
    """What a mismatching span looks like next to the closest emulator audio: the context whose
    audio shares the longest prefix with it, and where (frame-aligned) they part. For a report
    reader chasing a mismatch; costs a scan of every distinct context audio, so only for examples."""
    got = stream[span.start:span.end]
    best: tuple[int, Blob] | None = None
    for blob in index.blobs():
        n = 0
        limit = min(len(got), len(blob.audio))
        while n < limit and got[n:n + FRAME_BYTES] == blob.audio[n:n + FRAME_BYTES]:
            n += FRAME_BYTES
        if best is None or n > best[0]:
            best = (n, blob)
    out: dict[str, Any] = {"bytes": len(got), "first_frame_known": stream[span.start:span.start + FRAME_BYTES]
                           in index.by_head}
    if best is not None and best[0]:
        n, blob = best
        out.update({"closest_contexts": blob.contexts[:3], "closest_audio_bytes": len(blob.audio),
                    "same_for_bytes": min(n, len(got))})
    return out
