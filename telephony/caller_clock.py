"""Sending side of simulated Twilio callers: masked client frames, and one clock for many calls.

``MaskedFrameWriter`` writes a caller's WebSocket frames straight to its
transport; ``CallerClock`` sends the inbound 20 ms frames and mark echoes of
every ``SimulatedCall`` of a process from one task (see ``telephony.simulator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import struct
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import aiohttp

__all__ = ["OPCODE_BINARY", "OPCODE_TEXT", "CallerClock", "ClockedCall", "MaskedFrameWriter"]


class ClockedCall(Protocol):
    """What ``CallerClock`` needs of a call (``telephony.simulator.SimulatedCall`` is one)."""

    @property
    def send_inbound_audio(self) -> bool: ...

    @property
    def next_frame_due(self) -> float: ...

    def send_due_frames(self, now: float) -> float | None: ...

    def echo_due_marks(self, now: float) -> None: ...


def _mask_with_ints(mask: bytes, data: bytearray) -> None:
    """RFC 6455 §5.3 masking in place (pure Python; aiohttp's compiled one is used when importable)."""
    n = len(data)
    key = (mask * ((n >> 2) + 1))[:n]
    data[:] = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


_mask: Callable[[bytes, bytearray], None]
try:
    from aiohttp._websocket.helpers import websocket_mask as _mask
except ImportError:  # pragma: no cover - aiohttp moved it
    _mask = _mask_with_ints

_CLIENT_HEADER_7: Final = struct.Struct("!BB")
_CLIENT_HEADER_16: Final = struct.Struct("!BBH")
_CLIENT_HEADER_64: Final = struct.Struct("!BBQ")
OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2


class MaskedFrameWriter:
    """Writes a client's WebSocket data frames (RFC 6455 §5.2-5.3: FIN, masked) straight to
    its transport, one ``transport.write`` (one ``send`` syscall, as Twilio sends) per message.

    The cheap way for hundreds of simulated callers to send 50 frames a second each:
    aiohttp's ``send_str`` costs a coroutine, a lock and a ``random`` call per frame.
    Mask keys are 4-byte slices of ``os.urandom`` blocks of ``KEY_BLOCK_BYTES``, shared by
    every writer of the process (one syscall per 1024 frames, not one per frame), so each
    frame still gets its own unpredictable key.
    Writes are synchronous: messages of one socket can never interleave. No
    back-pressure: what the peer does not read waits in the transport's buffer
    (a caller sends about 15 KB/s, for a bounded call).
    """

    KEY_BLOCK_BYTES: Final = 4096
    #: Unused keys of the current block, shared by all writers (popped from the end).
    _keys: list[bytes] = []

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, transport: asyncio.BaseTransport) -> None:
        if not hasattr(transport, "write") or not hasattr(transport, "is_closing"):
            raise TypeError("MaskedFrameWriter needs a writable transport")
        self._ws = ws
        self._transport: Any = transport

    @classmethod
    def for_socket(cls, ws: aiohttp.ClientWebSocketResponse) -> MaskedFrameWriter | None:
        """The writer for an aiohttp client socket, or None when its transport cannot be
        reached (then send through aiohttp) or it negotiated compression."""
        writer = getattr(ws, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is None or ws.compress:
            return None
        return cls(ws, transport)

    @classmethod
    def _next_key(cls) -> bytes:
        keys = cls._keys
        if not keys:
            block = os.urandom(cls.KEY_BLOCK_BYTES)
            keys.extend(block[i : i + 4] for i in range(0, len(block), 4))
        return keys.pop()

    def write(self, payload: bytes, opcode: int = OPCODE_TEXT) -> None:
        """One final, masked frame; ``ConnectionResetError`` once the socket is closing."""
        if self._ws.closed or self._transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        n = len(payload)
        first = 0x80 | opcode
        if n < 126:
            header = _CLIENT_HEADER_7.pack(first, 0x80 | n)
        elif n < 65536:
            header = _CLIENT_HEADER_16.pack(first, 0x80 | 126, n)
        else:
            header = _CLIENT_HEADER_64.pack(first, 0x80 | 127, n)
        key = self._next_key()
        body = bytearray(payload)
        _mask(key, body)
        self._transport.write(header + key + body)


class CallerClock:
    """Drives inbound audio and mark echoes of many simulated calls from one task.

    Shared by a process's calls, it saves two timer tasks per call (a frame
    every 20 ms, an echo per mark): at 300 calls those wake-ups cost a caller
    process most of its CPU, and a saturated load side shows up as underruns
    that are not the bridge's. One task wakes at most every ``tick_s`` (default
    5 ms) and serves only what is due: two heaps hold each call's next inbound
    frame and each pending mark echo, so a wake-up costs per due item, not per
    call. A frame leaves at most ``tick_s`` late (each call keeps its own 20 ms
    phase, anchored: no drift); an echo at most ``tick_s`` after the audio
    before its mark has played. Every frame is its own socket write. Calls
    register on ``connect`` and leave when they close.
    """

    def __init__(self, tick_s: float = 0.005) -> None:
        if not 0.001 <= tick_s <= 0.020:
            raise ValueError("tick_s must be in [1, 20] ms")
        self.tick_s = tick_s
        self.calls: dict[int, ClockedCall] = {}
        #: (due monotonic s, tie-break, call): each registered call's next inbound frame.
        self._frames: list[tuple[float, int, ClockedCall]] = []
        #: (due monotonic s, tie-break, call): one entry per mark placed (stale ones are no-ops).
        self._marks: list[tuple[float, int, ClockedCall]] = []
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def add(self, call: ClockedCall) -> None:
        self.calls[id(call)] = call
        if call.send_inbound_audio:
            heapq.heappush(self._frames, (call.next_frame_due, next(self._seq), call))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="caller-clock")

    def remove(self, call: ClockedCall) -> None:
        self.calls.pop(id(call), None)

    def mark_due(self, call: ClockedCall, due: float) -> None:
        """A mark was placed on ``call``: echo it once ``due`` has passed."""
        heapq.heappush(self._marks, (due, next(self._seq), call))

    def _serve(self, now: float) -> None:
        calls = self.calls
        frames = self._frames
        while frames and frames[0][0] <= now:
            _due, _n, call = heapq.heappop(frames)
            if id(call) not in calls:
                continue
            nxt = call.send_due_frames(now)
            if nxt is not None:
                heapq.heappush(frames, (nxt, next(self._seq), call))
        marks = self._marks
        while marks and marks[0][0] <= now:
            _due, _n, call = heapq.heappop(marks)
            if id(call) in calls:
                call.echo_due_marks(now)

    async def _run(self) -> None:
        next_tick = time.monotonic()
        while self.calls:
            now = time.monotonic()
            self._serve(now)
            # A fixed grid (200 wake-ups a second at 5 ms, whatever the number of calls): an echo
            # placed between ticks waits at most one tick.
            next_tick = max(next_tick + self.tick_s, time.monotonic())
            await asyncio.sleep(next_tick - time.monotonic())

    async def close(self) -> None:
        self.calls.clear()
        self._frames.clear()
        self._marks.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
