"""Summaries of measured values for the report: distributions in ms and the bridge's histograms.

Caller-side distributions use ``bridge.stats.percentile`` (nearest rank: every
figure is a value that was measured); the bridge's own latencies come from the
buckets of its ``/metrics`` histograms (``metrics.scrape.summarize``).
"""

from __future__ import annotations

import math
from typing import Any

from bridge.stats import percentile
from metrics.scrape import summarize

#: Parsed Prometheus exposition: metric name -> [(labels, value)].
Samples = dict[str, list[tuple[dict[str, str], float]]]


def round_or_none(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def dist_ms(values_s: list[float]) -> dict[str, Any]:
    """count, p50/p95/p99/max and mean in ms of a list of seconds."""
    ms = [v * 1000.0 for v in values_s]
    out: dict[str, Any] = {"count": len(ms)}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        out[name] = round_or_none(percentile(ms, q), 3)
    out["max"] = round(max(ms), 3) if ms else None
    out["mean"] = round(sum(ms) / len(ms), 3) if ms else None
    return out


def bucket_counts(samples: Samples, name: str) -> list[list[float]]:
    """[[upper bound s, count in that bucket]] (non-cumulative), merged over label sets; +Inf as 1e9."""
    merged: dict[float, float] = {}
    for labels, v in samples.get(name + "_bucket", []):
        b = float(labels["le"])
        merged[b] = merged.get(b, 0.0) + v
    out, prev = [], 0.0
    for b, c in sorted(merged.items()):
        out.append([b if math.isfinite(b) else 1e9, c - prev])
        prev = c
    return out


def histogram_ms(samples: Samples, name: str) -> dict[str, Any]:
    """A bridge histogram (seconds) as count, p50/p95/p99 and mean in ms, plus its buckets."""
    h = summarize(samples, name)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {"count": h.count, "p50": ms(h.p50), "p95": ms(h.p95), "p99": ms(h.p99),
            "mean": ms(h.sum / h.count) if h.count else None,
            "buckets": bucket_counts(samples, name)}
