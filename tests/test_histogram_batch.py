"""``HistogramBatch`` gives the same histogram as the same ``Histogram.observe`` calls."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from bridge.histogram_batch import HistogramBatch
from metrics import LATENCY_BUCKETS

from .fuzz_strategies import FUZZ


def samples(values: list[float], *, batched: bool, flush_every: int = 0) -> tuple[dict[str, float], float]:
    """Bucket and count samples (exact) and the sum of a fresh histogram fed ``values``."""
    registry = CollectorRegistry()
    histogram = Histogram("x_seconds", "test", buckets=LATENCY_BUCKETS, registry=registry)
    batch = HistogramBatch(histogram)
    for n, v in enumerate(values, 1):
        if batched:
            batch.observe(v)
            if flush_every and n % flush_every == 0:
                batch.flush()
        else:
            histogram.observe(v)
    batch.flush()
    batch.flush()  # a second flush adds nothing
    exact: dict[str, float] = {}
    total = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                total = s.value
            elif not s.name.endswith("_created"):
                exact[f"{s.name}{sorted(s.labels.items())}"] = s.value
    return exact, total


def same(values: list[float], flush_every: int = 0) -> None:
    got, got_sum = samples(values, batched=True, flush_every=flush_every)
    want, want_sum = samples(values, batched=False)
    assert got == want
    assert len(got) == len(LATENCY_BUCKETS) + 2  # every bucket, +Inf and the count
    # The sum is added in another order: equal up to float rounding.
    assert math.isclose(got_sum, want_sum, rel_tol=1e-9, abs_tol=1e-9) or (got_sum == want_sum)


EDGES = [0.0, -1.0, 1e-9, math.inf, 1e9, *LATENCY_BUCKETS[:-1], *(b * (1 + 1e-12) for b in LATENCY_BUCKETS[:-1])]


def test_bucket_edges_count_like_observe() -> None:
    same(EDGES)
    assert samples(EDGES, batched=True)[0]["x_seconds_count[]"] == len(EDGES)


def test_nothing_observed_is_nothing() -> None:
    same([])


@settings(FUZZ, max_examples=60)
@given(st.lists(st.floats(min_value=-1.0, max_value=100.0) | st.sampled_from(EDGES), max_size=60),
       st.integers(0, 7))
def test_any_observations_count_like_observe(values: list[float], flush_every: int) -> None:
    same(values, flush_every)
