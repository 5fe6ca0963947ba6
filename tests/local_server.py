"""Start an aiohttp app on 127.0.0.1 for a test peer (agent, audio host, fake Twilio API)."""

from __future__ import annotations

from aiohttp import web

from bridge.netutil import free_port


async def serve_locally(app: web.Application, shutdown_timeout: float = 1.0) -> tuple[web.AppRunner, int]:
    """The app served on a free port of 127.0.0.1: (runner to clean up, port)."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port
