"""Playout with backpressure for one call: 20 ms framing, marks, two cursors.

No I/O. The call feeds it Cartesia audio (``push``), Twilio mark echoes
(``on_mark``) and asks what to send next (``take``).

Timeline. Positions are byte offsets of 8 kHz mu-law on the call's outbound
timeline (8 bytes = 1 ms, 160 bytes = one 20 ms frame):

* *sent* cursor: bytes handed to Twilio;
* *played* cursor: bytes Twilio has confirmed playing, advanced only by the
  echo of a mark we placed after that audio.

Frames are released only while ``sent - played <= lead`` (``lead_ms``,
default 400 ms), so Twilio's buffer holds at most ``lead`` of our audio and a
barge-in ``clear`` throws away at most that much. Cartesia is read at full
speed; what cannot be sent yet waits here.

Utterances play strictly in the order they were opened. Each starts on a frame
boundary; its last partial frame is padded with mu-law silence (0xFF) when it
finishes. A mark is placed every ``mark_interval_ms`` of audio (default
200 ms), at the end of every utterance, and whenever the buffer runs dry, so
the played cursor keeps up. After ``clear`` all outstanding marks count as
*flushed*, never played. What the caller heard at a ``clear`` is interpolated
between echoes (``heard_position``), so the interval costs no precision there.

Limits:

* ``max_buffer_ms`` (default 60 000 ms = 480 000 bytes) of unsent audio per
  call. A ``push`` beyond it is refused (returns ``False``) and the bytes are
  counted in ``overflow_bytes``; the caller truncates that utterance.
* ``max_message_ms`` (default 200 ms) of audio per ``media`` message.
* Outstanding marks are bounded by the lead: at most
  ``lead / min(mark_interval, 20 ms) + utterances`` at once.

Gaps. The playout also estimates when Twilio runs out of audio *inside* an
utterance: it assumes Twilio plays in real time from the moment audio is sent
(it really starts a little later, so the estimate errs towards reporting a
gap). When a continuation goes out after that estimated end, a ``PlayoutGap``
is recorded with its cause: ``tts_late`` (the audio had not arrived from
Cartesia) or ``held`` (it was here, whole frames, but the lead window was
waiting for a mark echo). ``take_gaps`` hands them to the caller. Silence
between utterances is not a gap. What the bridge cannot see: how late its own
event loop read the chunk from the socket (that shows as ``tts_late``; see the
event-loop lag metric).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final, Union

from bridge.defaults import PLAYOUT_LEAD_MS, PLAYOUT_MARK_INTERVAL_MS
from telephony.media import BYTES_PER_MS, FRAME_BYTES, MULAW_SILENCE

_SILENCE_FRAME: Final = bytes([MULAW_SILENCE]) * FRAME_BYTES


def _frames_floor(n: int) -> int:
    return n - n % FRAME_BYTES


@dataclass(slots=True)
class UtteranceAudio:
    """One utterance's audio on the call's timeline."""

    utterance_id: str
    pending: bytearray = field(default_factory=bytearray)
    received_bytes: int = 0
    sent_bytes: int = 0  # including padding
    finished: bool = False
    start_pos: int | None = None  # sent-timeline position of its first byte
    #: monotonic s since which ``pending`` has held at least one whole frame (None: it has not)
    sendable_since: float | None = None


@dataclass(slots=True)  # not frozen: one per mark (a frozen __init__ costs several times more)
class MarkInfo:
    name: str
    position: int  # sent-timeline position the mark follows
    sent_at: float  # monotonic seconds
    utterance_id: str | None  # set when this mark ends an utterance


@dataclass(slots=True)  # not frozen: one per mark (see ``MarkInfo``)
class SendMark:
    name: str


OutboundItem = Union[bytes, SendMark]


@dataclass(frozen=True, slots=True)
class PlayoutGap:
    """Estimated silence inside an utterance (see module docstring)."""

    utterance_id: str
    cause: str  # "tts_late" or "held" (the label values of metrics' playout_gaps)
    seconds: float
    at_ms: int  # position in the utterance where the silence fell


#: Shorter estimated gaps are not recorded (the estimate is not that exact), s.
GAP_TOLERANCE_S: Final = 0.001


@dataclass(slots=True)
class MarkResult:
    """What a mark echo meant."""

    status: str  # "played", "flushed" or "unknown"
    round_trip_s: float | None = None
    completed_utterances: list[tuple[str, int]] = field(default_factory=list)  # (id, played ms)


@dataclass(slots=True)
class ClearResult:
    """What a ``clear`` threw away. ``played_ms`` per utterance it cut."""

    cut_utterances: list[tuple[str, int]]
    dropped_bytes: int


class Playout:
    """Per-call outbound playout state machine (see module docstring for limits)."""

    def __init__(
        self,
        *,
        lead_ms: int = PLAYOUT_LEAD_MS,
        mark_interval_ms: int = PLAYOUT_MARK_INTERVAL_MS,
        max_buffer_ms: int = 60_000,
        max_message_ms: int = 200,
    ) -> None:
        if lead_ms < 20:
            raise ValueError("lead_ms must be at least one 20 ms frame")
        self.lead_bytes = _frames_floor(lead_ms * BYTES_PER_MS)
        self.mark_interval_bytes = max(FRAME_BYTES, _frames_floor(mark_interval_ms * BYTES_PER_MS))
        self.max_buffer_bytes = max_buffer_ms * BYTES_PER_MS
        self.max_message_bytes = max(FRAME_BYTES, _frames_floor(max_message_ms * BYTES_PER_MS))
        self.sent = 0
        self.played = 0
        self.buffered_bytes = 0  # unsent bytes across utterances
        self.overflow_bytes = 0
        self.unknown_marks = 0
        self._utterances: deque[UtteranceAudio] = deque()
        self._by_id: dict[str, UtteranceAudio] = {}
        self._marks: OrderedDict[str, MarkInfo] = OrderedDict()
        self._flushed: set[str] = set()
        self._mark_seq = 0
        self._last_mark_pos = 0
        self._waiting_since: float | None = None
        # Estimated monotonic s at which Twilio has played everything sent (None: nothing playing).
        self._play_end: float | None = None
        self._gaps: list[PlayoutGap] = []
        # When the latest echo advanced ``played`` (None: no echo since the start or the last clear).
        self._played_at: float | None = None
        # Utterances sent completely, waiting for their end mark's echo.
        self._awaiting_end: dict[str, UtteranceAudio] = {}

    # ------------------------------------------------------------------ input

    def open(self, utterance_id: str) -> None:
        """Queue an utterance; it plays after every utterance opened before it."""
        if utterance_id in self._by_id:
            raise ValueError(f"utterance {utterance_id!r} already open")
        utt = UtteranceAudio(utterance_id)
        self._utterances.append(utt)
        self._by_id[utterance_id] = utt

    def push(self, utterance_id: str, audio: bytes, now: float) -> bool:
        """Add audio for an open utterance. ``False``: refused (buffer full or
        utterance unknown/finished); overflow bytes are counted."""
        utt = self._by_id.get(utterance_id)
        if utt is None or utt.finished:
            return False
        if self.buffered_bytes + len(audio) > self.max_buffer_bytes:
            self.overflow_bytes += len(audio)
            return False
        if utt.sendable_since is None and len(utt.pending) + len(audio) >= FRAME_BYTES:
            utt.sendable_since = now
        utt.pending += audio
        # Forwarding delay starts when a whole frame can go out now: this is the
        # head utterance and the lead has room. A sub-frame tail waiting for the
        # next chunk, or audio queued behind another utterance, is not delay of ours.
        if (self._waiting_since is None and len(utt.pending) >= FRAME_BYTES and self._utterances[0] is utt
                and self.sent - self.played < self.lead_bytes):
            self._waiting_since = now
        utt.received_bytes += len(audio)
        self.buffered_bytes += len(audio)
        return True

    def finish(self, utterance_id: str) -> None:
        """No more audio will come for this utterance (Cartesia ``done``)."""
        utt = self._by_id.get(utterance_id)
        if utt is not None:
            utt.finished = True

    def truncate(self, utterance_id: str, keep_bytes: int) -> int:
        """Keep only the first ``keep_bytes`` received for an open utterance
        (never less than what was already sent); returns the bytes kept."""
        utt = self._by_id.get(utterance_id)
        if utt is None:
            return 0
        keep = max(keep_bytes, utt.sent_bytes)
        drop = max(0, utt.received_bytes - keep)
        if drop:
            del utt.pending[len(utt.pending) - drop :]
            utt.received_bytes -= drop
            self.buffered_bytes -= drop
        return utt.received_bytes

    def discard(self, utterance_id: str) -> int:
        """Drop an utterance that has not started playing; returns bytes dropped.

        For one that has started, use ``clear`` (Twilio must be told too).
        """
        utt = self._by_id.get(utterance_id)
        if utt is None or utt.start_pos is not None:
            return 0
        self._utterances.remove(utt)
        del self._by_id[utterance_id]
        dropped = len(utt.pending)
        self.buffered_bytes -= dropped
        return dropped

    # ----------------------------------------------------------------- output

    def _new_mark(self, now: float, utterance_id: str | None) -> SendMark:
        self._mark_seq += 1
        name = f"m{self._mark_seq}"
        self._marks[name] = MarkInfo(name, self.sent, now, utterance_id)
        self._last_mark_pos = self.sent
        return SendMark(name)

    def take(self, now: float) -> list[OutboundItem]:
        """Everything that may be sent now, in order: audio (whole frames,
        at most ``max_message_ms`` each) and marks."""
        out: list[OutboundItem] = []
        while self._utterances:
            utt = self._utterances[0]
            room = self.lead_bytes - (self.sent - self.played)
            if room < FRAME_BYTES:
                break
            available = len(utt.pending)
            if utt.finished and available % FRAME_BYTES:
                pad = FRAME_BYTES - available % FRAME_BYTES
                utt.pending += _SILENCE_FRAME[:pad]
                self.buffered_bytes += pad
                available += pad
            whole = _frames_floor(available)
            if whole:
                next_mark_at = self._last_mark_pos + self.mark_interval_bytes
                size = min(whole, _frames_floor(room), self.max_message_bytes, max(FRAME_BYTES, next_mark_at - self.sent))
                audio = bytes(utt.pending[:size])
                del utt.pending[:size]
                play_end = self._play_end
                if utt.start_pos is None:
                    utt.start_pos = self.sent
                elif play_end is not None and now - play_end > GAP_TOLERANCE_S:
                    since = utt.sendable_since
                    cause = "held" if since is not None and since <= play_end else "tts_late"
                    self._gaps.append(PlayoutGap(utt.utterance_id, cause, now - play_end,
                                                 (self.sent - utt.start_pos) // BYTES_PER_MS))
                self._play_end = (now if play_end is None or play_end < now else play_end) + size / (BYTES_PER_MS * 1000)
                if len(utt.pending) < FRAME_BYTES:
                    utt.sendable_since = None
                self.sent += size
                utt.sent_bytes += size
                self.buffered_bytes -= size
                out.append(audio)
                if self.sent >= next_mark_at:
                    out.append(self._new_mark(now, None))
                continue
            if utt.finished:
                # Fully sent: its end mark tells us when it has been heard.
                self._utterances.popleft()
                del self._by_id[utt.utterance_id]
                if utt.start_pos is None:
                    continue  # produced no audio at all
                mark = self._new_mark(now, utt.utterance_id)
                self._awaiting_end[mark.name] = utt
                out.append(mark)
                continue
            break
        if out and self._last_mark_pos < self.sent and self.buffered_bytes == 0:
            out.append(self._new_mark(now, None))
        return out

    @property
    def has_gaps(self) -> bool:
        """Gaps are waiting for ``take_gaps``."""
        return bool(self._gaps)

    def take_gaps(self) -> list[PlayoutGap]:
        """Gaps recorded since the last call (see module docstring)."""
        gaps, self._gaps = self._gaps, []
        return gaps

    def take_forward_start(self) -> float | None:
        """When the audio about to be sent became sendable (once per burst), or
        ``None``; call right before using ``take``'s audio."""
        since = self._waiting_since
        self._waiting_since = None
        return since

    # ------------------------------------------------------------- feedback

    def on_mark(self, name: str, now: float) -> MarkResult:
        """A Twilio mark echo: advance the played cursor (or count a flush)."""
        if name in self._flushed:
            self._flushed.discard(name)
            return MarkResult("flushed")
        if name not in self._marks:
            self.unknown_marks += 1
            return MarkResult("unknown")
        result = MarkResult("played")
        # Echoes arrive in order; an echo also confirms every earlier mark.
        while self._marks:
            mark_name, info = self._marks.popitem(last=False)
            self.played = max(self.played, info.position)
            utt = self._awaiting_end.pop(mark_name, None)
            if utt is not None:
                result.completed_utterances.append((utt.utterance_id, utt.sent_bytes // BYTES_PER_MS))
            if mark_name == name:
                result.round_trip_s = now - info.sent_at
                break
        self._played_at = now
        return result

    def clear(self, now: float | None = None) -> ClearResult:
        """Twilio ``clear`` was sent: every queued utterance is cut, every
        outstanding mark becomes flushed, and the lead window restarts at the
        played cursor. ``now``: when, for the heard estimate (``heard_position``);
        without it only what mark echoes confirmed counts as heard."""
        cut: list[tuple[str, int]] = []
        dropped = 0
        heard = self.played if now is None else self.heard_position(now)
        for utt in self._utterances:
            if utt.start_pos is not None:
                cut.append((utt.utterance_id, self._heard_ms_of(utt, heard)))
            dropped += len(utt.pending)
        for utt in self._awaiting_end.values():
            cut.append((utt.utterance_id, self._heard_ms_of(utt, heard)))
        self._utterances.clear()
        self._by_id.clear()
        self._awaiting_end.clear()
        self._flushed.update(self._marks)
        self._marks.clear()
        self.buffered_bytes = 0
        self.sent = self.played
        self._last_mark_pos = self.sent
        self._waiting_since = None
        self._play_end = None  # Twilio's buffer is empty after a clear
        self._played_at = None
        return ClearResult(cut, dropped)

    # --------------------------------------------------------------- queries

    def played_ms_of(self, utt: UtteranceAudio) -> int:
        """Milliseconds of ``utt`` confirmed played (by mark echoes)."""
        return self._heard_ms_of(utt, self.played)

    def heard_position(self, now: float) -> int:
        """Where the caller is on the sent timeline at ``now`` (bytes), at least ``played``.

        Between echoes Twilio plays in real time, so after the echo of the mark at
        ``played`` the caller moves on by 8 bytes per ms; never past the next mark
        not yet echoed (the caller has not reached it, or its echo is on the way),
        which also stops the estimate where sent audio ran out. Without an echo
        since the start or the last ``clear`` it is ``played``: before the first
        echo the bridge cannot tell when playing began. So marks every 200 ms report
        what was heard as closely as marks every 20 ms would, never more than was.
        """
        played_at = self._played_at
        if played_at is None or now <= played_at:
            return self.played
        limit = next(iter(self._marks.values())).position if self._marks else self.sent
        return max(self.played, min(limit, self.played + round((now - played_at) * 1000) * BYTES_PER_MS))

    @staticmethod
    def _heard_ms_of(utt: UtteranceAudio, position: int) -> int:
        if utt.start_pos is None:
            return 0
        heard = min(max(position - utt.start_pos, 0), utt.sent_bytes)
        return heard // BYTES_PER_MS

    def utterance(self, utterance_id: str) -> UtteranceAudio | None:
        return self._by_id.get(utterance_id)

    def playing_utterance(self) -> UtteranceAudio | None:
        """The utterance whose audio Twilio is playing or about to play."""
        if self._awaiting_end:
            return next(iter(self._awaiting_end.values()))
        for utt in self._utterances:
            if utt.start_pos is not None:
                return utt
        return None

    @property
    def outstanding_marks(self) -> int:
        return len(self._marks)

    @property
    def is_idle(self) -> bool:
        """Nothing queued, nothing unplayed."""
        return not self._utterances and not self._marks and not self._awaiting_end
