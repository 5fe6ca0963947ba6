"""One call's state machine: Twilio, agent and Cartesia events in, actions out. No I/O.

``CallCore`` is fed events by the I/O layer (``bridge.session``) with the
current monotonic time and returns the actions to carry out, in order:
``ToTwilio`` (a text frame), ``ToCartesia`` / ``CancelCartesia`` (per
utterance; one Cartesia context per utterance), ``ToAgent`` and ``EndCall``.

Barge-in is one ordered step (``interrupt``): Twilio ``clear`` → Cartesia
``cancel`` for every unfinished utterance → those utterances are tombstoned
here (late chunks dropped and counted) → the words the caller heard, from the
*played* cursor intersected with Cartesia's word timestamps → ``interrupt`` to
the agent.

Agent text is sent to Cartesia at word boundaries (a trailing partial word
waits for the next token or ``last``), so a word is never split across
generations; the concatenation of what is sent equals the tokens verbatim.
Tokens that arrive for an interrupted turn are dropped until that turn's
``last: true``.
"""

from __future__ import annotations

import audioop
import base64
import binascii
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Union

from bridge.agent import protocol as agent_proto
from bridge.agent.relay_settings import RELAY_ATTRIBUTES, RelaySettings
from bridge.cartesia.protocol import (
    Chunk,
    Done,
    ErrorMessage,
    FlushDone,
    GenerationRequest,
    ServerMessage,
    WordTimestamps,
)
from bridge.cartesia.stt_protocol import SttError, SttFlushDone, SttServerMessage, SttTranscript, SttTurnEvent
from bridge.defaults import PLAYOUT_LEAD_MS, PLAYOUT_MARK_INTERVAL_MS
from bridge.hearing import FinalizeDue, HearingEvent, PartialText, SpeechStarted, TurnComplete, TurnTracker
from bridge.histogram_batch import HistogramBatch
from bridge.logs import log_event
from bridge.playout import Playout, PlayoutGap
from metrics import BridgeMetrics
from telephony.media import FRAME_BYTES, OutboundEncoder, Start

log = logging.getLogger("bridge.call")


@dataclass(slots=True)  # not frozen: several per call every 100 ms (a frozen __init__ costs ~6x)
class ToTwilio:
    text: str
    #: Monotonic time the audio in this message became sendable (Cartesia chunk
    #: received); the I/O layer observes forwarding delay when it writes it.
    since: float | None = None


@dataclass(frozen=True, slots=True)
class ToCartesia:
    context_id: str
    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class CancelCartesia:
    context_id: str


@dataclass(frozen=True, slots=True)
class ResumeLater:
    """Call ``CallCore.resume(utterance_id, now)`` after ``delay_s`` (429 back-off)."""

    utterance_id: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class ToAgent:
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EndCall:
    reason: str
    handoff_data: Any = None


@dataclass(frozen=True, slots=True)
class SttFinalize:
    """Ask Cartesia STT to turn what the caller said so far into a final transcript."""


@dataclass(frozen=True, slots=True)
class SttReconfigure:
    """Reopen the call's STT socket with another language (Cartesia code) and keyterms."""

    language: str
    keyterms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FetchPlay:
    """Fetch ``source`` (allowlisted), transcode to μ-law 8 kHz, then ``CallCore.play_audio``."""

    source: str
    loop: int
    interruptible: str
    preemptible: bool


@dataclass(frozen=True, slots=True)
class PlayDigits:
    """Render ``digits`` as in-band DTMF tones, then ``CallCore.play_audio``."""

    digits: str


Action = Union[ToTwilio, ToCartesia, CancelCartesia, ToAgent, EndCall, ResumeLater, SttFinalize, SttReconfigure,
               FetchPlay, PlayDigits]

#: Re-sends of one utterance on new contexts (socket loss, 429) before giving up.
MAX_RESUMES = 5
#: First 429 back-off (doubles per retry, plus up to 50 % jitter), seconds.
BACKOFF_BASE_S = 0.2
#: Bad agent messages logged per call before only every 1000th is (each still gets ``error``).
BAD_MESSAGE_LOG_LINES = 20
#: Word timestamps beyond this (seconds into one utterance) are refused as nonsense.
MAX_TIMESTAMP_S = 3600.0
#: Audio received without any word timestamp before the horizon is given up (bytes = 500 ms).
HORIZON_GIVE_UP_BYTES = 4000
#: The first audio of an utterance released without waiting for its word timestamps (bytes = 60 ms):
#: a caller's playback starts with this much in hand, not with one 20 ms frame up to the first short
#: word's end and the next chunk due just as that frame ends (any jitter was then a gap). A context
#: lost inside it is resumed by ``skip_bytes`` like any audio sent mid-word.
START_RELEASE_BYTES = 480
#: ``<Parameter>`` names the bridge uses for itself (routing, call facts, ConversationRelay
#: settings); every other ``<Parameter>`` reaches the agent in ``setup.customParameters``.
INTERNAL_PARAMETERS = frozenset({"from", "to", "direction", "agentUrl", *RELAY_ATTRIBUTES})
#: Which interruptible modes let each barge-in source cut speech (an agent ``interrupt`` always may).
_MODES_CUT_BY = {"vad": ("speech", "any"), "stt": ("speech", "any"), "dtmf": ("dtmf", "any")}


@dataclass(frozen=True, slots=True)
class CallSettings:
    """Per-call settings (from ``Config``); units in the names."""

    model_id: str
    voice_id: str
    language: str
    lead_ms: int = PLAYOUT_LEAD_MS
    mark_interval_ms: int = PLAYOUT_MARK_INTERVAL_MS
    max_buffer_ms: int = 60_000
    max_buffer_delay_ms: int | None = 0
    vad_enabled: bool = True
    vad_threshold_rms: int = 1200
    vad_min_speech_ms: int = 120
    vad_hangover_ms: int = 200
    retry_window_s: float = 5.0
    #: ConversationRelay's TwiML attributes for this call (greeting, interruptible, ...).
    relay: RelaySettings = field(default_factory=RelaySettings)
    #: The caller's audio goes to Cartesia STT (prompts for the agent).
    stt_enabled: bool = False


@dataclass(slots=True)
class Utterance:
    """One agent turn = one Cartesia context."""

    utterance_id: str
    interruptible: str  # ConversationRelay mode: none | dtmf | speech | any
    voice_id: str
    language: str
    generation_config: dict[str, Any] | None
    context_id: str = ""  # the Cartesia context currently producing it
    text_sent: str = ""
    text_held: str = ""  # trailing partial word not yet sent
    closed: bool = False  # continue:false sent
    done: bool = False  # Cartesia done / error / lost
    cancelled: bool = False
    words: list[tuple[str, float, float]] = field(default_factory=list)
    t_text: float | None = None
    t_first_chunk: float | None = None
    t_first_frame: float | None = None
    audio_bytes: int = 0
    resumes: int = 0
    word_offset_s: float = 0.0  # timeline position where the current context's audio starts
    skip_bytes: int = 0  # leading audio of the current context already played from the previous one
    pending_resume: bool = False
    complete: bool = True  # false once speech failed part-way (error, lost, cut)
    first_failure: float | None = None  # start of the current run of failures (reset by progress)
    failures: int = 0  # resumes since the last audio progress
    held: bytearray = field(default_factory=bytearray)  # audio past the word-timestamp horizon
    horizon_bytes: int = 0  # utterance timeline: end of the last word with a timestamp
    timestamps_seen: bool = False
    horizon_off: bool = False  # this context sends no timestamps: release audio as it comes
    preemptible: bool = False  # cut without an interrupt when the agent starts the next utterance
    audio_only: bool = False  # play / sendDigits: audio from the bridge, no Cartesia context


class EnergyVad:
    """Caller-speech detector on inbound mu-law (RMS of 16-bit PCM per frame).

    Speech is declared after ``min_speech_ms`` of frames above the threshold
    within one run; a run ends after ``hangover_ms`` below it. ``update``
    returns the onset time (seconds) when speech is declared, else ``None``.
    """

    __slots__ = ("threshold", "min_speech_ms", "hangover_ms", "_speech_ms", "_silence_ms", "_onset", "_fired")

    def __init__(self, threshold: int, min_speech_ms: int, hangover_ms: int) -> None:
        self.threshold = threshold
        self.min_speech_ms = min_speech_ms
        self.hangover_ms = hangover_ms
        self._speech_ms = 0
        self._silence_ms = 0
        self._onset: float | None = None
        self._fired = False

    @property
    def in_run(self) -> bool:
        """A run of loud frames has started (``reset`` has something to undo)."""
        return self._onset is not None

    def update(self, mulaw: bytes, now: float) -> float | None:
        if audioop.rms(audioop.ulaw2lin(mulaw, 2), 2) >= self.threshold:
            if self._onset is None:
                self._onset = now
            self._speech_ms += len(mulaw) // 8
            self._silence_ms = 0
            if not self._fired and self._speech_ms >= self.min_speech_ms:
                self._fired = True
                return self._onset
        elif self._onset is not None:
            self._silence_ms += len(mulaw) // 8
            if self._silence_ms >= self.hangover_ms:
                self.reset()
        return None

    def reset(self) -> None:
        self._speech_ms = 0
        self._silence_ms = 0
        self._onset = None
        self._fired = False


def split_at_word_end(text: str) -> tuple[str, str]:
    """``(send, held)``: ``text`` up to its last whitespace, and the unfinished word after it."""
    if text[-1:] == " ":  # the usual streamed token, a word with its space: sent whole
        return text, ""
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    return (text[: cut + 1], text[cut + 1 :]) if cut >= 0 else ("", text)


def _times_valid(starts: list[float], ends: list[float]) -> bool:
    """Every time in [0, ``MAX_TIMESTAMP_S``] s (neither list empty). NaN fails: it makes the sum NaN,
    and a sum of values in range is finite."""
    total = sum(starts, 0.0) + sum(ends, 0.0)  # 0.0 start: a float sum, also for mypyc
    return (min(starts) >= 0.0 and min(ends) >= 0.0 and max(starts) <= MAX_TIMESTAMP_S
            and max(ends) <= MAX_TIMESTAMP_S and total == total)


def heard_words(words: list[tuple[str, float, float]], played_ms: int) -> str:
    """The words whose end time is at or before ``played_ms``, space-joined."""
    limit = played_ms / 1000.0 + 1e-9
    return " ".join(w for w, _start, end in words if end <= limit)


class CallCore:
    """Sans-I/O state of one call (see module docstring)."""

    def __init__(
        self,
        settings: CallSettings,
        metrics: BridgeMetrics,
        *,
        call_info: dict[str, str] | None = None,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.call_info = dict(call_info or {})
        self._new_id = new_id
        self.playout = Playout(
            lead_ms=settings.lead_ms,
            mark_interval_ms=settings.mark_interval_ms,
            max_buffer_ms=settings.max_buffer_ms,
        )
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.encoder: OutboundEncoder | None = None
        self.utterances: dict[str, Utterance] = {}
        self.contexts: dict[str, Utterance] = {}  # context_id -> utterance it is producing
        self.current: Utterance | None = None  # open for more agent tokens
        self.dropping_turn = False  # agent tokens of an interrupted turn
        self.voice_id = settings.voice_id
        self.language = settings.language
        self.generation_config: dict[str, Any] | None = None
        self.media_to_agent = False
        self.vad = (
            EnergyVad(settings.vad_threshold_rms, settings.vad_min_speech_ms, settings.vad_hangover_ms)
            if settings.vad_enabled
            else None
        )
        self.ended = False
        self.frames_sent = 0
        self.bytes_sent = 0
        self._frames_flushed = 0
        self._bytes_flushed = 0
        self.late_chunks = 0
        self.gaps: dict[str, int] = {}  # cause -> count, this call
        self.gap_ms: dict[str, float] = {}
        self._gap_counters: dict[str, tuple[Any, Any]] = {}  # cause -> (gaps, gap seconds) metric children
        self._mark_round_trip = HistogramBatch(metrics.mark_round_trip)  # added up in ``flush_metrics``
        # Speech in (ConversationRelay): settings may change mid-call with ``config``.
        self.relay = settings.relay
        self.stt_connected = False  # the I/O layer says when the STT socket is up
        self.turns: TurnTracker | None = None
        self.configure_relay(settings.relay, stt=settings.stt_enabled)
        self.speech_onset: float | None = None  # caller speech onset of the current turn
        self.prompt_end_of_speech: float | None = None  # the last prompt's end of speech (turn TTFA)
        self.prompt_sent_at: float | None = None
        self.agent_speaking = False  # for info agentSpeaking on/off
        self.prompts = 0
        self.bad_agent_messages = 0  # all counted in the metric; the first few and every 1000th logged

    # ------------------------------------------------------------- helpers

    def configure_relay(self, relay: RelaySettings, *, stt: bool) -> None:
        """This call's ConversationRelay settings (before ``on_start``); ``stt``: the
        caller's audio goes to speech recognition, so turns are tracked."""
        self.relay = relay
        self.turns = None
        if stt:
            threshold, min_speech_ms, onset_words = relay.vad_tuning()
            self.turns = TurnTracker(speech_timeout_ms=relay.speech_timeout_ms, threshold_rms=threshold,
                                     min_speech_ms=min_speech_ms, onset_words=onset_words)
        if relay.voice:
            self.voice_id = relay.voice
        self.language = relay.cartesia_tts_language if relay.tts_language else self.settings.language

    def flush_metrics(self) -> None:
        """Add frames/bytes sent and mark round trips since the last flush to the
        metrics (the I/O layer calls this before every /metrics render and at call end)."""
        frames = self.frames_sent - self._frames_flushed
        if frames:
            self.metrics.frames_out.inc(frames)
            self._frames_flushed = self.frames_sent
        nbytes = self.bytes_sent - self._bytes_flushed
        if nbytes:
            self.metrics.bytes_out.inc(nbytes)
            self._bytes_flushed = self.bytes_sent
        self._mark_round_trip.flush()

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(log, event, level, call_sid=self.call_sid, stream_sid=self.stream_sid, **fields)

    def _request(self, utt: Utterance, transcript: str, *, cont: bool, flush: bool = False) -> GenerationRequest:
        return GenerationRequest(
            context_id=utt.context_id,
            transcript=transcript,
            model_id=self.settings.model_id,
            voice_id=utt.voice_id,
            continue_=cont,
            flush=flush,
            language=utt.language,
            add_timestamps=True,
            max_buffer_delay_ms=self.settings.max_buffer_delay_ms,
            generation_config=utt.generation_config,
        )

    def _pump(self, now: float, out: list[Action]) -> None:
        encoder = self.encoder
        if encoder is None:
            return
        items = self.playout.take(now)
        if not items:
            return
        nbytes = 0
        for item in items:
            if isinstance(item, bytes):
                # The first audio of this batch carries when it became sendable (forwarding delay).
                since = None if nbytes else self.playout.take_forward_start()
                out.append(ToTwilio(encoder.media(item), since))
                nbytes += len(item)
            else:
                out.append(ToTwilio(encoder.mark(item.name)))
        if nbytes:
            self.bytes_sent += nbytes
            self.frames_sent += nbytes // FRAME_BYTES
            if not self.agent_speaking:
                self.agent_speaking = True
                self._info(out, "agentSpeaking", "on", now)
            if self.playout.has_gaps:
                for gap in self.playout.take_gaps():
                    self._count_gap(gap)
            for utt in self.utterances.values():
                if utt.t_first_frame is None and utt.t_text is not None and utt.audio_bytes:
                    head = self.playout.utterance(utt.utterance_id)
                    if head is None or head.start_pos is not None:
                        utt.t_first_frame = now
                        self.metrics.text_to_first_frame.observe(now - utt.t_text)
                        if (self.prompt_end_of_speech is not None and self.prompt_sent_at is not None
                                and utt.t_text >= self.prompt_sent_at):
                            # The reply to the caller's turn: what the caller feels.
                            self.metrics.speech.turn_ttfa.observe(now - self.prompt_end_of_speech)
                            self.prompt_end_of_speech = None

    def _count_gap(self, gap: PlayoutGap) -> None:
        counters = self._gap_counters.get(gap.cause)
        if counters is None:  # labels() is a locked lookup: once per call and cause, not per gap
            counters = self._gap_counters[gap.cause] = (self.metrics.playout_gaps.labels(cause=gap.cause),
                                                        self.metrics.playout_gap_seconds.labels(cause=gap.cause))
        counters[0].inc()
        counters[1].inc(gap.seconds)
        self.gaps[gap.cause] = self.gaps.get(gap.cause, 0) + 1
        self.gap_ms[gap.cause] = round(self.gap_ms.get(gap.cause, 0.0) + gap.seconds * 1000.0, 1)
        if not log.isEnabledFor(logging.DEBUG):
            return
        utt = self.utterances.get(gap.utterance_id)
        self._log("playout_gap", logging.DEBUG, utterance_id=gap.utterance_id, cause=gap.cause,
                  gap_ms=round(gap.seconds * 1000.0, 1), at_ms=gap.at_ms,
                  context_id=utt.context_id if utt is not None else None)

    # ------------------------------------------------------------- Twilio in

    def on_start(self, start: Start, now: float) -> list[Action]:
        self.stream_sid = start.stream_sid
        self.call_sid = start.call_sid
        self.encoder = OutboundEncoder(start.stream_sid)
        params = start.custom_parameters
        info = self.call_info
        self._log("stream_started", account_sid=start.account_sid, tracks=start.tracks)
        custom = {k: v for k, v in params.items() if k not in INTERNAL_PARAMETERS}
        out: list[Action] = [
            ToAgent(
                agent_proto.setup_message(
                    session_id=info.get("session_id") or "VX" + uuid.uuid5(uuid.NAMESPACE_URL, start.call_sid).hex,
                    call_sid=start.call_sid,
                    stream_sid=start.stream_sid,
                    account_sid=start.account_sid,
                    from_=info.get("from", params.get("from", "")),
                    to=info.get("to", params.get("to", "")),
                    direction=info.get("direction", params.get("direction", "inbound")),
                    custom_parameters=custom,
                    parent_call_sid=info.get("parent_call_sid", ""),
                    forwarded_from=info.get("forwarded_from", ""),
                    call_type=info.get("call_type", "PSTN"),
                    caller_name=info.get("caller_name", ""),
                    call_status=info.get("call_status", "in-progress").upper(),
                )
            )
        ]
        greeting = self.relay.welcome_greeting
        if greeting:
            out.extend(self.speak(greeting, last=True, now=now,
                                  interruptible=self.relay.welcome_greeting_interruptible))
        return out

    def on_media(self, payload: bytes, timestamp_ms: int, now: float) -> list[Action]:
        out: list[Action] = []
        if self.media_to_agent:
            out.append(ToAgent(agent_proto.media_message(base64.b64encode(payload).decode(), timestamp_ms)))
        turns = self.turns
        if turns is not None and payload:
            for event in turns.on_audio(payload, now):
                self._on_hearing(event, now, out)
        vad = self.vad
        # With STT up, barge-in waits for recognised words (echo and noise are not speech);
        # the energy VAD is the fallback while STT is off or down.
        if vad is not None and payload and not (turns is not None and self.stt_connected):
            if not self.playout.is_idle:  # is_speaking, without a second property call per frame
                onset = vad.update(payload, now)
                if onset is not None:
                    out.extend(self.interrupt("vad", now, onset=onset))
            elif vad.in_run:
                vad.reset()  # nothing playing: no barge-in to detect, and no RMS to compute
        return out

    # ------------------------------------------------------------ STT in

    def on_stt(self, msg: SttServerMessage, now: float) -> list[Action]:
        """A Cartesia STT message for this call."""
        turns = self.turns
        out: list[Action] = []
        if turns is None or self.ended:
            return out
        if isinstance(msg, SttTranscript):
            for event in turns.on_transcript(msg, now, partials=self.relay.partial_prompts):
                self._on_hearing(event, now, out)
            if msg.text.strip() and self.is_speaking and turns.turn_words >= self.relay.vad_tuning()[2]:
                onset = self.speech_onset if self.speech_onset is not None else now
                out.extend(self.interrupt("stt", now, onset=onset))
        elif isinstance(msg, SttFlushDone):
            for event in turns.on_flush_done(now):
                self._on_hearing(event, now, out)
        elif isinstance(msg, SttTurnEvent):
            if msg.kind == "turn.end":
                out.extend(self.on_stt(SttTranscript(True, msg.transcript), now))
        elif isinstance(msg, SttError):
            self._log("stt_error", logging.WARNING, status=msg.status_code, error_code=msg.error_code,
                      message=msg.message)
        return out

    def on_stt_lost(self, reason: str, *, turn_lost: bool) -> list[Action]:
        """The STT socket died; with ``turn_lost`` the caller's turn in progress is gone."""
        self.stt_connected = False
        if self.turns is None or not turn_lost:
            return []
        lost = self.turns.abandon_turn()
        self.metrics.speech.stt_turns.labels(outcome="lost").inc()
        self._log("stt_turn_lost", logging.WARNING, reason=reason, lost_chars=len(lost))
        return [ToAgent(agent_proto.error_message(f"speech recognition lost the caller's turn: {reason}"))]

    def _on_hearing(self, event: HearingEvent, now: float, out: list[Action]) -> None:
        if isinstance(event, SpeechStarted):
            self.speech_onset = event.onset
            self._info(out, "clientSpeaking", "on", now)
        elif isinstance(event, FinalizeDue):
            self._info(out, "clientSpeaking", "off", now)
            out.append(SttFinalize())
        elif isinstance(event, PartialText):
            if self._input_reportable():
                out.append(ToAgent(agent_proto.prompt_message(event.text, self.relay.transcription_language,
                                                              last=False)))
        elif isinstance(event, TurnComplete):
            self.speech_onset = None
            if event.end_of_speech is not None:
                self.metrics.speech.stt_latency.observe(max(0.0, now - event.end_of_speech))
            if not event.text:
                self.metrics.speech.stt_turns.labels(outcome="empty").inc()
                return
            if not self._input_reportable():
                self.metrics.speech.stt_turns.labels(outcome="ignored").inc()
                self._log("prompt_ignored", reason="agent_speaking", chars=len(event.text))
                return
            self.metrics.speech.stt_turns.labels(outcome="prompt").inc()
            self.prompts += 1
            self.prompt_end_of_speech = event.end_of_speech
            self.prompt_sent_at = now
            self._log("prompt", chars=len(event.text),
                      stt_ms=None if event.end_of_speech is None else round((now - event.end_of_speech) * 1000, 1))
            out.append(ToAgent(agent_proto.prompt_message(event.text, self.relay.transcription_language)))

    def _input_reportable(self) -> bool:
        """ConversationRelay's reportInputDuringAgentSpeech: caller input while the agent
        speaks something that input cannot interrupt is dropped unless asked for."""
        if self.relay.report_input_during_agent_speech or not self.is_speaking:
            return True
        return all(u.interruptible in ("speech", "any") for u in self.utterances.values())

    def _info(self, out: list[Action], name: str, value: str, now: float) -> None:
        if name in self.relay.events:
            out.append(ToAgent(agent_proto.info_message(name, value, int(now * 1000))))

    def on_mark(self, name: str, now: float) -> list[Action]:
        result = self.playout.on_mark(name, now)
        out: list[Action] = []
        if result.status == "played":
            if result.round_trip_s is not None:
                self._mark_round_trip.observe(result.round_trip_s)
            for utterance_id, duration_ms in result.completed_utterances:
                utt = self.utterances.pop(utterance_id, None)
                if utt is not None:
                    self._log("utterance_played", context_id=utterance_id, duration_ms=duration_ms,
                              complete=utt.complete)
                    # Never report words the caller did not hear (pipecat's mistake).
                    text = utt.text_sent if utt.complete else heard_words(utt.words, duration_ms)
                    out.append(ToAgent(agent_proto.spoken_message(text, duration_ms, utterance_id,
                                                                  complete=utt.complete)))
                    if text:
                        self._info(out, "tokensPlayed", text, now)
        elif result.status == "unknown":
            self.metrics.bad_input.labels(source="twilio", kind="unknown_mark").inc()
            self._log("unknown_mark", logging.WARNING, mark=name)
        self._pump(now, out)
        if self.agent_speaking and self.playout.is_idle:
            self.agent_speaking = False
            self._info(out, "agentSpeaking", "off", now)
        return out

    def on_dtmf(self, digit: str, now: float = 0.0) -> list[Action]:
        if not self.relay.dtmf_detection:
            return []
        out: list[Action] = []
        if self.is_speaking:
            if all(u.interruptible in ("dtmf", "any") for u in self.utterances.values()):
                out.extend(self.interrupt("dtmf", now))
            elif not self.relay.report_input_during_agent_speech:
                self._log("dtmf_ignored", reason="agent_speaking", digit=digit)
                return out
        out.append(ToAgent(agent_proto.dtmf_message(digit)))
        return out

    # -------------------------------------------------------------- agent in

    def stream_token(self, raw: str, now: float) -> tuple[str, str] | None:
        """The cheap path for an agent's streamed word: a ``text`` message that
        ``agent_proto.streamed_text`` recognizes, not ``last``, for the open
        utterance (not ended, not dropping an interrupted turn, not waiting to
        resume). Applies it exactly as ``on_agent_message`` would and returns
        ``(context_id, text)``: the continuation that ``on_agent_message`` would
        have sent as ``ToCartesia(context_id, text_request(text))``, or ``text``
        empty when the word waits for its end (no action). ``None``: nothing
        was done; use ``on_agent_message``.
        """
        utt = self.current
        if utt is None or utt.pending_resume or self.ended or self.dropping_turn:
            return None
        found = agent_proto.streamed_text(raw)
        if found is None or found[1]:
            return None
        # speak()'s not-last branch for an open utterance, without its action list.
        send, utt.text_held = split_at_word_end(utt.text_held + found[0])
        if not send:
            return utt.context_id, ""
        if utt.t_text is None:
            utt.t_text = now
        utt.text_sent += send
        return utt.context_id, send

    def text_request(self, text: str) -> GenerationRequest:
        """The open utterance's continuation input for ``text`` (after ``stream_token``)."""
        assert self.current is not None
        return self._request(self.current, text, cont=True)

    def on_agent_message(self, raw: str | bytes | dict[str, Any], now: float) -> list[Action]:
        if type(raw) is str:
            found = agent_proto.streamed_text(raw)
            if found is not None:  # what parse_agent_message makes a Text with no other field
                return self.speak(found[0], last=found[1], now=now)
        try:
            msg = agent_proto.parse_agent_message(raw)
        except agent_proto.AgentMessageError as exc:
            self.metrics.bad_input.labels(source="agent", kind="invalid_message").inc()
            self.bad_agent_messages += 1
            n = self.bad_agent_messages
            if n <= BAD_MESSAGE_LOG_LINES or n % 1000 == 0:  # a hostile agent cannot flood the log
                self._log("agent_bad_message", logging.WARNING, error=str(exc)[:300], count=n)
            return [ToAgent(agent_proto.error_message(str(exc)))]
        if isinstance(msg, agent_proto.Text):
            return self.speak(msg.token, last=msg.last, now=now, interruptible=msg.interruptible,
                              overrides=msg.overrides, preemptible=msg.preemptible)
        if isinstance(msg, agent_proto.Interrupt):
            return self.interrupt("agent", now)
        if isinstance(msg, agent_proto.Play):
            return [FetchPlay(msg.source, msg.loop, msg.interruptible or self.relay.interruptible,
                              self.relay.preemptible if msg.preemptible is None else msg.preemptible)]
        if isinstance(msg, agent_proto.SendDigits):
            return [PlayDigits(msg.digits)]
        if isinstance(msg, agent_proto.Language):
            changes: dict[str, Any] = {}
            if msg.tts_language is not None:
                self.language = msg.tts_language
                changes["tts_language"] = msg.tts_tag
            out_lang: list[Action] = []
            if msg.transcription_language is not None:
                changes["transcription_language"] = msg.transcription_tag
                if self.turns is not None:
                    out_lang.append(SttReconfigure(msg.transcription_language, self.relay.hints))
            self.relay = replace(self.relay, **changes)
            self._log("language_changed", tts=self.relay.tts_language, transcription=self.relay.transcription_language)
            return out_lang
        if isinstance(msg, agent_proto.End):
            self._log("agent_end", handoff=msg.handoff_data is not None)
            # A turn left open would never finish playing: close it so its audio can end.
            closing = self.speak("", last=True, now=now) if self.current is not None else []
            return [*closing, EndCall("agent_end", msg.handoff_data)]
        ov = msg.overrides
        if ov.voice is not None:
            self.voice_id = ov.voice
        if ov.language is not None:
            self.language = ov.language
        if ov.speed is not None or ov.emotion is not None:
            config = dict(self.generation_config or {})
            if ov.speed is not None:
                config["speed"] = ov.speed
            if ov.emotion is not None:
                config["emotion"] = ov.emotion
            self.generation_config = config
        if msg.media is not None:
            self.media_to_agent = msg.media
        if msg.vad is not None:
            self.vad = (
                EnergyVad(self.settings.vad_threshold_rms, self.settings.vad_min_speech_ms,
                          self.settings.vad_hangover_ms) if msg.vad else None
            )
        return self._apply_relay_config(msg)

    def _apply_relay_config(self, msg: agent_proto.ConfigUpdate) -> list[Action]:
        changes: dict[str, Any] = {}
        for key in ("interruptible", "interrupt_sensitivity", "partial_prompts", "report_input_during_agent_speech",
                    "dtmf_detection", "hints"):
            value = getattr(msg, key)
            if value is not None:
                changes[key] = value
        if msg.transcription_tag is not None:
            changes["transcription_language"] = msg.transcription_tag
        if not changes:
            return []
        self.relay = replace(self.relay, **changes)
        if self.turns is not None and ("interrupt_sensitivity" in changes):
            threshold, min_speech_ms, onset_words = self.relay.vad_tuning()
            self.turns.threshold_rms, self.turns.min_speech_s = threshold, min_speech_ms / 1000.0
            self.turns.onset_words = onset_words
        if self.turns is not None and ("hints" in changes or "transcription_language" in changes):
            return [SttReconfigure(self.relay.cartesia_stt_language, self.relay.hints)]
        return []

    def speak(
        self,
        token: str,
        *,
        last: bool,
        now: float,
        interruptible: bool | str | None = None,
        overrides: agent_proto.VoiceOverrides | None = None,
        preemptible: bool | None = None,
    ) -> list[Action]:
        """Stream agent text into the current utterance's Cartesia context.

        ``interruptible``: ConversationRelay's mode (``none|dtmf|speech|any`` or a bool),
        None = the call's default. ``preemptible``: the agent's next utterance cuts this
        one instead of queueing behind it."""
        if self.ended:
            return []
        if self.dropping_turn:
            if last:
                self.dropping_turn = False
            return []
        out: list[Action] = []
        utt = self.current
        if utt is None:
            out.extend(self._preempt(now))
            mode = (self.relay.interruptible if interruptible is None
                    else agent_proto.interrupt_mode(interruptible))
            ov = overrides or agent_proto.VoiceOverrides()
            config = dict(self.generation_config or {})
            if ov.speed is not None:
                config["speed"] = ov.speed
            if ov.emotion is not None:
                config["emotion"] = ov.emotion
            utterance_id = self._new_id()
            utt = Utterance(
                utterance_id=utterance_id,
                interruptible=mode,
                preemptible=self.relay.preemptible if preemptible is None else preemptible,
                voice_id=ov.voice or self.voice_id,
                language=ov.language or self.language,
                generation_config=config or None,
                context_id=utterance_id,
            )
            self.utterances[utt.utterance_id] = utt
            self.contexts[utt.context_id] = utt
            self.playout.open(utt.utterance_id)
            self.current = utt
        text = utt.text_held + token
        send, held = (text, "") if last else split_at_word_end(text)
        utt.text_held = held
        if send:
            if utt.t_text is None:
                utt.t_text = now
            utt.text_sent += send
            if not utt.pending_resume:
                out.append(ToCartesia(utt.context_id, self._request(utt, send, cont=True)))
        if last:
            if utt.t_text is None:
                utt.t_text = now
            if not utt.pending_resume:
                out.append(ToCartesia(utt.context_id, self._request(utt, "", cont=False)))
            utt.closed = True
            self.current = None
        return out

    def _preempt(self, now: float) -> list[Action]:
        """The agent starts a new utterance: queued or playing preemptible speech is cut
        (Twilio ``clear``, Cartesia ``cancel``), without an ``interrupt`` to the agent."""
        encoder = self.encoder
        if encoder is None or not self.utterances or not all(u.preemptible for u in self.utterances.values()):
            return []
        out: list[Action] = [ToTwilio(encoder.clear())]
        self.metrics.twilio_messages_out.labels(event="clear").inc()
        cleared = self.playout.clear()
        for utt in self.utterances.values():
            if not utt.done and not utt.pending_resume and not utt.audio_only:
                out.append(CancelCartesia(utt.context_id))
            utt.cancelled = True
            utt.done = True
        self.contexts.clear()
        self._log("preempted", utterances=len(self.utterances), dropped_bytes=cleared.dropped_bytes)
        self.utterances.clear()
        return out

    def play_audio(self, audio: bytes, now: float, *, loop: int = 1, interruptible: str = "any",
                   preemptible: bool = False, label: str = "play") -> list[Action]:
        """Play μ-law 8 kHz audio made by the bridge (``play``, ``sendDigits``) as an
        utterance of its own, queued after the speech before it. ``loop`` 0 repeats the
        audio as often as the playout buffer holds (``max_buffer_ms``), never more."""
        if self.ended or not audio or self.encoder is None:
            return []
        out = self._preempt(now)
        limit = self.settings.max_buffer_ms * 8
        fits = max(1, limit // len(audio))
        repeats = fits if loop == 0 else min(loop, fits)
        utterance_id = self._new_id()
        utt = Utterance(utterance_id=utterance_id, interruptible=interruptible, voice_id="", language=self.language,
                        generation_config=None, done=True, horizon_off=True, preemptible=preemptible,
                        audio_only=True, t_text=now)
        self.utterances[utterance_id] = utt
        self.playout.open(utterance_id)
        body = (audio * repeats)[:limit]
        if self.playout.push(utterance_id, body, now):
            utt.audio_bytes = len(body)
        else:
            self.metrics.playout_overflow_bytes.inc(len(body))
        self.playout.finish(utterance_id)
        self._forget_if_silent(utt)
        self._log("audio_queued", context_id=utterance_id, kind=label, ms=len(body) // 8, repeats=repeats)
        self._pump(now, out)
        return out

    # ------------------------------------------------------------ Cartesia in

    def on_cartesia(self, context_id: str, msg: ServerMessage, now: float) -> list[Action]:
        utt = self.contexts.get(context_id)
        if utt is None or utt.cancelled:
            if isinstance(msg, Chunk):
                self.late_chunks += 1
                self.metrics.late_chunks_dropped.inc()
            return []
        utterance_id = utt.utterance_id
        out: list[Action] = []
        if isinstance(msg, Chunk):
            try:
                audio = binascii.a2b_base64(msg.data)
            except (binascii.Error, ValueError):
                self.metrics.bad_input.labels(source="cartesia", kind="invalid_base64").inc()
                self._log("cartesia_bad_chunk", logging.WARNING, context_id=context_id)
                return out
            if utt.skip_bytes:
                # Already played from the previous context (resumed mid-word).
                skip = min(utt.skip_bytes, len(audio))
                utt.skip_bytes -= skip
                audio = audio[skip:]
                if not audio:
                    return out
            if utt.t_first_chunk is None:
                utt.t_first_chunk = now
                if utt.t_text is not None:
                    self.metrics.tts_ttfb.observe(now - utt.t_text)
            utt.first_failure = None
            utt.failures = 0
            utt.held += audio
            if not utt.horizon_off and not utt.timestamps_seen and len(utt.held) > HORIZON_GIVE_UP_BYTES:
                utt.horizon_off = True
            self._release(utt, now, out)
        elif isinstance(msg, WordTimestamps):
            words, starts, ends = msg.words, msg.start, msg.end
            count = len(words)
            if count != len(starts) or count != len(ends):
                count = min(count, len(starts), len(ends))
                words, starts, ends = words[:count], starts[:count], ends[:count]
            if count == 1:
                # The usual message (one word per chunk at speaking rate): the checks of
                # ``_times_valid`` and the extend below, for one word (NaN fails both comparisons).
                start, end = starts[0], ends[0]
                if not (0.0 <= start <= MAX_TIMESTAMP_S and 0.0 <= end <= MAX_TIMESTAMP_S):
                    self._bad_timestamps(context_id)
                    return out
                off = utt.word_offset_s
                utt.words.append((words[0], start + off, end + off) if off else (words[0], start, end))
            elif count:
                if not _times_valid(starts, ends):
                    self._bad_timestamps(context_id)
                    return out
                off = utt.word_offset_s
                if off:
                    utt.words.extend((w, a + off, b + off) for w, a, b in zip(words, starts, ends, strict=True))
                else:
                    utt.words.extend(zip(words, starts, ends, strict=True))  # the same tuples, built in C
            else:
                return out
            utt.timestamps_seen = True
            horizon = round(utt.words[-1][2] * 8000)  # round() of a float is an int
            if horizon > utt.horizon_bytes:
                utt.horizon_bytes = horizon
            if utt.held:
                self._release(utt, now, out)
        elif isinstance(msg, Done):
            self.contexts.pop(context_id, None)
            utt.horizon_off = True
            self._release(utt, now, out)
            utt.done = True
            self.playout.finish(utterance_id)
            self._forget_if_silent(utt)
            self._pump(now, out)
        elif isinstance(msg, ErrorMessage):
            self.contexts.pop(context_id, None)
            self._log("cartesia_error", logging.WARNING, context_id=context_id, status=msg.status_code,
                      error_code=msg.error_code, message=msg.message)
            if msg.status_code == 429 and self._may_resume(utt, now):
                # Over the concurrency limit: back off, then resume on a new context.
                utt.pending_resume = True
                delay = BACKOFF_BASE_S * 2 ** utt.resumes
                self.metrics.context_retries.labels(reason="429").inc()
                return [ResumeLater(utterance_id, delay)]
            utt.horizon_off = True
            self._release(utt, now, out)
            utt.done = True
            utt.complete = False
            self.metrics.utterances_failed.labels(reason="cartesia_error").inc()
            self.playout.finish(utterance_id)
            self._forget_if_silent(utt)
            if self.current is utt:
                self.current = None
                self.dropping_turn = not utt.closed
            out.append(ToAgent(agent_proto.error_message(
                f"speech failed for utterance {utterance_id}: {msg.status_code} {msg.description}")))
            self._pump(now, out)
        elif isinstance(msg, FlushDone):
            pass
        return out

    def _bad_timestamps(self, context_id: str) -> None:
        """NaN, negative or absurd word times (1e305 overflows the byte arithmetic): the
        message is dropped whole, counted and logged."""
        self.metrics.bad_input.labels(source="cartesia", kind="invalid_timestamps").inc()
        self._log("cartesia_bad_timestamps", logging.WARNING, context_id=context_id)

    def _release(self, utt: Utterance, now: float, out: list[Action]) -> None:
        """Move held audio into playout up to the word-timestamp horizon.

        Audio is sent to Twilio only once Cartesia has said which word it
        belongs to, so a context lost mid-word can be resumed exactly at a word
        start (``resume``), except the first ``START_RELEASE_BYTES`` of an
        utterance. Contexts that send no timestamps are not held.
        """
        if not utt.held:
            return
        if utt.horizon_off:
            n = len(utt.held)
        else:
            horizon = utt.horizon_bytes if utt.horizon_bytes > START_RELEASE_BYTES else START_RELEASE_BYTES
            n = min(len(utt.held), horizon - utt.audio_bytes)
        if n <= 0:
            return
        held = utt.held
        if n == len(held):
            audio = bytes(held)
            held.clear()
        else:
            audio = bytes(held[:n])
            del held[:n]
        if not self.playout.push(utt.utterance_id, audio, now):
            self.metrics.playout_overflow_bytes.inc(len(audio) + len(utt.held))
            self._log("playout_overflow", logging.WARNING, context_id=utt.context_id, dropped_bytes=len(audio),
                      limit_ms=self.settings.max_buffer_ms)
            utt.held.clear()
            out.extend(self._truncate(utt, now))
            return
        utt.audio_bytes += len(audio)
        self._pump(now, out)

    def _may_resume(self, utt: Utterance, now: float) -> bool:
        """Within the utterance's retry budget: ``MAX_RESUMES`` and
        ``retry_window_s`` since the first failure without progress."""
        if utt.first_failure is None:
            utt.first_failure = now
        return (not self.ended and utt.failures < MAX_RESUMES
                and now - utt.first_failure < self.settings.retry_window_s)

    def on_context_lost(self, context_id: str, reason: str, now: float, *, retry: bool = False,
                        cause: str = "socket_lost") -> list[Action]:
        """The context producing an utterance is gone (socket died, admission
        failed, deadline). With ``retry``, the rest of the utterance is
        re-sent on a new context; otherwise it ends with what was received.
        ``cause`` (``socket_lost``, ``no_done``, ``congested``) labels the
        retry metric; a ``congested`` socket gets the retry after a back-off,
        since an immediate one would only add to its queue."""
        utt = self.contexts.pop(context_id, None)
        if utt is None or utt.cancelled or utt.done:
            return []
        utterance_id = utt.utterance_id
        if retry and self._may_resume(utt, now):
            self._log("utterance_resuming", logging.WARNING, context_id=context_id, reason=reason)
            self.metrics.context_retries.labels(reason=cause).inc()
            if cause == "congested":
                utt.pending_resume = True
                return [ResumeLater(utterance_id, BACKOFF_BASE_S * 2 ** utt.resumes)]
            return self.resume(utterance_id, now)
        if retry:
            self.metrics.utterances_failed.labels(reason="retries_exhausted").inc()
        out: list[Action] = []
        utt.horizon_off = True
        self._release(utt, now, out)
        utt.done = True
        utt.complete = False
        self.playout.finish(utterance_id)
        self._forget_if_silent(utt)
        if self.current is utt:
            self.current = None
            self.dropping_turn = not utt.closed
        self._log("utterance_lost", logging.WARNING, context_id=context_id, reason=reason)
        out.append(ToAgent(agent_proto.error_message(
            f"speech interrupted for utterance {utterance_id}: {reason}")))
        self._pump(now, out)
        return out

    def resume(self, utterance_id: str, now: float) -> list[Action]:
        """Continue an utterance on a new context with only the words the
        caller has not heard and the bridge does not hold.

        The audio kept ends at the last word fully received (by Cartesia's
        word timestamps); when part of the next word was already sent to
        Twilio, that many leading bytes of the new context are skipped, so
        nothing is heard twice.
        """
        utt = self.utterances.get(utterance_id)
        if utt is None or utt.cancelled or utt.done or self.ended:
            return []
        utt.pending_resume = False
        utt.resumes += 1
        utt.failures += 1
        received = utt.audio_bytes + len(utt.held)
        complete = [w for w in utt.words if int(round(w[2] * 8000)) <= received]
        if utt.closed and len(complete) == len(utt.text_sent.split()):
            # Every word arrived (only the done was lost): keep all the audio, finish.
            out_done: list[Action] = []
            utt.horizon_off = True
            self._release(utt, now, out_done)
            utt.done = True
            self.playout.finish(utterance_id)
            self._pump(now, out_done)
            return out_done
        utt.held.clear()
        nxt = utt.words[len(complete)] if len(complete) < len(utt.words) else None
        if nxt is not None and int(round(nxt[1] * 8000)) < received:
            cut_bytes = int(round(nxt[1] * 8000))  # the word being spoken is re-made from its start
        else:
            cut_bytes = int(round(complete[-1][2] * 8000)) if complete else 0
        # The current context began at the start of its first word: never cut before that.
        cut_bytes = max(cut_bytes, int(round(utt.word_offset_s * 8000)))
        head = self.playout.utterance(utterance_id)
        sent_raw = head.sent_bytes if head is not None else 0
        kept = self.playout.truncate(utterance_id, cut_bytes) if head is not None else utt.audio_bytes
        utt.audio_bytes = kept
        utt.skip_bytes = max(0, sent_raw - cut_bytes)
        utt.words = complete
        utt.word_offset_s = cut_bytes / 8000.0
        utt.horizon_bytes = cut_bytes
        utt.timestamps_seen = False
        tokens = utt.text_sent.split()
        remaining = " ".join(tokens[len(complete):])
        if remaining and utt.text_sent[-1:].isspace():
            remaining += " "
        utt.context_id = self._new_id()
        self.contexts[utt.context_id] = utt
        out: list[Action] = []
        if remaining:
            out.append(ToCartesia(utt.context_id, self._request(utt, remaining, cont=True)))
        if utt.closed:
            if remaining:
                out.append(ToCartesia(utt.context_id, self._request(utt, "", cont=False)))
            else:
                self.contexts.pop(utt.context_id, None)
                utt.done = True
                self.playout.finish(utterance_id)
                self._pump(now, out)
        self._log("utterance_resumed", context_id=utt.context_id, kept_ms=kept // 8, words_kept=len(complete),
                  skip_bytes=utt.skip_bytes, resumes=utt.resumes)
        return out

    def _forget_if_silent(self, utt: Utterance) -> None:
        # An utterance with no audio never gets an end mark; drop it now.
        if utt.audio_bytes == 0:
            self.utterances.pop(utt.utterance_id, None)

    def _truncate(self, utt: Utterance, now: float) -> list[Action]:
        out: list[Action] = []
        utt.complete = False
        if not utt.done:
            utt.done = True
            utt.cancelled = True
            self.contexts.pop(utt.context_id, None)
            out.append(CancelCartesia(utt.context_id))
        self.playout.finish(utt.utterance_id)
        if self.current is utt:
            self.current = None
            self.dropping_turn = not utt.closed
        self._pump(now, out)
        return out

    # ------------------------------------------------------------- barge-in

    @property
    def is_speaking(self) -> bool:
        """Audio queued or playing at the caller."""
        return not self.playout.is_idle

    def interrupt(self, source: str, now: float, *, onset: float | None = None) -> list[Action]:
        """Barge-in, in order: clear → cancel → tombstone → words heard → agent."""
        encoder = self.encoder
        playing = self.playout.playing_utterance()
        target = self.utterances.get(playing.utterance_id) if playing is not None else None
        allowed = _MODES_CUT_BY.get(source)
        if allowed is not None and any(u.interruptible not in allowed for u in self.utterances.values()):
            # Playing, queued or still being made: caller input never cuts what its mode protects.
            return []
        if encoder is None or not self.is_speaking and self.current is None:
            return []
        out: list[Action] = [ToTwilio(encoder.clear())]
        self.metrics.twilio_messages_out.labels(event="clear").inc()
        cleared = self.playout.clear(now)
        for utt in self.utterances.values():
            if not utt.done and not utt.pending_resume:
                out.append(CancelCartesia(utt.context_id))
            utt.cancelled = True
            utt.done = True
        self.contexts.clear()
        if self.current is not None and not self.current.closed:
            self.dropping_turn = True
        if self.agent_speaking:
            self.agent_speaking = False
            self._info(out, "agentSpeaking", "off", now)
        self.current = None
        played = dict(cleared.cut_utterances)
        heard = ""
        duration_ms = 0
        target_id: str | None = None
        if target is not None:
            target_id = target.utterance_id
            duration_ms = played.get(target.utterance_id, 0)
            heard = heard_words(target.words, duration_ms)
        self.utterances.clear()
        self.metrics.interruptions.labels(source=source).inc()
        self.metrics.barge_in_latency.observe(max(0.0, now - (onset if onset is not None else now)))
        if self.vad is not None:
            self.vad.reset()
        self._log("barge_in", source=source, context_id=target_id, heard_ms=duration_ms,
                  dropped_bytes=cleared.dropped_bytes)
        out.append(ToAgent(agent_proto.interrupt_message(heard, duration_ms, target_id)))
        return out

    # ------------------------------------------------------------------ end

    def on_end(self) -> list[Action]:
        """The call is over: cancel every unfinished context."""
        if self.ended:
            return []
        self.ended = True
        out: list[Action] = []
        for utt in self.utterances.values():
            if not utt.done:
                if not utt.pending_resume:
                    out.append(CancelCartesia(utt.context_id))
                utt.cancelled = True
                utt.done = True
        self.utterances.clear()
        self.contexts.clear()
        self.current = None
        return out
