"""Audio integrity on the load tester's side: split what a caller heard into emulator contexts' audio.

With the local emulator every context's audio is recorded (``AudioIndex``).
A caller's received byte stream must then be a sequence of utterances, each
starting on a 160-byte frame and being exactly one context's audio plus 0xFF
(mu-law silence) padding to the frame; a ``clear`` ends an utterance, and the
last utterance before a clear (or before the hang-up) may be a prefix.
Anything else is a ``mismatch`` span. When the bytes can be read more than
one way (a context cancelled part-way holds a whole-frame prefix of another
context's audio), the reading with the fewest mismatched bytes counts. The fault bench's check of resumed
contexts (a chain cut at word boundaries) is ``bridge.integrity``.
"""

from __future__ import annotations

import hashlib
import heapq
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
    if p + padded > end or not stream.startswith(blob.audio, p):  # startswith: no copy of the audio
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
    where a full match starts again. Of the readings that fit, the one with
    the fewest mismatched bytes wins (see ``_split_stretch``).
    """
    spans: list[Span] = []
    bounds = sorted({o for o in clear_offsets if 0 < o < len(stream)}) + [len(stream)]
    start = 0
    for end in bounds:
        spans += _split_stretch(stream, start, end, index, "interrupted" if end != len(stream) else "cut")
        start = end
    return spans


def _split_stretch(stream: bytes, start: int, end: int, index: AudioIndex, cut_status: str) -> list[Span]:
    """The utterances of ``stream[start:end]``: the reading with the fewest mismatched bytes.

    One greedy reading is not enough: a context's audio can be a frame-aligned prefix of
    another context's (the emulator sends whole-frame chunks, so a context cancelled part-way,
    e.g. because its call hung up, recorded a prefix of the audio the same text got on other
    calls). Taken as a whole utterance wherever it fitted, it turned the rest of a longer
    utterance into a "mismatch" starting mid-audio (issue 18's overloaded runs: in every call at
    the same offset, where that text began). So this is a shortest-path search over utterance
    boundaries, cost = mismatched bytes: readings are followed cheapest first and, among equal
    cost, furthest along first, so a clean stream costs what the greedy split cost (one reading
    per utterance) and a dead end falls back to the next fitting reading. Among readings of
    equal cost the first found wins: whole contexts (longest first), then a prefix.
    """
    best: dict[int, tuple[int, Span | None]] = {start: (0, None)}
    todo = [(0, -start)]
    while todo:
        cost, neg_p = heapq.heappop(todo)
        p = -neg_p
        if p == end:
            break
        if cost > best[p][0]:
            continue  # reached more cheaply since it was queued
        for span in _readings_at(stream, p, end, index, cut_status):
            c = cost + (span.end - p if span.status == "mismatch" else 0)
            known = best.get(span.end)
            if known is None or c < known[0]:
                best[span.end] = (c, span)
                heapq.heappush(todo, (c, -span.end))
    spans: list[Span] = []
    p = end
    while p != start:
        last = best[p][1]
        assert last is not None, "only the start has no span leading to it"
        spans.append(last)
        p = last.start
    spans.reverse()
    return spans


def _readings_at(stream: bytes, p: int, end: int, index: AudioIndex, cut_status: str) -> list[Span]:
    """Every utterance that may start at ``p``: each whole context's audio that fits (longest
    first), a prefix of a longer one reaching ``end``; when none fits, a mismatch up to the next
    frame where some context's whole audio starts (or ``end``)."""
    cands = index.by_head.get(stream[p:p + FRAME_BYTES], [])
    out: list[Span] = []
    for blob in cands:
        n = _full_match(stream, p, end, blob)
        if n is not None and all(s.end != p + n for s in out):
            out.append(Span(p, p + n, "ok", len(blob.audio)))
    rest = end - p
    tail = memoryview(stream)[p:end]
    for blob in cands:
        if rest < len(blob.audio) and blob.audio.startswith(tail):
            out.append(Span(p, end, cut_status, rest))
            break
    if out:
        return out
    # Resynchronise on the next frame where some context's whole audio starts.
    q = p + FRAME_BYTES
    while q < end and not any(
        _full_match(stream, q, end, b) is not None for b in index.by_head.get(stream[q:q + FRAME_BYTES], [])
    ):
        q += FRAME_BYTES
    return [Span(p, min(q, end), "mismatch")]


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
    elif (inside := _inside_some_context(got[:FRAME_BYTES], index)) is not None:
        # Audio that starts mid-context: the head of that utterance was taken for something else.
        blob, at = inside
        out.update({"first_frame_inside": blob.contexts[:3], "first_frame_at_byte": at})
    return out


def _inside_some_context(frame: bytes, index: AudioIndex) -> tuple[Blob, int] | None:
    """The first context audio holding ``frame`` at a frame-aligned offset, and that offset."""
    if len(frame) < FRAME_BYTES:
        return None
    for blob in index.blobs():
        at = blob.audio.find(frame)
        while at >= 0:
            if at % FRAME_BYTES == 0:
                return blob, at
            at = blob.audio.find(frame, at + 1)
    return None
