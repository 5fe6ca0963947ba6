"""Shared fixtures: a real emulator and a real bridge on 127.0.0.1, ephemeral ports."""

from __future__ import annotations

import asyncio
import gc
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings
from bridge.config import Config
from bridge.demo import free_port
from bridge.server import BridgeServer
from metrics.scrape import parse_samples
from telephony.simulator import SimulatedCall


@dataclass
class Bridge:
    server: BridgeServer
    base_url: str
    token: str | None
    http: aiohttp.ClientSession
    emulator: Emulator

    def call(self, **kwargs: Any) -> SimulatedCall:
        kwargs.setdefault("auth_token", self.token)
        return SimulatedCall(self.base_url, self.http, **kwargs)

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        async with self.http.get(self.base_url + "/metrics") as resp:
            assert resp.status == 200
            return parse_samples(await resp.text())


@pytest.fixture(autouse=True)
def _collect_garbage_between_tests() -> None:
    # Finalise sockets and tasks of earlier tests' event loops now, not inside this test's loop.
    gc.collect()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(EmulatorSettings(ttfb_ms=5, rtf=0.05))
    await emu.start("127.0.0.1", 0)
    yield emu
    await _bounded(emu.stop(), "emulator stop")


BridgeFactory = Callable[..., Awaitable[Bridge]]


@pytest.fixture
async def make_bridge(http: aiohttp.ClientSession) -> AsyncIterator[BridgeFactory]:
    """Start bridges against a given (or new) emulator; all torn down at the end."""
    runners: list[web.AppRunner] = []
    emulators: list[Emulator] = []

    async def factory(
        env: dict[str, str] | None = None,
        *,
        emulator: Emulator | None = None,
        emulator_settings: EmulatorSettings | None = None,
        signed: bool = True,
    ) -> Bridge:
        if emulator is None:
            emulator = Emulator(emulator_settings or EmulatorSettings(ttfb_ms=5, rtf=0.05))
            await emulator.start("127.0.0.1", 0)
            emulators.append(emulator)
        port = free_port()
        token = secrets.token_hex(16) if signed else None
        values = {
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "CARTESIA_URL": emulator.url,
            "CARTESIA_API_KEY": "sk_car_test_key_never_logged",
            "CARTESIA_VOICE_ID": DEFAULT_VOICE_ID,
            "VAD_ENABLED": "false",
            "GREETING": "Hello there caller, welcome to the bridge.",
        }
        if token:
            values["TWILIO_AUTH_TOKEN"] = token
        values.update(env or {})
        server = BridgeServer(Config.from_env(values))
        runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return Bridge(server, f"http://127.0.0.1:{port}", token, http, emulator)

    yield factory
    # Bounded teardown: a hang here names the tasks still running instead of eating the test timeout.
    for runner in reversed(runners):
        await _bounded(runner.cleanup(), "bridge cleanup")
    for emu in emulators:
        await _bounded(emu.stop(), "emulator stop")


async def _bounded(aw: Awaitable[None], what: str, timeout_s: float = 15.0) -> None:
    try:
        await asyncio.wait_for(aw, timeout_s)
    except TimeoutError:
        tasks = [f"{t.get_name()}: {t.get_coro()!r}" for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        pytest.fail(f"{what} did not finish in {timeout_s} s; running tasks: {tasks}")
