"""The agent's streamed words take a cheaper path with the same result (issue 18).

Three layers, each proved against the path it short-cuts:

* ``streamed_text`` (``bridge/agent/protocol.py``) either declines a message or
  returns what ``parse_agent_message`` makes of it; the layouts agents really
  write (orjson / ``JSON.stringify``, Python's ``json.dumps``) are not declined.
* ``CallCore.stream_token`` changes the call's state exactly as
  ``on_agent_message`` does and stands for the same ``ToCartesia`` (or none).
* ``CallContexts.append_text`` writes the same Cartesia inputs, at the same
  moments, as ``send`` with the request the core would have built (real pool,
  real emulator, a virtual clock for the hold timers).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge.agent import protocol as ap
from bridge.call import Action, CallCore, CallSettings, ToCartesia
from bridge.cartesia.client import CartesiaPool, ContextLease
from bridge.cartesia.contexts import MAX_MERGED_CHARS, CallContexts
from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings
from bridge.cartesia.protocol import GenerationRequest, ServerMessage
from metrics import BridgeMetrics
from telephony.media import Start
from tests.fuzz_strategies import FUZZ, json_text, json_values, text_edits

# ------------------------------------------------------------------ the recognizer


def agrees(data: str) -> str:
    """Assert ``streamed_text`` and ``parse_agent_message`` agree on ``data``; say which way it went."""
    try:
        general: ap.AgentMessage | ap.AgentMessageError = ap.parse_agent_message(data)
    except ap.AgentMessageError as exc:
        general = exc
    fast = ap.streamed_text(data)
    if fast is None:
        return "declined"
    assert general == ap.Text(fast[0], fast[1], None, ap.VoiceOverrides(), None), (data, general)
    return "fast"


def compact(token: str, last: bool = False) -> str:
    return orjson.dumps({"type": "text", "token": token, "last": last}).decode()


def spaced(token: str, last: bool = False) -> str:
    return json.dumps({"type": "text", "token": token, "last": last}, ensure_ascii=False)


#: What agents send for a streamed word: the fast path must take it.
TAKEN = [
    compact("Hello "), compact("world.", True), compact(""), compact("", True), compact(" "),
    spaced("Hello "), spaced("there", True), json.dumps({"type": "text", "token": "plain ascii ", "last": False}),
    compact("héllo "), compact("👋 "), compact("日本語"), compact("a\x7fb"), compact("line\u2028sep "),
    compact("{}[]:,"), compact("'single' "), compact("x" * (ap.MAX_AGENT_MESSAGE_BYTES - 40)),
    '{"type":"text","token":"last","last":true}',
]

#: Valid messages the fast path leaves to the parser, and broken ones both must refuse alike.
DECLINED = [
    compact('say "hi" '), compact("back\\slash "), compact("new\nline "), compact("tab\t"),
    json.dumps({"type": "text", "token": "é", "last": False}),  # json.dumps escapes non-ASCII by default
    '{"token":"Hello ","type":"text","last":false}', '{"type":"text","last":false,"token":"Hello "}',
    '{"type": "text", "token": "Hello", "last": false, "lang": "en-US", "interruptible": true, "preemptible": false}',
    '{"type":"text","token":"Hi ","last":false,"interruptible":"speech"}',
    '{"type":"text","token":"Hi ","last":false,"voice":"v2"}',
    '{"type":"text","token":"Hi "}', '{"type":"text","token":"Hi ","last":0}', '{"type":"text","token":"Hi ","last":"false"}',
    '{"type":"text","token":null,"last":false}', '{"type":"text","token":1,"last":false}',
    ' {"type":"text","token":"Hi ","last":false}', '{"type":"text","token":"Hi ","last":false}\n',
    '{"type":"text","token":"Hi ","last":false} ', '{"type":"text", "token":"Hi ","last":false}',
    '{"type":"text","token":"Hi","last":false}}', '{"type":"text","token":"Hi","last":fals}',
    '{"type":"text","token":","last":false}',  # head and tail share a quote: not JSON
    '{"type":"text","token":",last":false}', '{"type":"text","token":"","last":false,"last":true}',
    '{"type":"text","token":"a","last":false}{"type":"text","token":"b","last":false}',
    '{"type":"text","token":"\\u0041","last":false}', '{"type":"text","token":"a\x00","last":false}',
    '{"type":"text","token":"a\x1f","last":false}', '{"type":"text","token":"\ud800","last":false}',
    compact("x" * ap.MAX_AGENT_MESSAGE_BYTES),  # oversized
    '{"type":"play","token":"Hi ","last":false}', '{"type":"interrupt"}', "", "{}", "[]", "null", "{not json",
    '{"type":"text"', '"type":"text","token":"Hi ","last":false}',
]


@pytest.mark.parametrize("data", TAKEN)
def test_agents_streamed_words_take_the_fast_path(data: str) -> None:
    assert agrees(data) == "fast"


@pytest.mark.parametrize("data", DECLINED)
def test_what_the_fast_path_cannot_vouch_for_goes_to_the_parser(data: str) -> None:
    assert agrees(data) == "declined"


@st.composite
def text_messages(draw: st.DrawFn) -> str:
    """A ``text`` message as some agent might write it: keys in any order, extra fields, any
    token and ``last`` values, one of several JSON writers (about a third in a fast layout)."""
    token = draw(st.sampled_from(["w ", "", "a b", "é."]) | json_text)
    obj: dict[str, Any] = {"type": draw(st.sampled_from(["text"] * 6 + ["TEXT", "play", "text "])), "token": token}
    shape = draw(st.sampled_from(["bool"] * 4 + ["absent", "other"]))
    if shape == "bool":
        obj["last"] = draw(st.booleans())
    elif shape == "other":
        obj["last"] = draw(json_values(3))
    if draw(st.integers(0, 3)) == 0:
        for key in draw(st.lists(st.sampled_from(["lang", "interruptible", "preemptible", "voice", "x"]),
                                 min_size=1, max_size=2)):
            obj[key] = draw(st.booleans() | json_text)
    keys = list(obj)
    if draw(st.integers(0, 3)) == 0:
        keys = draw(st.permutations(keys))
    ordered = {k: obj[k] for k in keys}
    writer = draw(st.sampled_from(["orjson", "json", "json-utf8", "json-compact"]))
    if writer == "orjson":
        return orjson.dumps(ordered).decode()
    if writer == "json-compact":
        return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(ordered, ensure_ascii=writer == "json")


@settings(FUZZ, max_examples=200)
@given(text_messages())
def test_fast_path_and_parser_agree_on_any_text_message(data: str) -> None:
    agrees(data)


@settings(FUZZ, max_examples=300)
@given(json_text, st.booleans(), st.sampled_from([compact, spaced]))
def test_every_escape_free_token_is_taken(token: str, last: bool, layout: Any) -> None:
    data = layout(token, last)
    expected = "declined" if any(c in token for c in '"\\') or any(ord(c) < 0x20 for c in token) else "fast"
    assert agrees(data) == expected


def edited() -> st.SearchStrategy[str]:
    """A streamed-word message with a few characters replaced, inserted or deleted."""
    return text_edits([compact("Hello "), compact("", True), spaced("word "), compact('a"b')],
                      list('"\\{}:, \n\x00\ud800éat') + ["\\u0041", '","', "true", "false", '"last":'])


@settings(FUZZ, max_examples=300)
@given(edited())
def test_fast_path_and_parser_agree_on_edited_messages(data: str) -> None:
    agrees(data)


@settings(FUZZ, max_examples=300)
@given(st.text(max_size=80))
def test_fast_path_and_parser_agree_on_any_text(data: str) -> None:
    agrees(data)


# ------------------------------------------------------------------ the call core


def make_core() -> CallCore:
    counter = itertools.count(1)
    core = CallCore(CallSettings(model_id="sonic-3", voice_id="v", language="en", max_buffer_delay_ms=300),
                    BridgeMetrics(), new_id=lambda: f"u{next(counter)}")
    core.on_start(Start("MZ1", "CA1", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0)
    return core


def by_parser(core: CallCore, raw: str, now: float) -> list[Action]:
    """``on_agent_message`` as it was before the fast path: every message through the parser."""
    with mock.patch.object(ap, "streamed_text", lambda data: None):
        return core.on_agent_message(raw, now)


def by_fast_path(core: CallCore, raw: str, now: float) -> list[Action]:
    """What ``CallSession._deliver_from_agent`` does, as actions."""
    streamed = core.stream_token(raw, now)
    if streamed is None:
        return core.on_agent_message(raw, now)
    context_id, text = streamed
    return [ToCartesia(context_id, core.text_request(text))] if text else []


def state(core: CallCore) -> tuple[object, ...]:
    return (core.current, core.dropping_turn, core.utterances, sorted(core.contexts), core.ended)


TOKENS = st.sampled_from(["Hel", "lo ", "world", ", ", "how\n", "are\t", " you", "?", "", " ", "é ", "x" * 40,
                          "done. ", "a b c "])


@st.composite
def agent_turns(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Agent messages (mostly streamed words) and events that change what the fast path may take."""
    steps: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["word"] * 8 + ["last", "other", "interrupt", "bad", "lost", "resume"]))
        token = draw(TOKENS)
        if kind == "word":
            steps.append(("agent", draw(st.sampled_from([compact, spaced]))(token)))
        elif kind == "last":
            steps.append(("agent", compact(token, True)))
        elif kind == "other":
            steps.append(("agent", orjson.dumps({"type": "text", "token": token, "last": draw(st.booleans()),
                                                 "interruptible": draw(st.booleans())}).decode()))
        elif kind == "interrupt":
            steps.append(("agent", '{"type":"interrupt"}'))
        elif kind == "bad":
            steps.append(("agent", compact(token)[:-1]))
        else:
            steps.append((kind, ""))
    return steps


@settings(FUZZ, max_examples=150)
@given(agent_turns())
def test_stream_token_is_on_agent_message_without_the_action_list(steps: list[tuple[str, str]]) -> None:
    reference, fast = make_core(), make_core()
    for i, (kind, raw) in enumerate(steps):
        now = 1.0 + i / 50
        if kind == "agent":
            assert by_fast_path(fast, raw, now) == by_parser(reference, raw, now), raw
        elif kind == "lost" and reference.current is not None:
            # A congested socket: the utterance waits to resume (stream_token must step aside).
            ctx = reference.current.context_id
            assert fast.on_context_lost(ctx, "x", now, retry=True, cause="congested") == \
                reference.on_context_lost(ctx, "x", now, retry=True, cause="congested")
        elif kind == "resume" and reference.current is not None:
            uid = reference.current.utterance_id
            assert fast.resume(uid, now) == reference.resume(uid, now)
        assert state(fast) == state(reference)


def test_stream_token_takes_the_open_utterances_words_only() -> None:
    core = make_core()
    assert core.stream_token(compact("Hello "), 1.0) is None, "the first word opens the utterance: speak()"
    core.on_agent_message(compact("Hello "), 1.0)
    assert core.stream_token(compact("wor"), 1.1) == ("u1", ""), "a partial word waits"
    assert core.stream_token(compact("ld, how "), 1.2) == ("u1", "world, how ")
    assert core.text_request("world, how ") == core._request(core.contexts["u1"], "world, how ", cont=True)
    assert core.stream_token(compact("you", True), 1.3) is None, "last closes the context: speak()"
    assert core.stream_token('{"type":"text","token":"x ","last":false,"lang":"fr-FR"}', 1.4) is None
    assert core.current is not None and core.current.text_sent == "Hello world, how "


# ------------------------------------------------------------------ the call's contexts


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio's loop whose clock the test moves (``virtual``; real time while it is None)."""

    virtual: float | None = None

    def time(self) -> float:
        return super().time() if self.virtual is None else self.virtual


class Owner:
    """The session's side of ``CallContexts``: records failures."""

    closed = False

    def __init__(self) -> None:
        self.failed: list[str] = []

    def on_tts_message(self, context_id: str, msg: ServerMessage, received_at: float) -> None:
        pass

    def on_tts_failed(self, context_id: str, reason: str, *, retry: bool, cause: str) -> None:
        self.failed.append(cause)


class Rig:
    """One emulator and pool on a virtual-clock loop, shared by the examples (fresh contexts each)."""

    def __init__(self) -> None:
        self.loop = VirtualClockLoop()
        self.emulator = Emulator(EmulatorSettings(ttfb_ms=1))
        self.loop.run_until_complete(self.emulator.start())
        self.pool = CartesiaPool(url=str(self.emulator.url), api_key=None, version="2026-03-01",
                                 metrics=BridgeMetrics(), size=1, max_concurrency=64, max_age_s=3600)
        assert self.loop.run_until_complete(self.pool.prewarm(5))
        self.examples = itertools.count()

    def close(self) -> None:
        self.loop.virtual = None
        self.loop.run_until_complete(self.pool.close())
        self.loop.run_until_complete(self.emulator.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    made = Rig()
    try:
        yield made
    finally:
        made.close()


def word(ctx: str, text: str, *, cont: bool = True, flush: bool = False) -> GenerationRequest:
    return GenerationRequest(ctx, text, "sonic-3", DEFAULT_VOICE_ID, continue_=cont, flush=flush, language="en",
                             add_timestamps=True, max_buffer_delay_ms=300)


PIECES = st.sampled_from(["One ", "two ", "three, ", "four. ", "five", "! ", " ", "six; ", "“q” ", "y" * 300,
                          "z" * 990, "end?) ", "\n"])


@st.composite
def held_runs(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A context's inputs as an agent streams them, with loop turns and time between them."""
    steps: list[tuple[str, str]] = [("word", draw(PIECES))]
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["word"] * 5 + ["turn", "wait", "flush"]))
        steps.append((kind, draw(PIECES) if kind in ("word", "flush") else str(draw(st.integers(1, 120)))))
    if draw(st.booleans()):
        steps.append(("close", draw(st.sampled_from(["", "last."]))))
    return steps


async def run_both(rig: Rig, steps: list[tuple[str, str]]) -> tuple[list[Any], list[Any], list[int]]:
    """The same inputs into two calls' contexts: by ``send`` only, and by ``append_text`` where the
    session uses it. Returns the requests each wrote (step index, request with a common id) and how
    many inputs ``append_text`` took."""
    n = next(rig.examples)
    by_send = CallContexts(rig.pool, Owner(), BridgeMetrics(), admission_timeout_s=5, context_timeout_s=60,
                           text_hold_ms=80)
    by_append = CallContexts(rig.pool, Owner(), BridgeMetrics(), admission_timeout_s=5, context_timeout_s=60,
                             text_hold_ms=80)
    ctx_send, ctx_append = f"s{n}", f"a{n}"
    written: dict[str, list[Any]] = {ctx_send: [], ctx_append: []}
    step = [0]
    lease_send = ContextLease.send

    def recording_send(lease: ContextLease, request: GenerationRequest) -> None:
        written[request.context_id].append((step[0], replace(request, context_id="ctx")))
        lease_send(lease, request)

    appended = [0]
    rig.loop.virtual = rig.loop.time()
    with mock.patch.object(ContextLease, "send", recording_send):
        for i, (kind, text) in enumerate(steps):
            step[0] = i
            if kind == "word":
                by_send.send(ctx_send, word(ctx_send, text))
                if by_append.append_text(ctx_append, text):
                    appended[0] += 1
                else:
                    by_append.send(ctx_append, word(ctx_append, text))
            elif kind in ("flush", "close"):
                by_send.send(ctx_send, word(ctx_send, text, cont=kind == "flush", flush=kind == "flush"))
                by_append.send(ctx_append, word(ctx_append, text, cont=kind == "flush", flush=kind == "flush"))
            elif kind == "turn":
                await asyncio.sleep(0)
            else:
                rig.loop.virtual += int(text) / 1000
                await asyncio.sleep(0)  # the loop's next turn runs the timers now due, after this task's step
                await asyncio.sleep(0)
            assert (by_send.held_inputs, by_send.timers) == (by_append.held_inputs, by_append.timers)
        step[0] = len(steps)
        for _ in range(3):  # whatever is held goes within the hold
            rig.loop.virtual += 0.05
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    assert by_send.held_inputs == by_append.held_inputs == 0
    for contexts in (by_send, by_append):
        contexts.close()
        assert contexts.timers == 0 and not contexts._last_written and not contexts._held_text
    rig.loop.virtual = None
    return written[ctx_send], written[ctx_append], appended


@settings(FUZZ, max_examples=100)
@given(held_runs())
def test_append_text_writes_what_send_writes_at_the_same_moments(rig: Rig, steps: list[tuple[str, str]]) -> None:
    by_send, by_append, _ = rig.loop.run_until_complete(run_both(rig, steps))
    assume(by_send)  # (never false: the first input is always written)
    assert by_append == by_send


def test_append_text_joins_words_and_writes_them_as_send_does(rig: Rig) -> None:
    steps = [("word", "One "), ("turn", ""), ("word", "two "), ("turn", ""), ("word", "three "), ("turn", ""),
             ("wait", "100"), ("word", "four "), ("word", "five. "), ("word", "z" * 990), ("word", "y" * 300),
             ("close", "")]
    by_send, by_append, appended = rig.loop.run_until_complete(run_both(rig, steps))
    assert by_append == by_send
    assert appended[0] == 5, "every word but the first input and the one past the length cap"
    assert [(s, r.transcript, r.continue_) for s, r in by_send] == [
        (1, "One ", True),  # the first input: at the end of its loop turn
        (6, "two three ", True),  # the hold (80 ms) expired
        (8, "four five. ", True),  # a sentence end: at once
        (10, "z" * 990, True),  # the next input would pass the length cap: what was held goes first
        (11, "y" * 300, False),  # the close joins what was held and goes at once
    ]
    assert MAX_MERGED_CHARS == 1000
