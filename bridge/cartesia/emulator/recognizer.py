"""Hear the emulator's own tone voices: audio → words, from the audio alone (no I/O).

A tone voice (``voices.ToneSynth``) renders each word as one sine burst of
``tone_word_ms(word) / speed`` ms at ``tone_word_frequency(word, pitch_offset)`` Hz
(integer Hz, 5 ms ramps, digital silence around it), then 40 ms of silence. So a
burst carries two numbers: its frequency and its length. Recognition:

1. **Segment** by energy: RMS of 5 ms windows (``audioop.rms``); a burst opens at a
   window of RMS ≥ ``min_rms`` and closes after two quieter windows (10 ms). Its edges
   are then refined to the first/last sample above the noise floor, so its length is
   known to a few samples whatever the 20 ms frame split points were.
2. **Frequency** from zero crossings: the exact (interpolated) first and last crossing
   of the steady part and the crossing count between them (``audioop.cross``): a
   fraction of a Hz on a clean tone.
3. **Candidates**: vocabulary words whose tone frequency, for any tone voice's pitch
   offset, is within ``FREQ_TOLERANCE_HZ`` of it; each implies a speed
   (``tone_word_ms / burst length``), which must lie in ``SPEED_RANGE_PCT``; each is
   checked with the Goertzel power at its own frequency (normalised to the burst's
   energy, 1.0 for a pure tone), and a burst that is not a clean tone
   (``MIN_TONALITY``) or does not fade in and out as a tone word does (5 ms ramps) is
   skipped: noise, clicks, beeps, the simulator's ``speak`` tone, espeak speech.
4. **Decode** the pending bursts jointly: one voice speaks at one speed, so the
   (pitch offset, speed) that explains most bursts (rendered words counting more than
   built-in ones) wins and picks each burst's word; ties go to the voice and speed heard
   last on the stream, then to the more recently rendered words, then to speed 1.

The vocabulary (``vocabulary.Vocabulary``) is what the emulator's tone voices rendered
(raw tokens: punctuation changes the pitch, case does not) plus built-in common words.
Words come out normalised as the TTS normalises timestamps (``voices.normalize_word``).

Limits: only tone voices are heard (espeak and real speech are skipped or, rarely,
misheard as a vocabulary word); two words with the same letter count and the same
``crc32 % 400`` sound identical (the built-in list keeps the more common one; among
rendered words the latest rendered wins); speeds between 0.4 and 2.1; overlapping
voices are not separated; a burst cut by ``finalize`` is analysed as it is.
"""

from __future__ import annotations

import array
import math
import struct
import sys
import warnings
from dataclasses import dataclass, field
from typing import Final

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from .vocabulary import RANK_RENDERED, VOICE_OFFSETS
from .vocabulary import Vocabulary as Vocabulary  # re-exported: what StreamingRecognizer takes

_LITTLE: Final = sys.byteorder == "little"
WINDOW_MS: Final = 5
#: Quiet windows that end a burst (the gap between words is 40 ms).
END_QUIET_WINDOWS: Final = 2
#: Default opening threshold (RMS of 16-bit samples); a tone word is 9000 peak at volume 1.
DEFAULT_MIN_RMS: Final = 300
#: Samples below this magnitude count as silence when refining a burst's edges.
EDGE_FLOOR: Final = 24
#: The ramps of a tone word (ms): left out of the frequency and Goertzel analysis.
RAMP_MS: Final = 6
#: A tone word's linear fade in/out (ms, not scaled by speed; ``voices._RAMP_MS``).
TONE_RAMP_MS: Final = 5
#: Over the first/last half ramp a tone word stays under half its steady level; an abrupt tone does not.
RAMP_LEVEL: Final = 0.7
MIN_BURST_MS: Final = 20
#: A longer burst is cut here and analysed as it is (a tone word at speed 0.45 is < 3.5 s).
MAX_BURST_MS: Final = 4000
#: Tone frequencies are whole Hz; the zero-crossing estimate is within 0.03 Hz on clean audio.
FREQ_TOLERANCE_HZ: Final = 0.25
#: Goertzel power / burst energy below which a burst is not a tone (1.0 = pure tone).
MIN_TONALITY: Final = 0.6
#: Samples the Goertzel check looks at (the middle of the burst): bounds its cost.
GOERTZEL_MAX_SAMPLES: Final = 1024
SPEED_RANGE_PCT: Final = (40.0, 210.0)
#: Two bursts agree on speed when their implied speeds are this close (percent points).
SPEED_TOLERANCE_PCT: Final = 1.5
# --------------------------------------------------------------------------- audio


def to_linear16(audio: bytes, encoding: str) -> bytes:
    """Wire audio (whole samples) → native-order signed 16-bit samples."""
    if encoding == "pcm_mulaw":
        return audioop.ulaw2lin(audio, 2)
    if encoding == "pcm_alaw":
        return audioop.alaw2lin(audio, 2)
    if encoding == "pcm_s16le":
        if _LITTLE:
            return audio
        arr = array.array("h", audio)
        arr.byteswap()
        return arr.tobytes()
    if encoding == "pcm_s32le":
        data = audio if _LITTLE else audioop.byteswap(audio, 4)
        return audioop.lin2lin(data, 4, 2)
    if encoding in ("pcm_f32le", "pcm_f16le"):
        fmt = "<f" if encoding == "pcm_f32le" else "<e"
        values = [max(-32768, min(32767, int(v * 32768.0))) for (v,) in struct.iter_unpack(fmt, audio)]
        return array.array("h", values).tobytes()
    raise ValueError(f"unsupported encoding {encoding!r}")


def goertzel_tonality(samples: array.array[int], freq: float, rate: int) -> float:
    """Goertzel power at ``freq`` over ``samples``, divided by their energy × N / 2.

    1.0 for a pure tone at ``freq`` (whatever its amplitude), ~2/N for white noise.
    """
    n = len(samples)
    if n == 0:
        return 0.0
    coeff = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s0 = x + coeff * s1 - s2
        s2 = s1
        s1 = s0
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    energy = sum(x * x for x in samples)
    return 0.0 if energy == 0 else 2.0 * power / (n * energy)


def zero_crossing_frequency(samples: array.array[int], rate: int) -> float | None:
    """Frequency (Hz) from the interpolated first and last zero crossing and the count between."""
    n = len(samples)
    first = last = None
    for i in range(1, n):
        if (samples[i - 1] < 0) != (samples[i] < 0):
            first = i
            break
    for i in range(n - 1, first or n, -1):
        if (samples[i - 1] < 0) != (samples[i] < 0):
            last = i
            break
    if first is None or last is None or last <= first:
        return None
    # Crossings from ``first`` to ``last`` inclusive; audioop.cross uses the same sign rule (x < 0).
    count = audioop.cross(samples[first - 1 : last + 1].tobytes(), 2)
    if count < 3:
        return None

    def where(i: int) -> float:
        a, b = samples[i - 1], samples[i]
        return i - 1 + (a / (a - b) if a != b else 0.0)

    span = where(last) - where(first)
    return (count - 1) * rate / (2.0 * span) if span > 0 else None


# --------------------------------------------------------------------------- bursts


@dataclass(frozen=True, slots=True)
class Candidate:
    text: str
    offset: int  # the voice's pitch offset, Hz
    speed_pct: float  # speed the burst's length implies for this word, percent
    rank: int  # vocabulary.RANK_RENDERED or RANK_BUILTIN
    tonality: float  # Goertzel power at the word's frequency, normalised
    recency: int = 0  # render order of the word (higher = later; 0 = built-in)


@dataclass(frozen=True, slots=True)
class Burst:
    """One tone burst: sample offsets from the start of the stream's audio (end exclusive)."""

    start: int
    end: int
    frequency: float | None
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True, slots=True)
class RecognizedWord:
    word: str
    start: float  # seconds from the start of the stream's audio
    end: float


def analyse_burst(pcm: bytes, start: int, rate: int, vocabulary: Vocabulary) -> Burst | None:
    """One burst's samples (native s16, starting at stream sample ``start``) → ``Burst``,
    or ``None`` when it is too short to be a word or has no energy above the floor."""
    samples = array.array("h", pcm)
    floor = EDGE_FLOOR
    lo = next((i for i, x in enumerate(samples) if abs(x) > floor), None)
    if lo is None:
        return None
    hi = next(i for i in range(len(samples) - 1, -1, -1) if abs(samples[i]) > floor)
    # A tone word's first and last samples are exactly 0 (its ramps start and end there).
    length = hi - lo + 3
    if length * 1000 < MIN_BURST_MS * rate:
        return None
    ramp = RAMP_MS * rate // 1000
    steady = samples[lo + ramp : hi - ramp + 1]
    freq = zero_crossing_frequency(steady, rate) if len(steady) > ramp else None
    burst_start, burst_end = start + lo - 1, start + hi + 2
    if freq is None:
        return Burst(burst_start, burst_end, None)
    middle = steady
    if len(steady) > GOERTZEL_MAX_SAMPLES:
        skip = (len(steady) - GOERTZEL_MAX_SAMPLES) // 2
        middle = steady[skip : skip + GOERTZEL_MAX_SAMPLES]
    if goertzel_tonality(middle, freq, rate) < MIN_TONALITY or not _ramped(samples, lo, hi, middle, rate):
        return Burst(burst_start, burst_end, freq)
    candidates: list[Candidate] = []
    tonality_at: dict[int, float] = {}
    lo_speed, hi_speed = SPEED_RANGE_PCT
    for f, entry in vocabulary.near(freq, FREQ_TOLERANCE_HZ):
        speed = entry.ms * rate * 100.0 / (1000.0 * length)
        if not lo_speed <= speed <= hi_speed:
            continue
        if f not in tonality_at:
            tonality_at[f] = goertzel_tonality(middle, f, rate)
        if tonality_at[f] >= MIN_TONALITY:
            candidates.append(Candidate(entry.text, entry.offset, speed, entry.rank, tonality_at[f], entry.seq))
    return Burst(burst_start, burst_end, freq, tuple(candidates))


def _ramped(samples: array.array[int], lo: int, hi: int, middle: array.array[int], rate: int) -> bool:
    """Whether the burst fades in and out as a tone word does (5 ms linear ramps): over the
    first and last half ramp the level stays well under the steady level. A tone that starts
    abruptly (the simulator's ``speak``, a beep) is no word, whatever its pitch and length."""
    half = max(1, TONE_RAMP_MS * rate // 2000)
    steady = max(abs(x) for x in middle)
    head = max(abs(x) for x in samples[lo : lo + half])
    tail = max(abs(x) for x in samples[hi - half + 1 : hi + 1])
    return head <= RAMP_LEVEL * steady and tail <= RAMP_LEVEL * steady


def _agrees(c: Candidate, offset: int, speed: float) -> bool:
    return c.offset == offset and abs(c.speed_pct - speed) <= SPEED_TOLERANCE_PCT


class SegmentDecoder:
    """The bursts of one segment and, per (pitch offset, speed %) hypothesis, how well it
    explains them, kept up to date as bursts arrive: adding a burst costs O(hypotheses +
    new hypotheses × bursts), choosing O(hypotheses + bursts), not a rescan per word."""

    def __init__(self) -> None:
        self.bursts: list[Burst] = []
        #: hypothesis → [explained bursts (rendered 1.0, built-in 0.9), summed recency]
        self._scores: dict[tuple[int, int], list[float]] = {}

    @staticmethod
    def _contribute(burst: Burst, h: tuple[int, int], score: list[float]) -> None:
        agreeing = [c for c in burst.candidates if _agrees(c, h[0], h[1])]
        if agreeing:
            score[0] += 1.0 if min(c.rank for c in agreeing) == RANK_RENDERED else 0.9
            score[1] += max(c.recency for c in agreeing)

    def add(self, burst: Burst) -> None:
        for h, score in self._scores.items():
            self._contribute(burst, h, score)
        self.bursts.append(burst)
        for c in burst.candidates:
            h = (c.offset, round(c.speed_pct))
            if h not in self._scores:
                score = [0.0, 0.0]
                for b in self.bursts:
                    self._contribute(b, h, score)
                self._scores[h] = score

    def choose(self, prior: tuple[int, float] | None) -> tuple[list[tuple[Burst, Candidate]], tuple[int, float] | None]:
        """Pick each burst's word under the hypothesis that explains most bursts; ties go to
        ``prior`` (the stream's last voice and speed), then recency, then speed 1, then
        catalogue order. A burst none of whose candidates agrees falls back to its own best."""
        if not self._scores:
            return [], prior

        def key(item: tuple[tuple[int, int], list[float]]) -> tuple[float, int, float, float, int, tuple[int, int]]:
            (offset, speed), (total, recency) = item
            near_prior = int(prior is not None and prior[0] == offset and abs(prior[1] - speed) <= SPEED_TOLERANCE_PCT)
            voice_order = -VOICE_OFFSETS.index(offset) if offset in VOICE_OFFSETS else -99
            return (total, near_prior, recency, -abs(speed - 100.0), voice_order, (-offset, -speed))

        best = max(self._scores.items(), key=key)[0]
        out: list[tuple[Burst, Candidate]] = []
        for b in self.bursts:
            if not b.candidates:
                continue
            agreeing = [c for c in b.candidates if _agrees(c, best[0], best[1])]
            pool = agreeing or list(b.candidates)
            out.append((b, min(pool, key=lambda c: (c.rank, -c.recency, abs(c.speed_pct - best[1]), -c.tonality))))
        return out, (best[0], float(best[1]))


def decode(bursts: list[Burst], prior: tuple[int, float] | None = None) -> tuple[list[tuple[Burst, Candidate]], tuple[int, float] | None]:
    """``SegmentDecoder`` over ``bursts`` at once: the chosen (burst, candidate) pairs and hypothesis."""
    decoder = SegmentDecoder()
    for b in bursts:
        decoder.add(b)
    return decoder.choose(prior)


# --------------------------------------------------------------------------- streaming


@dataclass(slots=True)
class StreamingRecognizer:
    """Audio in any chunking → bursts → words; the pending words are decoded jointly
    until ``commit``. No I/O; units: samples of the stream's ``rate``.

    Memory: the open burst (at most ``MAX_BURST_MS`` of samples), one pre-roll window,
    and the pending bursts (the caller commits at ``max_pending``: ``SttSession`` does).
    """

    vocabulary: Vocabulary
    rate: int
    encoding: str = "pcm_mulaw"
    min_rms: int = DEFAULT_MIN_RMS
    max_pending: int = 500
    samples: int = 0  # stream samples consumed (whole windows)
    decoder: SegmentDecoder = field(default_factory=SegmentDecoder)
    last_burst_end: int = 0
    prior: tuple[int, float] | None = None
    bursts_total: int = 0
    skipped_total: int = 0
    _carry: bytes = b""  # a partial sample of the wire encoding
    _partial: bytes = b""  # s16 samples short of a window
    _preroll: bytes = b""
    _burst: bytearray | None = None
    _burst_start: int = 0
    _quiet: int = 0
    _last_loud_end: int = 0

    @property
    def window(self) -> int:
        return max(1, WINDOW_MS * self.rate // 1000)

    @property
    def in_burst(self) -> bool:
        return self._burst is not None

    def silence_samples(self) -> int:
        """Samples since the end of the last burst (0 while one is open)."""
        return 0 if self._burst is not None else self.samples - self.last_burst_end

    def feed(self, audio: bytes) -> list[Burst]:
        """Consume wire audio; return the bursts that closed (also appended to ``pending``)."""
        width = _sample_bytes(self.encoding)
        data = self._carry + audio
        cut = len(data) - len(data) % width
        self._carry = data[cut:]
        pcm = self._partial + to_linear16(data[:cut], self.encoding)
        step = 2 * self.window
        closed: list[Burst] = []
        pos = 0
        while len(pcm) - pos >= step:
            self._window(pcm[pos : pos + step], closed)
            pos += step
        self._partial = pcm[pos:]
        return closed

    def _window(self, win: bytes, closed: list[Burst]) -> None:
        n = len(win) // 2
        rms = audioop.rms(win, 2)
        if self._burst is None:
            if rms >= self.min_rms:
                self._burst = bytearray(self._preroll + win)
                self._burst_start = self.samples - len(self._preroll) // 2
                self._quiet = 0
                self._last_loud_end = self.samples + n
            else:
                self._preroll = win
        else:
            self._burst += win
            if rms >= self.min_rms // 2:
                self._quiet = 0
                self._last_loud_end = self.samples + n
            else:
                self._quiet += 1
            too_long = len(self._burst) // 2 * 1000 >= MAX_BURST_MS * self.rate
            if self._quiet >= END_QUIET_WINDOWS or too_long:
                self._close_burst(closed)
                self._preroll = win
        self.samples += n

    def _close_burst(self, closed: list[Burst]) -> None:
        assert self._burst is not None
        # Up to one window after the last loud one: the ramp's tail, not the silence after it.
        keep = min(len(self._burst) // 2, self._last_loud_end - self._burst_start + self.window)
        burst = analyse_burst(bytes(self._burst[: 2 * keep]), self._burst_start, self.rate, self.vocabulary)
        self._burst = None
        if burst is None:
            return
        self.last_burst_end = burst.end
        self.bursts_total += 1
        if not burst.candidates:
            self.skipped_total += 1
            return
        self.decoder.add(burst)
        closed.append(burst)

    def flush(self) -> list[Burst]:
        """Close an open burst now (``finalize``/``close``), with the samples short of a window."""
        closed: list[Burst] = []
        if self._partial:
            if self._burst is not None:
                self._burst += self._partial
                self._last_loud_end = self.samples + len(self._partial) // 2
            self.samples += len(self._partial) // 2
            self._partial = b""
        if self._burst is not None:
            self._close_burst(closed)
        return closed

    @property
    def pending(self) -> list[Burst]:
        """Bursts with candidates since the last ``commit``."""
        return self.decoder.bursts

    def pending_words(self) -> list[RecognizedWord]:
        chosen, _ = self.decoder.choose(self.prior)
        return [RecognizedWord(c.text, b.start / self.rate, b.end / self.rate) for b, c in chosen]

    def commit(self) -> list[RecognizedWord]:
        """The pending words, decoded for good; the stream starts a new segment."""
        chosen, hypothesis = self.decoder.choose(self.prior)
        if chosen:
            self.prior = hypothesis
        self.decoder = SegmentDecoder()
        return [RecognizedWord(c.text, b.start / self.rate, b.end / self.rate) for b, c in chosen]


def _sample_bytes(encoding: str) -> int:
    return {"pcm_mulaw": 1, "pcm_alaw": 1, "pcm_s16le": 2, "pcm_f16le": 2, "pcm_s32le": 4, "pcm_f32le": 4}[encoding]


def recognize(audio: bytes, encoding: str, rate: int, vocabulary: Vocabulary) -> list[RecognizedWord]:
    """Whole-buffer convenience: every word heard in ``audio``."""
    rec = StreamingRecognizer(vocabulary, rate, encoding)
    rec.feed(audio)
    rec.flush()
    return rec.commit()
