"""The bridge fails loudly when Cartesia is misconfigured or unreachable (issue 17).

Real bridges and real emulators on 127.0.0.1: a wrong key (the emulator requires
another one), a closed port, an outage after start, and recovery from each.
Short back-off and grace settings keep every test to a few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

import bridge.call as bridge_call
from bridge.build import COMPILED_MODULES
from bridge.cartesia.client import connect_failure_kind
from bridge.cartesia.emulator import Emulator, EmulatorSettings
from bridge.config import ENV_VARS, Config
from bridge.netutil import free_port
from metrics.scrape import value

from .build_mode import is_compiled
from .conftest import Bridge, BridgeFactory

#: The key conftest's bridges send (its value, or any prefix of it, must never be logged).
BRIDGE_KEY = "sk_car_test_key_never_logged"
FAST = {"CARTESIA_RECONNECT_BACKOFF_MAX_S": "0.4", "CARTESIA_DOWN_GRACE_S": "1", "CARTESIA_ADMISSION_TIMEOUT_S": "1"}
FALLBACK = ENV_VARS["FALLBACK_LINE"][0]


async def readyz(bridge: Bridge) -> tuple[int, dict[str, Any]]:
    async with bridge.http.get(bridge.base_url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def assert_unavailable(bridge: Bridge, status_label: str) -> None:
    """503 with the reason, bridge_ready 0, the connect failure counted, the webhook refuses politely."""
    status, body = await readyz(bridge)
    assert status == 503, body
    assert body["reason"] == "cartesia_unavailable" and body["ready"] is False
    assert body["cartesia_connected"] is False
    samples = await bridge.metrics()
    assert value(samples, "bridge_ready") == 0
    assert (value(samples, "bridge_cartesia_errors_total", status=status_label) or 0) >= 1
    call = bridge.call()
    assert await call.place() is None, "a bridge that cannot speak must not accept the call"
    assert call.twiml is not None and f"<Say>{FALLBACK}</Say>" in call.twiml and "<Hangup" in call.twiml
    samples = await bridge.metrics()
    assert value(samples, "bridge_calls_refused_total", reason="cartesia_unavailable") == 1
    assert not bridge.server.registry.occupancy, "a refused call leaves nothing waiting"


async def assert_serves_a_call(bridge: Bridge) -> None:
    await eventually(lambda: _ready(bridge), 5, "/readyz 200 after recovery")
    samples = await bridge.metrics()
    assert value(samples, "bridge_ready") == 1
    call = bridge.call()
    assert await call.place() is not None, "a ready bridge connects the call"
    await call.connect()
    assert await call.wait_until(lambda: call.record.media_bytes > 0, 5), "the caller hears the greeting"
    await call.hangup()


async def _ready(bridge: Bridge) -> bool:
    return (await readyz(bridge))[0] == 200


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.levelname} {r.getMessage()} {r.__dict__}" for r in caplog.records)


async def test_wrong_key_is_loud_and_recovers(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    emu = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05, api_key="sk_car_the_key_cartesia_expects"))
    await emu.start("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.DEBUG):
            started = time.monotonic()
            bridge = await make_bridge(FAST, emulator=emu)
            assert time.monotonic() - started < 4, "a refused key must not hold start-up for the prewarm timeout"
            await assert_unavailable(bridge, "401")
            await asyncio.sleep(1.5)  # retried with back-off, not in a hot loop
            samples = await bridge.metrics()
            attempts = value(samples, "bridge_cartesia_errors_total", status="401") or 0
            # 2 sockets, back-off 0.1 s doubling to 0.4 s (jittered down to half): ~10-20 in this time.
            assert 2 <= attempts <= 40, attempts
        errors = [r for r in caplog.records if r.getMessage() == "cartesia_auth_failed"]
        assert errors, "a refused key must be an ERROR line"
        assert all(r.levelno == logging.ERROR for r in errors)
        assert errors[0].__dict__["credential"] == "CARTESIA_API_KEY"
        assert errors[0].__dict__["status"] == "401"
        assert len(errors) <= 2, "repeats of one failure are rate-limited, not logged per attempt"
        text = logged(caplog)
        for secret in (BRIDGE_KEY, BRIDGE_KEY[:8], "sk_car_the_key_cartesia_expects"[:8]):
            assert secret not in text, f"{secret!r} reached the logs"
        changes = [r for r in caplog.records if r.getMessage() == "readiness_changed"]
        assert [(r.levelno, r.__dict__["reason"]) for r in changes] == [(logging.ERROR, "cartesia_unavailable")]

        emu.auth.api_key = BRIDGE_KEY  # the key is fixed (e.g. the secret rotated): Cartesia accepts it
        with caplog.at_level(logging.INFO):
            await assert_serves_a_call(bridge)
        changes = [r for r in caplog.records if r.getMessage() == "readiness_changed"]
        assert changes[-1].__dict__["reason"] == "ready" and changes[-1].__dict__["ready"] is True
    finally:
        await emu.stop()


async def test_unreachable_host_is_loud_and_recovers(make_bridge: BridgeFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here until the emulator below starts
    with caplog.at_level(logging.WARNING):
        bridge = await make_bridge({**FAST, "CARTESIA_URL": f"ws://127.0.0.1:{port}"})
        await assert_unavailable(bridge, "connection_refused")
    failures = [r for r in caplog.records if r.getMessage() == "cartesia_connect_failed"]
    assert failures and failures[0].__dict__["status"] == "connection_refused"
    assert failures[0].levelno == logging.WARNING
    started = [r for r in caplog.records if r.getMessage() == "bridge_started"]
    assert started and started[0].levelno == logging.ERROR and started[0].__dict__["reason"] == "cartesia_unavailable"
    # Which build runs: "N/11" modules compiled, N = 11 on CI's compiled suite, 0 on the plain one.
    compiled, total = started[0].__dict__["compiled_modules"].split("/")
    assert int(total) == len(COMPILED_MODULES)
    assert int(compiled) == (len(COMPILED_MODULES) if is_compiled(bridge_call) else 0)

    emu = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05))
    await emu.start("127.0.0.1", port)  # Cartesia comes up
    try:
        await assert_serves_a_call(bridge)
    finally:
        await emu.stop()


async def test_outage_after_start_turns_not_ready_after_the_grace(make_bridge: BridgeFactory) -> None:
    emu = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05))
    port = await _start_on_free_port(emu)
    bridge = await make_bridge(FAST, emulator=emu)
    assert (await readyz(bridge))[0] == 200
    registry = bridge.server.metrics.registry
    assert registry.get_sample_value("bridge_ready") == 1
    await emu.stop()
    # Inside the grace period a reconnect is not an outage...
    await eventually(lambda: _async(not bridge.server.pool.healthy), 3, "the pool notices the outage")
    assert registry.get_sample_value("bridge_ready") == 1
    # ...after it, bridge_ready drops by itself (no request needed) and calls are refused.
    deadline = time.monotonic() + 3
    while registry.get_sample_value("bridge_ready") != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert registry.get_sample_value("bridge_ready") == 0, "bridge_ready follows readiness at every change"
    status, body = await readyz(bridge)
    assert status == 503 and body["reason"] == "cartesia_unavailable"
    assert body["cartesia_down_for_s"] >= 1.0
    call = bridge.call()
    assert await call.place() is None

    emu2 = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05))
    await emu2.start("127.0.0.1", port)
    try:
        await assert_serves_a_call(bridge)
    finally:
        await emu2.stop()


async def test_call_that_cannot_speak_names_the_cause(make_bridge: BridgeFactory) -> None:
    emu = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05))
    await _start_on_free_port(emu)
    bridge = await make_bridge({**FAST, "CARTESIA_DOWN_GRACE_S": "30"}, emulator=emu)
    call = bridge.call()
    assert await call.place() is not None  # accepted while Cartesia was up
    await emu.stop()  # Cartesia goes away between the webhook and the stream
    await eventually(lambda: _async(not bridge.server.pool.healthy), 3, "the pool notices the outage")
    await call.connect()

    async def greeting_failed() -> bool:
        return (value(await bridge.metrics(), "bridge_utterances_failed_total", reason="cartesia_unavailable")
                or 0) >= 1

    await eventually(greeting_failed, 5, "the greeting fails for want of a Cartesia socket")
    await call.hangup()

    async def counted() -> bool:
        return value(await bridge.metrics(), "bridge_calls_total", outcome="no_audio_cartesia_unavailable") == 1

    await eventually(counted, 5, "the call's outcome names the cause")
    samples = await bridge.metrics()
    assert not value(samples, "bridge_calls_total", outcome="caller_hangup")
    assert call.record.media_bytes == 0
    assert value(samples, "bridge_active_calls") == 0


def test_http_public_url_warns_outside_local_runs() -> None:
    def warnings(url: str) -> list[str]:
        return [event for event, _ in Config.from_env({"PUBLIC_URL": url}).warnings()]

    assert warnings("http://bridge.example.com") == ["public_url_not_https"]
    detail = Config.from_env({"PUBLIC_URL": "http://bridge.example.com"}).warnings()[0][1]
    assert "wss://" in detail
    for local in ("http://127.0.0.1:8080", "http://localhost:9000", "http://[::1]:8080", "https://bridge.example.com"):
        assert warnings(local) == [], local


async def test_http_public_url_warning_is_logged_at_start(make_bridge: BridgeFactory,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        await make_bridge({"PUBLIC_URL": "http://bridge.example.com"})
    hits = [r for r in caplog.records if r.getMessage() == "public_url_not_https"]
    assert len(hits) == 1 and hits[0].levelno == logging.WARNING
    assert "wss://" in hits[0].__dict__["detail"]


def test_connect_failure_kinds() -> None:
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    def refused(status: int) -> InvalidStatus:
        return InvalidStatus(Response(status, "x", Headers()))

    assert connect_failure_kind(refused(401)) == "401"
    assert connect_failure_kind(refused(403)) == "403"
    assert connect_failure_kind(socket.gaierror(-2, "Name or service not known")) == "dns"
    assert connect_failure_kind(ConnectionRefusedError(111, "refused")) == "connection_refused"
    assert connect_failure_kind(TimeoutError()) == "timeout"
    assert connect_failure_kind(OSError(113, "No route to host")) == "network"


async def _start_on_free_port(emu: Emulator) -> int:
    port = free_port()
    await emu.start("127.0.0.1", port)
    return port


async def _async(result: bool) -> bool:
    return result

