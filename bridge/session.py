"""One call's I/O: the Twilio WebSocket, the agent link and Cartesia contexts.

``CallSession`` feeds events into ``CallCore`` and carries out its actions.
It owns every task of the call (Twilio writer, agent link, admissions,
context deadlines) and cancels them all in ``_finish``; gauges go back down.

Limits:

* Twilio outbound: messages are written as soon as the state machine makes
  them, all of one event in one transport write. While the transport holds
  more than ``TWILIO_WRITE_HIGH_WATER`` bytes unsent they wait in a FIFO
  instead (bounded by the playout lead plus marks and ``clear``); a hard cap
  of ``MAX_TWILIO_OUTBOX`` messages ends the call as stuck (the Twilio socket
  is not draining).
* Per utterance, at most ``MAX_PENDING_REQUESTS`` Cartesia inputs wait for
  admission; beyond that the utterance fails and the agent is told.
* Cartesia inputs made in one event-loop turn (an agent that delivers a
  passage as a burst of tokens) are joined into one input of at most
  ``MAX_MERGED_CHARS`` characters, written as soon as it ends a sentence or
  closes the context (where Cartesia starts generating) and otherwise when the
  turn ends: one message per sentence instead of one per token, same text
  (``merge_continuation``). A token that arrives alone waits one loop turn at
  most. At most one such input is held per context.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from aiohttp import WSMsgType

from bridge.agent.link import AgentLink, AgentUnavailable
from bridge.call import (
    Action,
    CallCore,
    CancelCartesia,
    EndCall,
    ResumeLater,
    ToAgent,
    ToCartesia,
    ToTwilio,
)
from bridge.cartesia.client import AdmissionError, ContextError, ContextLease, SendQueueFull
from bridge.cartesia.protocol import (
    ENDS_SENTENCE,
    Done,
    ErrorMessage,
    GenerationRequest,
    ServerMessage,
    merge_continuation,
)
from bridge.inline_ws import InlineWebSocketResponse
from bridge.logs import log_event
from telephony.media import (
    Connected,
    Dtmf,
    MarkEcho,
    Media,
    MediaError,
    Start,
    Stop,
    parse_inbound,
)

if TYPE_CHECKING:
    from bridge.server import BridgeServer

log = logging.getLogger("bridge.session")

MAX_TWILIO_OUTBOX: Final = 5000
#: Unsent bytes in the Twilio transport above which messages wait in the
#: outbox, and below which writing resumes (checked every
#: ``TWILIO_DRAIN_POLL_S``). Steady playout needs ~3 KB per 100 ms.
TWILIO_WRITE_HIGH_WATER: Final = 64 * 1024
TWILIO_WRITE_LOW_WATER: Final = 16 * 1024
TWILIO_DRAIN_POLL_S: Final = 0.01
MAX_PENDING_REQUESTS: Final = 10_000
#: Longest transcript made by joining one turn's inputs for a context (characters).
MAX_MERGED_CHARS: Final = 1000
#: Longest a call waits for queued speech to finish playing before hanging up.
END_PLAYOUT_GRACE_S: Final = 15.0
#: Bad Twilio messages logged per call before only every 1000th is (the metric counts them all).
BAD_INPUT_LOG_LINES: Final = 20


def _retry_cause(exc: ContextError) -> str:
    return "congested" if isinstance(exc, SendQueueFull) else "socket_lost"


class CallSession:
    """One Twilio media stream, from upgrade to close."""

    def __init__(self, server: BridgeServer, ws: InlineWebSocketResponse) -> None:
        self.server = server
        self.ws = ws
        self.metrics = server.metrics
        self.core = CallCore(server.call_settings, server.metrics)
        self.agent: AgentLink | None = None
        self._outbox: deque[str] = deque()
        self._queued = 0  # messages taken off the outbox so far (its head's sequence number)
        self._timed: deque[tuple[int, float]] = deque()  # (sequence number, sendable since)
        self._drain_task: asyncio.Task[None] | None = None  # exists only while the transport is full
        self._close_task: asyncio.Task[Any] | None = None
        self._busy = False  # the read loop is handling a message: the inline path must queue behind it
        self._leases: dict[str, ContextLease] = {}
        self._pending: dict[str, list[GenerationRequest]] = {}
        self._admissions: dict[str, asyncio.Task[None]] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._last_heard: dict[str, float] = {}  # context_id -> last Cartesia message (monotonic s)
        self._resumes: dict[str, asyncio.TimerHandle] = {}
        # Inputs joined during this loop turn, per context, written by _write_held at its end.
        self._held: dict[str, GenerationRequest] = {}
        self._held_write: asyncio.Handle | None = None
        self._end_task: asyncio.Task[None] | None = None
        self.outcome = "completed"
        self.started = False
        self.closed = False
        self.connected_at = time.monotonic()
        self._bad_inputs = 0  # this call's bad Twilio messages so far (all counted, few logged)
        # Per-frame counts, added to the shared counters by ``flush_metrics``
        # (before every /metrics render and at call end): no locked inc per frame.
        self._n_frames_in = 0
        self._n_bytes_in = 0
        self._n_media_out = 0
        self._n_marks_out = 0

    def flush_metrics(self) -> None:
        m = self.metrics
        if self._n_frames_in:
            m.frames_in.inc(self._n_frames_in)
            m.bytes_in.inc(self._n_bytes_in)
            self._n_frames_in = self._n_bytes_in = 0
        if self._n_media_out:
            m.twilio_messages_out.labels(event="media").inc(self._n_media_out)
            self._n_media_out = 0
        if self._n_marks_out:
            m.twilio_messages_out.labels(event="mark").inc(self._n_marks_out)
            self._n_marks_out = 0
        self.core.flush_metrics()

    # --------------------------------------------------------------- logging

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(log, event, level, call_sid=self.core.call_sid, stream_sid=self.core.stream_sid, **fields)

    def _bad_input(self, kind: str, detail: str) -> None:
        self.metrics.bad_input.labels(source="twilio", kind=kind).inc()
        # A peer sending garbage must not flood the log: the first lines of a call, then every 1000th.
        self._bad_inputs += 1
        if self._bad_inputs <= BAD_INPUT_LOG_LINES or self._bad_inputs % 1000 == 0:
            self._log("twilio_bad_input", logging.WARNING, kind=kind, detail=detail[:200], count=self._bad_inputs)

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        self.ws.set_sink(self._on_text_inline)
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    self._busy = True
                    try:
                        await self._on_text(msg.data)
                    finally:
                        self._busy = False
                elif msg.type == WSMsgType.BINARY:
                    self._bad_input("binary_frame", f"{len(msg.data)} bytes")
                elif msg.type == WSMsgType.ERROR:
                    self._bad_input("socket_error", str(self.ws.exception()))
                    self.outcome = "socket_error"
                    break
                if self.closed:
                    break
            else:
                if self.started and self.outcome == "completed" and not self.closed:
                    self.outcome = "twilio_disconnected"
        finally:
            self.ws.set_sink(None)
            await self._finish()

    def _on_text_inline(self, data: str) -> bool:
        """Media frames and mark echoes, handled in the socket's data callback
        (no task wake-up per message). Anything else, anything malformed and
        anything arriving while the read loop is busy returns ``False`` and
        takes the read loop, which reports it."""
        if self._busy or not self.started or self.closed:
            return False
        try:
            event = parse_inbound(data)
        except MediaError:
            return False
        kind = type(event)
        if kind is not Media and kind is not MarkEcho:
            return False
        try:
            if kind is Media:
                self._on_media(event, time.monotonic())  # type: ignore[arg-type]
            else:
                self._on_mark_echo(event, time.monotonic())  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a bug must end this call, not the socket's data callback
            self.metrics.internal_errors.inc()
            log_event(log, "call_internal_error", logging.ERROR, call_sid=self.core.call_sid,
                      stream_sid=self.core.stream_sid, error=repr(exc)[:300], exc_info=exc)
            self.outcome = "internal_error"
            self.closed = True
            self._close_soon()
        return True

    def _on_media(self, event: Media, now: float) -> None:
        if event.stream_sid != self.core.stream_sid:
            self._bad_input("wrong_stream_sid", f"media for {event.stream_sid}")
            return
        self._n_frames_in += 1
        self._n_bytes_in += len(event.payload)
        actions = self.core.on_media(event.payload, event.timestamp_ms, now)
        if actions:
            self._execute(actions)

    def _on_mark_echo(self, event: MarkEcho, now: float) -> None:
        if event.stream_sid != self.core.stream_sid:
            self._bad_input("wrong_stream_sid", f"mark for {event.stream_sid}")
            return
        self._execute(self.core.on_mark(event.name, now))

    def _close_soon(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self.ws.close(), name="twilio-close")

    async def _on_text(self, data: str) -> None:
        try:
            event = parse_inbound(data)
        except MediaError as exc:
            self._bad_input(exc.kind, exc.detail)
            return
        now = time.monotonic()
        if isinstance(event, Media):
            if not self.started:
                self._bad_input("media_before_start", "media received before start")
                return
            self._on_media(event, now)
            return
        if isinstance(event, MarkEcho):
            if not self.started:
                self._bad_input("wrong_stream_sid", f"mark for {event.stream_sid}")
                return
            self._on_mark_echo(event, now)
            return
        if isinstance(event, Start):
            if self.started:
                self._bad_input("duplicate_start", "start received twice")
                return
            await self._on_start(event, now)
            return
        if isinstance(event, Dtmf):
            if not self.started or event.stream_sid != self.core.stream_sid:
                self._bad_input("wrong_stream_sid", f"dtmf for {event.stream_sid}")
                return
            self._log("dtmf", digit=event.digit)
            self._execute(self.core.on_dtmf(event.digit))
            return
        if isinstance(event, Stop):
            if self.started and event.stream_sid != self.core.stream_sid:
                self._bad_input("wrong_stream_sid", f"stop for {event.stream_sid}")
                return
            self._log("stream_stopped")
            self.outcome = "caller_hangup"
            self.closed = True
            return
        if isinstance(event, Connected):
            return

    async def _on_start(self, start: Start, now: float) -> None:
        if start.encoding != "audio/x-mulaw" or start.sample_rate != 8000:
            self._bad_input("unsupported_format", f"{start.encoding}/{start.sample_rate}")
        self.started = True
        self.core.call_info = self.server.take_call_info(start.call_sid)
        webhook_at = self.core.call_info.pop("_webhook_at", None)
        if webhook_at is not None:
            self.metrics.webhook_to_start.observe(max(0.0, now - float(webhook_at)))
        self.metrics.active_calls.inc()
        self.server.register(self)
        actions = self.core.on_start(start, now)
        self._log("call_started", from_=self.core.call_info.get("from"), params=list(start.custom_parameters))
        try:
            self.agent = await self.server.connect_agent(start, self._deliver_from_agent, self._agent_closed)
        except AgentUnavailable as exc:
            self.metrics.agent_failures.labels(reason="unreachable").inc()
            self._log("agent_unreachable", logging.WARNING, error=str(exc))
            self.outcome = "agent_unreachable"
            self._execute(self.core.speak(self.server.config.fallback_line, last=True, now=time.monotonic(),
                                          interruptible=False))
            self._execute([EndCall("agent_unreachable")])
            return
        self.metrics.agent_connections.inc()
        self._execute(actions)

    # ---------------------------------------------------------------- agent

    def _deliver_from_agent(self, message: str | dict[str, Any]) -> None:
        if self.closed:
            return
        self._execute(self.core.on_agent_message(message, time.monotonic()))

    def _agent_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.metrics.agent_failures.labels(reason="disconnected").inc()
        self._log("agent_disconnected", logging.WARNING, reason=reason)
        self.outcome = "agent_disconnected"
        self._execute([EndCall("agent_disconnected")])

    # -------------------------------------------------------------- actions

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToTwilio):
                if action.since is not None:
                    # Forwarding delay is observed when this message is actually written.
                    self._timed.append((self._queued + len(self._outbox), action.since))
                if len(self._outbox) >= MAX_TWILIO_OUTBOX:
                    self._log("twilio_outbox_full", logging.ERROR, limit=MAX_TWILIO_OUTBOX)
                    self.outcome = "twilio_stuck"
                    self.closed = True
                    self._outbox.clear()
                    self._timed.clear()
                    self._close_soon()
                    return
                self._outbox.append(action.text)
            elif isinstance(action, ToCartesia):
                self._send_cartesia(action.context_id, action.request)
            elif isinstance(action, CancelCartesia):
                self._cancel_cartesia(action.context_id)
            elif isinstance(action, ResumeLater):
                jitter = 1.0 + random.random() / 2
                self._resumes[action.utterance_id] = asyncio.get_running_loop().call_later(
                    action.delay_s * jitter, self._resume, action.utterance_id)
            elif isinstance(action, ToAgent):
                if self.agent is not None:
                    self.agent.send(action.message)
            elif isinstance(action, EndCall):
                self._end_call(action)
        if self._outbox and self._drain_task is None:
            self._flush_twilio()

    def _flush_twilio(self) -> None:
        """Write the whole outbox in one transport write, unless the transport
        is full: then a drain task writes it once the transport has room."""
        outbox = self._outbox
        if self.ws.write_buffer_size > TWILIO_WRITE_HIGH_WATER:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_flush(),
                                                                      name="twilio-drain")
            return
        texts = list(outbox)
        outbox.clear()
        try:
            self.ws.send_texts(texts)
        except (ConnectionError, RuntimeError) as exc:
            if not self.closed:
                self._log("twilio_send_failed", logging.WARNING, error=str(exc))
            self.closed = True
            self._timed.clear()
            return
        end = self._queued + len(texts)
        self._queued = end
        timed = self._timed
        if timed:
            sent_at = time.monotonic()
            observe = self.metrics.forwarding_delay.observe
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
            while self.ws.write_buffer_size > TWILIO_WRITE_LOW_WATER and not self.closed:
                await asyncio.sleep(TWILIO_DRAIN_POLL_S)
        finally:
            self._drain_task = None
        if not self.closed and self._outbox:
            self._flush_twilio()

    # ------------------------------------------------------------- Cartesia

    def _resume(self, utterance_id: str) -> None:
        self._resumes.pop(utterance_id, None)
        if not self.closed:
            self._execute(self.core.resume(utterance_id, time.monotonic()))

    def _arm_deadline(self, context_id: str) -> None:
        """Once a context is closed (continue:false), Cartesia must finish it:
        no message for CARTESIA_CONTEXT_TIMEOUT_S ends it."""
        if context_id in self._deadlines:
            return
        self._last_heard.setdefault(context_id, time.monotonic())
        self._deadlines[context_id] = asyncio.get_running_loop().call_later(
            self.server.config.cartesia_context_timeout_s, self._context_deadline, context_id)

    def _send_cartesia(self, utterance_id: str, request: GenerationRequest) -> None:
        if not request.continue_:
            self._arm_deadline(utterance_id)
        if utterance_id not in self._leases and utterance_id not in self._pending:
            # A new context: admitted at once when a slot and a socket are free, else it waits.
            lease = self.server.pool.try_open_context(utterance_id, self)
            if lease is None:
                self._pending[utterance_id] = [request]
                self._admissions[utterance_id] = asyncio.get_running_loop().create_task(
                    self._admit(utterance_id), name=f"admit-{utterance_id}"
                )
                return
            self._leases[utterance_id] = lease
            self._last_heard[utterance_id] = time.monotonic()
        if utterance_id in self._leases:
            # Join it with the rest of this turn's inputs; written at a sentence end or the turn's end.
            held = self._held.get(utterance_id)
            if held is not None:
                merged = merge_continuation(held, request)
                if merged is not None and len(merged.transcript) <= MAX_MERGED_CHARS:
                    request = merged
                else:
                    self._write_one_held(utterance_id)  # keep the order: what was held goes first
                    if utterance_id not in self._leases:
                        return  # that write failed and the utterance is being resumed from its text
            self._held[utterance_id] = request
            # Only the tail can end a sentence: no rescan of the whole joined text per token.
            if not request.continue_ or ENDS_SENTENCE.search(request.transcript, max(0, len(request.transcript) - 16)):
                # Cartesia starts generating at a sentence end (or at the close): do not make it wait.
                self._write_one_held(utterance_id)
            elif self._held_write is None:
                self._held_write = asyncio.get_running_loop().call_soon(self._write_held)
            return
        pending = self._pending[utterance_id]
        merged = merge_continuation(pending[-1], request)
        if merged is not None and len(merged.transcript) <= MAX_MERGED_CHARS:
            pending[-1] = merged
        elif len(pending) >= MAX_PENDING_REQUESTS:
            self._context_failed(utterance_id, "too many inputs waiting for admission")
        else:
            pending.append(request)

    def _write_held(self) -> None:
        """End of the loop turn: write every context's joined input."""
        self._held_write = None
        for utterance_id in list(self._held):
            self._write_one_held(utterance_id)

    def _write_one_held(self, utterance_id: str) -> None:
        request = self._held.pop(utterance_id, None)
        lease = self._leases.get(utterance_id)
        if request is None or lease is None or self.closed:
            return
        try:
            lease.send(request)
        except ContextError as exc:  # socket just died / queue full: transient, resume elsewhere
            self._context_failed(utterance_id, str(exc), retry=True, cause=_retry_cause(exc))

    async def _admit(self, utterance_id: str) -> None:
        try:
            lease = await self.server.pool.open_context(
                utterance_id, self, self.server.config.cartesia_admission_timeout_s
            )
        except AdmissionError as exc:
            self._admissions.pop(utterance_id, None)
            self._pending.pop(utterance_id, None)
            self.metrics.utterances_failed.labels(reason="admission").inc()
            self._context_failed(utterance_id, f"admission: {exc}")
            return
        self._admissions.pop(utterance_id, None)
        if self.closed:
            lease.cancel()
            return
        self._leases[utterance_id] = lease
        self._last_heard[utterance_id] = time.monotonic()
        for request in self._pending.pop(utterance_id, []):
            try:
                lease.send(request)
            except ContextError as exc:
                self._context_failed(utterance_id, str(exc), retry=True, cause=_retry_cause(exc))
                return

    def _cancel_cartesia(self, utterance_id: str) -> None:
        self._held.pop(utterance_id, None)
        task = self._admissions.pop(utterance_id, None)
        if task is not None:
            task.cancel()
        self._pending.pop(utterance_id, None)
        lease = self._leases.pop(utterance_id, None)
        if lease is not None:
            lease.cancel()
        self._drop_deadline(utterance_id)

    def _drop_deadline(self, utterance_id: str) -> None:
        self._last_heard.pop(utterance_id, None)
        handle = self._deadlines.pop(utterance_id, None)
        if handle is not None:
            handle.cancel()

    def _context_deadline(self, utterance_id: str) -> None:
        self._deadlines.pop(utterance_id, None)
        timeout = self.server.config.cartesia_context_timeout_s
        quiet = time.monotonic() - self._last_heard.get(utterance_id, 0.0)
        waiting = utterance_id in self._admissions  # admission has its own deadline; check again after
        if waiting or (quiet < timeout and utterance_id in self._leases):
            # Still producing (or not yet admitted): check again when it could next be overdue.
            self._deadlines[utterance_id] = asyncio.get_running_loop().call_later(
                timeout if waiting else timeout - quiet, self._context_deadline, utterance_id)
            return
        lease = self._leases.pop(utterance_id, None)
        if lease is None:
            return
        lease.cancel()
        self.metrics.context_timeouts.inc()
        # Resume what is missing on a new context (or finish, if every word already arrived).
        self._context_failed(utterance_id, "no done from Cartesia before the context deadline", retry=True,
                             cause="no_done")

    def _context_failed(self, utterance_id: str, reason: str, *, retry: bool = False,
                        cause: str = "socket_lost") -> None:
        self._held.pop(utterance_id, None)  # its text is resumed from what the core knows was sent
        lease = self._leases.pop(utterance_id, None)
        if lease is not None:
            lease.cancel()
        self._drop_deadline(utterance_id)
        self._execute(self.core.on_context_lost(utterance_id, reason, time.monotonic(), retry=retry, cause=cause))

    # ContextListener
    def on_cartesia_message(self, msg: ServerMessage, received_at: float) -> None:
        utterance_id = msg.context_id or ""
        if utterance_id in self._last_heard:
            self._last_heard[utterance_id] = received_at
        if isinstance(msg, (Done, ErrorMessage)):
            self._held.pop(utterance_id, None)
            lease = self._leases.pop(utterance_id, None)
            if lease is not None:
                lease.abandon()
            self._drop_deadline(utterance_id)
        if self.closed:
            return
        self._execute(self.core.on_cartesia(utterance_id, msg, received_at))

    def on_context_lost(self, context_id: str, reason: str) -> None:
        self._held.pop(context_id, None)
        self._leases.pop(context_id, None)
        self._drop_deadline(context_id)
        if self.closed:
            return
        self._execute(self.core.on_context_lost(context_id, f"Cartesia socket {reason}", time.monotonic(),
                                                retry=True))

    # ------------------------------------------------------------------ end

    def _end_call(self, action: EndCall) -> None:
        if self._end_task is not None or self.closed:
            return
        if action.reason == "agent_end":
            self.outcome = "agent_end"
        if action.handoff_data is not None and self.core.call_sid:
            self.server.store_handoff(self.core.call_sid, action.handoff_data)
        self._end_task = asyncio.get_running_loop().create_task(self._end_after_playout(action.reason))

    async def _end_after_playout(self, reason: str) -> None:
        """Let queued speech finish (bounded), then close: Twilio continues the TwiML."""
        deadline = time.monotonic() + END_PLAYOUT_GRACE_S
        while self.core.is_speaking and time.monotonic() < deadline and not self.closed:
            await asyncio.sleep(0.05)
        self._log("call_ending", reason=reason)
        self.closed = True
        control = self.server.call_control
        if reason == "agent_end" and control is not None and self.core.call_sid \
                and self.core.call_sid not in self.server.handoff_pending:
            # Hang up over REST as well: a bare close would run any TwiML after </Connect>.
            try:
                await control.hang_up(self.core.call_sid)
            except Exception as exc:  # noqa: BLE001 - the stream close below still ends the call
                self.metrics.agent_failures.labels(reason="rest_hangup_failed").inc()
                self._log("rest_hangup_failed", logging.WARNING, error=str(exc)[:200])
        await self.ws.close()

    async def hang_up(self, reason: str) -> None:
        """Server-initiated end (drain): close the stream now."""
        self.outcome = reason
        self.closed = True
        await self.ws.close()

    async def _finish(self) -> None:
        self.closed = True
        try:
            await self._release_everything()
        finally:
            # Whatever failed above, the call must not stay counted.
            self.flush_metrics()
            if self.started:
                self.metrics.active_calls.dec()
                self.metrics.calls.labels(outcome=self.outcome).inc()
                self.server.unregister(self)
            if self.agent is not None:
                self.metrics.agent_connections.dec()
                self.agent = None
            if not self.ws.closed:
                await self.ws.close()
            self._log("call_ended", outcome=self.outcome, frames_sent=self.core.frames_sent,
                      late_chunks=self.core.late_chunks, playout_gaps=self.core.gaps, playout_gap_ms=self.core.gap_ms, duration_s=round(time.monotonic() - self.connected_at, 3))

    async def _release_everything(self) -> None:
        for action in self.core.on_end():
            if isinstance(action, CancelCartesia):
                self._cancel_cartesia(action.context_id)
        for context_id in list(self._leases):
            self._cancel_cartesia(context_id)
        for task in list(self._admissions.values()):
            task.cancel()
        self._admissions.clear()
        self._pending.clear()
        self._held.clear()
        if self._held_write is not None:
            self._held_write.cancel()
            self._held_write = None
        for handle in (*self._deadlines.values(), *self._resumes.values()):
            handle.cancel()
        self._deadlines.clear()
        self._resumes.clear()
        self._last_heard.clear()
        tasks = [t for t in (self._drain_task, self._end_task, self._close_task)
                 if t is not None and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.agent is not None:
            await self.agent.close()
