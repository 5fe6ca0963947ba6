"""One call's Twilio Media Streams socket: inbound events in, outbound messages out.

``TwilioStream`` is the call's Twilio peer. It reads the socket (media frames
and mark echoes inside the socket's data callback, everything else through
the read loop, in arrival order either way), decodes each message with
``telephony.media`` and hands the event to its owner (``StreamOwner``, the
call session). Once the stream is bound (``bind``, at ``start``), media
frames and mark echoes in Twilio's own layout are recognized without the
JSON parser (``InboundFastPath``, same validation) and reach the owner as
``on_fast_media(payload, timestamp_ms, now)`` / ``on_fast_mark(name, now)``;
everything else takes ``parse_inbound``. Outbound, the owner queues ``send(text, since)`` and calls
``flush()`` once per event, so all the messages one event makes go out in one
transport write.

Limits:

* Outbound messages are written as soon as the owner flushes, all of one
  event in one transport write. While the transport holds more than
  ``TWILIO_WRITE_HIGH_WATER`` bytes unsent they wait in a FIFO instead
  (bounded in practice by the playout lead plus marks and ``clear``); a hard
  cap of ``MAX_TWILIO_OUTBOX`` messages ends the call as stuck
  (``twilio_stuck``: the Twilio socket is not draining).
* Inbound messages the inline path declines wait in aiohttp's queue, which
  pauses reading beyond 128 KiB (see ``telephony.inline_ws``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import WSMsgType

from bridge.histogram_batch import HistogramBatch
from bridge.logs import log_event
from metrics import BridgeMetrics
from telephony.inline_ws import InlineWebSocketResponse
from telephony.media import InboundEvent, InboundFastPath, MarkEcho, Media, MediaError, parse_inbound

log = logging.getLogger("telephony.stream")

#: Most outbound messages waiting for a full transport; beyond it the call ends as stuck.
MAX_TWILIO_OUTBOX: Final = 5000
#: Unsent bytes in the Twilio transport above which messages wait in the
#: outbox, and below which writing resumes (checked every
#: ``TWILIO_DRAIN_POLL_S``). Steady playout needs ~3 KB per 100 ms.
TWILIO_WRITE_HIGH_WATER: Final = 64 * 1024
TWILIO_WRITE_LOW_WATER: Final = 16 * 1024
TWILIO_DRAIN_POLL_S: Final = 0.01


class StreamOwner(Protocol):
    """What the owner of a Twilio stream (the call session) provides."""

    @property
    def closed(self) -> bool:
        """The call is over: stop reading, writing and draining."""
        ...

    def on_fast_event(self, event: Media | MarkEcho, now: float) -> bool:
        """A media frame or mark echo, from the socket's data callback (no
        task wake-up). ``False``: not now, the read loop delivers it instead."""
        ...

    def on_fast_media(self, payload: bytes, timestamp_ms: int, now: float) -> bool:
        """``on_fast_event`` for a media frame of this stream that took the
        fast recognizer (``bind``): its audio and timestamp, no ``Media`` object."""
        ...

    def on_fast_mark(self, name: str, now: float) -> bool:
        """``on_fast_event`` for a mark echo of this stream that took the fast recognizer."""
        ...

    async def on_event(self, event: InboundEvent, now: float) -> None:
        """Any event, from the read loop (never while another is handled)."""
        ...

    def on_bad_input(self, kind: str, detail: str) -> None:
        """A message that is not a Twilio event (``kind`` is a metric label)."""
        ...

    def on_stream_broken(self, outcome: str | None) -> None:
        """Writing failed: the call must end (``outcome`` names why, if it is the call's outcome)."""
        ...


class TwilioStream:
    """The call's Twilio Media Streams socket (see the module docstring for limits)."""

    def __init__(self, ws: InlineWebSocketResponse, metrics: BridgeMetrics, owner: StreamOwner, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ws = ws
        self.metrics = metrics
        self._owner = owner
        #: Monotonic seconds; replaceable so a benchmark can replay a call on a synthetic clock.
        self.clock = clock
        #: Names for log lines, set by the owner (``bind``) once the stream's ``start`` is known.
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self._fast: InboundFastPath | None = None  # this stream's media/mark recognizer, from ``bind``
        self._outbox: deque[str] = deque()
        self._queued = 0  # messages taken off the outbox so far (its head's sequence number)
        self._timed: deque[tuple[int, float]] = deque()  # (sequence number, sendable since)
        self._drain_task: asyncio.Task[None] | None = None  # exists only while the transport is full
        self._close_task: asyncio.Task[Any] | None = None
        self._busy = False  # the read loop is handling a message: the inline path must queue behind it
        # Per-message counts and delays, added to the shared metrics by ``flush_metrics``.
        self._n_media_out = 0
        self._n_marks_out = 0
        self._forwarding_delay = HistogramBatch(metrics.forwarding_delay)

    def bind(self, call_sid: str | None, stream_sid: str | None) -> None:
        """The stream has started: names for log lines, and from now on this
        stream's media frames and mark echoes in Twilio's layout skip the JSON
        parser (``InboundFastPath``; the owner gets ``on_fast_media`` / ``on_fast_mark``)."""
        self.call_sid, self.stream_sid = call_sid, stream_sid
        self._fast = InboundFastPath(stream_sid) if stream_sid else None

    def _log(self, event: str, level: int, **fields: Any) -> None:
        log_event(log, event, level, call_sid=self.call_sid, stream_sid=self.stream_sid, **fields)

    # -------------------------------------------------------------- inbound

    async def serve(self) -> str:
        """Read until the socket closes or the owner is closed. Returns
        ``"socket_error"``, ``"disconnected"`` (Twilio closed the socket) or
        ``""`` (the owner closed)."""
        ws = self.ws
        ws.set_sink(self._on_text_inline)
        owner = self._owner
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._busy = True
                    try:
                        await self._on_text(msg.data)
                    finally:
                        self._busy = False
                elif msg.type == WSMsgType.BINARY:
                    owner.on_bad_input("binary_frame", f"{len(msg.data)} bytes")
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp puts a protocol error (e.g. 1009, over the size cap) in the message, not exception().
                    error = ws.exception() or msg.data
                    code = getattr(error, "code", None)
                    owner.on_bad_input("socket_error", f"close {code}: {error}" if code else str(error))
                    return "socket_error"
                if owner.closed:
                    return ""
            return "disconnected"
        finally:
            ws.set_sink(None)

    def _on_text_inline(self, data: str) -> bool:
        """The socket's data callback: media frames and mark echoes go to the
        owner here; anything else, anything malformed and anything arriving
        while the read loop is busy returns ``False`` and takes the read loop."""
        if self._busy:
            return False
        fast = self._fast
        if fast is not None:
            found = fast.media(data)
            if found is not None:
                return self._owner.on_fast_media(found[0], found[1], self.clock())
            name = fast.mark(data)
            if name is not None:
                return self._owner.on_fast_mark(name, self.clock())
        try:
            event = parse_inbound(data)
        except MediaError:
            return False
        kind = type(event)
        if kind is not Media and kind is not MarkEcho:
            return False
        return self._owner.on_fast_event(event, self.clock())  # type: ignore[arg-type]

    async def _on_text(self, data: str) -> None:
        try:
            event = parse_inbound(data)
        except MediaError as exc:
            self._owner.on_bad_input(exc.kind, exc.detail)
            return
        await self._owner.on_event(event, self.clock())

    # ------------------------------------------------------------- outbound

    def send(self, text: str, since: float | None = None) -> bool:
        """Queue one message for the next ``flush``. ``since``: when its audio
        became sendable (forwarding delay is observed at the write). ``False``
        when the outbox is full: the call has been told and is being closed."""
        if since is not None:
            self._timed.append((self._queued + len(self._outbox), since))
        if len(self._outbox) >= MAX_TWILIO_OUTBOX:
            self._log("twilio_outbox_full", logging.ERROR, limit=MAX_TWILIO_OUTBOX)
            self._outbox.clear()
            self._timed.clear()
            self._owner.on_stream_broken("twilio_stuck")
            self.close_soon()
            return False
        self._outbox.append(text)
        return True

    def flush(self, now: float | None = None) -> None:
        """Write everything queued in one transport write, unless the
        transport is full: then a drain task writes it once there is room.
        ``now``: the caller's clock reading, if it has one (saves a second read)."""
        if not self._outbox or self._drain_task is not None:
            return
        if self.ws.write_buffer_size > TWILIO_WRITE_HIGH_WATER:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_flush(),
                                                                      name="twilio-drain")
            return
        outbox = self._outbox
        texts = list(outbox)
        outbox.clear()
        try:
            self.ws.send_texts(texts)
        except (ConnectionError, RuntimeError) as exc:
            if not self._owner.closed:
                self._log("twilio_send_failed", logging.WARNING, error=str(exc))
            self._timed.clear()
            self._owner.on_stream_broken(None)
            return
        end = self._queued + len(texts)
        self._queued = end
        timed = self._timed
        if timed:
            sent_at = self.clock() if now is None else now
            observe = self._forwarding_delay.observe
            while timed and timed[0][0] < end:
                observe(sent_at - timed.popleft()[1])
        for text in texts:
            # '{"event":"media"' vs '{"event":"mark"': the 12th char tells.
            if text[11] == "e":
                self._n_media_out += 1
            elif text[11] == "a":
                self._n_marks_out += 1

    async def _drain_then_flush(self) -> None:
        try:
            while self.ws.write_buffer_size > TWILIO_WRITE_LOW_WATER and not self._owner.closed:
                await asyncio.sleep(TWILIO_DRAIN_POLL_S)
        finally:
            self._drain_task = None
        if not self._owner.closed:
            self.flush()

    @property
    def draining(self) -> bool:
        """Messages are waiting for the transport to drain."""
        return self._drain_task is not None

    @property
    def queued(self) -> int:
        """Messages waiting in the outbox."""
        return len(self._outbox)

    def flush_metrics(self) -> None:
        """Add the batched outbound message counts and forwarding delays to the shared metrics."""
        self._forwarding_delay.flush()
        if self._n_media_out:
            self.metrics.twilio_messages_out.labels(event="media").inc(self._n_media_out)
            self._n_media_out = 0
        if self._n_marks_out:
            self.metrics.twilio_messages_out.labels(event="mark").inc(self._n_marks_out)
            self._n_marks_out = 0

    # ---------------------------------------------------------------- close

    def close_soon(self) -> None:
        """Close the socket from a callback (the close runs as a task this stream owns)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self.ws.close(), name="twilio-close")

    async def close(self) -> None:
        """Close the socket (Twilio goes on with the TwiML after ``<Connect>``)."""
        if not self.ws.closed:
            await self.ws.close()

    async def stop_tasks(self) -> None:
        """Cancel and await the drain and close tasks (the call is over)."""
        current = asyncio.current_task()
        tasks = [t for t in (self._drain_task, self._close_task) if t is not None and t is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the call is over either way
                pass
        self._outbox.clear()
        self._timed.clear()
