"""The simulated callers' sending side: masked client frames written straight to the transport,
and the one clock that sends every call's 20 ms frames and mark echoes."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from telephony.caller_clock import OPCODE_BINARY, OPCODE_TEXT, CallerClock, MaskedFrameWriter


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing


class _Ws:
    closed = False


def _decode(frame: bytes) -> tuple[int, bytes, bytes]:
    """(first byte, mask key, unmasked payload) of one client frame; asserts it is whole."""
    first, second = frame[0], frame[1]
    assert second & 0x80, "client frames must be masked"
    n, pos = second & 0x7F, 2
    if n == 126:
        (n,), pos = struct.unpack("!H", frame[2:4]), 4
    elif n == 127:
        (n,), pos = struct.unpack("!Q", frame[2:10]), 10
    key, body = frame[pos : pos + 4], frame[pos + 4 :]
    assert len(body) == n
    return first, key, bytes(b ^ key[i % 4] for i, b in enumerate(body))


def test_each_message_is_one_masked_final_frame_in_one_write() -> None:
    transport = _Transport()
    writer = MaskedFrameWriter(_Ws(), transport)  # type: ignore[arg-type]
    payloads = [b"", b"x" * 125, b"y" * 126, bytes(range(256)) * 300, b'{"event":"media"}' * 20]
    for p in payloads:
        writer.write(p)
    writer.write(b"\x00\x01", OPCODE_BINARY)
    assert len(transport.writes) == len(payloads) + 1
    for frame, p in zip(transport.writes, [*payloads, b"\x00\x01"], strict=True):
        first, _key, body = _decode(frame)
        assert first == 0x80 | (OPCODE_BINARY if p == b"\x00\x01" else OPCODE_TEXT)
        assert body == p


def test_mask_keys_differ_frame_to_frame_across_key_blocks() -> None:
    transport = _Transport()
    writer = MaskedFrameWriter(_Ws(), transport)  # type: ignore[arg-type]
    n = MaskedFrameWriter.KEY_BLOCK_BYTES // 4 * 2 + 3  # crosses two refills
    for _ in range(n):
        writer.write(b"\xff" * 160)
    keys = [_decode(f)[1] for f in transport.writes]
    assert all(_decode(f)[2] == b"\xff" * 160 for f in transport.writes)
    # 32-bit random keys: a repeat among ~2000 has probability ~5e-4; allow one.
    assert len(set(keys)) >= n - 1


def test_writing_to_a_closing_socket_raises_connection_reset() -> None:
    transport, ws = _Transport(), _Ws()
    writer = MaskedFrameWriter(ws, transport)  # type: ignore[arg-type]
    transport.closing = True
    with pytest.raises(ConnectionResetError):
        writer.write(b"late")
    transport.closing, ws.closed = False, True
    with pytest.raises(ConnectionResetError):
        writer.write(b"late")
    assert transport.writes == []


async def test_a_real_aiohttp_server_reads_every_message_in_order() -> None:
    got: list[Any] = []
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            got.append(msg.data)
            if msg.data == "end":
                done.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sent: list[Any] = [f"message {i} " * (i * 7) for i in range(60)] + [b"\x00binary\xff" * 50, "x" * 70000]
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            writer = MaskedFrameWriter.for_socket(ws)
            assert writer is not None
            for m in sent:
                writer.write(m.encode() if isinstance(m, str) else m, OPCODE_TEXT if isinstance(m, str) else OPCODE_BINARY)
            writer.write(b"end")
            await asyncio.wait_for(done.wait(), 10)
    finally:
        await runner.cleanup()
    assert got == [*sent, "end"]


class _FakeCall:
    """What CallerClock needs from a call: its next frame due, sending due frames, echoing marks."""

    def __init__(self, t0: float, inbound: bool = True) -> None:
        self.t0 = t0
        self.sent_at: list[tuple[float, float]] = []  # (due, sent)
        self.echo_at: list[float] = []
        self.frames = 0
        self.send_inbound_audio = inbound

    @property
    def next_frame_due(self) -> float:
        return self.t0 + self.frames * 0.020

    def send_due_frames(self, now: float) -> float | None:
        while self.next_frame_due <= now:
            self.sent_at.append((self.next_frame_due, now))
            self.frames += 1
        return self.next_frame_due

    def echo_due_marks(self, now: float) -> None:
        self.echo_at.append(now)


async def test_clock_sends_every_frame_on_its_own_phase_at_most_a_tick_late() -> None:
    clock = CallerClock(tick_s=0.005)
    t0 = time.monotonic()
    calls = [_FakeCall(t0 + i * 0.0013) for i in range(30)]
    quiet = _FakeCall(t0, inbound=False)
    for c in [*calls, quiet]:
        clock.add(c)  # type: ignore[arg-type]
    clock.mark_due(quiet, t0 + 0.1)  # type: ignore[arg-type]
    await asyncio.sleep(0.4)
    clock.remove(calls[0])  # type: ignore[arg-type]
    n0 = calls[0].frames
    await asyncio.sleep(0.1)
    await clock.close()
    assert calls[0].frames == n0, "a removed call is not served"
    assert quiet.sent_at == [], "a call without inbound audio sends no frames"
    assert len(quiet.echo_at) == 1 and quiet.echo_at[0] >= t0 + 0.1
    for c in calls[1:]:
        assert c.frames >= 20  # 0.5 s / 20 ms = 25, minus start-up slack
        dues = [d for d, _s in c.sent_at]
        assert dues == [c.t0 + k * 0.020 for k in range(len(dues))], "anchored 20 ms phase, no drift"
        lateness = sorted(s - d for d, s in c.sent_at)
        assert lateness[0] >= 0
        # At most one tick late, plus the loop's own scheduling noise on a busy machine (median).
        assert lateness[len(lateness) // 2] <= 0.005 + 0.010
