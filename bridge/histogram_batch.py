"""Per-call batching of Prometheus histogram observations (no I/O).

``Histogram.observe`` takes two locks and walks the bucket list in Python on
every call; a call observes its mark round trip and its forwarding delay
about ten times a second each, which at 500 calls is ~10 000 locked observes
per second. ``HistogramBatch`` keeps the call's bucket counts and sum in
plain Python (a ``bisect`` per observation) and adds them to the shared
histogram in ``flush`` (the owner calls it before every /metrics render and at
call end, with its other batched counters), so a scrape sees the same numbers.

It uses prometheus_client's own bucket bounds and values of an unlabelled
histogram (or one labelled child): ``_upper_bounds``, ``_buckets``, ``_sum``.
``tests/test_histogram_batch.py`` checks that a flushed batch renders exactly
like the same ``observe`` calls, so a prometheus_client that changes them fails there.
Limits: one list of ``len(buckets)`` ints per batch; nothing is lost between
flushes (counts only grow until ``flush``).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any


class HistogramBatch:
    """Observations for one histogram, added to it in bulk by ``flush`` (values in its unit, e.g. s)."""

    __slots__ = ("_histogram", "_bounds", "_counts", "_sum", "_pending")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._bounds: list[float] = list(histogram._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = False

    def observe(self, amount: float) -> None:
        """As ``Histogram.observe``: the first bucket whose upper bound is >= ``amount``."""
        if amount == amount:  # NaN falls in no bucket (and makes the sum NaN), as with observe
            self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        self._pending = True

    def flush(self) -> None:
        """Add what was observed since the last flush to the histogram."""
        if not self._pending:
            return
        histogram = self._histogram
        counts = self._counts
        for index, count in enumerate(counts):
            if count:
                histogram._buckets[index].inc(count)
                counts[index] = 0
        histogram._sum.inc(self._sum)
        self._sum = 0.0
        self._pending = False
