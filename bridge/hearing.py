"""The caller's turns: endpointing on inbound audio plus Cartesia STT transcripts. No I/O.

``TurnTracker`` is fed every inbound 20 ms μ-law frame and every STT message of one
call and says what happens next:

* speech **onset**: ``min_speech_ms`` of frames at or above ``threshold_rms`` in one run
  (energy), or recognised words in a transcript while no onset was seen;
* **end of speech**: ``speech_timeout_ms`` of quiet after speech → ``finalize`` is due
  (Cartesia's manual-finalize endpoint turns what it heard into a final transcript);
* the **turn** is complete when the matching ``flush_done`` arrives: its text is every
  final transcript since the previous turn, concatenated as the SDK says (no strip, no
  added spaces), then trimmed once.

Times are monotonic seconds. One ``finalize`` is outstanding at most; speech that
starts while it is outstanding belongs to the next turn. Transcripts that Cartesia
finalized by itself (``max_silence_duration_secs``) are kept and committed by the
next ``flush_done``. Memory: two strings (the turn's text), bounded by
``MAX_TURN_CHARS``; text past that is dropped and counted in ``dropped_chars``.
"""

from __future__ import annotations

import audioop
from dataclasses import dataclass
from typing import Final, Union

from bridge.cartesia.stt_protocol import SttTranscript

#: Longest turn kept (characters); a caller does not say more than this in one turn.
MAX_TURN_CHARS: Final = 8000
FRAME_S: Final = 0.02


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    onset: float  # first loud frame of the run
    source: str  # "energy" or "stt"


@dataclass(frozen=True, slots=True)
class FinalizeDue:
    end_of_speech: float


@dataclass(frozen=True, slots=True)
class PartialText:
    text: str  # cumulative text of the turn so far (final + interim)


@dataclass(frozen=True, slots=True)
class TurnComplete:
    text: str  # empty when nothing was recognised
    end_of_speech: float | None


HearingEvent = Union[SpeechStarted, FinalizeDue, PartialText, TurnComplete]


class TurnTracker:
    """Endpointing and transcript assembly for one call (see the module docstring)."""

    __slots__ = ("speech_timeout_s", "threshold_rms", "min_speech_s", "onset_words", "_loud_s", "_run_onset",
                 "_in_speech", "_last_loud", "_quiet_s", "_final", "_interim", "_finalize_pending",
                 "_pending_end", "_turn_heard", "dropped_chars", "turn_words")

    def __init__(self, *, speech_timeout_ms: int, threshold_rms: int, min_speech_ms: int, onset_words: int = 1) -> None:
        self.speech_timeout_s = speech_timeout_ms / 1000.0
        self.threshold_rms = threshold_rms
        self.min_speech_s = min_speech_ms / 1000.0
        self.onset_words = onset_words
        self._loud_s = 0.0
        self._run_onset: float | None = None
        self._in_speech = False
        self._last_loud: float | None = None
        self._quiet_s = 0.0
        self._final = ""
        self._interim = ""
        self._finalize_pending = False
        self._pending_end: float | None = None  # end of speech of the finalize in flight
        self._turn_heard = False  # an onset was reported for the turn being assembled
        self.dropped_chars = 0
        self.turn_words = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def idle(self) -> bool:
        """No speech, no loud run starting, no finalize outstanding: no turn in progress."""
        return not self._in_speech and self._run_onset is None and not self._finalize_pending

    @property
    def finalize_pending(self) -> bool:
        return self._finalize_pending

    def on_audio(self, mulaw: bytes, now: float) -> list[HearingEvent]:
        """One inbound frame (any length; 8 bytes per ms)."""
        if not mulaw:
            return []
        seconds = len(mulaw) / 8000.0
        loud = audioop.rms(audioop.ulaw2lin(mulaw, 2), 2) >= self.threshold_rms
        out: list[HearingEvent] = []
        if loud:
            if self._run_onset is None:
                self._run_onset = now
            self._loud_s += seconds
            self._quiet_s = 0.0
            self._last_loud = now + seconds
            if not self._in_speech and self._loud_s >= self.min_speech_s - 1e-9:
                self._in_speech = True
                self._turn_heard = True
                out.append(SpeechStarted(self._run_onset, "energy"))
            return out
        self._quiet_s += seconds
        if self._in_speech:
            if self._quiet_s >= self.speech_timeout_s - 1e-9:
                self._in_speech = False
                self._reset_run()
                end = self._last_loud if self._last_loud is not None else now
                out.extend(self._request_finalize(end))
        elif self._quiet_s >= 0.2:  # a short blip that never became speech
            self._reset_run()
        return out

    def _reset_run(self) -> None:
        self._loud_s = 0.0
        self._run_onset = None

    def _request_finalize(self, end_of_speech: float) -> list[HearingEvent]:
        if self._finalize_pending:
            return []
        self._finalize_pending = True
        self._pending_end = end_of_speech
        return [FinalizeDue(end_of_speech)]

    def on_transcript(self, msg: SttTranscript, now: float, *, partials: bool) -> list[HearingEvent]:
        out: list[HearingEvent] = []
        if msg.is_final:
            self._append_final(msg.text)
            self._interim = ""
        else:
            self._interim = msg.text
        words = len((self._final + self._interim).split())
        if words >= self.onset_words > 0 and not self._turn_heard:
            # Speech the energy detector missed (quiet caller): STT heard words.
            self._turn_heard = True
            out.append(SpeechStarted(now, "stt"))
        self.turn_words = max(self.turn_words, words)
        if partials and words:
            out.append(PartialText((self._final + self._interim).strip()))
        if msg.is_final and msg.text.strip() and not self._in_speech and not self._finalize_pending:
            # Cartesia finalized on its own; ask for flush_done so the turn is committed.
            out.extend(self._request_finalize(self._last_loud if self._last_loud is not None else now))
        return out

    def _append_final(self, text: str) -> None:
        room = MAX_TURN_CHARS - len(self._final)
        if len(text) > room:
            self.dropped_chars += len(text) - max(room, 0)
            text = text[: max(room, 0)]
        self._final += text

    def on_flush_done(self, now: float) -> list[HearingEvent]:
        """The outstanding ``finalize`` is done: the turn is complete."""
        if not self._finalize_pending:
            return []
        self._finalize_pending = False
        text = self._final.strip()
        end = self._pending_end
        self._final = ""
        self._interim = ""
        self._pending_end = None
        self.turn_words = 0
        self._turn_heard = self._in_speech  # speech already under way belongs to the next turn
        return [TurnComplete(text, end)]

    def abandon_turn(self) -> str:
        """The STT socket lost the turn in progress: forget it; returns the text that was lost."""
        lost = (self._final + self._interim).strip()
        self._final = ""
        self._interim = ""
        self._finalize_pending = False
        self._pending_end = None
        self.turn_words = 0
        self._turn_heard = self._in_speech
        return lost
