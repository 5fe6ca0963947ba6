"""ConversationRelay ``play``: fetch an audio file from an allowlisted URL, play it as μ-law 8 kHz.

Three layers, from pure to I/O:

* ``url_allowed``: may this URL be fetched? Exact origin (scheme, host, port) plus a path
  prefix at a segment boundary, after normalising the path. Fails closed on anything odd.
* ``decode_to_mulaw8k``: bytes of a file -> μ-law 8 kHz mono, transcoded once (no I/O).
  WAV (PCM 8/16/24/32-bit, IEEE float 32/64, μ-law, a-law; any rate; mono/stereo), Sun
  ``.snd`` and raw ``audio/basic`` / ``audio/x-mulaw``, MP3 when ``miniaudio`` is installed.
* ``PlayAudioFetcher``: the HTTP edge (size, time and redirect limits, LRU cache, coalescing).

Query strings are never logged nor put in error messages: signed media URLs carry tokens there.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import ipaddress
import logging
import math
import re
import sys
import time
import warnings
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
import yarl

from bridge.logs import log_event, loggable_url

with warnings.catch_warnings():  # 3.11/3.12 ship audioop (deprecated); 3.13+ gets it from audioop-lts.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

_miniaudio: Any
try:  # Optional: MP3 decoding (MIT, wheels only). Without it MP3 is refused with a clear error.
    _miniaudio = importlib.import_module("miniaudio")
except ImportError:  # pragma: no cover - depends on the environment
    _miniaudio = None

if TYPE_CHECKING:
    from metrics import BridgeMetrics

log = logging.getLogger("bridge.agent.play")

MiB: Final = 1024 * 1024
FRAME_BYTES: Final = 160  # 20 ms of μ-law 8 kHz
MULAW_SILENCE: Final = 0xFF
OUTPUT_RATE_HZ: Final = 8000
MAX_REDIRECTS: Final = 3
# Decoded length cap: 5 min = 2.4 MB of μ-law, ~6 s of CPU at 44.1 kHz; longer music loops (``loop``).
MAX_DURATION_S: Final = 300.0
MIN_RATE_HZ: Final = 1000
MAX_RATE_HZ: Final = 384_000
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_DNS_NAME = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?)*")
_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c)", re.IGNORECASE)
_MULAW_TYPES: Final = frozenset({"audio/basic", "audio/x-mulaw", "audio/mulaw", "audio/pcmu", "audio/x-basic"})
_MP3_TYPES: Final = frozenset({"audio/mpeg", "audio/mp3", "audio/x-mp3", "audio/mpeg3", "audio/x-mpeg-3"})


class PlayAudioError(Exception):
    """A ``play`` source that cannot be played. ``kind`` is a short label for metrics:
    not_allowed, http_status, too_large, too_many_redirects, timeout, network, bad_audio,
    unsupported_format, too_long."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- allowlist ------------------------------------------------------------------------------------


def _normalised(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) with the path percent-decoded and dot segments removed, or None
    for anything that is not a plain http(s) URL or that parsers could read differently."""
    if "\\" in url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc or "@" in parts.netloc:
        return None
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal (urlsplit dropped its brackets)
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            return None
    elif not _DNS_NAME.fullmatch(host):
        return None
    raw_path = parts.path or "/"
    if not raw_path.startswith("/") or _ENCODED_SEPARATOR.search(raw_path):
        return None  # an encoded / or \ would make segments the server may not see
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "%" in decoded or "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None  # double encoding, malformed escapes, encoded control characters
    path = _remove_dot_segments(decoded)
    if path is None:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme], path


def _remove_dot_segments(path: str) -> str | None:
    """RFC 3986 dot-segment removal; None when ``..`` would climb above the root."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == "..":
                if not out:
                    return None
                out.pop()
            if index == len(segments) - 1:
                out.append("")  # "/a/b/.." is the directory "/a/"
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def url_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    """True when ``url`` is http(s), has the exact origin of an allowlist entry (host compared
    case-insensitively, default ports normalised) and a normalised path under that entry's path
    at a segment boundary (``https://cdn/audio/`` and ``https://cdn/audio`` both allow
    ``/audio/x.wav`` but not ``/audio-private/x.wav``). Userinfo, backslashes, encoded ``/``
    or ``\\``, double encoding and ``..`` above the root are refused outright. The URL must
    also read the same through yarl (what aiohttp requests), so a parser differential fails closed.
    """
    ours = _normalised(url)
    if ours is None:
        return False
    scheme, host, port, path = ours
    try:
        theirs = yarl.URL(url)
        yarl_host = (theirs.host or "").lower()
        if ":" in yarl_host:
            yarl_host = ipaddress.IPv6Address(yarl_host).compressed
    except (ValueError, TypeError):
        return False
    if theirs.user is not None or (theirs.scheme, yarl_host, theirs.port) != (scheme, host, port):
        return False
    for entry in allowlist:
        allowed = _normalised(entry)
        if allowed is None or allowed[:3] != (scheme, host, port):
            continue
        if _under(path, allowed[3]) and _under(theirs.path, allowed[3]):
            return True
    return False


# --- decoding (no I/O) ---------------------------------------------------------------------------


def decode_to_mulaw8k(data: bytes, content_type: str | None, *, max_duration_s: float = MAX_DURATION_S) -> bytes:
    """Decode an audio file to μ-law 8 kHz mono, padded with μ-law silence (0xFF) to whole
    160-byte frames. The format is sniffed from the bytes (RIFF/WAVE, ``.snd``, ID3/MPEG sync);
    ``content_type`` is needed only for headerless μ-law (``audio/basic``, ``audio/x-mulaw``,
    optional ``rate``/``channels`` parameters). μ-law 8 kHz mono input passes through untouched.
    Above 8 kHz a low-pass FIR (see ``_anti_alias``) runs before audioop's linear-interpolation
    resampler, so aliases stay > 50 dB down. CPU: about 20 ms per second of 44.1 kHz audio
    (run it in a worker thread; no single audioop call holds the GIL much longer than 15 ms
    for a minute of audio). Raises ``PlayAudioError``
    for bad, truncated, unsupported or longer-than-``max_duration_s`` audio.
    """
    media_type, params = _parse_content_type(content_type)
    if data[:4] == b"RIFF":
        return _from_wav(data, max_duration_s)
    if data[:4] == b"RIFX":
        raise PlayAudioError("big-endian WAV (RIFX) is not supported", "unsupported_format")
    if data[:4] == b".snd":
        return _from_au(data, max_duration_s)
    if media_type in _MULAW_TYPES:  # before MPEG sniffing: μ-law silence is 0xFF bytes, like a sync word
        return _from_raw_mulaw(data, params, max_duration_s)
    if data[:3] == b"ID3" or media_type in _MP3_TYPES or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return _from_mp3(data, max_duration_s)
    if media_type in ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"):
        raise PlayAudioError(f"declared {media_type} but the body is not a RIFF/WAVE file", "bad_audio")
    raise PlayAudioError(
        f"unrecognised audio (content type {media_type or 'none'}): expected WAV, MP3 or raw μ-law "
        "(audio/basic, audio/x-mulaw)",
        "unsupported_format",
    )


def _parse_content_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    media_type, *rest = content_type.split(";")
    params = {}
    for item in rest:
        key, _, value = item.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return media_type.strip().lower(), params


def _check_shape(channels: int, rate: int, frames: int, max_duration_s: float, what: str) -> None:
    if channels not in (1, 2):
        raise PlayAudioError(f"{what} has {channels} channels; mono or stereo is supported", "unsupported_format")
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise PlayAudioError(f"{what} has an implausible sample rate {rate} Hz", "bad_audio")
    if frames <= 0:
        raise PlayAudioError(f"{what} has no audio samples", "bad_audio")
    if frames / rate > max_duration_s:
        raise PlayAudioError(f"{what} lasts {frames / rate:.0f} s, more than {max_duration_s:.0f} s", "too_long")


def _from_wav(data: bytes, max_duration_s: float) -> bytes:
    if len(data) < 12 or data[8:12] != b"WAVE":
        raise PlayAudioError("RIFF file is not WAVE", "bad_audio")
    fmt: bytes | None = None
    payload: bytes | None = None
    pos = 12
    while pos + 8 <= len(data) and (fmt is None or payload is None):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        start = pos + 8
        available = len(data) - start
        if chunk_id == b"data":
            if size == 0xFFFFFFFF:  # streaming writers: "until the end of the file"
                size = available
            if size > available:
                raise PlayAudioError(f"truncated WAV: data chunk declares {size} bytes, {available} present", "bad_audio")
            payload = data[start : start + size]
        elif chunk_id == b"fmt ":
            if size < 16 or size > available:
                raise PlayAudioError(f"bad WAV fmt chunk ({size} bytes, {available} present)", "bad_audio")
            fmt = data[start : start + size]
        pos = start + size + (size & 1)
    if fmt is None:
        raise PlayAudioError("WAV has no fmt chunk", "bad_audio")
    if payload is None:
        raise PlayAudioError("WAV has no data chunk", "bad_audio")
    code = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    block_align = int.from_bytes(fmt[12:14], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if code == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real code opens the SubFormat GUID
        code = int.from_bytes(fmt[24:26], "little")
    supported = {1: (8, 16, 24, 32), 3: (32, 64), 6: (8,), 7: (8,)}
    if bits not in supported.get(code, ()):
        raise PlayAudioError(
            f"WAV encoding 0x{code:04x} with {bits}-bit samples is not supported "
            "(PCM 8/16/24/32-bit, IEEE float 32/64-bit, μ-law and a-law are)",
            "unsupported_format",
        )
    if channels and block_align != channels * bits // 8:
        raise PlayAudioError(f"bad WAV block align {block_align} for {channels} x {bits}-bit", "bad_audio")
    frames = len(payload) // block_align if block_align else 0
    _check_shape(channels, rate, frames, max_duration_s, "WAV")
    payload = payload[: frames * block_align]  # a torn last sample frame is dropped
    width = bits // 8
    if code == 7:
        if channels == 1 and rate == OUTPUT_RATE_HZ:
            return _frame_pad(payload)  # already what Twilio plays: no transcoding at all
        return _pcm16_to_mulaw8k(audioop.ulaw2lin(payload, 2), channels, rate)
    if code == 6:
        return _pcm16_to_mulaw8k(audioop.alaw2lin(payload, 2), channels, rate)
    if code == 3:
        return _pcm16_to_mulaw8k(_float_to_pcm16(payload, width, big_endian=False), channels, rate)
    if width == 1:  # 8-bit WAV is unsigned
        return _pcm16_to_mulaw8k(audioop.lin2lin(audioop.bias(payload, 1, -128), 1, 2), channels, rate)
    return _pcm16_to_mulaw8k(_native(payload, width, big_endian=False, out_width=2), channels, rate)


def _from_au(data: bytes, max_duration_s: float) -> bytes:
    """Sun/NeXT ``.snd`` (often served as ``audio/basic``): big-endian header, then samples."""
    if len(data) < 24:
        raise PlayAudioError("truncated .snd header", "bad_audio")
    offset, size, encoding, rate, channels = (int.from_bytes(data[i : i + 4], "big") for i in range(4, 24, 4))
    if offset < 24 or offset > len(data):
        raise PlayAudioError(f"bad .snd data offset {offset}", "bad_audio")
    payload = data[offset:] if size == 0xFFFFFFFF else data[offset : offset + size]
    if size != 0xFFFFFFFF and len(payload) < size:
        raise PlayAudioError(f"truncated .snd: {size} bytes declared, {len(payload)} present", "bad_audio")
    widths = {1: 1, 2: 1, 3: 2, 27: 1}
    if encoding not in widths:
        raise PlayAudioError(f".snd encoding {encoding} is not supported (μ-law, a-law, 8/16-bit PCM are)", "unsupported_format")
    block = widths[encoding] * max(channels, 1)
    frames = len(payload) // block
    _check_shape(channels, rate, frames, max_duration_s, ".snd")
    payload = payload[: frames * block]
    if encoding == 1:
        if channels == 1 and rate == OUTPUT_RATE_HZ:
            return _frame_pad(payload)
        return _pcm16_to_mulaw8k(audioop.ulaw2lin(payload, 2), channels, rate)
    if encoding == 27:
        return _pcm16_to_mulaw8k(audioop.alaw2lin(payload, 2), channels, rate)
    if encoding == 2:  # signed 8-bit
        return _pcm16_to_mulaw8k(audioop.lin2lin(payload, 1, 2), channels, rate)
    return _pcm16_to_mulaw8k(_native(payload, 2, big_endian=True, out_width=2), channels, rate)


def _from_raw_mulaw(data: bytes, params: dict[str, str], max_duration_s: float) -> bytes:
    try:
        rate = int(params.get("rate", OUTPUT_RATE_HZ))
        channels = int(params.get("channels", 1))
    except ValueError as exc:
        raise PlayAudioError(f"bad μ-law content type parameters: {params}", "bad_audio") from exc
    frames = len(data) // max(channels, 1)
    _check_shape(channels, rate, frames, max_duration_s, "μ-law audio")
    if channels == 1 and rate == OUTPUT_RATE_HZ:
        return _frame_pad(data)
    return _pcm16_to_mulaw8k(audioop.ulaw2lin(data[: frames * channels], 2), channels, rate)


def _from_mp3(data: bytes, max_duration_s: float) -> bytes:
    if _miniaudio is None:
        raise PlayAudioError("MP3 needs the 'miniaudio' package, which is not installed", "unsupported_format")
    try:
        info = _miniaudio.mp3_get_info(data)
        _check_shape(info.nchannels, info.sample_rate, info.num_frames, max_duration_s, "MP3")
        decoded = _miniaudio.mp3_read_s16(data)
    except _miniaudio.DecodeError as exc:
        raise PlayAudioError(f"MP3 could not be decoded ({exc})", "bad_audio") from exc
    _check_shape(decoded.nchannels, decoded.sample_rate, decoded.num_frames, max_duration_s, "MP3")
    return _pcm16_to_mulaw8k(decoded.samples.tobytes(), decoded.nchannels, decoded.sample_rate)


def _native(raw: bytes, width: int, *, big_endian: bool, out_width: int) -> bytes:
    """Linear PCM of ``width`` bytes in the file's byte order -> native ``out_width`` (audioop's order)."""
    if big_endian != (sys.byteorder == "big"):
        raw = audioop.byteswap(raw, width)
    return raw if width == out_width else audioop.lin2lin(raw, width, out_width)


def _float_to_pcm16(raw: bytes, width: int, *, big_endian: bool) -> bytes:
    """IEEE float (±1.0 full scale) -> native 16-bit, clipped; NaN becomes 0. Pure Python:
    about 0.2 µs per sample, so a 10 MiB float32 file costs well under a second (in a thread)."""
    samples = array("f" if width == 4 else "d")
    samples.frombytes(raw)
    if big_endian != (sys.byteorder == "big"):
        samples.byteswap()
    return array(
        "h",
        [32767 if v >= 1.0 else -32768 if v <= -1.0 else int(v * 32767.0) if v == v else 0 for v in samples],
    ).tobytes()


def _pcm16_to_mulaw8k(pcm: bytes, channels: int, rate: int) -> bytes:
    if channels == 2:
        pcm = audioop.tomono(pcm, 2, 0.5, 0.5)
    if rate > OUTPUT_RATE_HZ:
        pcm, rate = _anti_alias(pcm, rate)
    if rate != OUTPUT_RATE_HZ:
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate, OUTPUT_RATE_HZ, None)
    return _frame_pad(audioop.lin2ulaw(pcm, 2))


def _anti_alias(pcm: bytes, rate: int) -> tuple[bytes, int]:
    """Low-pass native 16-bit ``pcm`` below 4 kHz so that the linear-interpolation resampler
    (audioop.ratecv) folds almost nothing into the telephone band; returns (pcm, new rate).

    Above 16 kHz a cheap second-order box-car first decimates by ``rate // 16000`` (its nulls sit
    on the multiples of the new rate, where the folding bands are centred). Then a Hamming-windowed
    sinc FIR (cut-off 4 kHz, ~1.2 kHz transition, 31-61 taps) runs at that rate. Measured on a
    44.1 kHz input: 1 kHz -0.1 dB, 3 kHz -0.9 dB, 3.4 kHz -1.2 dB; 4.7 kHz (folding to 3.3 kHz)
    -54 dB, 7 kHz (to 1 kHz) -70 dB. Audio is halved first so that no partial sum clips in 16 bits.
    """
    pcm = audioop.mul(pcm, 2, 0.5)
    factor = rate // 16000
    fir_rate = rate / max(factor, 1)
    if factor >= 2:
        pcm = _boxcar(_boxcar(pcm, factor), factor)
        samples = array("h")
        samples.frombytes(pcm)
        pcm = samples[::factor].tobytes()
    half = int(3.3 * fir_rate / 1200) // 2
    cutoff = 4000 / fir_rate  # cycles per sample
    taps = [
        (2 * cutoff if j == 0 else math.sin(2 * math.pi * cutoff * j) / (math.pi * j))
        * (0.54 + 0.46 * math.cos(math.pi * j / (half + 1)))
        for j in range(half + 1)
    ]
    norm = taps[0] + 2 * sum(taps[1:])
    pad = b"\x00\x00" * half
    padded = pad + pcm + pad
    size = len(pcm)
    out = audioop.mul(pcm, 2, taps[0] / norm)
    for j in range(1, half + 1):
        pair = audioop.add(padded[2 * (half + j) : 2 * (half + j) + size], padded[2 * (half - j) : 2 * (half - j) + size], 2)
        out = audioop.add(out, audioop.mul(pair, 2, taps[j] / norm), 2)
    return audioop.mul(out, 2, 2.0), round(fir_rate)


def _boxcar(pcm: bytes, taps: int) -> bytes:
    """Moving average over ``taps`` samples: nulls at multiples of rate / ``taps``."""
    scaled = audioop.mul(pcm, 2, 1.0 / taps)
    total = scaled
    for shift in range(1, taps):
        total = audioop.add(total, b"\x00\x00" * shift + scaled[: len(scaled) - 2 * shift], 2)
    return total


def _frame_pad(mulaw: bytes) -> bytes:
    remainder = len(mulaw) % FRAME_BYTES
    return mulaw + bytes([MULAW_SILENCE]) * (FRAME_BYTES - remainder) if remainder else mulaw


# --- fetching (I/O) ------------------------------------------------------------------------------


class PlayAudioFetcher:
    """Fetches ``play`` sources over HTTP and returns them as μ-law 8 kHz (see ``decode_to_mulaw8k``).

    Limits, all per fetcher (one per process is enough; it is safe to share between calls):

    * only URLs passing ``url_allowed(url, allowlist)``; every redirect target is checked again,
      at most ``MAX_REDIRECTS`` (3) redirects;
    * ``max_bytes`` (default 10 MiB) of response body, counted while streaming (Content-Length
      is used only to refuse early, never trusted to accept); gzip bodies are counted decompressed;
    * ``timeout_s`` (default 10 s) for the whole download: waiting for a slot, redirects and
      body (decoding comes after it and is bounded by ``max_duration_s``, default 300 s of audio);
    * at most ``max_concurrent`` (default 4) downloads at once; more wait for a slot within their
      timeout;
    * an LRU cache of transcoded audio keyed by the exact URL, bounded both by ``cache_entries``
      (default 32) and by ``cache_bytes`` (default 32 MiB of μ-law, about 70 min of audio); the
      least recently used entries are evicted until both hold, and a single result larger than
      ``cache_bytes`` is returned but not cached. Failures are not cached;
    * concurrent fetches of the same URL share one download. If every waiter is cancelled the
      download still finishes (bounded by ``timeout_s``) and fills the cache; ``close`` cancels it.

    Decoding runs in a worker thread so a large file does not stall the event loop.
    Each failure raises ``PlayAudioError`` and is counted in ``bridge_bad_input{source="play"}``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        allowlist: tuple[str, ...],
        *,
        max_bytes: int = 10 * MiB,
        timeout_s: float = 10.0,
        cache_entries: int = 32,
        cache_bytes: int = 32 * MiB,
        max_concurrent: int = 4,
        max_duration_s: float = MAX_DURATION_S,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        for entry in allowlist:
            parts = urlsplit(entry)
            if _normalised(entry) is None or parts.query or parts.fragment:
                raise ValueError(f"play allowlist entry {loggable_url(entry)!r} must be a plain http(s)://host/path prefix")
        self._session = session
        self._allowlist = tuple(allowlist)
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._cache_entries = cache_entries
        self._cache_bytes = cache_bytes
        self._max_duration_s = max_duration_s
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_concurrent)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self.downloads = 0  # HTTP fetches started (a cache hit or a coalesced wait is not one)

    @property
    def cached_entries(self) -> int:
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    async def fetch(self, url: str) -> bytes:
        """μ-law 8 kHz audio of ``url``, a whole number of 160-byte frames; ``PlayAudioError`` if not."""
        if not url_allowed(url, self._allowlist):
            raise self._counted(url, PlayAudioError(f"{loggable_url(url)} is not on the play allowlist", "not_allowed"))
        cached = self._cache.get(url)
        if cached is not None:
            self._cache.move_to_end(url)
            return cached
        task = self._inflight.get(url)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(url), name="play-audio-fetch")
            self._inflight[url] = task
            task.add_done_callback(functools.partial(self._finished, url))
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel downloads in flight and empty the cache."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cache.clear()
        self._cached_bytes = 0

    def _finished(self, url: str, task: asyncio.Task[bytes]) -> None:
        if self._inflight.get(url) is task:
            del self._inflight[url]
        if not task.cancelled():
            task.exception()  # retrieved here, so a download nobody awaits any more does not warn

    def _counted(self, url: str, error: PlayAudioError) -> PlayAudioError:
        if self._metrics is not None:
            self._metrics.bad_input.labels(source="play", kind=error.kind).inc()
        log_event(log, "play_audio_failed", logging.WARNING, url=loggable_url(url), kind=error.kind, reason=str(error))
        return error

    async def _load(self, url: str) -> bytes:
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    async with self._slots:
                        self.downloads += 1
                        body, content_type, redirects = await self._download(url)
            except TimeoutError:
                raise PlayAudioError(f"fetching {loggable_url(url)} took more than {self._timeout_s:g} s", "timeout") from None
            except aiohttp.ClientError as exc:  # its text may hold the URL: name the type only
                raise PlayAudioError(f"fetching {loggable_url(url)} failed: {type(exc).__name__}", "network") from None
            audio = await asyncio.to_thread(decode_to_mulaw8k, body, content_type, max_duration_s=self._max_duration_s)
        except PlayAudioError as error:
            self._counted(url, error)
            raise
        self._remember(url, audio)
        log_event(
            log, "play_audio_fetched", url=loggable_url(url), body_bytes=len(body), audio_ms=len(audio) // 8,
            redirects=redirects, fetch_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return audio

    async def _download(self, url: str) -> tuple[bytes, str | None, int]:
        current = url
        headers = {"Accept": "audio/*", "Accept-Encoding": "identity"}
        for redirects in range(MAX_REDIRECTS + 1):
            async with self._session.get(current, allow_redirects=False, headers=headers) as resp:
                if resp.status in _REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise PlayAudioError(f"{loggable_url(current)} redirected without a Location", "http_status")
                    target = urljoin(current, location)
                    if not url_allowed(target, self._allowlist):
                        raise PlayAudioError(
                            f"{loggable_url(current)} redirected to {loggable_url(target)}, which is not on the play allowlist",
                            "not_allowed",
                        )
                    current = target
                    continue
                if resp.status != 200:
                    raise PlayAudioError(f"{loggable_url(current)} answered HTTP {resp.status}", "http_status")
                if resp.content_length is not None and resp.content_length > self._max_bytes:
                    raise PlayAudioError(self._too_large(current), "too_large")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise PlayAudioError(self._too_large(current), "too_large")
                return bytes(body), resp.headers.get("Content-Type"), redirects
        raise PlayAudioError(f"{loggable_url(url)}: more than {MAX_REDIRECTS} redirects", "too_many_redirects")

    def _too_large(self, url: str) -> str:
        return f"{loggable_url(url)} is larger than {self._max_bytes} bytes"

    def _remember(self, url: str, audio: bytes) -> None:
        if len(audio) > self._cache_bytes or self._cache_entries <= 0:
            return
        self._cache[url] = audio
        self._cached_bytes += len(audio)
        while len(self._cache) > self._cache_entries or self._cached_bytes > self._cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= len(evicted)
