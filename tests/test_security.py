"""Security checks against a real bridge on 127.0.0.1 with TWILIO_AUTH_TOKEN set.

* ``X-Twilio-Signature``: a signature over any other URL (host, scheme, port, path, query order) or
  other parameters is refused with 403, on the webhooks and on the Media Streams upgrade.
* The per-call agent URL allowlist holds against prefix, userinfo, case, encoding, scheme, dot-segment
  and port tricks, and a malformed URL is refused without an exception.
* Secrets never appear in the bridge's log output (captured at DEBUG), ``/metrics`` or error bodies.
* Floods of unstarted media sockets, half-open HTTP connections and webhooks stay within documented
  limits (``MEDIA_MAX_UNSTARTED``, ``MEDIA_START_TIMEOUT_S``, ``MAX_CALLS``) and real calls still work.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from bridge import server as server_module
from bridge import session as session_module
from bridge.agent.link import agent_url_allowed, loggable_url
from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator
from bridge.config import Config
from bridge.demo import free_port
from bridge.logs import JsonFormatter
from bridge.server import BridgeServer
from metrics.scrape import value
from telephony.signature import sign

from .conftest import Bridge, BridgeFactory
from .test_call_e2e import wait_for

TWILIO_SECRET = "twilio-token-SECRET-8c1f0e"
CARTESIA_SECRET = "sk_car_SECRET-5b7d2a"
AGENT_SECRET = "agent-token-SECRET-91e4c3"
SECRETS = (TWILIO_SECRET, CARTESIA_SECRET, AGENT_SECRET)


def _form(call_sid: str = "CA" + "1" * 32) -> dict[str, str]:
    return {"CallSid": call_sid, "From": "+15550100001", "To": "+15550100002", "AccountSid": "AC" + "2" * 32}


async def _post(bridge: Bridge, path: str, form: dict[str, str], signature: str | None, query: str = ""
                ) -> tuple[int, str]:
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    url = URL(bridge.base_url + path + query, encoded=True)  # exactly as signed
    async with bridge.http.post(url, data=form, headers=headers) as resp:
        return resp.status, await resp.text()


# ------------------------------------------------------------------ webhook signatures


async def test_webhook_signature_must_cover_this_exact_url_and_these_params(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge()
    token = bridge.token or ""
    base = bridge.base_url  # == PUBLIC_URL: http://127.0.0.1:<port>
    port = int(base.rsplit(":", 1)[1])
    form = _form()
    query = "?agentUrl=wss%3A%2F%2Fa.example%2Fx&greeting=hi"
    signed = base + "/twilio/voice" + query

    # Control: the right signature is accepted.
    assert (await _post(bridge, "/twilio/voice", form, sign(token, signed, form), query))[0] == 200
    refused = {
        "https instead of http": sign(token, signed.replace("http://", "https://"), form),
        "another host": sign(token, signed.replace("127.0.0.1", "localhost"), form),
        "another port": sign(token, signed.replace(f":{port}", f":{port + 1}"), form),
        "another path": sign(token, base + "/twilio/voice/" + query, form),
        "query reordered": sign(token, base + "/twilio/voice?greeting=hi&agentUrl=wss%3A%2F%2Fa.example%2Fx", form),
        "query decoded": sign(token, base + "/twilio/voice?agentUrl=wss://a.example/x&greeting=hi", form),
        "query dropped": sign(token, base + "/twilio/voice", form),
        "param changed": sign(token, signed, {**form, "From": "+15550199999"}),
        "param added": sign(token, signed, {**form, "Extra": "1"}),
        "param removed": sign(token, signed, {k: v for k, v in form.items() if k != "To"}),
        "other token": sign("not-the-token", signed, form),
        "empty": "",
        "garbage": "!!not base64!!",
    }
    for what, signature in refused.items():
        status, body = await _post(bridge, "/twilio/voice", form, signature, query)
        assert status == 403, what
        assert token not in body
    assert (await _post(bridge, "/twilio/voice", form, None, query))[0] == 403
    # Twilio's algorithm sorts the POST parameters, so their order in the body does not matter ...
    assert (await _post(bridge, "/twilio/voice", dict(reversed(list(form.items()))), sign(token, signed, form),
                        query))[0] == 200
    # ... and twilio-python accepts the signature over the URL without its port (Twilio signs either way).
    assert (await _post(bridge, "/twilio/voice", form, sign(token, signed.replace(f":{port}", ""), form),
                        query))[0] == 200
    samples = await bridge.metrics()
    assert value(samples, "bridge_signature_failures_total", endpoint="voice") == len(refused) + 1


@pytest.mark.parametrize(("path", "endpoint"), [("/twilio/stream-status", "stream_status"),
                                                ("/twilio/connect-action", "connect_action")])
async def test_every_webhook_checks_the_signature(make_bridge: BridgeFactory, path: str, endpoint: str) -> None:
    bridge = await make_bridge()
    token = bridge.token or ""
    form = {**_form(), "StreamEvent": "stream-started"}
    assert (await _post(bridge, path, form, sign(token, bridge.base_url + "/twilio/voice", form)))[0] == 403
    assert (await _post(bridge, path, form, sign(token, bridge.base_url + path, {**form, "x": "1"})))[0] == 403
    assert (await _post(bridge, path, form, sign(token, bridge.base_url + path, form)))[0] in (200, 204)
    samples = await bridge.metrics()
    assert value(samples, "bridge_signature_failures_total", endpoint=endpoint) == 2


# ------------------------------------------------------------- media upgrade signatures


async def _upgrade(bridge: Bridge, signature: str | None, query: str = "") -> aiohttp.ClientWebSocketResponse:
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    return await bridge.http.ws_connect(bridge.base_url.replace("http://", "ws://") + "/twilio/media" + query,
                                        headers=headers)


async def test_media_upgrade_signature_must_cover_the_wss_url_exactly(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge()
    token = bridge.token or ""
    ws_url = bridge.server.config.public_ws_base + "/twilio/media"  # ws://127.0.0.1:<port>/twilio/media
    port = int(bridge.base_url.rsplit(":", 1)[1])
    refused = {
        "http instead of ws": sign(token, ws_url.replace("ws://", "http://"), {}),
        "wss instead of ws": sign(token, ws_url.replace("ws://", "wss://"), {}),
        "another host": sign(token, ws_url.replace("127.0.0.1", "localhost"), {}),
        "another port": sign(token, ws_url.replace(f":{port}", f":{port + 1}"), {}),
        "another path": sign(token, ws_url + "/", {}),
        "with params": sign(token, ws_url, {"CallSid": "CA1"}),
        "the webhook's URL": sign(token, bridge.base_url + "/twilio/voice", {}),
        "other token": sign("not-the-token", ws_url, {}),
        "empty": "",
    }
    for what, signature in refused.items():
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await _upgrade(bridge, signature)
        assert info.value.status == 403, what
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await _upgrade(bridge, None)
    # A query on the upgrade does not let a signature over that query in: the URL signed is fixed.
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await _upgrade(bridge, sign(token, ws_url + "?x=1", {}), "?x=1")
    samples = await bridge.metrics()
    assert value(samples, "bridge_signature_failures_total", endpoint="media") == len(refused) + 2
    ws = await _upgrade(bridge, sign(token, ws_url, {}))  # control: the right one upgrades
    await ws.close()


# -------------------------------------------------------------------- agent allowlist

ALLOW = ("wss://allowed.example.com/agent", "ws://127.0.0.1:9000/")


@pytest.mark.parametrize(("url", "allowed"), [
    ("wss://allowed.example.com/agent", True),
    ("wss://allowed.example.com/agent/v1?x=1", True),
    ("WSS://ALLOWED.example.com/agent/v1", True),  # scheme and host are case-insensitive
    ("ws://127.0.0.1:9000/anything", True),
    ("wss://allowed.example.com.evil.test/agent", False),
    ("wss://allowed.example.com@evil.test/agent", False),
    ("wss://user:pw@allowed.example.com/agent", False),
    ("wss://evil.test/allowed.example.com/agent", False),
    ("wss://evil.test#@allowed.example.com/agent", False),
    ("wss://allowed.example.com/agentx", False),
    ("wss://allowed.example.com/Agent/v1", False),  # paths are case-sensitive
    ("ws://allowed.example.com/agent", False),  # ws is not wss
    ("https://allowed.example.com/agent", False),
    ("wss://allowed%2Eexample.com/agent", False),
    ("wss://allowed.example.com%2F@evil.test/agent", False),
    ("wss://allowed.example.com/agent/../admin", False),  # was allowed: the client dials /admin
    ("wss://allowed.example.com/agent/%2e%2e/admin", False),  # was allowed: the client dials /admin
    ("wss://allowed.example.com/agent/%252e%252e/admin", False),
    ("wss://allowed.example.com/agent/./v1", False),
    ("wss://allowed.example.com/agent%2F..%2Fadmin", False),
    ("wss://allowed.example.com/agent/..%5Cadmin", False),
    ("wss://allowed.example.com/agent\\..\\admin", False),
    ("wss://allowed.example.com:443/agent", False),  # a port that is not in the allowlist entry
    ("wss://allowed.example.com:8443/agent", False),
    ("ws://127.0.0.1:9001/anything", False),
    ("ws://127.0.0.1/anything", False),
    ("wss://[::1", False),  # was ValueError
    ("wss://allowed.example.com:99999/agent", False),
    ("wss://allowed.example.com\uff0f@evil.test/agent", False),  # was ValueError (NFKC netloc check)
    ("", False),
    ("wss://", False),
])
def test_agent_url_allowlist_holds_against_tricks(url: str, allowed: bool) -> None:
    assert agent_url_allowed(url, ALLOW) is allowed
    loggable_url(url)  # never raises: it is used on the refusal path


class TwoRouteAgent:
    """A WebSocket server with an allowlisted route and one outside it; counts connections per path."""

    def __init__(self) -> None:
        self.connections: dict[str, int] = {}
        self.headers: list[dict[str, str]] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        self.connections[request.path] = self.connections.get(request.path, 0) + 1
        self.headers.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            obj = orjson.loads(msg.data)
            if obj.get("type") == "setup":
                await ws.send_str('{"type":"text","token":"Hello.","last":true}')
                await ws.send_str('{"not json')  # bad input: the bridge answers with an error
                await ws.send_str('{"type":"nope"}')
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/agent/v1", self._handle)
        app.router.add_get("/evil", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def two_route_agent() -> AsyncIterator[TwoRouteAgent]:
    agent = TwoRouteAgent()
    await agent.start()
    yield agent
    await agent.stop()


async def test_dot_segments_cannot_leave_the_allowlisted_path(make_bridge: BridgeFactory,
                                                              two_route_agent: TwoRouteAgent) -> None:
    base = f"ws://127.0.0.1:{two_route_agent.port}"
    bridge = await make_bridge({"AGENT_URL_ALLOWLIST": base + "/agent/"})
    for url in (base + "/agent/../evil", base + "/agent/%2e%2e/evil"):
        call = bridge.call(webhook_query={"agentUrl": url})
        await call.place()
        await call.connect()
        assert await wait_for(lambda c=call: c.closed.is_set(), 10)  # type: ignore[misc]
    assert two_route_agent.connections.get("/evil", 0) == 0
    samples = await bridge.metrics()
    assert value(samples, "bridge_agent_failures_total", reason="not_allowlisted") == 2
    # Control: the allowlisted path itself is dialled.
    ok = bridge.call(webhook_query={"agentUrl": base + "/agent/v1"})
    await ok.place()
    await ok.connect()
    assert await wait_for(lambda: two_route_agent.connections.get("/agent/v1", 0) == 1, 5)
    await ok.hangup()


async def test_a_malformed_agent_url_is_refused_without_an_exception(
        make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    bridge = await make_bridge({"AGENT_URL_ALLOWLIST": "wss://allowed.example.com/", "FALLBACK_LINE": "Sorry."})
    call = bridge.call()
    await call.place()
    with caplog.at_level(logging.WARNING):
        await call.connect(extra_parameters={"agentUrl": "wss://[::1"})
        assert await wait_for(lambda: call.closed.is_set(), 10)
        assert await wait_for(lambda: not bridge.server.calls, 5)
    assert call.record.media_bytes > 0, "the caller hears the fallback line"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no unhandled exception"
    samples = await bridge.metrics()
    assert value(samples, "bridge_agent_failures_total", reason="not_allowlisted") == 1
    assert value(samples, "bridge_calls_total", outcome="agent_unreachable") == 1


# ---------------------------------------------------------------------------- secrets


@pytest.fixture
def bridge_log() -> Iterator[io.StringIO]:
    """Every log line of the process at DEBUG, formatted exactly as the bridge writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_secrets_never_reach_logs_metrics_or_error_bodies(
        make_bridge: BridgeFactory, two_route_agent: TwoRouteAgent, bridge_log: io.StringIO) -> None:
    base = f"ws://127.0.0.1:{two_route_agent.port}"
    bridge = await make_bridge({"TWILIO_AUTH_TOKEN": TWILIO_SECRET, "CARTESIA_API_KEY": CARTESIA_SECRET,
                                "AGENT_TOKEN": AGENT_SECRET, "AGENT_URL": base + "/agent/v1",
                                "AGENT_URL_ALLOWLIST": base + "/agent/"})
    bridge.token = TWILIO_SECRET
    bodies: list[str] = []
    # Bad requests: wrong signatures, missing CallSid, an unstarted upgrade with a bad signature.
    bodies.append((await _post(bridge, "/twilio/voice", _form(), sign("x", bridge.base_url + "/twilio/voice")))[1])
    bodies.append((await _post(bridge, "/twilio/voice", {"From": "+1"},
                               sign(TWILIO_SECRET, bridge.base_url + "/twilio/voice", {"From": "+1"})))[1])
    async with bridge.http.get(bridge.base_url + "/twilio/media") as resp:
        bodies.append(await resp.text())
    async with bridge.http.get(bridge.base_url + "/nope") as resp:
        bodies.append(await resp.text())
    # A call whose caller sends garbage, and whose agent sends garbage (TwoRouteAgent's setup reply).
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 10)
    for bad in ("{", "[]", '{"event":"media","streamSid":"MZ0","media":{"payload":"!!"}}', b"\x00\x01",
                '{"event":"dtmf","streamSid":"' + call.record.stream_sid + '","dtmf":{"digit":"99"}}', "x" * 70_000):
        await call.send_raw(bad)
    await asyncio.sleep(0.2)
    await call.hangup()
    # A call to an agent URL outside the allowlist, with a credential in its query: the refusal is
    # logged without it (the TwiML does carry it: Twilio echoes the signed webhook's own parameter).
    call2 = bridge.call(webhook_query={"agentUrl": f"ws://127.0.0.1:{two_route_agent.port}/evil?token={AGENT_SECRET}"})
    await call2.place()
    await call2.connect()
    assert await wait_for(lambda: call2.closed.is_set(), 10)
    assert await wait_for(lambda: not bridge.server.calls, 5)
    async with bridge.http.get(bridge.base_url + "/metrics") as resp:
        metrics_text = await resp.text()

    # The secrets were really in use: the agent got the bearer token, and bad input was logged.
    assert any(h.get("Authorization") == f"Bearer {AGENT_SECRET}" for h in two_route_agent.headers)
    logged = bridge_log.getvalue()
    for event in ("signature_rejected", "twilio_bad_input", "agent_bad_message", "agent_unreachable"):
        assert event in logged, event
    for secret in SECRETS:
        assert secret not in logged, f"a secret is in the log: {secret}"
        assert secret not in metrics_text
        for body in bodies:
            assert secret not in body
        assert secret not in (call.twiml or "")


# ----------------------------------------------------------------------------- floods


async def _unstarted(bridge: Bridge) -> aiohttp.ClientWebSocketResponse:
    token = bridge.token or ""
    return await _upgrade(bridge, sign(token, bridge.server.config.public_ws_base + "/twilio/media", {}))


async def _closed_by_bridge(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> bool:
    msg = await asyncio.wait_for(ws.receive(), timeout_s)
    return msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


async def test_unstarted_media_sockets_are_capped_and_timed_out(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"MEDIA_MAX_UNSTARTED": "5", "MEDIA_START_TIMEOUT_S": "1.5"})
    idle = [await _unstarted(bridge) for _ in range(5)]
    # A sixth: the oldest waiting socket is closed to make room, the new one is accepted.
    newest = await _unstarted(bridge)
    assert await _closed_by_bridge(idle[0])
    assert sum(1 for s in bridge.server.streams if not s.started and not s.closed) == 5
    samples = await bridge.metrics()
    assert value(samples, "bridge_media_streams_refused_total", reason="unstarted_limit") == 1
    # The others are closed by the bridge after the start timeout ...
    for ws in [*idle[1:], newest]:
        assert await _closed_by_bridge(ws)
        await ws.close()
    await idle[0].close()
    assert await wait_for(lambda: not bridge.server.streams, 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_media_streams_refused_total", reason="start_timeout") == 5
    assert value(samples, "bridge_active_calls") == 0
    # ... and a real call is served afterwards.
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 10)
    await call.hangup()


async def test_a_started_call_is_not_closed_by_the_start_timeout(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"MEDIA_START_TIMEOUT_S": "0.3"})
    call = bridge.call()
    await call.place()
    await call.connect()
    await asyncio.sleep(0.8)
    assert not call.closed.is_set()
    samples = await bridge.metrics()
    assert value(samples, "bridge_media_streams_refused_total", reason="start_timeout") == 0
    await call.hangup()


async def test_a_flood_of_half_open_connections_does_not_stop_calls(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"MAX_CALLS": "20", "MEDIA_MAX_UNSTARTED": "16"})
    host, port = "127.0.0.1", int(bridge.base_url.rsplit(":", 1)[1])
    writers: list[asyncio.StreamWriter] = []
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    try:
        # 150 connections that send half an HTTP request and stall, ...
        for _ in range(150):
            _reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /twilio/media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            writers.append(writer)
        # ... 40 upgrades that never send start (at most 16 are kept waiting, the oldest closed first), ...
        for _ in range(40):
            sockets.append(await _unstarted(bridge))
        assert await wait_for(lambda: len(bridge.server.streams) == 16, 5)
        samples = await bridge.metrics()
        assert value(samples, "bridge_media_streams_refused_total", reason="unstarted_limit") == 24
        # ... and 200 signed webhooks at once: each gets TwiML or a polite refusal, none an error.
        token = bridge.token or ""

        async def webhook(i: int) -> int:
            form = _form(f"CA{i:032d}")
            return (await _post(bridge, "/twilio/voice", form, sign(token, bridge.base_url + "/twilio/voice", form)))[0]

        statuses = await asyncio.gather(*(webhook(i) for i in range(200)))
        assert set(statuses) == {200}
        assert len(bridge.server.registry._pending) <= 2 * 20  # noqa: SLF001 - the documented bound
        samples = await bridge.metrics()
        assert value(samples, "bridge_calls_refused_total", reason="max_calls") >= 180
        # While all of that is held open, the bridge still answers and a call still works.
        async with bridge.http.get(bridge.base_url + "/healthz") as resp:
            assert resp.status == 200
        bridge.server.registry._pending.clear()  # noqa: SLF001 - let the next webhook in (ringing calls that never came)
        call = bridge.call()
        assert await call.place() is not None
        await call.connect()  # 16 idle sockets wait: this upgrade closes the oldest of them, and starts
        assert await call.wait_until(lambda: call.record.media_bytes > 0, 10)
        await call.hangup()
        samples = await bridge.metrics()
        assert value(samples, "bridge_media_streams_refused_total", reason="unstarted_limit") == 25
    finally:
        for writer in writers:
            writer.close()
        for ws in sockets:
            await ws.close()
    assert await wait_for(lambda: not bridge.server.streams and not bridge.server.calls, 5)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_refusals_are_logged_as_structured_events(make_bridge: BridgeFactory, bridge_log: io.StringIO) -> None:
    bridge = await make_bridge({"MEDIA_MAX_UNSTARTED": "1", "MEDIA_START_TIMEOUT_S": "0.3"})
    first = await _unstarted(bridge)
    second = await _unstarted(bridge)  # closes the first
    assert await _closed_by_bridge(first)
    assert await _closed_by_bridge(second)  # after the timeout
    await first.close()
    await second.close()
    events = [e for e in _json_lines(bridge_log.getvalue()) if e["event"] == "media_stream_refused"]
    assert sorted(e["reason"] for e in events) == ["start_timeout", "unstarted_limit"]
    assert all(e["remote"] == "127.0.0.1" for e in events)


async def test_a_half_open_http_connection_is_closed_after_the_idle_timeout(emulator: Emulator) -> None:
    port = free_port()
    server = BridgeServer(Config.from_env({
        "PUBLIC_URL": f"http://127.0.0.1:{port}", "CARTESIA_URL": emulator.url, "CARTESIA_API_KEY": "sk_car_test",
        "CARTESIA_VOICE_ID": DEFAULT_VOICE_ID, "TWILIO_AUTH_TOKEN": TWILIO_SECRET, "HTTP_IDLE_TIMEOUT_S": "0.5"}))
    runner = server.make_runner(access_log=None, shutdown_timeout=2.0)  # as `media-bridge serve` makes it
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the bridge closes the connection"
        assert time.monotonic() - t0 < 3
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_webhook_body_that_trickles_in_is_cut_off(make_bridge: BridgeFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "WEBHOOK_BODY_TIMEOUT_S", 0.3)
    bridge = await make_bridge()
    port = int(bridge.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 1000\r\n\r\nCallSid=CA1")  # 11 of 1000 bytes, then silence
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    writer.close()
    samples = await bridge.metrics()
    assert value(samples, "bridge_webhooks_total", result="body_timeout") == 1


async def test_a_caller_sending_garbage_cannot_flood_the_log(make_bridge: BridgeFactory,
                                                             bridge_log: io.StringIO) -> None:
    bridge = await make_bridge()
    call = bridge.call()
    await call.place()
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 10)
    for _ in range(2001):
        await call.send_raw("{")
    assert await wait_for(lambda: bridge.server.metrics.bad_input.labels(source="twilio",
                                                                          kind="malformed_json")._value.get() == 2001, 10)
    lines = [e for e in _json_lines(bridge_log.getvalue()) if e["event"] == "twilio_bad_input"]
    assert len(lines) == session_module.BAD_INPUT_LOG_LINES + 2  # the first ones, then the 1000th and 2000th
    assert lines[-1]["count"] == 2000
    # The call goes on.
    before = call.record.media_bytes
    await call.send_dtmf("9")
    assert await call.wait_until(lambda: call.record.media_bytes > before, 10)
    await call.hangup()
