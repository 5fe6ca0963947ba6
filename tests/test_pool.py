"""The shared Cartesia pool against a real emulator: admission, reservation, outages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.cartesia.client import AdmissionError, CartesiaPool
from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings
from bridge.cartesia.protocol import Chunk, Done, GenerationRequest, ServerMessage
from bridge.demo import free_port
from metrics import BridgeMetrics


class Listener:
    def __init__(self) -> None:
        self.messages: list[ServerMessage] = []
        self.lost: list[str] = []

    def on_cartesia_message(self, msg: ServerMessage, received_at: float) -> None:
        self.messages.append(msg)

    def on_context_lost(self, context_id: str, reason: str) -> None:
        self.lost.append(context_id)


@contextlib.asynccontextmanager
async def pool_on_emulator(settings: EmulatorSettings, metrics: BridgeMetrics | None = None,
                           **pool_options: Any) -> AsyncIterator[tuple[Emulator, CartesiaPool]]:
    """A started emulator and a pool of sockets to it; both stopped afterwards."""
    emulator = Emulator(settings)
    await emulator.start()
    pool = CartesiaPool(url=str(emulator.url), api_key=None, version="2026-03-01",
                        metrics=metrics or BridgeMetrics(), **pool_options)
    try:
        yield emulator, pool
    finally:
        await pool.close()
        await emulator.stop()


async def test_cancelled_waiter_during_outage_does_not_leak_a_slot() -> None:
    port = free_port()
    emulator = Emulator(EmulatorSettings())
    await emulator.start("127.0.0.1", port)
    pool = CartesiaPool(url=f"ws://127.0.0.1:{port}", api_key=None, version="2026-03-01", metrics=BridgeMetrics(),
                        size=1, max_concurrency=1, backoff_max_s=0.2)
    try:
        assert await pool.prewarm(5)
        first = await pool.open_context("c1", Listener(), 1.0)
        waiter = asyncio.create_task(pool.open_context("c2", Listener(), 10.0))
        await asyncio.sleep(0.05)
        assert pool.waiting == 1
        await emulator.stop()  # Cartesia goes away: no socket open
        await asyncio.sleep(0.2)
        first.abandon()  # the slot frees; the waiter wakes but finds no socket and waits for one
        await asyncio.sleep(0.1)
        waiter.cancel()  # e.g. the caller barged in
        with pytest.raises(asyncio.CancelledError):
            await waiter
        emulator = Emulator(EmulatorSettings())
        await emulator.start("127.0.0.1", port)
        assert await pool.prewarm(5)
        lease = await pool.open_context("c3", Listener(), 2.0)  # the slot must still be there
        assert pool.active_contexts == 1
        lease.abandon()
        assert pool.active_contexts == 0
    finally:
        await pool.close()
        await emulator.stop()


async def test_admission_deadline_raises_and_frees_the_queue() -> None:
    async with pool_on_emulator(EmulatorSettings(), size=1, max_concurrency=1) as (_emulator, pool):
        await pool.prewarm(5)
        lease = await pool.open_context("a", Listener(), 1.0)
        with pytest.raises(AdmissionError):
            await pool.open_context("b", Listener(), 0.2)
        assert pool.waiting == 0
        lease.cancel()
        assert pool.active_contexts == 0
        again = await pool.open_context("c", Listener(), 0.5)
        again.abandon()


async def test_idle_socket_is_replaced_before_cartesia_would_close_it_but_busy_one_is_not() -> None:
    metrics = BridgeMetrics()
    async with pool_on_emulator(EmulatorSettings(idle_timeout_s=5), metrics, size=1, max_age_s=0.4) as (
            emulator, pool):
        await pool.prewarm(5)
        assert emulator.handshakes == 1
        await asyncio.sleep(1.0)  # idle well past max_age: replaced by us, not closed by Cartesia
        assert emulator.handshakes >= 2
        rotations = metrics.cartesia_reconnects.labels(reason="max_age")._value.get()  # noqa: SLF001
        assert rotations >= 1
        assert await pool.prewarm(5)
        listener = Listener()
        lease = await pool.open_context("busy", listener, 1.0)
        before = emulator.handshakes
        await asyncio.sleep(1.0)  # a socket with a context in flight is left alone
        assert emulator.handshakes == before
        assert listener.lost == []
        lease.abandon()


async def test_one_call_flooding_text_cannot_fill_the_socket_for_its_neighbours(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.cartesia import client
    from bridge.cartesia.client import MAX_PENDING_SENDS_PER_CALL, SendQueueFull

    # A backed-up transport (Cartesia reading slower than we write): every send queues.
    monkeypatch.setattr(client, "DIRECT_WRITE_MAX_BUFFERED", -1)
    flooder, neighbour = Listener(), Listener()
    async with pool_on_emulator(EmulatorSettings(ttfb_ms=5), size=1, max_concurrency=4) as (_emulator, pool):
        assert await pool.prewarm(5)
        greedy = await pool.open_context("greedy", flooder, 1.0)
        polite = await pool.open_context("polite", neighbour, 1.0)

        def word(ctx: str, text: str, cont: bool = True) -> GenerationRequest:
            return GenerationRequest(ctx, text, "sonic-3", DEFAULT_VOICE_ID, continue_=cont)

        # Without yielding, nothing is written: the flooder's share fills up.
        for _ in range(MAX_PENDING_SENDS_PER_CALL):
            greedy.send(word("greedy", "la "))
        with pytest.raises(SendQueueFull, match="for this call"):
            greedy.send(word("greedy", "la "))
        polite.send(word("polite", "Hello there.", cont=False))  # the neighbour still gets through
        greedy.cancel()  # and a cancel is never refused
        deadline = asyncio.get_running_loop().time() + 10
        while not any(isinstance(m, Done) for m in neighbour.messages):
            assert asyncio.get_running_loop().time() < deadline, f"never finished: {neighbour.messages[:3]}"
            await asyncio.sleep(0.02)
        assert neighbour.lost == [] and flooder.lost == []
        # Once the queue drains, the flooder's share is free again.
        again = await pool.open_context("greedy-2", flooder, 1.0)
        again.send(word("greedy-2", "ok", cont=False))
        again.cancel()


async def test_immediate_admission_only_when_a_slot_is_free_and_nobody_waits() -> None:
    async with pool_on_emulator(EmulatorSettings(ttfb_ms=1, rtf=0), size=1, max_concurrency=2) as (_emulator, pool):
        assert pool.try_open_context("early", Listener()) is None  # no socket yet: the caller must wait
        await pool.prewarm(5)
        first = pool.try_open_context("a", Listener())
        assert first is not None and pool.active_contexts == 1
        listener = Listener()
        second = pool.try_open_context("b", listener)
        assert second is not None
        assert pool.try_open_context("c", Listener()) is None  # at max_concurrency
        queued = asyncio.create_task(pool.open_context("d", Listener(), 5.0))
        await asyncio.sleep(0.05)
        assert pool.waiting == 1
        first.cancel()  # frees a slot, which goes to the queued waiter, not to a newcomer
        assert pool.try_open_context("e", Listener()) is None
        lease_d = await asyncio.wait_for(queued, 5)
        # The immediately admitted context works like any other; with room in the
        # transport its request is written at once, not queued for the writer task.
        second.send(GenerationRequest(context_id="b", transcript="Hi there", model_id="sonic-2",
                                      voice_id=DEFAULT_VOICE_ID))
        assert all(not sock.outbox for sock in pool._sockets)  # noqa: SLF001
        for _ in range(200):
            if any(isinstance(m, Done) for m in listener.messages):
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(m, Chunk) for m in listener.messages)
        assert any(isinstance(m, Done) for m in listener.messages)
        lease_d.cancel()
        assert pool.active_contexts == 0  # "b" was released by its done, "d" by the cancel
