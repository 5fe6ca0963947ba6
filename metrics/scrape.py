"""Reading a bridge's ``/metrics`` back: parse, and estimate quantiles.

Used by the demo's timeline, the load tester's report and tests. Quantiles
are estimated from cumulative histogram buckets by linear interpolation
inside the bucket, as PromQL's ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class HistogramSummary:
    count: int
    sum: float
    p50: float | None
    p95: float | None
    p99: float | None


def parse_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] for every sample in the exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """``buckets``: (upper bound, cumulative count) sorted by bound, +Inf last."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def summarize(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> HistogramSummary:
    """Count, sum and p50/p95/p99 (seconds) of histogram ``name`` (all label sets merged)."""
    merged: dict[float, float] = {}
    for labels, v in samples.get(name + "_bucket", []):
        bound = float(labels["le"])
        merged[bound] = merged.get(bound, 0.0) + v
    buckets = sorted(merged.items())
    count = int(value(samples, name + "_count"))
    total = value(samples, name + "_sum")
    return HistogramSummary(
        count, total,
        histogram_quantile(buckets, 0.50), histogram_quantile(buckets, 0.95), histogram_quantile(buckets, 0.99),
    )
