"""More calls than aiohttp's default connection limit (100), each with its own remote agent link.

Every agent link holds one connection of the bridge's shared HTTP client for
the whole call. With aiohttp's default connector, call 101 would wait for a
free connection and, after the connect timeout, hear the fallback line; the
bridge sizes the connector from ``MAX_CALLS`` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from metrics.scrape import value
from telephony.simulator import SimulatedCall

from .conftest import BridgeFactory
from .local_server import serve_locally
from .test_call_e2e import wait_for

CALLS = 120  # > aiohttp's default TCPConnector limit of 100


class GreetingAgent:
    """An external agent: answers every ``setup`` with one sentence naming the call; counts open links."""

    def __init__(self) -> None:
        self.open_links = 0
        self.peak_links = 0
        self.setups: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.open_links += 1
        self.peak_links = max(self.peak_links, self.open_links)
        try:
            async for msg in ws:
                obj = orjson.loads(msg.data)
                if obj.get("type") == "setup":
                    self.setups.append(obj["callSid"])
                    await ws.send_str(orjson.dumps({"type": "text", "token": "Agent here, hello.",
                                                    "last": True}).decode())
        finally:
            self.open_links -= 1
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._handle)
        self._runner, port = await serve_locally(app)
        self.url = f"ws://127.0.0.1:{port}/agent"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def greeting_agent() -> AsyncIterator[GreetingAgent]:
    agent = GreetingAgent()
    await agent.start()
    yield agent
    await agent.stop()


@pytest.mark.timeout(60)
async def test_more_calls_than_the_default_connection_limit_all_reach_their_agent(
        make_bridge: BridgeFactory, greeting_agent: GreetingAgent) -> None:
    bridge = await make_bridge({"AGENT_URL": greeting_agent.url, "CARTESIA_MAX_CONCURRENCY": str(2 * CALLS),
                                "AGENT_CONNECT_TIMEOUT_S": "10"})
    # The callers need their own client without a connection cap, or they would be the bottleneck.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        calls = [SimulatedCall(bridge.base_url, http, auth_token=bridge.token, send_inbound_audio=False)
                 for _ in range(CALLS)]

        async def start(call: SimulatedCall) -> None:
            assert await call.place() is not None
            await call.connect()

        await asyncio.wait_for(asyncio.gather(*(start(c) for c in calls)), 20)
        # Every call hears its agent while all of them are connected at once.
        assert await wait_for(lambda: len(greeting_agent.setups) == CALLS, 20), len(greeting_agent.setups)
        assert await wait_for(lambda: all(c.record.media_bytes > 0 for c in calls), 20), \
            sum(c.record.media_bytes > 0 for c in calls)
        assert greeting_agent.peak_links == CALLS
        assert sorted(greeting_agent.setups) == sorted(c.record.call_sid for c in calls)
        samples = await bridge.metrics()
        assert value(samples, "bridge_agent_connections") == CALLS
        assert value(samples, "bridge_agent_failures_total") == 0, "no call fell back to FALLBACK_LINE"
        await asyncio.wait_for(asyncio.gather(*(c.hangup() for c in calls)), 20)
    assert await wait_for(lambda: not bridge.server.calls, 10)
    assert await wait_for(lambda: greeting_agent.open_links == 0, 10)
