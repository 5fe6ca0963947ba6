"""Fault injection for load tests, deterministic under a seed.

Faults are given on the command line as repeated ``--fault NAME=VALUE``:

``close-after-chunks=N``
    Close each WebSocket (code 1011, reason ``emulator fault: close after N
    chunks``) right after it has sent its N-th ``chunk``. Counted per connection.
``reject-429=P``
    A fraction P (0-1) of contexts is answered with a 429 ``concurrency_limited``
    error instead of audio.
``no-done=P``
    A fraction P of contexts never gets its ``done`` (audio and ``flush_done``
    still flow; the context still stops counting as active).
``delay-ms=MS[:P]``
    A fraction P (default 1) of chunks is held back MS milliseconds extra.

Which contexts are hit depends only on ``(seed, fault, context_id)`` (crc32), so
a rerun with the same seed and the same ids hits the same contexts. Which
chunks are delayed comes from the per-context ``random.Random(seed +
crc32(context_id))`` stream, so it is deterministic for a given message order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(slots=True)
class FaultSettings:
    """Which faults are on; fractions in [0, 1], ``delay_ms`` in ms (see the module doc)."""

    close_after_chunks: int | None = None
    reject_429_fraction: float = 0.0
    no_done_fraction: float = 0.0
    delay_ms: float = 0.0
    delay_fraction: float = 0.0


FAULT_HELP = (
    "inject a fault (repeatable): close-after-chunks=N (close each socket after its N-th chunk); "
    "reject-429=P (fraction P of contexts get 429 concurrency_limited); no-done=P (fraction P of "
    "contexts never get 'done'); delay-ms=MS[:P] (fraction P of chunks, default all, delayed MS ms). "
    "Deterministic under --seed."
)


def _fraction(text: str, name: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"fault {name}: fraction must be in [0, 1], got {text!r}")
    return value


def parse_fault(spec: str, faults: FaultSettings) -> FaultSettings:
    """Apply one ``NAME=VALUE`` spec to ``faults`` (mutated and returned)."""
    name, sep, value = spec.partition("=")
    name = name.strip().lower().replace("_", "-")
    if not sep or not value:
        raise ValueError(f"fault {spec!r}: expected NAME=VALUE")
    if name == "close-after-chunks":
        n = int(value)
        if n < 1:
            raise ValueError("fault close-after-chunks: N must be >= 1")
        faults.close_after_chunks = n
    elif name == "reject-429":
        faults.reject_429_fraction = _fraction(value, name)
    elif name == "no-done":
        faults.no_done_fraction = _fraction(value, name)
    elif name == "delay-ms":
        ms, _, frac = value.partition(":")
        faults.delay_ms = float(ms)
        if faults.delay_ms < 0:
            raise ValueError("fault delay-ms: MS must be >= 0")
        faults.delay_fraction = _fraction(frac, name) if frac else 1.0
    else:
        raise ValueError(
            f"unknown fault {name!r} (known: close-after-chunks, reject-429, no-done, delay-ms)"
        )
    return faults


def parse_faults(specs: list[str] | None) -> FaultSettings:
    faults = FaultSettings()
    for spec in specs or []:
        parse_fault(spec, faults)
    return faults


def hits(seed: int, fault: str, context_id: str, fraction: float) -> bool:
    """Whether ``context_id`` is in the ``fraction`` hit by ``fault`` under ``seed``."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    h = zlib.crc32(f"{seed}:{fault}:{context_id}".encode())
    return h / 4294967296.0 < fraction


def context_seed(seed: int, context_id: str) -> int:
    """Seed of a context's ``random.Random``: ``seed + crc32(context_id)``."""
    return seed + zlib.crc32(context_id.encode("utf-8"))
