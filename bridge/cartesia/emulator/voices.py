"""Offline voices for the emulator: ``tone`` (pure Python) and ``espeak`` (ctypes).

Both backends render one *job* (a piece of a context's transcript) into a
``Rendered``: the encoded audio in the requested output format plus word and
phoneme timings as sample offsets from the start of that audio. The context
slices the audio into chunks and turns offsets into seconds.

``tone``
    Each word is a tone burst of ``60 ms + 45 ms * letters`` (divided by
    ``generation_config.speed``) followed by a 40 ms silence. The pitch comes
    from ``crc32`` of the lower-cased word, the waveform from an integer
    Bhaskara sine approximation and an integer phase accumulator, so the
    samples are bit-exact on every platform and Python version (no libm, no
    ``hash()``). Encoded words are cached in a bounded LRU, so a hot path is a
    dictionary hit and a ``bytes.join``. ``--words-per-s W``: every word lasts
    1/W s instead (see ``ToneSynth``), which the STT recogniser cannot decode.

``espeak``
    espeak-ng from the ``espeakng-loader`` wheel (GPL-3.0+, an optional extra)
    via ctypes in synchronous mode at its native 22050 Hz. One synthesis thread
    (the library is not thread-safe); audio and WORD/PHONEME events are handed
    back to the event loop with ``call_soon_threadsafe``; conversion uses a
    stateful ``audioop.ratecv`` then ``lin2ulaw``/``lin2alaw``.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import ctypes
import re
import sys
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

try:  # Python 3.11/3.12 ship audioop; 3.13+ gets it from audioop-lts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
except ImportError:  # pragma: no cover
    audioop = None  # type: ignore[assignment]

from ..protocol import OutputFormat
from .rendered import RenderCache, Rendered

_LITTLE: Final = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Voice:
    """One catalogue voice. ``backend`` is ``tone`` or ``espeak``."""

    id: str
    name: str
    backend: str
    description: str
    gender: str
    language: str = "en"
    locale: str = "en-US"
    #: tone: pitch offset in Hz; espeak: voice name passed to espeak_SetVoiceByName.
    param: str = "0"

    def to_api(self) -> dict[str, Any]:
        """The ``Voice`` object shape of ``GET /voices`` (SDK ``cartesia.types.Voice``)."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "tagline": f"emulator {self.backend} voice"[:32],
            "language": self.language,
            "locales": [{"locale": self.locale, "is_native": True}],
            "gender": self.gender,
            "access": "public",
            "visibility": "all",
            "is_owner": False,
            "is_public": True,
            "created_at": "2026-01-01T00:00:00Z",
        }


TONE_VOICES: Final = (
    Voice("5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a01", "Tone Alto", "tone", "Deterministic tone bursts, mid pitch", "feminine", param="0"),
    Voice("5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a02", "Tone Bass", "tone", "Deterministic tone bursts, low pitch", "masculine", param="-120"),
    Voice("5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a03", "Tone Soprano", "tone", "Deterministic tone bursts, high pitch", "gender_neutral", param="240"),
)
ESPEAK_VOICES: Final = (
    Voice("9e3d6c1e-1b4f-4f7e-8a2c-3d5b7e9f0a01", "eSpeak US Male", "espeak", "espeak-ng en-us", "masculine", param="en-us"),
    Voice("9e3d6c1e-1b4f-4f7e-8a2c-3d5b7e9f0a02", "eSpeak US Female", "espeak", "espeak-ng en-us+f3", "feminine", param="en-us+f3"),
    Voice("9e3d6c1e-1b4f-4f7e-8a2c-3d5b7e9f0a03", "eSpeak UK", "espeak", "espeak-ng en-gb", "masculine", "en", "en-GB", param="en-gb"),
)
#: Real Cartesia voice ids that clients send by default, spoken by tone voices, so a client
#: used with its default options gets audio: the official SDK's README and its 3.x/4.x
#: ``no_more_inputs`` fallback (6ccbfb76…); Katie and Jameson, the docs' voice-agent picks
#: (Katie is livekit-plugins-cartesia's default); the docs' WebSocket example (a0e99841…).
CARTESIA_VOICES: Final = (
    Voice("6ccbfb76-1fc6-48f7-b71d-91ac6298247b", "SDK example voice (emulated)", "tone", "Official SDK README voice, emulated", "feminine", param="60"),
    Voice("f786b574-daa5-4673-aa0c-cbe3e8534c02", "Katie (emulated)", "tone", "Docs voice-agent pick, emulated", "feminine", param="120"),
    Voice("a5136bf9-224c-4d76-b823-52bd5efcffcc", "Jameson (emulated)", "tone", "Docs voice-agent pick, emulated", "masculine", param="-60"),
    Voice("a0e99841-438c-4a64-b679-ae501e7d6091", "Docs example voice (emulated)", "tone", "Docs WebSocket example voice, emulated", "masculine", param="-90"),
)
#: The voice tests and the bridge use by default (tone backend).
DEFAULT_VOICE_ID: Final = TONE_VOICES[0].id
DEFAULT_ESPEAK_VOICE_ID: Final = ESPEAK_VOICES[0].id


def catalogue(backend: str) -> dict[str, Voice]:
    """Voices usable with ``backend``: tone (and the emulated Cartesia ids) always; espeak adds its own."""
    voices = list(TONE_VOICES) + list(CARTESIA_VOICES)
    if backend == "espeak":
        voices = list(ESPEAK_VOICES) + voices
    return {v.id: v for v in voices}


# --------------------------------------------------------------------------
# Encoding


def encode_s16(pcm: bytes, encoding: str) -> bytes:
    """Native-order s16 samples → the wire encoding (little-endian PCM)."""
    if encoding == "pcm_s16le":
        if _LITTLE:
            return pcm
        arr = array.array("h", pcm)
        arr.byteswap()
        return arr.tobytes()
    if encoding == "pcm_mulaw":
        return audioop.lin2ulaw(pcm, 2)
    if encoding == "pcm_alaw":
        return audioop.lin2alaw(pcm, 2)
    if encoding == "pcm_f32le":
        src = array.array("h", pcm)
        out = array.array("f", [s / 32768.0 for s in src])
        if not _LITTLE:
            out.byteswap()
        return out.tobytes()
    raise ValueError(f"unsupported encoding {encoding!r}")


_WORD_RE: Final = re.compile(r"\S+")
_ALNUM_RE: Final = re.compile(r"\w", re.UNICODE)
_STRIP_RE: Final = re.compile(r"^\W+|\W+$", re.UNICODE)


def normalize_word(word: str) -> str:
    """Timestamp text for ``use_normalized_timestamps``: lower-cased, punctuation stripped."""
    return _STRIP_RE.sub("", word).lower() or word


# --------------------------------------------------------------------------
# tone

_TABLE_BITS: Final = 10
_TABLE_N: Final = 1 << _TABLE_BITS
_AMPLITUDE: Final = 9000
_GAP_MS: Final = 40
_RAMP_MS: Final = 5
_MIN_BURST_MS: Final = 10


def _bhaskara_table(n: int, amp: int) -> tuple[int, ...]:
    """One sine period of ``n`` integer samples, integer arithmetic only.

    Bhaskara I: sin(x) ≈ 16x(π−x) / (5π² − 4x(π−x)); with the half period
    mapped to ``h`` integer steps that is ``4p(h−p) / (5h²/4 − p(h−p))``.
    """
    h = n // 2
    out = []
    for i in range(n):
        p = i % h
        q = p * (h - p)
        v = (amp * 16 * q) // (5 * h * h - 4 * q)
        out.append(v if i < h else -v)
    return tuple(out)


_SINE: Final = _bhaskara_table(_TABLE_N, _AMPLITUDE)


def tone_word_frequency(word: str, pitch_offset: int) -> int:
    """Stable pitch in Hz: 220-619 Hz from crc32 of the lower-cased word, plus the voice offset."""
    return 220 + zlib.crc32(word.lower().encode("utf-8")) % 400 + pitch_offset


def tone_word_ms(word: str) -> int:
    """Burst length before speed scaling: 60 ms + 45 ms per letter/digit (at least one)."""
    letters = len(_ALNUM_RE.findall(word))
    return 60 + 45 * max(1, letters)


def _tone_pcm(freq: int, n: int, rate: int, volume_pct: int) -> bytes:
    """``n`` s16 samples of a tone with 5 ms linear ramps, integer-only."""
    inc = (freq * _TABLE_N << 16) // rate
    ramp = max(1, _RAMP_MS * rate // 1000)
    sine = _SINE
    mask = _TABLE_N - 1
    out = array.array("h", bytes(2 * n))
    phase = 0
    for i in range(n):
        v = sine[(phase >> 16) & mask] * volume_pct // 100
        if i < ramp:
            v = v * i // ramp
        elif n - i <= ramp:
            v = v * (n - 1 - i) // ramp
        out[i] = v
        phase += inc
    return out.tobytes()


class ToneSynth:
    """Deterministic tone voice with a bounded LRU of encoded words.

    ``words_per_s`` None: each word is ``tone_word_ms(word) / speed`` of burst
    plus a 40 ms gap. Set (0 < W <= ``MAX_WORDS_PER_S``): word ``k`` of a
    render starts at sample ``k * rate / W`` (integer floor), so every word
    lasts 1/W s to within one sample and ``speed`` is ignored; the gap is
    ``min(40 ms, word - 10 ms)`` (W <= 50). STT cannot decode it (it reads letter-count lengths).
    """

    def __init__(self, cache_size: int = 4096, words_per_s: float | None = None) -> None:
        self.words_per_s = words_per_s
        self._cache: OrderedDict[tuple[int, int, int, str, int], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._renders = RenderCache()  # whole renders (words hit ``_cache`` only on a render's miss)
        self._silence: dict[tuple[int, str, int], bytes] = {}
        self.cache_hits = self.cache_misses = 0

    def _word_audio(self, freq: int, n: int, rate: int, encoding: str, volume_pct: int) -> bytes:
        key = (freq, n, rate, encoding, volume_pct)
        audio = self._cache.get(key)
        if audio is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return audio
        self.cache_misses += 1
        audio = encode_s16(_tone_pcm(freq, n, rate, volume_pct), encoding)
        self._cache[key] = audio
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return audio

    def _gap(self, n: int, encoding: str, rate: int) -> bytes:
        key = (n, encoding, rate)
        gap = self._silence.get(key)
        if gap is None:
            gap = encode_s16(bytes(2 * n), encoding)
            self._silence[key] = gap
        return gap

    def render(
        self,
        text: str,
        fmt: OutputFormat,
        voice: Voice,
        *,
        speed: float = 1.0,
        volume: float = 1.0,
        phonemes: bool = False,
    ) -> Rendered:
        rate = fmt.sample_rate
        speed_pct = max(1, round(speed * 100))
        volume_pct = max(1, round(volume * 100))
        pitch = int(voice.param)
        key = (text, rate, fmt.encoding, pitch, speed_pct, volume_pct, phonemes, self.words_per_s)
        rendered = self._renders.get(key)
        if rendered is None:
            rendered = self._render(text, rate, fmt.encoding, pitch, speed_pct, volume_pct, phonemes)
            self._renders.put(key, rendered)
        return rendered

    def _render(self, text: str, rate: int, encoding: str, pitch: int, speed_pct: int, volume_pct: int,
                phonemes: bool) -> Rendered:  # render() without the cache
        gap_n = _GAP_MS * rate // 1000
        gap = self._gap(gap_n, encoding, rate)
        parts: list[bytes] = []
        words: list[tuple[str, int, int]] = []
        phons: list[tuple[str, int, int]] = []
        pos = 0
        # Fixed word rate: word k spans [k * rate * 1000 // milli_wps, (k + 1) * ...), integer-exact.
        milli_wps = None if self.words_per_s is None else max(1, round(self.words_per_s * 1000))
        for k, match in enumerate(_WORD_RE.finditer(text)):
            word = match.group(0)
            if milli_wps is None:
                n = tone_word_ms(word) * rate * 100 // (1000 * speed_pct)
            else:
                span = (k + 1) * rate * 1000 // milli_wps - k * rate * 1000 // milli_wps
                gap_n = min(_GAP_MS * rate // 1000, span - _MIN_BURST_MS * rate // 1000)
                gap = self._gap(gap_n, encoding, rate)
                n = span - gap_n
            parts.append(self._word_audio(tone_word_frequency(word, pitch), n, rate, encoding, volume_pct))
            parts.append(gap)
            words.append((word, pos, pos + n))
            if phonemes:
                letters = [c.lower() for c in word if c.isalnum()] or [word[0]]
                for k, letter in enumerate(letters):
                    phons.append((letter, pos + n * k // len(letters), pos + n * (k + 1) // len(letters)))
            pos += n + gap_n
        return Rendered(b"".join(parts), pos, words, phons)


# --------------------------------------------------------------------------
# espeak


class EspeakUnavailable(RuntimeError):
    """espeak-ng could not be loaded (``espeakng-loader`` missing or broken)."""


class _EspeakEventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EspeakEventId),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent))
_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_INIT_PHONEME_EVENTS: Final = 0x0001
_POS_CHARACTER: Final = 1
_CHARS_UTF8: Final = 1
_EV_LIST_TERMINATED: Final = 0
_EV_WORD: Final = 1
_EV_PHONEME: Final = 7
ESPEAK_RATE: Final = 22050


class EspeakSynth:
    """espeak-ng behind one worker thread (the library is not thread-safe)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise EspeakUnavailable(
                "voice backend 'espeak' needs the optional extra: pip install -e '.[speech]' (espeakng-loader)"
            ) from exc
        if audioop is None:  # pragma: no cover
            raise EspeakUnavailable("audioop is unavailable (install audioop-lts on Python 3.13+)")
        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise EspeakUnavailable(f"cannot load libespeak-ng: {exc}") from exc
        self._lib = lib
        self._data_path = data_path
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        self._lock = threading.Lock()
        # Per-synthesis sink, only touched on the worker thread.
        self._deliver: Callable[[bytes, list[tuple[int, int, int, int, bytes]]], None] | None = None
        self._callback = _SYNTH_CALLBACK(self._on_synth)
        self._voice_name: str | None = None
        rate = self._executor.submit(self._init).result()
        if rate <= 0:
            raise EspeakUnavailable(f"espeak_Initialize failed (returned {rate})")
        self.rate = rate

    def _init(self) -> int:
        lib = self._lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        rate = int(lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 200, self._data_path.encode(), _INIT_PHONEME_EVENTS))
        lib.espeak_SetSynthCallback(self._callback)
        return rate

    def _on_synth(self, wav: Any, numsamples: int, events: Any) -> int:
        deliver = self._deliver
        if deliver is None:
            return 0
        pcm = ctypes.string_at(wav, numsamples * 2) if numsamples > 0 and wav else b""
        evs: list[tuple[int, int, int, int, bytes]] = []
        i = 0
        while True:
            ev = events[i]
            if ev.type == _EV_LIST_TERMINATED:
                break
            if ev.type in (_EV_WORD, _EV_PHONEME):
                evs.append((ev.type, ev.text_position, ev.length, ev.audio_position, bytes(ev.id.string)))
            i += 1
        deliver(pcm, evs)
        return 0

    def _synth(
        self, text: str, voice_name: str, rate_wpm: int, deliver: Any
    ) -> None:
        """Worker thread: synthesize ``text``; ``deliver(pcm, events)`` per callback batch."""
        with self._lock:
            if voice_name != self._voice_name:
                self._lib.espeak_SetVoiceByName(voice_name.encode())
                self._voice_name = voice_name
            self._lib.espeak_SetParameter(1, rate_wpm, 0)  # espeakRATE
            data = text.encode("utf-8") + b"\0"
            buf = ctypes.create_string_buffer(data)
            self._deliver = deliver
            try:
                self._lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            finally:
                self._deliver = None

    async def render(
        self,
        text: str,
        fmt: OutputFormat,
        voice: Voice,
        *,
        speed: float = 1.0,
        volume: float = 1.0,
        phonemes: bool = False,
    ) -> Rendered:
        """Synthesize on the worker thread; batches come back via ``call_soon_threadsafe``."""
        loop = asyncio.get_running_loop()
        batches: list[tuple[bytes, list[tuple[int, int, int, int, bytes]]]] = []

        def deliver(pcm: bytes, evs: list[tuple[int, int, int, int, bytes]]) -> None:
            loop.call_soon_threadsafe(batches.append, (pcm, evs))

        rate_wpm = max(80, min(450, round(175 * speed)))
        fut = loop.run_in_executor(self._executor, self._synth, text, voice.param, rate_wpm, deliver)
        await fut
        # call_soon_threadsafe callbacks queued before the future resolved run first; yield once more.
        await asyncio.sleep(0)
        return self._convert(text, batches, fmt, volume, phonemes)

    def _convert(
        self,
        text: str,
        batches: list[tuple[bytes, list[tuple[int, int, int, int, bytes]]]],
        fmt: OutputFormat,
        volume: float,
        phonemes: bool,
    ) -> Rendered:
        in_rate, out_rate = self.rate, fmt.sample_rate
        state: Any = None
        out_parts: list[bytes] = []
        word_starts: list[tuple[str, int]] = []
        phon_starts: list[tuple[str, int]] = []
        encoded = text.encode("utf-8")
        in_samples = 0
        for pcm, evs in batches:
            for kind, pos, length, audio_ms, ident in evs:
                # audio_position is ms since the start of this synthesis.
                at = audio_ms * out_rate // 1000
                if kind == _EV_WORD:
                    start = max(0, pos - 1)
                    word = encoded[start : start + length].decode("utf-8", "replace") if length > 0 else ""
                    if word.strip():
                        word_starts.append((word, at))
                elif phonemes:
                    name = ident.split(b"\0", 1)[0].decode("utf-8", "replace")
                    if name:
                        phon_starts.append((name, at))
            if not pcm:
                continue
            in_samples += len(pcm) // 2
            if volume != 1.0:
                pcm = audioop.mul(pcm, 2, volume)
            if in_rate != out_rate:
                pcm, state = audioop.ratecv(pcm, 2, 1, in_rate, out_rate, state)
            out_parts.append(pcm)
        pcm_all = b"".join(out_parts)
        total = len(pcm_all) // 2
        words = _spans(word_starts, total)
        phons = _spans(phon_starts, total) if phonemes else []
        return Rendered(encode_s16(pcm_all, fmt.encoding), total, words, phons)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _spans(starts: list[tuple[str, int]], total: int) -> list[tuple[str, int, int]]:
    """Turn ordered (label, start) pairs into (label, start, end): end = next start, last = total."""
    out: list[tuple[str, int, int]] = []
    for i, (label, start) in enumerate(starts):
        start = min(start, total)
        end = starts[i + 1][1] if i + 1 < len(starts) else total
        out.append((label, start, max(start, min(end, total))))
    return out
