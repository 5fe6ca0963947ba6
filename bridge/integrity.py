"""Audio integrity across resumed contexts: was anything heard twice, or lost?

When a Cartesia context dies mid-utterance the bridge continues the utterance
on a new context, cutting at a word boundary. What the caller hears must then
be ``c1[:b1] + c2[:b2] + ... + ck`` (each ``b`` a word start or end of that
context, in bytes) followed by mu-law silence padding to a 20 ms frame.
"""

from __future__ import annotations

from collections.abc import Sequence

from telephony.media import FRAME_BYTES


def explain_heard(heard: bytes, chain: Sequence[tuple[bytes, Sequence[float]]]) -> bool:
    """True when ``heard`` is the chain of contexts' audio cut at word boundaries.

    ``chain``: per context in creation order, its audio and its word
    boundaries in seconds (starts and ends). The padding follows the
    utterance's total length.
    """
    if not chain:
        return heard == b""

    def match(pos: int, k: int) -> bool:
        audio, bounds_s = chain[k]
        if k == len(chain) - 1:
            pad = -(pos + len(audio)) % FRAME_BYTES
            return heard[pos:] == audio + b"\xff" * pad
        bounds = sorted({0, *(int(round(b * 8000)) for b in bounds_s)}, reverse=True)
        return any(b <= len(audio) and heard[pos:pos + b] == audio[:b] and match(pos + b, k + 1) for b in bounds)

    return match(0, 0)
