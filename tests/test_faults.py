"""Calls survive Cartesia faults injected by the emulator; nothing heard is lost or repeated."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from bridge.cartesia.emulator import EmulatorSettings, FaultSettings
from bridge.demo import free_port
from bridge.integrity import explain_heard
from metrics.scrape import parse_samples, value
from telephony.media import FRAME_BYTES
from telephony.simulator import SimulatedCall

from .conftest import Bridge, BridgeFactory
from .test_call_e2e import wait_for

CALLS = 20
WORDS = 8


CALL_TASK_PREFIXES = ("twilio-writer", "admit-", "agent-", "builtin-agent")


def call_tasks() -> list[str]:
    """Tasks a call owns (the pool's and the emulator's are process-wide)."""
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(CALL_TASK_PREFIXES)]


def greeting(i: int) -> str:
    return " ".join(f"c{i}w{j}" for j in range(WORDS))


def contexts_of_call(bridge: Bridge, i: int) -> list[str]:
    """This call's contexts in creation order (every word names its call)."""
    order: list[str] = []
    for _conn, obj in bridge.emulator.received:
        ctx = obj.get("context_id")
        words = (obj.get("transcript") or "").split()
        if ctx and ctx not in order and words and words[0].startswith(f"c{i}w"):
            order.append(ctx)
    return order


async def run_calls(bridge: Bridge) -> list[SimulatedCall]:
    calls = [bridge.call(webhook_query={"greeting": greeting(i)}) for i in range(CALLS)]
    for call in calls:
        stream = await call.place()
        assert stream is not None
        await call.connect()
    # Each greeting is ~3 s of tone speech played in real time; wait until every ear is idle.
    for call in calls:
        assert await call.wait_until(lambda c=call: c.record.media_bytes > 0, 10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(not s.core.is_speaking for s in bridge.server.calls) and len(bridge.server.calls) == CALLS:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    return calls


async def check_and_hang_up(bridge: Bridge, calls: list[SimulatedCall]) -> dict[str, int]:
    lost_calls = sum(1 for c in calls if c.closed.is_set())
    mismatches = 0
    for i, call in enumerate(calls):
        chain = []
        for ctx in contexts_of_call(bridge, i):
            record = bridge.emulator.context_record(ctx)
            if record is None:  # refused by the emulator (429): produced nothing
                chain.append((b"", []))
                continue
            chain.append((bytes(record.audio), list(record.starts) + list(record.ends)))
        assert chain, f"call {i} produced no context"
        if not explain_heard(call.ear.heard(), chain):
            mismatches += 1
        assert call.record.protocol_errors == []
    for call in calls:
        await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 10)
    assert await wait_for(lambda: bridge.server.pool.active_contexts == 0, 5)
    assert bridge.server.pool.waiting == 0
    assert await wait_for(lambda: not call_tasks(), 5), f"tasks left behind: {call_tasks()}"
    samples = await bridge.metrics()
    assert value(samples, "bridge_active_calls") == 0
    assert value(samples, "bridge_cartesia_active_contexts") == 0
    assert value(samples, "bridge_cartesia_admission_queue") == 0
    return {"calls_lost": lost_calls, "mismatches": mismatches}


FAST = {"ttfb_ms": 5, "rtf": 0.05, "chunk_ms": 100, "seed": 7}


async def test_socket_killed_mid_utterance_resumes_without_repeat_or_gap(make_bridge: BridgeFactory) -> None:
    settings = EmulatorSettings(**FAST, faults=FaultSettings(close_after_chunks=60))  # type: ignore[arg-type]
    bridge = await make_bridge({"CARTESIA_POOL_SIZE": "2"}, emulator_settings=settings)
    calls = await run_calls(bridge)
    result = await check_and_hang_up(bridge, calls)
    assert result == {"calls_lost": 0, "mismatches": 0}
    samples = await bridge.metrics()
    assert value(samples, "bridge_cartesia_context_retries_total", reason="socket_lost") > 0
    assert value(samples, "bridge_cartesia_reconnects_total") > 0
    assert await wait_for(lambda: not call_tasks(), 5), f"tasks left behind: {call_tasks()}"


async def test_429_contexts_are_retried_within_the_utterance(make_bridge: BridgeFactory) -> None:
    settings = EmulatorSettings(**FAST, faults=FaultSettings(reject_429_fraction=0.3))  # type: ignore[arg-type]
    bridge = await make_bridge(emulator_settings=settings)
    calls = await run_calls(bridge)
    result = await check_and_hang_up(bridge, calls)
    assert result == {"calls_lost": 0, "mismatches": 0}
    samples = await bridge.metrics()
    assert value(samples, "bridge_cartesia_context_retries_total", reason="429") > 0
    assert value(samples, "bridge_cartesia_errors_total", status="429") > 0


async def test_missing_done_is_ended_by_the_context_deadline(make_bridge: BridgeFactory) -> None:
    settings = EmulatorSettings(**FAST, faults=FaultSettings(no_done_fraction=0.3))  # type: ignore[arg-type]
    bridge = await make_bridge({"CARTESIA_CONTEXT_TIMEOUT_S": "1"}, emulator_settings=settings)
    calls = await run_calls(bridge)
    result = await check_and_hang_up(bridge, calls)
    assert result == {"calls_lost": 0, "mismatches": 0}
    samples = await bridge.metrics()
    assert value(samples, "bridge_cartesia_context_timeouts_total") > 0
    assert value(samples, "bridge_cartesia_context_retries_total", reason="no_done") > 0
    assert value(samples, "bridge_cartesia_context_retries_total", reason="socket_lost") == 0


async def test_delayed_chunks_keep_audio_intact(make_bridge: BridgeFactory) -> None:
    settings = EmulatorSettings(**FAST, faults=FaultSettings(delay_ms=150, delay_fraction=0.3))  # type: ignore[arg-type]
    bridge = await make_bridge(emulator_settings=settings)
    calls = await run_calls(bridge)
    result = await check_and_hang_up(bridge, calls)
    assert result == {"calls_lost": 0, "mismatches": 0}


def test_explain_heard_detects_a_corrupted_byte() -> None:
    a = bytes(range(200)) * 4
    b = bytes(range(100)) * 5
    heard = a[:400] + b + b"\xff" * (-(400 + len(b)) % FRAME_BYTES)
    chain = [(a, [0.05, 0.1]), (b, [0.0625])]
    assert explain_heard(heard, chain)
    broken = bytearray(heard)
    broken[450] ^= 1
    assert not explain_heard(bytes(broken), chain)
    assert not explain_heard(a[:400] + a[:80] + heard[400:], chain), "a repeat is detected"


async def test_admission_queue_waits_then_admits(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"CARTESIA_MAX_CONCURRENCY": "2", "CARTESIA_ADMISSION_TIMEOUT_S": "10"},
                               emulator_settings=EmulatorSettings(**FAST))  # type: ignore[arg-type]
    calls = [bridge.call(webhook_query={"greeting": greeting(i)}) for i in range(5)]
    for call in calls:
        await call.place()
        await call.connect()
    for call in calls:
        assert await call.wait_until(lambda c=call: c.record.media_bytes > 0, 10), "every call is admitted in turn"
    samples = await bridge.metrics()
    assert value(samples, "bridge_cartesia_admission_wait_seconds_count") >= 3
    for call in calls:
        await call.hangup()
    assert await wait_for(lambda: bridge.server.pool.active_contexts == 0, 5)


async def test_max_calls_gets_a_polite_refusal(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"MAX_CALLS": "1", "BUSY_LINE": "Busy now."})
    first = bridge.call()
    await first.place()
    await first.connect()
    second = bridge.call()
    assert await second.place() is None
    assert second.twiml is not None and "<Say>Busy now.</Say>" in second.twiml
    samples = await bridge.metrics()
    assert value(samples, "bridge_calls_refused_total", reason="max_calls") == 1
    await first.hangup()


@pytest.mark.timeout(120)
async def test_sigterm_drains_a_real_serve_process(tmp_path: object) -> None:
    port = free_port()
    env = dict(os.environ, PUBLIC_URL=f"http://127.0.0.1:{port}", DRAIN_GRACE_S="3", LOG_LEVEL="INFO",
               TWILIO_AUTH_TOKEN="drain-token", GREETING=" ".join(["draining"] * 40))
    env.pop("CARTESIA_API_KEY", None)
    # Popen only forks (no wait): it does not block the loop the way run() would.
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],  # noqa: ASYNC220
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                try:
                    async with http.get(base + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"serve never became ready; stderr: {proc.stderr.read() if proc.stderr else ''}")
            call = SimulatedCall(base, http, auth_token="drain-token")
            await call.place()
            await call.connect()
            assert await call.wait_until(lambda: call.record.media_bytes > 0, 10)
            proc.send_signal(signal.SIGTERM)
            for _ in range(50):  # the signal is handled on the bridge's loop: poll, do not guess
                async with http.get(base + "/readyz") as r:
                    if r.status == 503:
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("/readyz never turned 503 after SIGTERM")
            refused = SimulatedCall(base, http, auth_token="drain-token")
            assert await refused.place() is None, "a draining bridge refuses new calls politely"
            assert not call.closed.is_set(), "the call in progress keeps going during the grace period"
            async with http.get(base + "/metrics") as r:
                samples = parse_samples(await r.text())
            assert value(samples, "bridge_calls_refused_total", reason="draining") == 1
            # The greeting outlasts the 3 s grace: the bridge ends the call by closing the stream.
            assert await call.wait_until(lambda: call.closed.is_set(), 10)
        code = await asyncio.to_thread(proc.wait, 15)
        assert code == 0
        logs = proc.stderr.read() if proc.stderr else ""
        assert '"drain_finished"' in logs and '"ended_calls":1' in logs
        assert "drain-token" not in logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
