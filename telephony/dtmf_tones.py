"""In-band DTMF for ConversationRelay's ``sendDigits``, rendered as μ-law 8 kHz (no I/O).

Why in-band: a Twilio Media Stream carries audio only (there is no outbound ``dtmf`` event), and
updating the live call with ``<Play digits>`` TwiML over REST would end the ``<Connect><Stream>``
and with it the conversation. So the bridge plays the dual tones itself, as ordinary audio.

Tones follow ITU-T Q.23 (row 697/770/852/941 Hz x column 1209/1336/1477/1633 Hz), each of the
two at -7 dBm0 (twist 0 dB). ``w`` is a 0.5 s pause and ``W`` a 1 s pause, as in Twilio's
``<Play digits>``. Limits: at most ``MAX_DIGITS`` characters per call (about 20 s of audio
with the defaults); tones and gaps of at least 40 ms (Q.24 receivers may ignore shorter ones).
"""

from __future__ import annotations

import math
import warnings
from array import array
from functools import lru_cache
from typing import Final

with warnings.catch_warnings():  # 3.11/3.12 ship audioop (deprecated); 3.13+ gets it from audioop-lts.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SAMPLE_RATE_HZ: Final = 8000
FRAME_BYTES: Final = 160  # one 20 ms μ-law frame
MULAW_SILENCE: Final = 0xFF
MAX_DIGITS: Final = 100
MIN_TONE_MS: Final = 40
LEVEL_DBM0_PER_TONE: Final = -7.0
LONG_PAUSE_MS: Final = 1000  # ``W``

ROW_HZ: Final = (697, 770, 852, 941)
COLUMN_HZ: Final = (1209, 1336, 1477, 1633)
_KEYPAD: Final = ("123A", "456B", "789C", "*0#D")

#: Each key's (low, high) frequency pair in Hz.
DTMF_FREQUENCIES: Final[dict[str, tuple[int, int]]] = {
    key: (ROW_HZ[row], COLUMN_HZ[col]) for row, keys in enumerate(_KEYPAD) for col, key in enumerate(keys)
}

# G.711 μ-law: a sine whose peak is the coder's overload point (8159 in 14-bit units, 32636 in the
# 16-bit scale audioop uses) is +3.17 dBm0, so 0 dBm0 has a peak of 32636 * 10^(-3.17/20).
_PEAK_0DBM0: Final = 32636 * 10 ** (-3.17 / 20)
_TONE_PEAK: Final = _PEAK_0DBM0 * 10 ** (LEVEL_DBM0_PER_TONE / 20)


def dtmf_mulaw(digits: str, *, tone_ms: int = 100, gap_ms: int = 100, w_pause_ms: int = 500) -> bytes:
    """μ-law 8 kHz audio for ``digits`` (0-9, ``*``, ``#``, A-D, ``w`` = ``w_pause_ms`` pause,
    ``W`` = 1 s pause).

    Each key is ``tone_ms`` of its dual tone followed by ``gap_ms`` of silence. The result is
    padded with μ-law silence to a whole number of 160-byte (20 ms) frames. Raises ``ValueError``
    naming the first invalid character, or for an empty/too long string or too short timings.
    """
    if not digits:
        raise ValueError("no digits to send")
    if len(digits) > MAX_DIGITS:
        raise ValueError(f"too many digits: {len(digits)} > {MAX_DIGITS}")
    if tone_ms < MIN_TONE_MS or gap_ms < MIN_TONE_MS:
        raise ValueError(f"tone_ms and gap_ms must be at least {MIN_TONE_MS} ms (got {tone_ms}, {gap_ms})")
    if w_pause_ms < 0:
        raise ValueError(f"w_pause_ms must not be negative (got {w_pause_ms})")
    gap = _silence(gap_ms)
    out = bytearray()
    for position, char in enumerate(digits):
        if char == "w":
            out += _silence(w_pause_ms)
        elif char == "W":
            out += _silence(LONG_PAUSE_MS)
        else:
            key = char.upper() if char in "abcd" else char
            if key not in DTMF_FREQUENCIES:
                raise ValueError(f"invalid DTMF character {char!r} at position {position}")
            out += _tone(key, tone_ms)
            out += gap
    remainder = len(out) % FRAME_BYTES
    if remainder:
        out += bytes([MULAW_SILENCE]) * (FRAME_BYTES - remainder)
    return bytes(out)


def _samples(ms: int) -> int:
    return SAMPLE_RATE_HZ * ms // 1000


def _silence(ms: int) -> bytes:
    return bytes([MULAW_SILENCE]) * _samples(ms)


@lru_cache(maxsize=64)  # at most 16 keys x a few tone lengths; each entry tone_ms * 8 bytes
def _tone(key: str, tone_ms: int) -> bytes:
    low_hz, high_hz = DTMF_FREQUENCIES[key]
    step_low = 2 * math.pi * low_hz / SAMPLE_RATE_HZ
    step_high = 2 * math.pi * high_hz / SAMPLE_RATE_HZ
    pcm = array(
        "h",
        (
            round(_TONE_PEAK * (math.sin(step_low * n) + math.sin(step_high * n)))
            for n in range(_samples(tone_ms))
        ),
    )
    return audioop.lin2ulaw(pcm.tobytes(), 2)
