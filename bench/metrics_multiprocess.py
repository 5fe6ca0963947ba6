"""Cost of one metric update in one process vs in a worker of ``serve --workers N``.

A worker's metric values live in memory-mapped files (prometheus-client's multiprocess mode,
``metrics/http.py``), so every ``observe``/``inc`` takes a lock and writes the file's page. This
prints microseconds per update for a histogram, a counter and a gauge of ``BridgeMetrics``, each
mode in its own fresh interpreter (the mode is chosen when prometheus-client is imported):

    .venv/bin/python bench/metrics_multiprocess.py [--updates 200000]

Multiply by the updates per call-second (a speaking call: about 10 histogram observations,
mostly ``bridge_mark_round_trip_seconds``; counters are batched per call) for the CPU it adds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import timeit


def measure(updates: int) -> str:
    from metrics import BridgeMetrics

    m = BridgeMetrics()
    histogram = timeit.timeit(lambda: m.forwarding_delay.observe(0.0012), number=updates) / updates * 1e6
    counter = timeit.timeit(lambda: m.frames_out.inc(3), number=updates) / updates * 1e6
    gauge = timeit.timeit(lambda: m.active_contexts.inc(), number=updates) / updates * 1e6
    return f"histogram observe {histogram:.2f} us, counter inc {counter:.2f} us, gauge inc {gauge:.2f} us"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.updates))
        return 0
    for mode in ("one process", "worker (multiprocess)"):
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with tempfile.TemporaryDirectory() as directory:
            if mode.startswith("worker"):
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            out = subprocess.run([sys.executable, __file__, "--child", "--updates", str(args.updates)], env=env,
                                 capture_output=True, text=True, check=True)
        print(f"{mode:>22}: {out.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
