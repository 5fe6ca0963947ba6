"""Percentiles, one definition for the load tester, the emulator and ``bench/``."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (``q`` in 0..1); ``None`` when empty.

    Nearest rank (no interpolation), so the answer is always a value that was
    measured: p99 of 100 samples is the 99th smallest.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(q * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]
