"""Property-based fuzz of ``CallCore``: random event sequences from Twilio, the agent and Cartesia.

A small model of Twilio and Cartesia sits around the core and checks, after every event:

* no exception escapes the core;
* every message to Twilio is one Twilio accepts (strict ``parse_outbound``);
* sent - played <= lead, in bytes, as Twilio sees it (played advances only with the echo of a mark
  placed after that audio; a ``clear`` drops everything unplayed);
* no audio of a context reaches Twilio after the ``clear`` that tombstoned it, and never more audio of
  a context than Cartesia delivered while that context was live (late chunks are dropped). Each
  context's audio is one distinct byte value, so every byte sent names its context;
* the words in an ``interrupt`` (and in an incomplete ``spoken``) to the agent are words that were
  sent to Cartesia for that utterance;
* after ``on_end`` no context or utterance is left, and every live context was cancelled.
"""

from __future__ import annotations

import base64
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.call import (
    CallCore,
    CallSettings,
    CancelCartesia,
    EndCall,
    ResumeLater,
    ToAgent,
    ToCartesia,
    ToTwilio,
)
from bridge.cartesia.protocol import Chunk, Done, ErrorMessage, FlushDone, WordTimestamps
from metrics import BridgeMetrics
from telephony.media import FRAME_BYTES, MULAW_SILENCE, OutClear, OutMark, OutMedia, Start, parse_outbound
from telephony.simulator import SILENCE_FRAME, SPEECH_FRAME
from tests.fuzz_strategies import FUZZ

#: One registry for every example: a new one per example would cost more than the example.
METRICS = BridgeMetrics()
STREAM_SID = "MZfuzz"


@dataclass
class Model:
    """What Twilio and Cartesia have seen of the core so far."""

    core: CallCore
    lead_bytes: int
    hostile: bool = False
    sent: int = 0  # Twilio's timeline: bytes of media received since the stream began, minus cleared
    played: int = 0  # position of the last echoed mark
    marks: deque[tuple[str, int]] = field(default_factory=deque)  # outstanding (name, position)
    flushed: list[str] = field(default_factory=list)  # marks cleared before their echo
    ctx_byte: dict[str, int] = field(default_factory=dict)  # context id -> its audio's byte value
    ctx_utt: dict[str, str] = field(default_factory=dict)  # context id -> utterance id
    ctx_text: dict[str, str] = field(default_factory=dict)  # transcript sent to each context
    ctx_words_timed: Counter[str] = field(default_factory=Counter)  # words already timestamped per ctx
    ctx_time: dict[str, float] = field(default_factory=dict)  # end of the last timestamp per ctx, s
    live: set[str] = field(default_factory=set)
    fed_live: Counter[int] = field(default_factory=Counter)  # byte value -> bytes fed while live
    heard_bytes: Counter[int] = field(default_factory=Counter)  # byte value -> bytes sent to Twilio
    dead: set[int] = field(default_factory=set)  # byte values tombstoned by a clear
    utt_words: dict[str, Counter[str]] = field(default_factory=dict)  # words sent to Cartesia per utterance
    resumes: list[str] = field(default_factory=list)
    ended: bool = False
    now: float = 0.0

    def byte_of(self, ctx: str) -> int:
        if ctx not in self.ctx_byte:
            value = len(self.ctx_byte) % 254 + 1  # 1..254: never the 0xFF padding
            self.ctx_byte[ctx] = value
        return self.ctx_byte[ctx]

    # ------------------------------------------------------------ checking actions

    def apply(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, ToTwilio):
                self._twilio(action.text)
            elif isinstance(action, ToCartesia):
                ctx = action.context_id
                utt = self.core.contexts.get(ctx)
                utt_id = utt.utterance_id if utt is not None else self.ctx_utt.get(ctx, ctx)
                if ctx not in self.ctx_utt:
                    self.ctx_utt[ctx] = utt_id
                    self.live.add(ctx)
                    self.byte_of(ctx)
                self.ctx_text[ctx] = self.ctx_text.get(ctx, "") + action.request.transcript
                self.utt_words.setdefault(utt_id, Counter()).update(action.request.transcript.split())
            elif isinstance(action, CancelCartesia):
                self.live.discard(action.context_id)
            elif isinstance(action, ResumeLater):
                assert action.delay_s > 0
                self.resumes.append(action.utterance_id)
            elif isinstance(action, ToAgent):
                self._agent(action.message)
            else:
                assert isinstance(action, EndCall)
        core = self.core
        assert core.playout.sent - core.playout.played <= self.lead_bytes

    def _twilio(self, text: str) -> None:
        event = parse_outbound(text, STREAM_SID)  # raises if Twilio would reject it
        if isinstance(event, OutMedia):
            audio = event.payload
            assert audio and len(audio) % FRAME_BYTES == 0
            self.sent += len(audio)
            assert self.sent - self.played <= self.lead_bytes, "more than the lead ahead of what was heard"
            for value, count in Counter(audio).items():
                if value == MULAW_SILENCE:
                    continue  # padding of an utterance's last frame
                assert value not in self.dead, f"audio of context byte {value} sent after its clear"
                self.heard_bytes[value] += count
                assert self.heard_bytes[value] <= self.fed_live[value], \
                    f"more audio of context byte {value} sent than Cartesia delivered while it was live"
        elif isinstance(event, OutMark):
            self.marks.append((event.name, self.sent))
        else:
            assert isinstance(event, OutClear)
            self.flushed.extend(name for name, _ in self.marks)
            self.marks.clear()
            self.sent = self.played
            self.dead.update(self.ctx_byte.values())

    def _agent(self, message: dict[str, Any]) -> None:
        orjson.dumps(message)  # what the bridge sends the agent must encode
        if self.hostile:
            return
        if message["type"] == "interrupt":
            words, utt_id = message["utteranceUntilInterrupt"], message.get("utteranceId")
        elif message["type"] == "spoken" and not message["complete"]:
            words, utt_id = message["text"], message["utteranceId"]
        else:
            return
        heard = Counter(words.split())
        sent = self.utt_words.get(utt_id or "", Counter())
        assert not heard - sent, f"words reported heard {words!r} were never sent for utterance {utt_id}"


# ------------------------------------------------------------------- the events

WORDS = ["one", "two", "three", "four", "five", "six."]
tokens = st.lists(st.sampled_from([*WORDS, " ", "fi", "ve ", "\n"]), max_size=6).map("".join)


def _chunk(model: Model, ctx: str, nbytes: int, *, valid: bool = True) -> list[Any]:
    value = model.byte_of(ctx)
    if ctx in model.live:
        model.fed_live[value] += nbytes
    data = base64.b64encode(bytes([value]) * nbytes).decode() if valid else "%%not base64%%"
    return model.core.on_cartesia(ctx, Chunk(ctx, data), model.now)


def _timestamps(model: Model, ctx: str, count: int, word_s: float) -> list[Any]:
    words = model.ctx_text.get(ctx, "").split()
    done = model.ctx_words_timed[ctx]
    batch = words[done:done + count]
    model.ctx_words_timed[ctx] += len(batch)
    start = model.ctx_time.get(ctx, 0.0)
    starts = [start + i * word_s for i in range(len(batch))]
    ends = [s + word_s * 0.9 for s in starts]
    if batch:
        model.ctx_time[ctx] = starts[-1] + word_s
    return model.core.on_cartesia(ctx, WordTimestamps(ctx, batch, starts, ends), model.now)


@st.composite
def call_settings(draw: st.DrawFn) -> CallSettings:
    return CallSettings(
        model_id="sonic-3", voice_id="v", language="en",
        lead_ms=draw(st.sampled_from([40, 100, 300])),
        mark_interval_ms=draw(st.sampled_from([20, 100, 200])),
        max_buffer_ms=draw(st.sampled_from([1000, 60_000])),
        vad_enabled=draw(st.booleans()), vad_min_speech_ms=40, vad_hangover_ms=40,
    )


def run_call(data: st.DataObject, settings_: CallSettings, steps: int) -> Model:
    ids = itertools.count(1)
    core = CallCore(settings_, METRICS, new_id=lambda: f"u{next(ids)}")
    model = Model(core, settings_.lead_ms * 8 - settings_.lead_ms * 8 % FRAME_BYTES)
    model.apply(core.on_start(Start(STREAM_SID, "CA1", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0))
    draw = data.draw
    for _ in range(steps):
        model.now += draw(st.sampled_from([0.0, 0.001, 0.02, 0.1, 0.5]), label="dt")
        known = sorted(model.ctx_utt)
        live = sorted(model.live)
        kinds = ["agent_text"] * 4 + ["echo"] * 5 + ["interrupt"] * 2 + [
            "config", "garbage", "dtmf", "media", "drop_mark", "echo_flushed", "unknown_mark", "unknown_ctx", "end"]
        if known:
            kinds += ["chunk", "chunk", "timestamps", "done", "done", "error", "lost", "flush_done", "bad_chunk",
                      "hostile_timestamps"]
        if live:
            kinds += ["progress"] * 6
        if model.resumes:
            kinds += ["resume"] * 2
        kind = draw(st.sampled_from(kinds), label="event")
        now = model.now
        actions: list[Any]
        if kind == "agent_text":
            msg: dict[str, Any] = {"type": "text", "token": draw(tokens, label="token"),
                                   "last": draw(st.booleans(), label="last")}
            if draw(st.booleans()):
                msg["interruptible"] = draw(st.booleans())
            actions = core.on_agent_message(orjson.dumps(msg), now)
        elif kind == "interrupt":
            actions = core.on_agent_message('{"type":"interrupt"}', now)
        elif kind == "config":
            actions = core.on_agent_message(orjson.dumps({"type": "config", "vad": draw(st.booleans()),
                                                          "media": draw(st.booleans())}), now)
        elif kind == "garbage":
            actions = core.on_agent_message(draw(st.sampled_from(['{"type":"nope"}', "{", '{"type":"text"}', "[]"])),
                                            now)
        elif kind == "end":
            actions = core.on_agent_message('{"type":"end"}', now)
        elif kind == "dtmf":
            actions = core.on_dtmf("5")
        elif kind == "media":
            actions = core.on_media(draw(st.sampled_from([SPEECH_FRAME, SILENCE_FRAME])), 0, now)
        elif kind == "echo":
            actions = []
            if model.marks:
                name, position = model.marks.popleft()
                model.played = max(model.played, position)
                actions = core.on_mark(name, now)
        elif kind == "drop_mark":
            actions = []
            if model.marks:
                model.marks.popleft()  # never echoed: the next echo confirms it
        elif kind == "echo_flushed":
            actions = core.on_mark(model.flushed.pop(0), now) if model.flushed else []
        elif kind == "unknown_mark":
            actions = core.on_mark("not-ours", now)
        elif kind == "unknown_ctx":
            actions = _chunk(model, f"stranger{draw(st.integers(0, 2))}", 320)
        elif kind == "resume":
            actions = core.resume(model.resumes.pop(draw(st.integers(0, len(model.resumes) - 1))), now)
        else:
            pool = live if live and (kind == "progress" or draw(st.booleans())) else known
            ctx = draw(st.sampled_from(pool), label="context")
            if kind == "progress":
                # Well-behaved Cartesia: the next words' timestamps, then their audio.
                word_s = draw(st.sampled_from([0.02, 0.1, 0.3]), label="word_s")
                count = draw(st.integers(1, 3), label="words")
                actions = _timestamps(model, ctx, count, word_s)
                model.apply(actions)
                actions = _chunk(model, ctx, int(count * word_s * 8000))
            elif kind == "chunk":
                actions = _chunk(model, ctx, draw(st.sampled_from([1, 80, 160, 800, 3200, 9000]), label="bytes"))
            elif kind == "bad_chunk":
                actions = _chunk(model, ctx, 0, valid=False)
            elif kind == "timestamps":
                actions = _timestamps(model, ctx, draw(st.integers(1, 3)), draw(st.sampled_from([0.01, 0.1, 0.4])))
            elif kind == "hostile_timestamps":
                model.hostile = True  # arbitrary words: "words heard" can no longer be checked
                floats = st.floats(allow_nan=True, allow_infinity=True)
                actions = core.on_cartesia(ctx, WordTimestamps(ctx, ["x", "y"], [draw(floats), draw(floats)],
                                                               [draw(floats)]), now)
            elif kind == "done":
                model.live.discard(ctx)
                actions = core.on_cartesia(ctx, Done(ctx), now)
            elif kind == "flush_done":
                actions = core.on_cartesia(ctx, FlushDone(ctx, 1), now)
            elif kind == "error":
                model.live.discard(ctx)
                status = draw(st.sampled_from([429, 500]))
                actions = core.on_cartesia(ctx, ErrorMessage(ctx, status, "fuzz"), now)
            else:
                model.live.discard(ctx)
                actions = core.on_context_lost(ctx, "fuzz", now, retry=draw(st.booleans()),
                                               cause=draw(st.sampled_from(["socket_lost", "no_done", "congested"])))
        model.apply(actions)
    model.apply(core.on_end())
    assert not core.contexts and not core.utterances and core.current is None
    assert not model.live, f"contexts never cancelled at the end of the call: {sorted(model.live)}"
    return model


@settings(FUZZ, max_examples=120)
@given(st.data(), call_settings())
def test_call_core_keeps_its_invariants_under_random_events(data: st.DataObject, settings_: CallSettings) -> None:
    run_call(data, settings_, steps=data.draw(st.integers(5, 60), label="steps"))


def test_a_huge_word_timestamp_does_not_crash_the_core() -> None:
    # Found by the fuzz above (hostile_timestamps with end=2.2e304; orjson carries such floats).
    core = CallCore(CallSettings(model_id="sonic-3", voice_id="v", language="en"), METRICS, new_id=lambda: "u1")
    core.on_start(Start(STREAM_SID, "CA1", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0)
    core.speak("hello there", last=True, now=0.0)
    core.on_cartesia("u1", WordTimestamps("u1", ["hello"], [0.0], [1e305]), 0.0)
    # After the fix: the timestamp is refused or clamped and the call goes on.
    assert "u1" in core.utterances
