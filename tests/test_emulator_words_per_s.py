"""``--words-per-s``: the tone voice at a fixed word rate (issue 18's timestamp density)."""

from __future__ import annotations

import base64

import pytest

from bridge.cartesia.emulator.cli import build_parser, settings_from_args
from bridge.cartesia.emulator.settings import EmulatorSettings
from bridge.cartesia.emulator.voices import TONE_VOICES, ToneSynth
from bridge.cartesia.protocol import OutputFormat
from tests import emulator_fixtures
from tests.emulator_fixtures import EmulatorFactory, collect, connect, request, send

FMT = OutputFormat("pcm_mulaw", 8000)
emulator_factory = emulator_fixtures.emulator_factory  # the fixture, shared
TEXT = "The quick brown fox jumps over the lazy dog, extraordinarily."


def test_each_word_lasts_one_over_w_seconds_with_its_gap() -> None:
    r = ToneSynth(words_per_s=15).render(TEXT, FMT, TONE_VOICES[0], speed=1.7)
    spans = [(s, e) for _, s, e in r.words]
    assert len(spans) == 10
    # Word k starts at floor(k * 8000 / 15): 1/15 s each, whatever the word's letters or the speed.
    bounds = [k * 8000 // 15 for k in range(11)]
    assert [s for s, _ in spans] == bounds[:10]
    assert [e for _, e in spans] == [b - 320 for b in bounds[1:]]
    assert r.samples == 10 * 8000 // 15 == len(r.audio)
    # The 40 ms gap is silence (mu-law 0xFF), the burst is not.
    s0, e0 = spans[0]
    assert r.audio[e0:spans[1][0]] == b"\xff" * 320
    assert len(set(r.audio[s0:e0])) > 10


def test_gap_shrinks_for_a_short_word_and_default_timing_is_unchanged() -> None:
    fast = ToneSynth(words_per_s=40).render("a b", FMT, TONE_VOICES[0])
    # 25 ms words: 10 ms of burst, 15 ms of gap.
    assert [(s, e) for _, s, e in fast.words] == [(0, 80), (200, 280)]
    default = ToneSynth().render("a bc", FMT, TONE_VOICES[0])
    # 60 + 45 * letters ms of burst, then 40 ms of gap.
    assert [(s, e) for _, s, e in default.words] == [(0, 840), (1160, 1160 + 1200)]


def test_cli_option_and_its_bounds() -> None:
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["--words-per-s", "15"])).words_per_s == 15.0
    assert settings_from_args(parser.parse_args([])).words_per_s is None
    for bad in (0.0, -1.0, 51.0):
        with pytest.raises(ValueError, match="words_per_s"):
            EmulatorSettings(words_per_s=bad).validate()


async def test_emulator_timestamps_reach_the_density(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(words_per_s=15.0, chunk_ms=40)
    ws = await connect(emu)
    text = " ".join(["word"] * 30)
    await send(ws, request("c1", text, add_timestamps=True))
    msgs = await collect(ws, {"c1"})
    audio = b"".join(base64.b64decode(m["data"]) for m in msgs if m["type"] == "chunk")
    starts = [s for m in msgs if m["type"] == "timestamps" for s in m["word_timestamps"]["start"]]
    chunks = sum(m["type"] == "chunk" for m in msgs)
    stamps = sum(m["type"] == "timestamps" for m in msgs)
    assert len(audio) == 30 * 8000 // 15
    assert len(starts) == 30
    assert starts == pytest.approx([(k * 8000 // 15) / 8000 for k in range(30)])
    # 40 ms chunks of 66.7 ms words: a timestamps message for most chunks (a word starts in 30 of 50).
    assert chunks == 50 and stamps == 30
    await ws.close()
