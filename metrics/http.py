"""The ``GET /metrics`` route: ``BridgeMetrics`` in the Prometheus text format."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from metrics import BridgeMetrics


def metrics_handler(metrics: BridgeMetrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """aiohttp handler serving ``metrics`` in the Prometheus text format."""

    async def handle(_request: web.Request) -> web.Response:
        body = metrics.render()
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp

    return handle
