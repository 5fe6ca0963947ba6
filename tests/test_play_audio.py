"""ConversationRelay ``play``: allowlist, decoding to μ-law 8 kHz, and the HTTP fetcher against a
real aiohttp server on 127.0.0.1 serving WAV files made here."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import warnings
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from bridge.agent import play_audio
from bridge.agent.play_audio import PlayAudioError, PlayAudioFetcher, decode_to_mulaw8k, url_allowed
from bridge.netutil import free_port
from metrics import BridgeMetrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

# --- signals and files made here --------------------------------------------------------------


def sine(freq: float, rate: int, seconds: float, amplitude: float) -> list[float]:
    return [amplitude * math.sin(2 * math.pi * freq * n / rate) for n in range(int(rate * seconds))]


def pcm16(samples: list[float]) -> bytes:
    return array("h", [round(s * 32767) for s in samples]).tobytes()


def interleave(left: bytes, right: bytes, width: int) -> bytes:
    out = bytearray()
    for i in range(0, len(left), width):
        out += left[i : i + width] + right[i : i + width]
    return bytes(out)


def wav(code: int, channels: int, rate: int, bits: int, payload: bytes, *, extensible: bool = False) -> bytes:
    block = channels * bits // 8
    if extensible:  # WAVE_FORMAT_EXTENSIBLE: the real code opens the SubFormat GUID
        guid = struct.pack("<H", code) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", code, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 5) + b"INFOx\x00"  # an odd-sized chunk to skip (padded)
    body += b"data" + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def ulaw_8k_mono(seconds: float = 0.5) -> tuple[bytes, bytes]:
    mulaw = audioop.lin2ulaw(pcm16(sine(1000, 8000, seconds, 0.5)), 2)
    return wav(7, 1, 8000, 8, mulaw), mulaw


def pcm16_16k_stereo(seconds: float = 0.5) -> bytes:
    left = pcm16(sine(1000, 16000, seconds, 0.5))
    right = pcm16(sine(1000, 16000, seconds, 0.3))
    return wav(1, 2, 16000, 16, interleave(left, right, 2))


def float_44k_mono(seconds: float = 0.5, freq: float = 1000) -> bytes:
    return wav(3, 1, 44100, 32, array("f", sine(freq, 44100, seconds, 0.5)).tobytes())


# --- measurements ------------------------------------------------------------------------------


def decoded(mulaw: bytes) -> list[int]:
    raw = audioop.ulaw2lin(mulaw, 2)
    return list(struct.unpack(f"<{len(raw) // 2}h", raw))


def tone_amplitude(samples: list[int], freq: float) -> float:
    """Amplitude of ``freq`` (Goertzel over the whole signal, normalised to a sine's peak)."""
    coeff = 2 * math.cos(2 * math.pi * freq / 8000)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return 2 * math.sqrt(max(s1 * s1 + s2 * s2 - coeff * s1 * s2, 0.0)) / len(samples)


def assert_1k_sine(mulaw: bytes, seconds: float, amplitude: float) -> None:
    assert len(mulaw) % 160 == 0
    assert abs(len(mulaw) - seconds * 8000) < 160 + 8, len(mulaw)  # right within one frame (+resampler tail)
    samples = decoded(mulaw)[: int(seconds * 8000) - 16]  # the tone, not the frame padding
    at_1k = tone_amplitude(samples, 1000)
    others = max(tone_amplitude(samples, f) for f in (300, 500, 700, 1300, 1600, 2000, 2500, 3000, 3700))
    assert at_1k > 30 * others, (at_1k, others)  # > 29 dB above anything else
    assert abs(20 * math.log10(at_1k / (amplitude * 32767))) < 0.6, at_1k


# --- decoding (no I/O) ---------------------------------------------------------------------------


def test_mulaw_8k_mono_wav_passes_through_untouched() -> None:
    data, mulaw = ulaw_8k_mono()
    out = decode_to_mulaw8k(data, "audio/wav")
    assert out == mulaw  # 4000 bytes = 25 frames, nothing re-encoded
    assert_1k_sine(out, 0.5, 0.5)


@pytest.mark.parametrize(
    "name, make, amplitude",
    [
        ("pcm16 16k stereo", pcm16_16k_stereo, 0.4),
        ("float32 44.1k", float_44k_mono, 0.5),
        ("float64 48k", lambda: wav(3, 1, 48000, 64, array("d", sine(1000, 48000, 0.5, 0.5)).tobytes()), 0.5),
        ("pcm24 22.05k", lambda: wav(1, 1, 22050, 24, audioop.lin2lin(pcm16(sine(1000, 22050, 0.5, 0.5)), 2, 3)), 0.5),
        ("pcm32 8k", lambda: wav(1, 1, 8000, 32, audioop.lin2lin(pcm16(sine(1000, 8000, 0.5, 0.5)), 2, 4)), 0.5),
        ("pcm8 11.025k", lambda: wav(1, 1, 11025, 8, audioop.bias(audioop.lin2lin(pcm16(sine(1000, 11025, 0.5, 0.5)), 2, 1), 1, 128)), 0.5),
        ("alaw 8k", lambda: wav(6, 1, 8000, 8, audioop.lin2alaw(pcm16(sine(1000, 8000, 0.5, 0.5)), 2)), 0.5),
        ("mulaw 16k", lambda: wav(7, 1, 16000, 8, audioop.lin2ulaw(pcm16(sine(1000, 16000, 0.5, 0.5)), 2)), 0.5),
        ("extensible pcm16 48k", lambda: wav(1, 1, 48000, 16, pcm16(sine(1000, 48000, 0.5, 0.5)), extensible=True), 0.5),
    ],
)
def test_wav_variants_become_the_same_1k_sine(name: str, make: Callable[[], bytes], amplitude: float) -> None:
    assert_1k_sine(decode_to_mulaw8k(make(), None), 0.5, amplitude)


def test_raw_mulaw_and_snd() -> None:
    _, mulaw = ulaw_8k_mono()
    assert decode_to_mulaw8k(mulaw, "audio/basic") == mulaw
    assert decode_to_mulaw8k(mulaw[:1000], "audio/x-mulaw") == mulaw[:1000] + b"\xff" * 120  # padded to 7 frames
    at_16k = audioop.lin2ulaw(pcm16(sine(1000, 16000, 0.5, 0.5)), 2)
    assert_1k_sine(decode_to_mulaw8k(at_16k, "audio/x-mulaw; rate=16000"), 0.5, 0.5)
    be16 = audioop.byteswap(pcm16(sine(1000, 8000, 0.5, 0.5)), 2)
    snd = b".snd" + struct.pack(">5I", 24, len(be16), 3, 8000, 1) + be16  # 16-bit big-endian PCM
    assert_1k_sine(decode_to_mulaw8k(snd, "audio/basic"), 0.5, 0.5)


@pytest.mark.parametrize("rate", [44100, 48000, 16000, 11025])
def test_resampling_keeps_the_band_and_rejects_aliases(rate: int) -> None:
    """Tones above 4 kHz would fold into the telephone band at 8 kHz; the anti-alias filter keeps
    them > 40 dB down while 1-3 kHz pass within 2.5 dB."""

    def level(freq: int, at: int) -> float:
        out = decode_to_mulaw8k(wav(3, 1, rate, 32, array("f", sine(freq, rate, 0.3, 0.5)).tobytes()), None)
        return 20 * math.log10(max(tone_amplitude(decoded(out)[200:-200], at), 1e-3) / (0.5 * 32767))

    assert level(1000, 1000) > -0.5
    assert level(3000, 3000) > -2.5
    assert level(5000, 3000) < -40
    if rate > 14000:
        assert level(7000, 1000) < -40
        assert level(4700, 3300) < -40


def silent_mp3(frames: int) -> bytes:
    # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, mono, no CRC: 417-byte frames whose all-zero side
    # information and main data decode to silence (1152 samples each).
    return (bytes([0xFF, 0xFB, 0x90, 0xC0]) + bytes(413)) * frames


def test_mp3_through_miniaudio_or_a_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("miniaudio")
    out = decode_to_mulaw8k(b"ID3\x03\x00\x00\x00\x00\x00\x00" + silent_mp3(50), "audio/mpeg")
    assert len(out) % 160 == 0
    assert abs(len(out) - 50 * 1152 * 8000 / 44100) < 160 + 8
    assert set(out) <= {0xFF, 0x7F}  # μ-law silence
    with pytest.raises(PlayAudioError, match="MP3 could not be decoded") as bad:
        decode_to_mulaw8k(b"ID3" + b"not an mp3 at all" * 50, "audio/mpeg")
    assert bad.value.kind == "bad_audio"
    monkeypatch.setattr(play_audio, "_miniaudio", None)
    with pytest.raises(PlayAudioError, match="MP3 needs the 'miniaudio' package") as missing:
        decode_to_mulaw8k(silent_mp3(5), "audio/mpeg")
    assert missing.value.kind == "unsupported_format"


def test_bad_files_have_clear_errors() -> None:
    good = pcm16_16k_stereo(0.1)
    cases: list[tuple[bytes, str | None, str, str]] = [
        (good[:-100], None, "truncated WAV: data chunk declares", "bad_audio"),
        (b"RIFF\x10\x00\x00\x00AVI LIST", None, "RIFF file is not WAVE", "bad_audio"),
        (wav(2, 1, 8000, 4, b"\x00" * 400), None, "WAV encoding 0x0002 with 4-bit", "unsupported_format"),
        (wav(1, 3, 8000, 16, b"\x00" * 600), None, "3 channels", "unsupported_format"),
        (wav(1, 1, 8000, 16, b""), None, "no audio samples", "bad_audio"),
        (good[:30], None, "no fmt chunk|bad WAV fmt", "bad_audio"),
        (b"<html><body>Not found</body></html>", "text/html", "unrecognised audio \\(content type text/html\\)", "unsupported_format"),
        (b"\x00\x01\x02\x03" * 100, "audio/wav", "declared audio/wav but the body is not", "bad_audio"),
        (b"", None, "unrecognised audio", "unsupported_format"),
    ]
    for data, ctype, message, kind in cases:
        with pytest.raises(PlayAudioError, match=message) as caught:
            decode_to_mulaw8k(data, ctype)
        assert caught.value.kind == kind, (message, caught.value.kind)
    with pytest.raises(PlayAudioError, match="more than 1 s") as long:
        decode_to_mulaw8k(ulaw_8k_mono(2.0)[0], None, max_duration_s=1.0)
    assert long.value.kind == "too_long"


# --- allowlist -----------------------------------------------------------------------------------

CDN = ("https://cdn.example.com/audio/",)


# One test per list, not one per URL: each test item pays the suite's per-test gc.collect().
ALLOWED = [
    "https://cdn.example.com/audio/a.wav",
    "https://CDN.Example.COM/audio/a.wav",
    "https://cdn.example.com:443/audio/a.wav",
    "https://cdn.example.com/audio/sub/a.wav?token=x#t",
    "https://cdn.example.com/audio/x/../a.wav",
    "https://cdn.example.com/audio/./a.wav",
    "https://cdn.example.com/audio/%61.wav",
]
REFUSED = [
    "http://cdn.example.com/audio/a.wav",  # scheme
    "https://cdn.example.com:8443/audio/a.wav",  # port
    "https://cdn.example.com.evil.test/audio/a.wav",  # suffix host
    "https://evil.test/cdn.example.com/audio/a.wav",
    "https://evilcdn.example.com/audio/a.wav",
    "https://user@cdn.example.com/audio/a.wav",  # userinfo
    "https://cdn.example.com@evil.test/audio/a.wav",
    "https://cdn.example.com:443@evil.test/audio/a.wav",
    "https://cdn.example.com/audio/../secret.wav",  # dot segments
    "https://cdn.example.com/audio/x/../../secret.wav",
    "https://cdn.example.com/audio/%2e%2e/secret.wav",  # encoded dot segments
    "https://cdn.example.com/audio/%2E%2E%2Fsecret.wav",  # encoded slash
    "https://cdn.example.com/x%2f..%2faudio/a.wav",
    "https://cdn.example.com/audio/%252e%252e/secret.wav",  # double encoding
    "https://cdn.example.com/audio/%zz.wav",
    "https://cdn.example.com/audio\\..\\secret.wav",  # backslash
    "https://cdn.example.com/audio/a.wav\t",
    "https://cdn.example.com/audio/%00.wav",
    "https://cdn.example.com/audiofile.wav",  # not a segment boundary
    "https://cdn.example.com/audio",
    "https://cdn.example.com/../audio/a.wav",  # above the root
    "https://cdn.example.com./audio/a.wav",
    "ftp://cdn.example.com/audio/a.wav",
    "file:///audio/a.wav",
    "//cdn.example.com/audio/a.wav",
    "javascript:alert(1)",
    "https:///audio/a.wav",
    "https://cdn.example.com:99999/audio/a.wav",
]


def test_allowed_and_refused_urls() -> None:
    assert [url for url in ALLOWED if not url_allowed(url, CDN)] == []
    assert [url for url in REFUSED if url_allowed(url, CDN)] == []


def test_entry_without_trailing_slash_ip_and_default_ports() -> None:
    entry = ("https://cdn.example.com/audio",)
    assert url_allowed("https://cdn.example.com/audio", entry)
    assert url_allowed("https://cdn.example.com/audio/a.wav", entry)
    assert not url_allowed("https://cdn.example.com/audio-private/a.wav", entry)
    assert url_allowed("http://cdn.example.com:80/x.wav", ("http://cdn.example.com/",))
    assert url_allowed("http://127.0.0.1:8080/a/b.wav", ("http://127.0.0.1:8080/a/",))
    assert not url_allowed("http://127.0.0.1/a/b.wav", ("http://127.0.0.1:8080/a/",))
    assert url_allowed("http://[::1]:8080/a/b.wav", ("http://[0:0::1]:8080/a/",))
    assert not url_allowed("https://cdn.example.com/audio/a.wav", ())
    assert not url_allowed("http://[fe80::1%25eth0]/a/b.wav", ("http://[fe80::1]/a/",))


# --- the fetcher against a real server -----------------------------------------------------------


@dataclass
class AudioServer:
    port: int
    files: dict[str, tuple[bytes, str]]
    hits: Counter[str] = field(default_factory=Counter)
    hosts: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def allowlist(self) -> tuple[str, ...]:
        return (f"http://127.0.0.1:{self.port}/audio/",)


@pytest.fixture
async def server() -> AsyncIterator[AudioServer]:
    ulaw, _ = ulaw_8k_mono()
    srv = AudioServer(
        free_port(),
        {
            "/audio/ulaw.wav": (ulaw, "audio/wav"),
            "/audio/stereo.wav": (pcm16_16k_stereo(), "audio/x-wav"),
            "/audio/float.wav": (float_44k_mono(), "audio/wav"),
            "/audio/garbage": (b"<html>oops</html>" * 20, "text/html"),
        },
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        srv.hits[path] += 1
        srv.hosts.append(request.host)
        if path in srv.files:
            body, ctype = srv.files[path]
            return web.Response(body=body, content_type=ctype)
        if path == "/audio/to-localhost":  # same server, but a host that is not on the allowlist
            raise web.HTTPFound(f"http://localhost:{srv.port}/audio/ulaw.wav")
        if path == "/audio/to-ulaw":
            raise web.HTTPMovedPermanently("ulaw.wav")  # relative, stays on the allowlist
        if path.startswith("/audio/loop/"):
            raise web.HTTPFound(f"/audio/loop/{int(path.rsplit('/', 1)[1]) + 1}")
        if path == "/audio/slow.wav":
            await asyncio.wait_for(srv.gate.wait(), 5)
            return web.Response(body=srv.files["/audio/stereo.wav"][0], content_type="audio/wav")
        if path == "/audio/huge":  # chunked, no Content-Length: only a running count can stop it
            resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"\x00" * 65536)  # 4 MiB in all
            return resp
        if path == "/audio/huge-declared":
            return web.Response(body=b"\x00" * (1024 * 1024 + 1), content_type="audio/wav")
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", srv.port).start()
    yield srv
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_fetches_and_transcodes_each_format(server: AudioServer, session: aiohttp.ClientSession) -> None:
    fetcher = PlayAudioFetcher(session, server.allowlist)
    assert await fetcher.fetch(server.url("/audio/ulaw.wav")) == ulaw_8k_mono()[1]
    assert_1k_sine(await fetcher.fetch(server.url("/audio/stereo.wav")), 0.5, 0.4)
    assert_1k_sine(await fetcher.fetch(server.url("/audio/float.wav")), 0.5, 0.5)
    assert_1k_sine(await fetcher.fetch(server.url("/audio/to-ulaw")), 0.5, 0.5)  # allowed redirect
    assert fetcher.downloads == 4
    await fetcher.close()
    for entry in ("https://a.test/x?y=1", "ftp://a.test/", "https://user@a.test/"):
        with pytest.raises(ValueError, match="plain http"):
            PlayAudioFetcher(session, (entry,))


async def test_failures(server: AudioServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    metrics = BridgeMetrics()
    fetcher = PlayAudioFetcher(session, server.allowlist, max_bytes=1024 * 1024, metrics=metrics)
    cases = [
        ("/audio/to-localhost", "redirected to http://localhost:.*not on the play allowlist", "not_allowed"),
        ("/audio/loop/0", "more than 3 redirects", "too_many_redirects"),
        ("/audio/huge", "larger than 1048576 bytes", "too_large"),
        ("/audio/huge-declared", "larger than 1048576 bytes", "too_large"),
        ("/audio/missing.wav", "answered HTTP 404", "http_status"),
        ("/audio/garbage", "unrecognised audio \\(content type text/html\\)", "unsupported_format"),
        ("/private/x.wav", "not on the play allowlist", "not_allowed"),
    ]
    caplog.set_level(logging.INFO, logger="bridge.agent.play")
    for path, message, kind in cases:
        with pytest.raises(PlayAudioError, match=message) as caught:
            await fetcher.fetch(server.url(path) + "?token=SECRET-TOKEN")
        assert caught.value.kind == kind
        assert "SECRET" not in str(caught.value)
    assert server.hits["/audio/ulaw.wav"] == 0 and "localhost" not in " ".join(server.hosts)
    assert [server.hits[f"/audio/loop/{i}"] for i in range(5)] == [1, 1, 1, 1, 0]
    assert server.hits["/private/x.wav"] == 0
    value = metrics.registry.get_sample_value
    assert value("bridge_bad_input_total", {"source": "play", "kind": "not_allowed"}) == 2
    assert value("bridge_bad_input_total", {"source": "play", "kind": "too_large"}) == 2
    failures = [r for r in caplog.records if r.getMessage() == "play_audio_failed"]
    assert len(failures) == len(cases)
    assert all("SECRET" not in repr(r.__dict__) for r in caplog.records)
    assert fetcher.cached_entries == 0  # failures are not cached
    await fetcher.close()


async def test_timeout(server: AudioServer, session: aiohttp.ClientSession) -> None:
    fetcher = PlayAudioFetcher(session, server.allowlist, timeout_s=0.3)
    with pytest.raises(PlayAudioError, match="took more than 0.3 s") as caught:
        await fetcher.fetch(server.url("/audio/slow.wav"))
    assert caught.value.kind == "timeout"
    server.gate.set()
    await fetcher.close()


async def test_concurrent_fetches_coalesce_then_hit_the_cache(
    server: AudioServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.agent.play")
    fetcher = PlayAudioFetcher(session, server.allowlist)
    url = server.url("/audio/slow.wav?sig=SECRET-SIG")
    waiters = [asyncio.create_task(fetcher.fetch(url)) for _ in range(5)]
    await asyncio.sleep(0.1)
    waiters[0].cancel()  # one caller hanging up does not cancel the others' download
    server.gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert server.hits["/audio/slow.wav"] == 1 and fetcher.downloads == 1
    assert all(r == results[0] for r in results)
    assert_1k_sine(results[0], 0.5, 0.4)
    assert await fetcher.fetch(url) is results[0]  # cache hit: no new request
    assert server.hits["/audio/slow.wav"] == 1
    fetched = [r for r in caplog.records if r.getMessage() == "play_audio_fetched"]
    assert len(fetched) == 1 and getattr(fetched[0], "url", "").endswith("/audio/slow.wav")
    assert all("SECRET" not in repr(r.__dict__) for r in caplog.records)
    await fetcher.close()


async def test_cache_is_lru_bounded_by_entries_and_bytes(server: AudioServer, session: aiohttp.ClientSession) -> None:
    a, b, c = (server.url(p) for p in ("/audio/ulaw.wav", "/audio/stereo.wav", "/audio/float.wav"))
    by_entries = PlayAudioFetcher(session, server.allowlist, cache_entries=2)
    for url in (a, b, a, c):  # a is used again before c arrives, so b is the one evicted
        await by_entries.fetch(url)
    assert by_entries.cached_entries == 2 and by_entries.downloads == 3
    await by_entries.fetch(a)
    assert by_entries.downloads == 3  # still cached
    await by_entries.fetch(b)
    assert by_entries.downloads == 4  # was evicted
    await by_entries.close()

    one_clip = 4000  # each file is 0.5 s = 4000 bytes of μ-law
    by_bytes = PlayAudioFetcher(session, server.allowlist, cache_bytes=one_clip + 100)
    await by_bytes.fetch(a)
    await by_bytes.fetch(b)
    assert by_bytes.cached_entries == 1 and by_bytes.cached_bytes == one_clip
    await by_bytes.fetch(b)
    await by_bytes.fetch(a)
    assert by_bytes.downloads == 3
    tiny = PlayAudioFetcher(session, server.allowlist, cache_bytes=100)  # a result too big to cache
    assert len(await tiny.fetch(a)) == one_clip and tiny.cached_entries == 0
    await by_bytes.close()
    await tiny.close()
