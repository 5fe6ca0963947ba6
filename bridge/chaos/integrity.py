"""Audio integrity under faults: split what a caller heard into emulator contexts' audio,
allowing the bridge's resumes (no I/O).

Without faults an utterance is one context's audio (``bridge.loadtest.integrity``). Under
faults an utterance may continue on new contexts (socket lost, 429, no ``done``): what the
caller hears is then ``c1[:b1] + c2[:b2] + ... + ck`` with each ``b`` a word boundary of its
context (``bridge.integrity``), padded with μ-law silence (0xFF) to the 160-byte frame. A
``clear`` (barge-in) ends an utterance, whose last piece may then be any prefix; so does the
end of the stream. An utterance the bridge gave up on (retries exhausted, playout overflow)
ends early: its last piece is a prefix followed by padding, and the bridge told the agent
(``error``); those are counted as ``cut_short`` so the caller of this module can match them
against what the agent was told.

Anything else is ``mismatch``: bytes heard that no chain of contexts explains (repeated,
foreign or corrupted audio). Search is bounded: at most ``MAX_PIECES`` contexts per utterance
and ``MAX_CANDIDATES`` contexts tried per position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from telephony.media import FRAME_BYTES

PAD: Final = 0xFF
#: Contexts are looked up by their first ``KEY_BYTES`` bytes (shorter audio: linear scan).
KEY_BYTES: Final = 32
MAX_PIECES: Final = 8
MAX_CANDIDATES: Final = 64


class ContextRecord(Protocol):
    """What the index needs of an emulator context record (times in seconds)."""

    @property
    def audio(self) -> bytes | bytearray: ...
    @property
    def starts(self) -> list[float]: ...
    @property
    def ends(self) -> list[float]: ...
    @property
    def transcript(self) -> str: ...


@dataclass(slots=True)
class Piece:
    """One distinct context audio; its word boundaries in bytes (descending, without 0), each with
    the number of words before it; and the words it was asked to say."""

    audio: bytes
    bounds: list[tuple[int, int]]
    words: list[str]


class ChainIndex:
    """Distinct context audio, looked up by its first ``KEY_BYTES`` bytes."""

    def __init__(self, records: Iterable[ContextRecord]) -> None:
        self.by_key: dict[bytes, list[Piece]] = {}
        self.short: list[Piece] = []
        seen: set[tuple[bytes, str]] = set()
        for rec in records:
            audio = bytes(rec.audio)
            words = rec.transcript.split()
            if not audio or (audio, rec.transcript) in seen:
                continue
            seen.add((audio, rec.transcript))
            bounds: dict[int, int] = {}
            for i, t in enumerate(rec.starts):
                bounds[int(round(t * 8000))] = i
            for i, t in enumerate(rec.ends):
                bounds[int(round(t * 8000))] = i + 1
            piece = Piece(audio, sorted(((b, k) for b, k in bounds.items() if 0 < b <= len(audio)), reverse=True),
                          words)
            if len(audio) < KEY_BYTES:
                self.short.append(piece)
            else:
                self.by_key.setdefault(audio[:KEY_BYTES], []).append(piece)
        for cands in self.by_key.values():
            cands.sort(key=lambda p: -len(p.audio))

    def starts_at(self, stream: bytes, p: int) -> bool:
        """Whether some context's audio (of ``KEY_BYTES`` or more) could start at ``p``."""
        return stream[p:p + KEY_BYTES] in self.by_key

    def candidates(self, stream: bytes, p: int) -> list[Piece]:
        return (self.by_key.get(stream[p:p + KEY_BYTES], []) + self.short)[:MAX_CANDIDATES]


@dataclass
class CallIntegrity:
    """One call's verdict: bytes explained, ``mismatch_bytes`` not, utterances by kind."""

    heard_bytes: int = 0
    utterances: int = 0
    resumed: int = 0
    interrupted: int = 0
    cut_short: int = 0
    cut_short_bytes: int = 0
    mismatch_bytes: int = 0
    mismatch_offsets: list[int] = field(default_factory=list)


def _padded_end(stream: bytes, q: int, end: int) -> int | None:
    """Where the 0xFF padding from ``q`` to the next frame boundary ends (None: not padding)."""
    stop = q + (-q % FRAME_BYTES)
    if stop > end or any(b != PAD for b in stream[q:stop]):
        return None
    return stop


@dataclass(slots=True)
class _Match:
    end: int
    pieces: int
    kind: str  # ok | interrupted | cut_short
    missing: int = 0


def _common_prefix(stream: bytes, p: int, a: bytes, limit: int) -> int:
    """How many bytes ``stream[p:]`` and ``a`` have in common (at most ``limit``); binary search on slices."""
    if stream[p:p + limit] == a[:limit]:
        return limit
    lo, hi = 0, limit  # stream[p:p+lo] == a[:lo]; stream[p:p+hi] != a[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if stream[p:p + mid] == a[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


_Memo = dict[tuple[int, str | None], list[_Match]]


def _options(stream: bytes, p: int, end: int, index: ChainIndex, depth: int, first_word: str | None,
             memo: _Memo) -> list[_Match]:
    """Every way an utterance (or, with ``first_word``, its continuation on a new context whose
    words start with it) can start at ``p`` within ``[p, end)``; one per (end, kind), memoised
    per position (a run of identical words would otherwise branch exponentially)."""
    key = (p, first_word)
    if key in memo:
        return memo[key]
    if depth > MAX_PIECES:
        return []
    memo[key] = []  # a chain cannot continue into itself
    cands = index.candidates(stream, p)
    if first_word is not None:
        cands = [c for c in cands if c.words[:1] == [first_word]]
    rest = end - p
    found: dict[tuple[int, str], _Match] = {}

    def add(m: _Match) -> None:
        old = found.get((m.end, m.kind))
        if old is None or (m.missing, m.pieces) < (old.missing, old.pieces):
            found[(m.end, m.kind)] = m

    for piece in cands:
        a = piece.audio
        n = _common_prefix(stream, p, a, min(rest, len(a)))
        if n == len(a):  # the whole audio, then padding
            stop = _padded_end(stream, p + n, end)
            if stop is not None:
                add(_Match(stop, 1, "ok"))
        elif n == rest:  # a prefix up to a clear or the end of the stream
            add(_Match(end, 1, "interrupted"))
        for b, k in piece.bounds:
            # Resumed on a new context, which says only the words after the cut: never a word twice.
            if b <= n and b < rest and k < len(piece.words):
                for m in _options(stream, p + b, end, index, depth + 1, piece.words[k], memo):
                    add(_Match(m.end, m.pieces + 1, m.kind, m.missing))
        if 0 < n < len(a):  # given up: a prefix, padding, and the next utterance
            stop = _padded_end(stream, p + n, end)
            if stop is not None and (stop == end or index.starts_at(stream, stop)):
                add(_Match(stop, 1, "cut_short", len(a) - n))
    memo[key] = list(found.values())
    return memo[key]


@dataclass(slots=True)
class _Parse:
    """The best reading of ``[p, end)``: fewest bytes unexplained, then fewest utterances cut short."""

    mismatch: int
    cut_short: int
    steps: list[tuple[int, _Match | None]]  # (start, match or None for a mismatching span to the next start)


def _parse(stream: bytes, start: int, end: int, index: ChainIndex) -> _Parse:
    memo: dict[int, _Parse] = {}
    options: _Memo = {}

    def best(p: int) -> _Parse:
        """Iterative from the end would need every position; memoised recursion visits only reachable ones."""
        if p >= end:
            return _Parse(0, 0, [])
        if p in memo:
            return memo[p]
        choice: _Parse | None = None
        for m in _options(stream, p, end, index, 1, None, options):
            if m.end <= p:
                continue
            tail = best(m.end)
            cand = _Parse(tail.mismatch, tail.cut_short + (m.kind == "cut_short"), [(p, m), *tail.steps])
            if choice is None or (cand.mismatch, cand.cut_short) < (choice.mismatch, choice.cut_short):
                choice = cand
        if choice is None or choice.mismatch:
            q = p + FRAME_BYTES
            while q < end and not index.starts_at(stream, q):
                q += FRAME_BYTES
            q = min(q, end)
            tail = best(q)
            cand = _Parse(tail.mismatch + (q - p), tail.cut_short, [(p, None), *tail.steps])
            if choice is None or (cand.mismatch, cand.cut_short) < (choice.mismatch, choice.cut_short):
                choice = cand
        memo[p] = choice
        return choice

    return best(start)


def check_call(stream: bytes, clear_offsets: Sequence[int], index: ChainIndex) -> CallIntegrity:
    """Split ``stream`` (every outbound audio byte, in order) between ``clear_offsets``."""
    out = CallIntegrity(heard_bytes=len(stream))
    bounds = sorted({o for o in clear_offsets if 0 < o < len(stream)}) + [len(stream)]
    start = 0
    for end in bounds:
        parse = _parse(stream, start, end, index)
        for i, (p, m) in enumerate(parse.steps):
            if m is None:
                nxt = parse.steps[i + 1][0] if i + 1 < len(parse.steps) else end
                out.mismatch_bytes += nxt - p
                if len(out.mismatch_offsets) < 5:
                    out.mismatch_offsets.append(p)
                continue
            out.utterances += 1
            out.resumed += int(m.pieces > 1)
            if m.kind == "interrupted":
                out.interrupted += 1
            elif m.kind == "cut_short":
                out.cut_short += 1
                out.cut_short_bytes += m.missing
        start = end
    return out
