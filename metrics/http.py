"""The ``GET /metrics`` route: ``BridgeMetrics`` in the Prometheus text format.

One process: the bridge's private registry, as is. A worker of ``media-bridge serve --workers N``
(``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor before prometheus-client was imported): every
metric value lives in a memory-mapped file per process in that directory, whichever registry
defined it, and the route answers with prometheus-client's ``MultiProcessCollector`` over the
directory, so whichever worker the scrape reaches, it shows the whole group: counters and
histograms summed over every worker that ever ran in the group, gauges combined as their
``multiprocess_mode`` says (``livesum`` for counts of live things, ``livemin`` for the 0/1
``bridge_ready`` and ``bridge_twilio_fast_path``: 1 only when every live worker is). In that
mode samples carry no ``_created`` series, and ``Gauge.set_function`` would not work (none is
used).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from metrics import BridgeMetrics

#: Set by the supervisor of ``serve --workers N`` for each worker.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def group_renderer(metrics: BridgeMetrics, directory: str) -> Callable[[], bytes]:
    """Render the whole process group's metrics from ``directory`` (this process's hooks run first)."""
    from prometheus_client import multiprocess

    group = CollectorRegistry()
    multiprocess.MultiProcessCollector(group, path=directory)  # type: ignore[no-untyped-call]

    def render() -> bytes:
        for hook in metrics.before_render:
            hook()
        return generate_latest(group)

    return render


def metrics_handler(metrics: BridgeMetrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """aiohttp handler serving ``metrics`` (or its process group's) in the Prometheus text format."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    render = group_renderer(metrics, directory) if directory else metrics.render

    async def handle(_request: web.Request) -> web.Response:
        body = render()
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp

    return handle
