"""The agent socket's inline receive (``bridge/agent/inline_client.py``) on real loopback sockets.

A real aiohttp server plays the agent; ``AgentConnector`` opens the link as a call would. Both
paths (inline sink and aiohttp's reader task) must deliver the same messages in the same order,
keep the size cap and the handler-error answer, and stop delivering at close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.agent import inline_client
from bridge.agent.connector import AgentConnector
from bridge.agent.link import AGENT_SOCKET_MAX_MSG_BYTES, RemoteAgentLink
from metrics import BridgeMetrics
from metrics.scrape import value

from .conftest import BridgeFactory
from .test_call_e2e import wait_for

Script = Callable[[web.WebSocketResponse], Awaitable[None]]


class Agent:
    """A loopback agent server; each connection runs ``script`` and records what the bridge sent."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.received: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert self.script is not None
        await self.script(ws)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.received.append(orjson.loads(msg.data))
        return ws


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    server = Agent()
    app = web.Application()
    app.router.add_get("/agent", server.handler)
    server.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await server.runner.setup()
    site = web.TCPSite(server.runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"ws://127.0.0.1:{server.runner.addresses[0][1]}/agent"
    yield server
    await server.runner.cleanup()


def connector_for(agent: Agent, *, inline: bool) -> AgentConnector:
    return AgentConnector(agent_url=agent.url, allowlist=(), token=None, connect_timeout_s=5.0, greeting="Hi.",
                          max_links=10, metrics=BridgeMetrics(), inline_receive=inline)


def test_the_guard_knows_this_aiohttp_and_refuses_an_unknown_one() -> None:
    assert inline_client.INLINE_CLIENT, inline_client.INLINE_CLIENT_REASON
    ok, reason = inline_client.check_client_hook(known=frozenset())
    assert not ok and "changed" in reason
    assert inline_client.inline_response_class(1000, inline=False) is aiohttp.ClientWebSocketResponse
    cls = inline_client.inline_response_class(1000)
    assert issubclass(cls, inline_client.InlineClientWebSocketResponse) and cls.inline_max_msg_size == 1000
    assert inline_client.inline_response_class(1000) is cls, "one class per size, not one per session"


async def test_self_test_sees_the_inline_path() -> None:
    status = await inline_client.self_test()
    assert status.active, status.reason


@pytest.mark.parametrize("inline", [True, False])
async def test_both_paths_deliver_every_message_in_order_and_answer_a_handler_bug(
        agent: Agent, inline: bool) -> None:
    words = [f"word{i} " for i in range(200)]

    async def script(ws: web.WebSocketResponse) -> None:
        await ws.send_str("{not json")  # the handler's business: delivered as it came
        for i, text in enumerate(words):
            await ws.send_str(orjson.dumps({"type": "text", "token": text, "last": False}).decode())
            if i == 50:
                await ws.send_bytes(b"\x00\x01")  # takes the reader task's path, between TEXT messages
            if i == 100:
                await ws.send_str('{"type": "boom"}')
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # some arrive alone, some in bursts
        await ws.send_str(orjson.dumps({"type": "text", "token": "", "last": True}).decode())

    agent.script = script
    delivered: list[Any] = []
    closed: list[str] = []

    def deliver(message: str | dict[str, Any]) -> None:
        if isinstance(message, str) and "boom" in message:
            raise RuntimeError("handler bug")
        delivered.append(message)

    connector = connector_for(agent, inline=inline)
    link = await connector.connect(None, deliver, closed.append)
    assert isinstance(link, RemoteAgentLink) and link.inline is inline
    try:
        assert await wait_for(lambda: len(delivered) == len(words) + 3)
        assert delivered[0] == "{not json"
        assert delivered[52] == {"type": "__binary__"}, delivered[50:54]
        tokens = [orjson.loads(m)["token"] for m in delivered[1:] if isinstance(m, str)]
        assert tokens == [*words, ""], "same order, nothing lost, nothing twice"
        assert await wait_for(lambda: any(m.get("type") == "error" for m in agent.received))
        assert agent.received[0]["description"] == "the bridge failed to handle that message"
        if inline:
            assert link._ws is not None and isinstance(link._ws, inline_client.InlineClientWebSocketResponse)
            assert link._ws.inline_messages > len(words) // 2, link._ws.inline_messages
        assert closed == []
    finally:
        await link.close()
        await connector.close()


@pytest.mark.parametrize("inline", [True, False])
async def test_a_message_over_the_size_cap_fails_the_link_on_both_paths(agent: Agent, inline: bool) -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        await ws.send_str('{"type": "text", "token": "ok ", "last": false}')
        await ws.send_str("x" * (AGENT_SOCKET_MAX_MSG_BYTES + 1))

    agent.script = script
    delivered: list[Any] = []
    closed: list[str] = []
    connector = connector_for(agent, inline=inline)
    link = await connector.connect(None, delivered.append, closed.append)
    try:
        assert await wait_for(lambda: bool(closed))
        assert delivered == ['{"type": "text", "token": "ok ", "last": false}']
        assert "agent socket error" in closed[0] and ("1009" in closed[0] or "size" in closed[0]), closed
    finally:
        await link.close()
        await connector.close()


async def test_nothing_is_delivered_after_close_and_no_task_is_left(agent: Agent) -> None:
    go = asyncio.Event()

    async def script(ws: web.WebSocketResponse) -> None:
        await ws.send_str('{"type": "text", "token": "one ", "last": false}')
        await go.wait()
        for _ in range(20):
            await ws.send_str('{"type": "text", "token": "late ", "last": false}')

    agent.script = script
    delivered: list[Any] = []
    connector = connector_for(agent, inline=True)
    link = await connector.connect(None, delivered.append, lambda reason: None)
    assert await wait_for(lambda: len(delivered) == 1)
    assert isinstance(link, RemoteAgentLink)
    tasks = list(link._tasks)
    await link.close()
    go.set()
    await asyncio.sleep(0.1)
    assert len(delivered) == 1
    assert all(task.done() for task in tasks)
    await connector.close()


async def test_start_up_checks_the_agent_fast_path_and_exports_it(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge()
    status = await inline_client.self_test()
    assert status.active == inline_client.INLINE_CLIENT
    assert bridge.server.agents.inline_receive == status.active
    assert value(await bridge.metrics(), "bridge_agent_fast_path") == (1 if status.active else 0)


async def test_a_failed_agent_self_test_switches_agent_sockets_to_the_plain_path(
        make_bridge: BridgeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from bridge import server

    async def failing_self_test() -> inline_client.ClientFastPathStatus:
        return inline_client.ClientFastPathStatus(False, "self-test got []")

    monkeypatch.setattr(server, "agent_self_test", failing_self_test)
    with caplog.at_level(logging.WARNING):
        bridge = await make_bridge()
    assert bridge.server.agents.inline_receive is False
    assert value(await bridge.metrics(), "bridge_agent_fast_path") == 0
    hits = [r for r in caplog.records if r.getMessage() == "agent_fast_path"]
    assert len(hits) == 1 and hits[0].levelno == logging.WARNING and hits[0].__dict__["reason"] == "self-test got []"
