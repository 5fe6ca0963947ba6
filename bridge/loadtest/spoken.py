"""The ``spoken`` scenario: the caller talks, the bridge's STT hears it, the agent answers.

Each simulated call, after the greeting, says sentences in one of the emulator's tone
voices (``CALLER_VOICE_ID``: the emulator's STT recognises its own tone voices from the
audio alone). Every distinct sentence is fetched once from the emulator's ``/tts/bytes``
(``prefetch_speech``) and the same bytes are sent by every call. The bridge listens
(``STT_ENABLED=true``), turns each sentence into a ``prompt`` after ``speechTimeout`` of
quiet, and the agent (built-in, or ``agent_server``) answers "You said <prompt>.".

A turn: pause 0.2-0.6 s after the previous reply has played out, say the sentence, then
wait for the first frame of the reply. About ``BARGE_IN_FRACTION`` of the turns after
the first start instead 0.8-1.2 s into the previous reply, over it (barge-in): the
bridge must ``clear``, and the reply counted is the first audio after that ``clear``.

Measured at the caller, per turn (``turns.SpokenTurn``): the last frame of the sentence
written to the socket -> the first frame of the reply received. The reply's text (from
the emulator's record of the context whose audio the caller heard) is compared with
"You said <sentence>." in ``spoken_report``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from telephony.media import FRAME_BYTES
from telephony.simulator import SimulatedCall, fetch_speech

from .turns import SpokenTurn

if TYPE_CHECKING:
    from .results import CallResult

#: What the callers say: lower case, no punctuation (the STT's words come back normalised so),
#: five words or more so that a reply ("You said ...") outlasts a barge-in 1.2 s into it. No two
#: words here, in the replies or in the greeting sound alike to the emulator's recogniser (same
#: letter count and pitch: "would" and "where" do; checked by tests/test_loadtest_spoken.py).
SENTENCES: Final = (
    "what time does the store open",
    "i would like to check my account",
    "can you help me with my bill",
    "please call me back tomorrow morning",
    "is the office open on sunday",
    "i want to cancel my appointment",
    "tell me about your opening hours",
    "is there a problem with my order",
)
#: The caller's voice: the emulator's "Tone Bass" (a tone voice, so its STT hears it; not the
#: bridge's "Tone Alto", so the two sides of the call never share a voice).
CALLER_VOICE_ID: Final = "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a02"
#: Share of turns (after the first) said over the previous reply.
BARGE_IN_FRACTION: Final = 0.3
#: A barge-in starts this long after the previous reply's first frame arrived, s.
BARGE_IN_AFTER_S: Final = (0.8, 1.2)
#: Pause after the previous reply has played out before the next sentence, s.
PAUSE_S: Final = (0.2, 0.6)
#: No reply this long after the end of speech: the turn is lost.
REPLY_TIMEOUT_S: Final = 8.0
#: A barge-in turn waits this long after the end of speech for the bridge's ``clear``.
CLEAR_WAIT_S: Final = 2.0
#: A turn starts only if the sentence plus this much (endpointing, reply) fits before hang-up.
TURN_BUDGET_S: Final = 2.0
#: μ-law bytes of digital silence (+0 and -0), stripped from the end of fetched speech.
_MULAW_ZEROS: Final = b"\xff\x7f"


def expected_reply(sentence: str) -> str:
    """What the agent says when it heard ``sentence`` right (built-in agent and ``agent_server``)."""
    return f"You said {sentence}."


async def prefetch_speech(http: aiohttp.ClientSession, emulator_http_url: str,
                          sentences: tuple[str, ...] = SENTENCES, voice_id: str = CALLER_VOICE_ID) -> dict[str, bytes]:
    """Each sentence spoken once by the emulator (μ-law 8 kHz), trailing silence removed, so the
    last frame a caller sends is speech; ``RuntimeError`` when the emulator refuses."""
    out: dict[str, bytes] = {}
    for sentence in sentences:
        audio = await fetch_speech(http, emulator_http_url, sentence, voice_id)
        out[sentence] = audio.rstrip(_MULAW_ZEROS)
        if not out[sentence]:
            raise RuntimeError(f"the emulator said {sentence!r} as silence")
    return out


class SpokenCall(SimulatedCall):
    """A ``SimulatedCall`` that knows when its ``say`` frames actually left and what it can say.

    ``speech``: sentence -> μ-law 8 kHz audio (shared by every call, never copied).
    ``said_sent``: frames of ``say`` audio written to the socket so far; ``said_first_at`` /
    ``said_last_at``: monotonic time of the first frame of the current ``say`` and of the
    latest one written.
    """

    def __init__(self, *args: Any, speech: Mapping[str, bytes], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.speech = speech
        self.said_sent = 0
        self.said_first_at: float | None = None
        self.said_last_at: float | None = None
        self._first_frame_of_say = 0

    def say(self, mulaw: bytes) -> float:
        if not self.saying:
            self._first_frame_of_say = self.said_frames + 1
            self.said_first_at = None
        return super().say(mulaw)

    def write_message(self, text: str | bytes) -> None:
        super().write_message(text)
        if self.said_frames != self.said_sent:  # a said frame was just written
            self.said_sent = self.said_frames
            self.said_last_at = time.monotonic()
            if self.said_sent == self._first_frame_of_say:
                self.said_first_at = self.said_last_at


async def _poll(pred: Callable[[], bool], until: float, interval: float = 0.01) -> bool:
    while time.monotonic() < until:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


def _first_reply(call: SimulatedCall, start: int, t_end: float, min_offset: int) -> tuple[int, int | None]:
    """(next index to scan, index of the first arrival at or after ``t_end`` and ``min_offset``)."""
    arr = call.record.arrivals
    i = start
    while i < len(arr):
        t, off, _n, _dry = arr[i]
        if t >= t_end and off >= min_offset:
            return i, i
        i += 1
    return i, None


async def run_spoken(call: SpokenCall, res: CallResult, end_at: float, rng: random.Random) -> None:
    """Spoken turns until ``end_at`` (the greeting has started; see the module docstring)."""
    from .scenarios import QUIET_S, wait_quiet  # scenarios dispatches here

    sentences = sorted(call.speech)
    if not sentences:
        raise ValueError("the spoken scenario needs prefetched speech")
    closed = call.closed.is_set
    last_reply_at: float | None = None
    while not closed() and time.monotonic() < end_at:
        sentence = sentences[(res.index + len(res.turns)) % len(sentences)]
        audio = call.speech[sentence]
        barge = last_reply_at is not None and rng.random() < BARGE_IN_FRACTION
        if last_reply_at is not None and barge:
            await asyncio.sleep(max(0.0, last_reply_at + rng.uniform(*BARGE_IN_AFTER_S) - time.monotonic()))
        else:
            if not await wait_quiet(call, end_at, QUIET_S):
                return
            await asyncio.sleep(rng.uniform(*PAUSE_S))
        if closed() or time.monotonic() + len(audio) / 8000 + TURN_BUDGET_S > end_at:
            return
        turn = SpokenTurn(sentence, barge, time.monotonic())
        res.turns.append(turn)
        if not await _say_turn(call, turn, audio, end_at):
            return
        last_reply_at = turn.t_reply
        if turn.barge_in and turn.t_clear is not None and turn.t_speech_start is not None:
            res.barge_in_s.append(turn.t_clear - turn.t_speech_start)


async def _say_turn(call: SpokenCall, turn: SpokenTurn, audio: bytes, end_at: float) -> bool:
    """Say ``audio`` and wait for the reply, filling ``turn``; False when the call is over."""
    closed = call.closed.is_set
    rec = call.record
    scan = len(rec.arrivals)
    clears0 = len(rec.clear_offsets)
    target = call.said_sent + -(-len(audio) // FRAME_BYTES)
    call.say(audio)
    if not await _poll(lambda: call.said_sent >= target or closed(), end_at, 0.02) or closed():
        turn.outcome = "cut"
        return False
    turn.t_speech_start, turn.t_speech_end = call.said_first_at, call.said_last_at
    t_end = turn.t_speech_end or time.monotonic()
    min_offset = 0
    if turn.barge_in:
        await _poll(lambda: len(rec.clear_offsets) > clears0 or closed(), min(end_at, t_end + CLEAR_WAIT_S))
        if len(rec.clear_offsets) <= clears0:
            # The bridge did not cut the reply: what arrives next may still be it, not an answer.
            turn.outcome = "not_cleared"
            return not closed()
        min_offset = rec.clear_offsets[clears0]
        turn.t_clear = next((t for t, kind, _d in reversed(rec.timeline) if kind == "clear"), None)
    found: int | None = None

    def reply_arrived() -> bool:
        nonlocal scan, found
        scan, found = _first_reply(call, scan, t_end, min_offset)
        return found is not None or closed()

    await _poll(reply_arrived, min(end_at, t_end + REPLY_TIMEOUT_S))
    if found is None:
        turn.outcome = "cut" if closed() or time.monotonic() >= end_at else "lost"
        return turn.outcome == "lost"
    turn.t_reply, turn.reply_offset, _n, _dry = rec.arrivals[found]
    turn.outcome = "replied"
    return True
