"""Streamed agent text is held and joined before it goes to Cartesia (``CallContexts``, real pool + emulator).

An agent streams a word per message, each handled in its own loop turn. The bridge writes a
context's first input at the end of its turn, then holds continuations until a sentence end
(at once), a clause end (end of the turn), the close, a flush, a change of settings, the length
cap, or ``text_hold_ms`` after the first held word.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.cartesia.contexts import MAX_MERGED_CHARS, CallContexts
from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings
from bridge.cartesia.protocol import GenerationRequest, ServerMessage
from bridge.config import Config, ConfigError
from metrics import BridgeMetrics
from tests.test_pool import pool_on_emulator

from .test_call_e2e import wait_for

CTX = "utt-1"


class Owner:
    """The call session's side of ``CallContexts``: records what it is told."""

    def __init__(self) -> None:
        self.closed = False
        self.failed: list[tuple[str, str]] = []

    def on_tts_message(self, context_id: str, msg: ServerMessage, received_at: float) -> None:
        pass

    def on_tts_failed(self, context_id: str, reason: str, *, retry: bool, cause: str) -> None:
        self.failed.append((context_id, cause))


def word(text: str, *, cont: bool = True, ctx: str = CTX, language: str | None = "en",
         flush: bool = False) -> GenerationRequest:
    return GenerationRequest(ctx, text, "sonic-3", DEFAULT_VOICE_ID, continue_=cont, flush=flush,
                             language=language, max_buffer_delay_ms=300)


def inputs(emulator: Emulator, ctx: str = CTX) -> list[tuple[str, bool]]:
    return [(obj["transcript"], obj["continue"]) for _c, obj in emulator.received
            if obj.get("context_id") == ctx and "transcript" in obj]


async def stream(contexts: CallContexts, words: list[str]) -> None:
    """One word per loop turn, as an agent's socket delivers them."""
    for text in words:
        contexts.send(CTX, word(text))
        await asyncio.sleep(0.01)


def text_inputs(metrics: BridgeMetrics) -> float:
    return metrics.cartesia_text_inputs._value.get()  # type: ignore[attr-defined, no-any-return]


async def test_streamed_words_are_held_until_a_sentence_end_a_clause_end_the_hold_or_the_close() -> None:
    metrics = BridgeMetrics()
    async with pool_on_emulator(EmulatorSettings(ttfb_ms=1), size=1, max_concurrency=2) as (emulator, pool):
        assert await pool.prewarm(5)
        # A long hold makes "at once" and "held" far apart in time on a noisy machine.
        contexts = CallContexts(pool, Owner(), metrics, admission_timeout_s=1, context_timeout_s=10,
                                text_hold_ms=1000)
        await stream(contexts, ["One "])
        assert await wait_for(lambda: inputs(emulator) == [("One ", True)]), "the first word opens the context"
        await stream(contexts, ["two ", "three "])
        await asyncio.sleep(0.3)
        assert inputs(emulator) == [("One ", True)] and contexts.held_inputs == 1, "continuations are held"
        await stream(contexts, ["four. "])
        assert await wait_for(lambda: len(inputs(emulator)) == 2, 0.6), "a sentence end goes at once"
        await stream(contexts, ["Five ", "six, "])
        assert await wait_for(lambda: len(inputs(emulator)) == 3, 0.6), "a clause end goes at the turn's end"
        await stream(contexts, ["seven ", "eight "])
        await asyncio.sleep(0.3)
        assert len(inputs(emulator)) == 3
        assert await wait_for(lambda: len(inputs(emulator)) == 4, 3.0), "the hold ends"
        await stream(contexts, ["nine "])
        contexts.send(CTX, word("", cont=False))
        assert await wait_for(lambda: len(inputs(emulator)) == 5, 0.6), "the close takes the held word along"
        assert inputs(emulator) == [("One ", True), ("two three four. ", True), ("Five six, ", True),
                                    ("seven eight ", True), ("nine ", False)]
        assert text_inputs(metrics) == 5
        assert contexts.held_inputs == 0
        contexts.close()
        assert contexts.timers == 0


async def test_zero_hold_writes_every_turns_input_as_before() -> None:
    metrics = BridgeMetrics()
    async with pool_on_emulator(EmulatorSettings(ttfb_ms=1), size=1, max_concurrency=2) as (emulator, pool):
        assert await pool.prewarm(5)
        contexts = CallContexts(pool, Owner(), metrics, admission_timeout_s=1, context_timeout_s=10,
                                text_hold_ms=0)
        await stream(contexts, ["One ", "two ", "three "])
        contexts.send(CTX, word("four ", cont=True))
        contexts.send(CTX, word("five.", cont=False))  # same turn: joined with the close
        assert await wait_for(lambda: len(inputs(emulator)) == 4)
        assert inputs(emulator) == [("One ", True), ("two ", True), ("three ", True), ("four five.", False)]
        assert text_inputs(metrics) == 4
        contexts.close()


async def test_a_flush_another_language_or_the_length_cap_writes_what_was_held_first() -> None:
    async with pool_on_emulator(EmulatorSettings(ttfb_ms=1), size=1, max_concurrency=2) as (emulator, pool):
        assert await pool.prewarm(5)
        contexts = CallContexts(pool, Owner(), BridgeMetrics(), admission_timeout_s=1, context_timeout_s=10,
                                text_hold_ms=1000)
        await stream(contexts, ["One ", "two "])
        contexts.send(CTX, word("", flush=True))
        assert await wait_for(lambda: len(inputs(emulator)) == 2, 0.6), "a flush goes at once"
        assert [bool(obj.get("flush")) for _c, obj in emulator.received if obj.get("context_id") == CTX] == [False, True]
        await stream(contexts, ["three "])
        contexts.send(CTX, word("quatre ", language="fr"))  # cannot be joined: 'three ' goes first
        assert await wait_for(lambda: len(inputs(emulator)) == 3, 0.6)
        await asyncio.sleep(0.01)
        long_text = "x" * (MAX_MERGED_CHARS - 5) + " "
        contexts.send(CTX, word(long_text, language="fr"))  # joined with 'quatre ': over the cap
        assert await wait_for(lambda: len(inputs(emulator)) == 4, 0.6)
        contexts.send(CTX, word("", cont=False, language="fr"))
        assert await wait_for(lambda: len(inputs(emulator)) == 5, 0.6)
        sent = inputs(emulator)
        assert sent == [("One ", True), ("two ", True), ("three ", True), ("quatre ", True), (long_text, False)]
        assert "".join(t for t, _ in sent) == "One two three quatre " + long_text
        contexts.close()


async def test_cancel_and_close_drop_held_text_and_leave_no_timer() -> None:
    async with pool_on_emulator(EmulatorSettings(ttfb_ms=1), size=1, max_concurrency=4) as (emulator, pool):
        assert await pool.prewarm(5)
        contexts = CallContexts(pool, Owner(), BridgeMetrics(), admission_timeout_s=1, context_timeout_s=10,
                                text_hold_ms=200)
        await stream(contexts, ["One ", "two "])
        assert contexts.held_inputs == 1 and contexts.timers == 1
        contexts.cancel(CTX)
        assert contexts.held_inputs == 0 and contexts.timers == 0
        other = "utt-2"
        contexts.send(other, word("Hi ", ctx=other))
        await asyncio.sleep(0.01)
        contexts.send(other, word("there ", ctx=other))
        assert contexts.held_inputs == 1
        contexts.close()
        assert contexts.held_inputs == 0 and contexts.timers == 0
        await asyncio.sleep(0.4)  # past the hold: nothing held is written after all
        assert inputs(emulator) == [("One ", True)]
        assert inputs(emulator, other) == [("Hi ", True)]
        assert pool.active_contexts == 0


@pytest.mark.parametrize("env, problem", [
    ({"CARTESIA_TEXT_HOLD_MS": "-1"}, "CARTESIA_TEXT_HOLD_MS=-1 must be in [0, 1000]"),
    ({"CARTESIA_TEXT_HOLD_MS": "soon"}, "CARTESIA_TEXT_HOLD_MS='soon' is not an integer"),
    ({"CARTESIA_TEXT_HOLD_MS": "300"}, "CARTESIA_TEXT_HOLD_MS must be below CARTESIA_MAX_BUFFER_DELAY_MS"),
])
def test_text_hold_setting_is_validated(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        Config.from_env(env)


def test_text_hold_setting_defaults_and_zero() -> None:
    assert Config.from_env({}).cartesia_text_hold_ms == 80
    config: Any = Config.from_env({"CARTESIA_TEXT_HOLD_MS": "0", "CARTESIA_MAX_BUFFER_DELAY_MS": "0"})
    assert config.cartesia_text_hold_ms == 0
    assert Config.from_env({"CARTESIA_TEXT_HOLD_MS": "500", "CARTESIA_MAX_BUFFER_DELAY_MS": "0"})


@pytest.mark.parametrize("text", ["me. ", 'me." ', "me, ", "me.", "me ", "a: ", "x) ", "hi!) \n", "e.g.x ",
                                  "wait; ", "so \u2014 ", "and, then. ", "3.5 ", "one, two "])
def test_one_search_finds_sentence_ends_as_the_protocol_defines_them(text: str) -> None:
    from bridge.cartesia.contexts import ENDS_CLAUSE, SENTENCE_MARKS
    from bridge.cartesia.protocol import ENDS_SENTENCE

    clause = ENDS_CLAUSE.search(text)
    assert (clause is not None and clause.group()[0] in SENTENCE_MARKS) == bool(ENDS_SENTENCE.search(text))
