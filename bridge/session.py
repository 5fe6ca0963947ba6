"""One call's glue: the state machine and the call's peers.

``CallSession`` feeds events from each peer into ``CallCore`` and routes the
actions it returns to the peer they are for. It owns one collaborator per
peer, each created for this call and each calling back into the session
through a small owner protocol the session implements:

* Twilio: ``TwilioStream`` (``telephony/stream_socket.py``), owner protocol ``StreamOwner``;
* Cartesia TTS: ``CallContexts`` (``bridge/cartesia/contexts.py``), owner protocol ``ContextOwner``;
* Cartesia STT: ``SttStream`` (``bridge/cartesia/stt_client.py``), owner protocol ``SttListener``;
* the agent: an ``AgentLink`` from the ``AgentConnector``, callbacks ``deliver`` and ``closed``.

Process-wide services (settings, metrics, the call registry, the agent
connector, the Cartesia pool and STT factory, REST call control, ``play``
fetches) come in one ``CallServices``; a new peer is one more factory there,
one more collaborator attribute here, its owner callbacks and its actions in
``_execute``, and its ``close`` in ``_release_everything``.

The session owns every task of the call (through its collaborators) and
cancels them all in ``_finish``; gauges go back down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bridge.agent import protocol as agent_proto
from bridge.agent.connector import AgentConnector
from bridge.agent.link import AgentLink, AgentUnavailable
from bridge.agent.relay_settings import RelaySettingsError
from bridge.call import (
    Action,
    CallCore,
    CallSettings,
    CancelCartesia,
    EndCall,
    FetchPlay,
    PlayDigits,
    ResumeLater,
    SttFinalize,
    SttReconfigure,
    ToAgent,
    ToCartesia,
    ToTwilio,
)
from bridge.cartesia.client import CartesiaPool
from bridge.cartesia.contexts import CallContexts, ContextOwner
from bridge.cartesia.protocol import ServerMessage
from bridge.cartesia.stt_client import SttStream, SttUnavailable
from bridge.cartesia.stt_protocol import SttParams, SttServerMessage
from bridge.logs import log_event
from bridge.registry import CallRegistry
from metrics import BridgeMetrics
from telephony.dtmf_tones import dtmf_mulaw
from telephony.inline_ws import InlineWebSocketResponse
from telephony.media import (
    Connected,
    Dtmf,
    InboundEvent,
    MarkEcho,
    Media,
    Start,
    Stop,
)
from telephony.stream_socket import TwilioStream

log = logging.getLogger("bridge.session")

#: Longest a call waits for queued speech to finish playing before hanging up.
END_PLAYOUT_GRACE_S: Final = 15.0
#: How often a call that is ending checks whether its speech has played.
END_PLAYOUT_POLL_S: Final = 0.05
#: Bad Twilio messages logged per call before only every 1000th is (the metric counts them all).
BAD_INPUT_LOG_LINES: Final = 20
#: Outcomes that say how a call ended but not why; a known cause (Cartesia unavailable) replaces them.
OUTCOMES_HIDING_A_CAUSE: Final = frozenset({"completed", "caller_hangup", "twilio_disconnected"})


class CallHangUp(Protocol):
    """REST control of a live call (``telephony.rest.CallControl``)."""

    async def hang_up(self, call_sid: str) -> bool: ...


@dataclass(frozen=True)
class CallServices:
    """Process-wide collaborators every call session uses (built once at start-up)."""

    settings: CallSettings
    metrics: BridgeMetrics
    registry: CallRegistry[CallSession]
    agents: AgentConnector
    #: Makes a call's Cartesia contexts (on the shared pool) for their owner.
    tts: Callable[[ContextOwner], CallContexts]
    fallback_line: str
    call_control: CallHangUp | None = None
    #: The call's Cartesia STT socket (speech in); None = no speech recognition in this process.
    stt: Callable[[CallSession, SttParams], SttStream] | None = None
    #: ``auto`` (external agents listen), ``true`` (every call), ``false``.
    stt_mode: str = "auto"
    stt_model: str = "ink-whisper"
    #: Fetches a ``play`` source (allowlisted) as μ-law 8 kHz; None = ``play`` refused.
    play_fetch: Callable[[str], Awaitable[bytes]] | None = None

    @staticmethod
    def tts_on(pool: CartesiaPool, metrics: BridgeMetrics, *, admission_timeout_s: float,
               context_timeout_s: float) -> Callable[[ContextOwner], CallContexts]:
        """A ``tts`` factory: each call's contexts on ``pool``."""
        def open_contexts(owner: ContextOwner) -> CallContexts:
            return CallContexts(pool, owner, metrics, admission_timeout_s=admission_timeout_s,
                                context_timeout_s=context_timeout_s)
        return open_contexts


class CallSession:
    """One Twilio media stream, from upgrade to close (see the module docstring)."""

    def __init__(self, services: CallServices, ws: InlineWebSocketResponse) -> None:
        self.services = services
        self.metrics = services.metrics
        self.core = CallCore(services.settings, services.metrics)
        self.twilio = TwilioStream(ws, services.metrics, self)
        self.tts = services.tts(self)
        self.agent: AgentLink | None = None
        self.stt: SttStream | None = None
        self._stt_task: asyncio.Task[None] | None = None  # starting (or restarting) the STT socket
        self._io_tasks: set[asyncio.Task[None]] = set()  # play fetches; cancelled at the end
        self._resumes: dict[str, asyncio.TimerHandle] = {}
        self._cancelled_at_end: list[str] = []  # context ids cancelled by the end of the call
        self._end_task: asyncio.Task[None] | None = None
        self.outcome = "completed"
        self._tts_unavailable = False  # an utterance failed because no Cartesia socket could connect
        self.started = False
        self.closed = False
        self.connected_at = time.monotonic()
        self._bad_inputs = 0  # this call's bad Twilio messages so far (all counted, few logged)
        # Per-frame counts, added to the shared counters by ``flush_metrics``
        # (before every /metrics render and at call end): no locked inc per frame.
        self._n_frames_in = 0
        self._n_bytes_in = 0
        self._buffered_reported = 0  # this call's share of bridge_playout_buffered_bytes

    def flush_metrics(self) -> None:
        """Add this call's batched counts to the shared metrics (before every
        /metrics render and at call end); the buffered-audio gauge moves by
        this call's change since the last flush."""
        m = self.metrics
        if self._n_frames_in:
            m.frames_in.inc(self._n_frames_in)
            m.bytes_in.inc(self._n_bytes_in)
            self._n_frames_in = self._n_bytes_in = 0
        buffered = 0 if self.closed else self.core.playout.buffered_bytes
        if buffered != self._buffered_reported:
            m.playout_buffered_bytes.inc(buffered - self._buffered_reported)
            self._buffered_reported = buffered
        self.twilio.flush_metrics()
        self.core.flush_metrics()

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(log, event, level, call_sid=self.core.call_sid, stream_sid=self.core.stream_sid, **fields)

    async def run(self) -> None:
        try:
            ended = await self.twilio.serve()
            if ended == "socket_error":
                self.outcome = "socket_error"
            elif ended == "disconnected" and self.started and self.outcome == "completed" and not self.closed:
                self.outcome = "twilio_disconnected"
        finally:
            await self._finish()

    # --------------------------------------------------- Twilio (StreamOwner)

    def on_bad_input(self, kind: str, detail: str) -> None:
        self.metrics.bad_input.labels(source="twilio", kind=kind).inc()
        # A peer sending garbage must not flood the log: the first lines of a call, then every 1000th.
        self._bad_inputs += 1
        if self._bad_inputs <= BAD_INPUT_LOG_LINES or self._bad_inputs % 1000 == 0:
            self._log("twilio_bad_input", logging.WARNING, kind=kind, detail=detail[:200], count=self._bad_inputs)

    def on_stream_broken(self, outcome: str | None) -> None:
        if outcome is not None:
            self.outcome = outcome
        self.closed = True

    def on_fast_event(self, event: Media | MarkEcho, now: float) -> bool:
        if not self.started or self.closed:
            return False
        try:
            if type(event) is Media:
                self._on_media(event, now)
            else:
                self._on_mark_echo(event, now)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a bug must end this call, not the socket's data callback
            self._internal_error(exc)
        return True

    def _internal_error(self, exc: Exception) -> None:
        """A bug in handling this call's input: end this call (only), say so."""
        self.metrics.internal_errors.inc()
        self._log("call_internal_error", logging.ERROR, error=repr(exc)[:300], exc_info=exc)
        self.outcome = "internal_error"
        self.closed = True
        self.twilio.close_soon()

    def on_fast_media(self, payload: bytes, timestamp_ms: int, now: float) -> bool:
        # The stream is bound (started) and the recognizer checked the stream SID.
        if self.closed:
            return False
        try:
            self._media_in(payload, timestamp_ms, now)
        except Exception as exc:  # noqa: BLE001 - a bug must end this call, not the socket's data callback
            self._internal_error(exc)
        return True

    def on_fast_mark(self, name: str, now: float) -> bool:
        if self.closed:
            return False
        try:
            self._execute(self.core.on_mark(name, now), now)
        except Exception as exc:  # noqa: BLE001 - a bug must end this call, not the socket's data callback
            self._internal_error(exc)
        return True

    def _on_media(self, event: Media, now: float) -> None:
        if event.stream_sid != self.core.stream_sid:
            self.on_bad_input("wrong_stream_sid", f"media for {event.stream_sid}")
            return
        self._media_in(event.payload, event.timestamp_ms, now)

    def _media_in(self, payload: bytes, timestamp_ms: int, now: float) -> None:
        """One inbound frame of this stream: counted (batched), to STT if listening, to the core."""
        self._n_frames_in += 1
        self._n_bytes_in += len(payload)
        stt = self.stt
        if stt is not None:
            turns = self.core.turns
            if turns is not None and turns.idle:
                stt.forget_replay()  # no turn in progress: a loss now loses nothing
            stt.send_audio(payload)
        actions = self.core.on_media(payload, timestamp_ms, now)
        if actions:
            self._execute(actions, now)

    def _on_mark_echo(self, event: MarkEcho, now: float) -> None:
        if event.stream_sid != self.core.stream_sid:
            self.on_bad_input("wrong_stream_sid", f"mark for {event.stream_sid}")
            return
        self._execute(self.core.on_mark(event.name, now), now)

    async def on_event(self, event: InboundEvent, now: float) -> None:
        try:
            await self._on_event(event, now)
        except Exception as exc:  # noqa: BLE001 - a bug must end this call, not the server's handler
            self._internal_error(exc)

    async def _on_event(self, event: InboundEvent, now: float) -> None:
        if isinstance(event, Media):
            if not self.started:
                self.on_bad_input("media_before_start", "media received before start")
                return
            self._on_media(event, now)
        elif isinstance(event, MarkEcho):
            if not self.started:
                self.on_bad_input("wrong_stream_sid", f"mark for {event.stream_sid}")
                return
            self._on_mark_echo(event, now)
        elif isinstance(event, Start):
            if self.started:
                self.on_bad_input("duplicate_start", "start received twice")
                return
            await self._on_start(event, now)
        elif isinstance(event, Dtmf):
            if not self.started or event.stream_sid != self.core.stream_sid:
                self.on_bad_input("wrong_stream_sid", f"dtmf for {event.stream_sid}")
                return
            self._log("dtmf", digit=event.digit)
            self._execute(self.core.on_dtmf(event.digit, now))
        elif isinstance(event, Stop):
            if self.started and event.stream_sid != self.core.stream_sid:
                self.on_bad_input("wrong_stream_sid", f"stop for {event.stream_sid}")
                return
            self._log("stream_stopped")
            self.outcome = "caller_hangup"
            self.closed = True
        elif isinstance(event, Connected):
            return

    async def _on_start(self, start: Start, now: float) -> None:
        if start.encoding != "audio/x-mulaw" or start.sample_rate != 8000:
            self.on_bad_input("unsupported_format", f"{start.encoding}/{start.sample_rate}")
        self.started = True
        registry = self.services.registry
        self.core.call_info, webhook_at = registry.take_call_info(start.call_sid)
        if webhook_at is not None:
            self.metrics.webhook_to_start.observe(max(0.0, now - webhook_at))
        self.metrics.active_calls.inc()
        registry.add(self)
        relay = self.services.settings.relay
        try:
            relay = relay.merged(start.custom_parameters)
        except RelaySettingsError as exc:
            # The webhook validated its query; a bad <Parameter> from elsewhere keeps the defaults.
            self.on_bad_input("bad_relay_setting", str(exc))
        agent_url = start.custom_parameters.get("agentUrl")
        external = self.services.agents.is_external(agent_url)
        mode = self.services.stt_mode
        listen = relay.transcription if relay.transcription is not None else (
            mode == "true" or (mode == "auto" and external))
        self.core.configure_relay(relay, stt=listen and self.services.stt is not None)
        actions = self.core.on_start(start, now)
        self.twilio.bind(self.core.call_sid, self.core.stream_sid)
        self._log("call_started", from_=self.core.call_info.get("from"), params=list(start.custom_parameters))
        try:
            self.agent = await self.services.agents.connect(agent_url, self._deliver_from_agent, self._agent_closed)
        except AgentUnavailable as exc:
            self.metrics.agent_failures.labels(reason="unreachable").inc()
            self._log("agent_unreachable", logging.WARNING, error=str(exc))
            self.outcome = "agent_unreachable"
            self._execute(self.core.speak(self.services.fallback_line, last=True, now=time.monotonic(),
                                          interruptible=False))
            self._execute([EndCall("agent_unreachable")])
            return
        self.metrics.agent_connections.inc()
        if self.core.turns is not None:
            self._start_stt()
        self._execute(actions)

    # ----------------------------------------------------------------- agent

    def _deliver_from_agent(self, message: str | dict[str, Any]) -> None:
        if self.closed:
            return
        now = time.monotonic()
        if type(message) is str:
            # An agent's streamed word (~50 per second per call): no action list, no _execute round.
            streamed = self.core.stream_token(message, now)
            if streamed is not None:
                context_id, text = streamed
                # It joins the text held for Cartesia, else it is the ToCartesia on_agent_message
                # makes (no Twilio message is queued by it, so there is nothing to flush).
                if text and not self.tts.append_text(context_id, text):
                    self.tts.send(context_id, self.core.text_request(text))
                return
        self._execute(self.core.on_agent_message(message, now))

    def _agent_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.metrics.agent_failures.labels(reason="disconnected").inc()
        self._log("agent_disconnected", logging.WARNING, reason=reason)
        self.outcome = "agent_disconnected"
        self._execute([EndCall("agent_disconnected")])

    # ------------------------------------------- Cartesia TTS (ContextOwner)

    def on_tts_message(self, context_id: str, msg: ServerMessage, received_at: float) -> None:
        if self.closed:
            return
        self._execute(self.core.on_cartesia(context_id, msg, received_at))

    def on_tts_failed(self, context_id: str, reason: str, *, retry: bool, cause: str) -> None:
        if cause == "cartesia_unavailable":
            self._tts_unavailable = True
        self._execute(self.core.on_context_lost(context_id, reason, time.monotonic(), retry=retry, cause=cause))

    # ------------------------------------------------ Cartesia STT (SttListener)

    def _stt_params(self) -> SttParams:
        relay = self.core.relay
        return SttParams(model=self.services.stt_model, language=relay.cartesia_stt_language,
                         encoding="pcm_mulaw", sample_rate=8000, keyterms=relay.hints[:100])

    def _start_stt(self) -> None:
        factory = self.services.stt
        if factory is None or self.closed:
            return
        old, self.stt = self.stt, factory(self, self._stt_params())
        self.core.stt_connected = False
        self._stt_task = asyncio.get_running_loop().create_task(self._run_stt_start(old, self.stt),
                                                                name=f"stt-start-{self.core.call_sid}")

    async def _run_stt_start(self, old: SttStream | None, stream: SttStream) -> None:
        if old is not None:
            await old.close()
        try:
            await stream.start()
        except SttUnavailable as exc:
            if self.stt is not stream:
                return  # superseded by a newer socket (language or hints changed): nothing lost
            self.stt = None
            self._log("stt_unavailable", logging.WARNING, reason=exc.reason, error=str(exc)[:200])
            if not self.closed:
                # Without ears the call still speaks; barge-in falls back to the energy VAD.
                self._execute([ToAgent(agent_proto.error_message(
                    f"speech recognition unavailable ({exc.reason}); the caller's speech is not transcribed"))])
            return
        if self.stt is stream and not self.closed:
            self.core.stt_connected = True

    def on_stt_message(self, msg: SttServerMessage, received_at: float) -> None:
        if not self.closed:
            self._execute(self.core.on_stt(msg, received_at))

    def on_stt_lost(self, reason: str, *, turn_lost: bool) -> None:
        if not self.closed:
            self._execute(self.core.on_stt_lost(reason, turn_lost=turn_lost))

    def on_stt_restored(self) -> None:
        if not self.closed:
            self.core.stt_connected = True
            self._log("stt_restored")

    # ------------------------------------------------------ play / sendDigits

    def _play(self, action: FetchPlay) -> None:
        fetch = self.services.play_fetch
        if fetch is None:
            self._execute([ToAgent(agent_proto.error_message(
                "play is not enabled on this bridge (set PLAY_URL_ALLOWLIST)"))])
            return
        task = asyncio.get_running_loop().create_task(self._fetch_and_play(fetch, action), name="play-fetch")
        self._io_tasks.add(task)
        task.add_done_callback(self._io_tasks.discard)

    async def _fetch_and_play(self, fetch: Callable[[str], Awaitable[bytes]], action: FetchPlay) -> None:
        try:
            audio = await fetch(action.source)
        except Exception as exc:  # noqa: BLE001 - any fetch failure is the agent's error message
            self.metrics.bad_input.labels(source="agent", kind="play_failed").inc()
            self._log("play_failed", logging.WARNING, error=str(exc)[:200])
            if not self.closed:
                self._execute([ToAgent(agent_proto.error_message(f"play failed: {exc}"))])
            return
        if not self.closed:
            self._execute(self.core.play_audio(audio, time.monotonic(), loop=action.loop,
                                               interruptible=action.interruptible, preemptible=action.preemptible))

    def _resume(self, utterance_id: str) -> None:
        self._resumes.pop(utterance_id, None)
        if not self.closed:
            self._execute(self.core.resume(utterance_id, time.monotonic()))

    # --------------------------------------------------------------- actions

    def _execute(self, actions: list[Action], now: float | None = None) -> None:
        """Carry out the core's actions in order; all Twilio messages of this
        batch go out in one write at the end. ``now``: the event's clock reading, if known."""
        twilio = self.twilio
        for action in actions:
            if isinstance(action, ToTwilio):
                if not twilio.send(action.text, action.since):
                    return  # the stream is stuck and the call is ending
            elif isinstance(action, ToCartesia):
                self.tts.send(action.context_id, action.request)
            elif isinstance(action, CancelCartesia):
                self.tts.cancel(action.context_id)
            elif isinstance(action, ResumeLater):
                jitter = 1.0 + random.random() / 2
                self._resumes[action.utterance_id] = asyncio.get_running_loop().call_later(
                    action.delay_s * jitter, self._resume, action.utterance_id)
            elif isinstance(action, ToAgent):
                if self.agent is not None:
                    self.agent.send(action.message)
            elif isinstance(action, EndCall):
                self._end_call(action)
            elif isinstance(action, SttFinalize):
                if self.stt is not None:
                    self.stt.finalize()
            elif isinstance(action, SttReconfigure):
                self._start_stt()
            elif isinstance(action, FetchPlay):
                self._play(action)
            elif isinstance(action, PlayDigits):
                self._execute(self.core.play_audio(dtmf_mulaw(action.digits), time.monotonic(),
                                                   interruptible="none", label="digits"))
        twilio.flush(now)

    # ------------------------------------------------------------------- end

    def _end_call(self, action: EndCall) -> None:
        if self._end_task is not None or self.closed:
            return
        if action.reason == "agent_end":
            self.outcome = "agent_end"
        if action.handoff_data is not None and self.core.call_sid:
            self.services.registry.store_handoff(self.core.call_sid, action.handoff_data)
        self._end_task = asyncio.get_running_loop().create_task(self._end_after_playout(action.reason))

    async def _end_after_playout(self, reason: str) -> None:
        """Let queued speech finish (bounded), then close: Twilio continues the TwiML."""
        deadline = time.monotonic() + END_PLAYOUT_GRACE_S
        while self.core.is_speaking and time.monotonic() < deadline and not self.closed:
            await asyncio.sleep(END_PLAYOUT_POLL_S)
        self._log("call_ending", reason=reason)
        self.closed = True
        control = self.services.call_control
        call_sid = self.core.call_sid
        if reason == "agent_end" and control is not None and call_sid \
                and not self.services.registry.has_handoff(call_sid):
            # Hang up over REST as well: a bare close would run any TwiML after </Connect>.
            try:
                await control.hang_up(call_sid)
            except Exception as exc:  # noqa: BLE001 - the stream close below still ends the call
                self.metrics.agent_failures.labels(reason="rest_hangup_failed").inc()
                self._log("rest_hangup_failed", logging.WARNING, error=str(exc)[:200])
        await self.twilio.ws.close()

    async def hang_up(self, reason: str) -> None:
        """Server-initiated end (drain): close the stream now."""
        self.outcome = reason
        self.closed = True
        await self.twilio.ws.close()

    async def _finish(self) -> None:
        self.closed = True
        try:
            await self._release_everything()
        finally:
            # Whatever failed above, the call must not stay counted.
            self.flush_metrics()
            if self.started:
                self.outcome = self._outcome_with_cause()
                self.metrics.active_calls.dec()
                self.metrics.calls.labels(outcome=self.outcome).inc()
                self.services.registry.discard(self)
            if self.agent is not None:
                self.metrics.agent_connections.dec()
                self.agent = None
            await self.twilio.close()
            if self.stt is not None:
                # Last: the call is already counted as ended while STT says goodbye (bounded).
                stt, self.stt = self.stt, None
                await stt.close()
            self._log("call_ended", outcome=self.outcome, frames_sent=self.core.frames_sent,
                      late_chunks=self.core.late_chunks, playout_gaps=self.core.gaps,
                      playout_gap_ms=self.core.gap_ms, duration_s=round(time.monotonic() - self.connected_at, 3),
                      contexts_cancelled_at_end=self._cancelled_at_end)

    def _outcome_with_cause(self) -> str:
        """A call that ended quietly (hang-up, completed) after speech failed
        because Cartesia was unavailable is counted under that cause, not as
        the hang-up it looked like: ``no_audio_cartesia_unavailable`` (the
        caller heard nothing) or ``cartesia_unavailable`` (speech stopped part-way)."""
        if not self._tts_unavailable or self.outcome not in OUTCOMES_HIDING_A_CAUSE:
            return self.outcome
        return "no_audio_cartesia_unavailable" if self.core.frames_sent == 0 else "cartesia_unavailable"

    async def _release_everything(self) -> None:
        for action in self.core.on_end():
            if isinstance(action, CancelCartesia):
                self.tts.cancel(action.context_id)
                # Said in call_ended: a context cut by the hang-up holds only a prefix of its audio.
                self._cancelled_at_end.append(action.context_id)
        self.tts.close()
        for handle in self._resumes.values():
            handle.cancel()
        self._resumes.clear()
        for task in [self._stt_task, *self._io_tasks]:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*[t for t in [self._stt_task, *self._io_tasks] if t is not None],
                             return_exceptions=True)
        self._io_tasks.clear()
        end_task = self._end_task
        if end_task is not None and end_task is not asyncio.current_task():
            end_task.cancel()
            try:
                await end_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the call is over either way
                pass
        await self.twilio.stop_tasks()
        if self.agent is not None:
            await self.agent.close()
