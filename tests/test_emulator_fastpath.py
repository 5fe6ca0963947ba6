"""The emulator's pre-encoded paths say exactly what the slow ones said: chunk JSON, cached
renders and their base64 slices."""

from __future__ import annotations

import base64

import orjson

from bridge.cartesia.emulator.connection import chunk_json
from bridge.cartesia.emulator.rendered import RenderCache, Rendered
from bridge.cartesia.emulator.voices import TONE_VOICES, ToneSynth
from bridge.cartesia.protocol import Chunk, OutputFormat, encode_server_message

MULAW = OutputFormat("pcm_mulaw", 8000)
VOICE = TONE_VOICES[0]


def test_chunk_json_is_byte_for_byte_the_encoded_message() -> None:
    cases = [
        ("ctx-1", b"\x01\x02\xff" * 100, 0.0, 1),
        ('quote"and\\slash \u00e9', b"\x7f" * 320, 51.234, 17),
        ("no-flush", b"", 3.5, None),
        ("big", bytes(range(256)) * 20, 1234567.891, 2**31),
    ]
    for cid, data, step, flush in cases:
        b64 = base64.b64encode(data).decode("ascii")
        for version in ("2024-06-10", "2025-04-16", None):
            expected = orjson.dumps(encode_server_message(Chunk(cid, b64, step, flush), version))
            assert chunk_json(orjson.dumps(cid), b64, step, flush) == expected


def test_a_cached_render_is_the_same_audio_and_timings_as_a_fresh_one() -> None:
    voice = VOICE
    text = "Here is a longer passage so that you can try interrupting me. "
    for words_per_s in (None, 15.0):
        cached, fresh = ToneSynth(words_per_s=words_per_s), ToneSynth(words_per_s=words_per_s)
        first = cached.render(text, MULAW, voice, phonemes=True)
        again = cached.render(text, MULAW, voice, phonemes=True)
        assert again is first  # served from the cache
        other = fresh.render(text, MULAW, voice, phonemes=True)
        assert (again.audio, again.samples, again.words, again.phonemes) == (
            other.audio, other.samples, other.words, other.phonemes)
        # Different inputs are different entries.
        assert cached.render(text, MULAW, voice, volume=0.5).audio != first.audio
        assert cached.render(text + "Again.", MULAW, voice).samples > first.samples


def test_a_render_cached_at_one_word_rate_is_not_served_at_another() -> None:
    voice = VOICE
    synth = ToneSynth()
    slow = synth.render("one two three", MULAW, voice)
    synth.words_per_s = 15.0
    fast = synth.render("one two three", MULAW, voice)
    assert fast.samples == 3 * 8000 // 15  # exactly three 1/15 s words, not the cached tone timing
    assert fast.samples != slow.samples


def test_base64_slices_match_and_are_computed_once() -> None:
    audio = bytes(range(256)) * 5
    r = Rendered(audio, len(audio))
    for start, end in ((0, 320), (320, 640), (1200, 1280), (0, 0)):
        assert base64.b64decode(r.b64_slice(start, end)) == audio[start:end]
    assert r.b64_slice(0, 320) is r.b64_slice(0, 320)


def test_render_cache_is_bounded_in_entries_and_bytes() -> None:
    cache = RenderCache(max_entries=3, max_bytes=1000)
    for i in range(5):
        cache.put(i, Rendered(b"x" * 100, 100))
    assert len(cache) == 3 and cache.bytes == 300
    assert cache.get(0) is None and cache.get(4) is not None
    cache.get(2)  # now the most recent: survives the next evictions
    cache.put("big", Rendered(b"y" * 800, 800))
    assert cache.bytes <= 1000
    assert cache.get(2) is not None and cache.get(3) is None
    cache.put("huge", Rendered(b"z" * 2000, 2000))  # larger than the budget: nothing kept
    assert len(cache) == 0 and cache.bytes == 0
