"""In-band DTMF: our output decoded by an independent Goertzel DTMF detector written here."""

from __future__ import annotations

import math
import struct
import warnings

import pytest

from telephony.dtmf_tones import dtmf_mulaw

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

RATE = 8000
ROWS = (697, 770, 852, 941)
COLS = (1209, 1336, 1477, 1633)
KEYS = ("123A", "456B", "789C", "*0#D")
BLOCK = 205  # the classic DTMF Goertzel block (25.6 ms)
HOP = 40  # 5 ms
PEAK_0DBM0 = 22653  # G.711 μ-law 0 dBm0 sine peak in audioop's 16-bit scale (see the digital milliwatt)


def pcm_of(mulaw: bytes) -> list[int]:
    raw = audioop.ulaw2lin(mulaw, 2)
    return list(struct.unpack(f"<{len(raw) // 2}h", raw))


def goertzel_power(samples: list[int], freq: float) -> float:
    coeff = 2 * math.cos(2 * math.pi * freq / RATE)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def classify(block: list[int]) -> str | None:
    energy = sum(x * x for x in block)
    if energy < 1e6:
        return None
    # A pure tone of any amplitude has a relative power close to 1; each tone of a pair about 0.5.
    rel_rows = [2 * goertzel_power(block, f) / (len(block) * energy) for f in ROWS]
    rel_cols = [2 * goertzel_power(block, f) / (len(block) * energy) for f in COLS]
    row = max(range(4), key=rel_rows.__getitem__)
    col = max(range(4), key=rel_cols.__getitem__)
    if rel_rows[row] < 0.35 or rel_cols[col] < 0.35:
        return None
    if sorted(rel_rows)[-2] > rel_rows[row] / 8 or sorted(rel_cols)[-2] > rel_cols[col] / 8:
        return None
    return KEYS[row][col]


def detect(mulaw: bytes) -> list[tuple[str, float, float]]:
    """(key, start_ms, end_ms) of each detected tone: runs of blocks classified as the same key."""
    samples = pcm_of(mulaw)
    events: list[tuple[str, float, float]] = []
    current: str | None = None
    start = 0
    for offset in range(0, len(samples) - BLOCK + 1, HOP):
        key = classify(samples[offset : offset + BLOCK])
        if key != current:
            if current is not None:
                events.append((current, start * 1000 / RATE, (offset - HOP + BLOCK) * 1000 / RATE))
            current, start = key, offset
    if current is not None:
        events.append((current, start * 1000 / RATE, len(samples) * 1000 / RATE))
    return events


def assert_events(audio: bytes, expected: list[tuple[str, float]], tone_ms: float) -> None:
    events = detect(audio)
    assert [e[0] for e in events] == [key for key, _ in expected], events
    for (key, start, end), (_, want_start) in zip(events, expected, strict=True):
        # A block is classified once most of it is tone, so a run starts up to ~40 % of a block
        # early and ends ~40 % of a block late: its centre is the tone's centre.
        centre = (start + end) / 2
        assert abs(centre - (want_start + tone_ms / 2)) <= 6, (key, start, end, want_start)
        assert abs((end - start) - (tone_ms + 0.2 * BLOCK * 1000 / RATE)) <= 12, (key, start, end)


def test_every_key_detected_once_in_order_with_default_timing() -> None:
    digits = "0123456789*#ABCD"
    audio = dtmf_mulaw(digits)
    assert len(audio) % 160 == 0
    assert len(audio) == 16 * 200 * 8  # 16 keys x (100 ms tone + 100 ms gap), already frame-aligned
    assert_events(audio, [(key, 200.0 * i) for i, key in enumerate(digits)], tone_ms=100)


def test_repeated_digits_are_separate_events_and_lowercase_abcd_accepted() -> None:
    audio = dtmf_mulaw("11a")
    assert_events(audio, [("1", 0.0), ("1", 200.0), ("A", 400.0)], tone_ms=100)


def test_pauses_w_and_capital_w() -> None:
    audio = dtmf_mulaw("1w2W3")
    # 1 at 0; gap to 200; w = 500 ms -> 2 at 700; gap to 900; W = 1000 ms -> 3 at 1900.
    assert_events(audio, [("1", 0.0), ("2", 700.0), ("3", 1900.0)], tone_ms=100)
    assert len(audio) == (1900 + 200) * 8
    assert dtmf_mulaw("1w", w_pause_ms=300) == dtmf_mulaw("1") + b"\xff" * 2400


def test_custom_timing_and_frame_padding() -> None:
    audio = dtmf_mulaw("59", tone_ms=65, gap_ms=55)
    # 2 x 120 ms = 240 ms = 1920 bytes -> padded to 12 frames (1920 is already 12 x 160).
    assert len(audio) == 1920
    assert_events(audio, [("5", 0.0), ("9", 120.0)], tone_ms=65)
    odd = dtmf_mulaw("5", tone_ms=45, gap_ms=45)  # 90 ms = 720 bytes -> 5 frames, silence-padded
    assert len(odd) == 800 and odd[720:] == b"\xff" * 80


def test_each_tone_is_minus_7_dbm0_with_no_twist() -> None:
    samples = pcm_of(dtmf_mulaw("5"))[:800]
    for freq in (770, 1336):
        i = sum(x * math.cos(2 * math.pi * freq * n / RATE) for n, x in enumerate(samples))
        q = sum(x * math.sin(2 * math.pi * freq * n / RATE) for n, x in enumerate(samples))
        amplitude = 2 * math.hypot(i, q) / len(samples)
        level = 20 * math.log10(amplitude / PEAK_0DBM0)
        assert -7.5 <= level <= -6.5, (freq, level)
    assert max(abs(x) for x in samples) < 32000  # two tones together do not clip


@pytest.mark.parametrize("digits, bad", [("12x4", "'x'"), ("1 2", "' '"), ("E", "'E'"), ("9-", "'-'")])
def test_invalid_character_names_it(digits: str, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        dtmf_mulaw(digits)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="no digits"):
        dtmf_mulaw("")
    with pytest.raises(ValueError, match="too many"):
        dtmf_mulaw("1" * 101)
    with pytest.raises(ValueError, match="at least 40"):
        dtmf_mulaw("1", tone_ms=20)
