"""Integrity check under overload (issue 18): a context cancelled part-way is no false mismatch.

An overloaded 400-call run reported ~300 integrity "mismatches", in every call at the same
offset (113280 = greeting 5440 + two passages of 50720 + 6400), first frame not the head of any
context, with no ``clear`` in the calls at all. The bytes were right: a call that hung up while
its passage was still being generated left a cancelled emulator context holding a whole-frame
prefix of the passage (6400 bytes = its first 12-word generation at 15 words/s). The greedy split
took that prefix as a complete utterance wherever it fitted, so in every other call whose passage
was cut by the hang-up further on, the rest of the passage became a "mismatch" starting 6400 bytes
into it. These tests build exactly that with the real emulator (its records, as the load tester
indexes them) and the simulator's ``CallRecord``, through the report's own path.
"""

from __future__ import annotations

import pytest

from bridge.agent.builtin import LONG_PASSAGE
from bridge.cartesia.emulator import Emulator
from bridge.loadtest.integrity import AudioIndex, explain_mismatch, split_utterances
from bridge.loadtest.report import integrity_summary
from bridge.loadtest.results import CallResult, RecordedCall, analyze_call
from telephony.media import FRAME_BYTES
from telephony.simulator import CallRecord
from tests.emulator_fixtures import (
    EmulatorFactory,
    audio_of,
    collect,
    connect,
    drain_for,
    recv,
    request,
    send,
)
from tests.emulator_fixtures import emulator_factory as emulator_factory  # noqa: F401 -- pytest fixture

pytestmark = pytest.mark.timeout(30)

WORDS = LONG_PASSAGE.split(" ")
#: The passage's first generation as the bridge's text hold sent it in the overloaded run: 12 words.
FIRST_PART = " ".join(WORDS[:12]) + " "
REST = " ".join(WORDS[12:])


def _padded(audio: bytes) -> bytes:
    return audio + b"\xff" * (-len(audio) % FRAME_BYTES)


async def _until_flush_done(ws: object, context_id: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while True:
        msg = await recv(ws)  # type: ignore[arg-type]
        out.append(msg)
        if msg.get("type") == "flush_done" and msg.get("context_id") == context_id:
            return out


async def _passage_contexts(emulator_factory: EmulatorFactory) -> tuple[Emulator, bytes, bytes]:
    """The load test's emulator voice (40 ms chunks, 15 words/s); one context speaks the whole
    passage, another is cancelled after its first generation (a call hung up). Returns the
    emulator and both contexts' audio as the client received it."""
    emu = await emulator_factory(chunk_ms=40, words_per_s=15)
    ws = await connect(emu)
    await send(ws, request("whole", FIRST_PART, cont=True, flush=True, max_buffer_delay_ms=0))
    await send(ws, request("whole", REST, cont=False, max_buffer_delay_ms=0))
    whole = audio_of(await collect(ws, {"whole"}), "whole")

    await send(ws, request("hung-up", FIRST_PART, cont=True, flush=True, max_buffer_delay_ms=0))
    msgs = await _until_flush_done(ws, "hung-up")
    await send(ws, {"context_id": "hung-up", "cancel": True})
    msgs += await drain_for(ws, 0.3)
    await ws.close()
    cut = audio_of(msgs, "hung-up")
    rec = emu.context_record("hung-up")
    assert rec is not None and rec.cancelled and bytes(rec.audio) == cut
    # The situation of the overloaded run: the cancelled context is a whole-frame prefix of the passage.
    assert 0 < len(cut) < len(whole) and len(cut) % FRAME_BYTES == 0 and whole.startswith(cut), (len(cut), len(whole))
    return emu, whole, cut


def _report_of(stream: bytes, index: AudioIndex) -> tuple[dict[str, object], CallResult]:
    """The report's integrity section for one call that received ``stream`` (one media message)."""
    record = CallRecord("CA" + "0" * 32, "MZ" + "0" * 32)
    record.received_audio += stream
    record.arrivals.append((0.0, 0, len(stream), 0.0))
    res = CallResult(0, call=RecordedCall(record))
    analyze_call(res, index)
    return integrity_summary([res], index), res


async def test_a_passage_cut_by_hang_up_past_a_cancelled_prefix_is_no_mismatch(
    emulator_factory: EmulatorFactory,
) -> None:
    emu, whole, cut = await _passage_contexts(emulator_factory)
    index = AudioIndex.from_records(emu.records)
    assert index.cancelled == 1
    # A whole passage, then the next one cut by the hang-up 50 frames after the cancelled prefix ends.
    first = _padded(whole)
    stream = first + whole[:len(cut) + 50 * FRAME_BYTES]
    summary, res = _report_of(stream, index)
    assert summary["mismatches"] == 0, summary["mismatch_examples"]
    assert [(s.status, s.start, s.end) for s in res.spans] == [
        ("ok", 0, len(first)), ("cut", len(first), len(stream))]


async def test_a_cancelled_prefix_followed_by_foreign_bytes_is_still_a_mismatch(
    emulator_factory: EmulatorFactory,
) -> None:
    emu, whole, cut = await _passage_contexts(emulator_factory)
    index = AudioIndex.from_records(emu.records)
    first = _padded(whole)
    foreign = bytes((7 + 3 * i) % 256 for i in range(2 * FRAME_BYTES))  # in no context's audio
    stream = first + cut + foreign
    summary, res = _report_of(stream, index)
    assert summary["mismatches"] == 1
    (example,) = summary["mismatch_examples"]  # type: ignore[misc]
    assert (example["start"], example["end"]) == (len(first) + len(cut), len(stream))
    assert [s.status for s in res.spans] == ["ok", "ok", "mismatch"]
    # Exactly the cancelled prefix, then the line ends: a whole context, "ok".
    assert [s.status for s in split_utterances(first + cut, [], index)] == ["ok", "ok"]


def _index(**audios: bytes) -> AudioIndex:
    idx = AudioIndex()
    for name, audio in audios.items():
        idx.add(name, audio)
    return idx


LONG = bytes((i * 11 + 5) % 253 for i in range(20 * FRAME_BYTES + 37))
SHORT = LONG[:6 * FRAME_BYTES]  # a whole-frame prefix of LONG, like a cancelled context
OTHER = bytes((i * 17 + 2) % 251 for i in range(3 * FRAME_BYTES))


def test_split_prefers_the_reading_without_mismatch() -> None:
    idx = _index(long=LONG, short=SHORT, other=OTHER)
    # LONG cut by the hang-up after SHORT's end: one "cut" utterance, not SHORT + a mismatch.
    stream = OTHER + LONG[:10 * FRAME_BYTES]
    assert [(s.status, s.start) for s in split_utterances(stream, [], idx)] == [
        ("ok", 0), ("cut", 3 * FRAME_BYTES)]
    # The same before a clear: "interrupted", and what follows the clear is split on its own.
    stream = LONG[:10 * FRAME_BYTES] + SHORT + OTHER
    spans = split_utterances(stream, [10 * FRAME_BYTES], idx)
    assert [(s.status, s.start, s.end) for s in spans] == [
        ("interrupted", 0, 10 * FRAME_BYTES), ("ok", 10 * FRAME_BYTES, 16 * FRAME_BYTES),
        ("ok", 16 * FRAME_BYTES, 19 * FRAME_BYTES)]
    # SHORT then OTHER: SHORT is a whole utterance there (LONG does not fit).
    stream = SHORT + OTHER + _padded(LONG)
    assert [s.status for s in split_utterances(stream, [], idx)] == ["ok", "ok", "ok"]


def test_split_still_reports_the_smallest_mismatch() -> None:
    idx = _index(long=LONG, short=SHORT, other=OTHER)
    bad = bytearray(OTHER + _padded(LONG) + OTHER)
    bad[3 * FRAME_BYTES + 8 * FRAME_BYTES + 3] ^= 0x40  # inside LONG, after SHORT's end
    spans = split_utterances(bytes(bad), [], idx)
    mism = [s for s in spans if s.status == "mismatch"]
    # SHORT fits up to the flipped byte; the mismatch is the rest of LONG, up to OTHER.
    assert [(s.start, s.end) for s in mism] == [(9 * FRAME_BYTES, 3 * FRAME_BYTES + len(_padded(LONG)))]
    assert spans[-1].status == "ok" and spans[-1].start == 3 * FRAME_BYTES + len(_padded(LONG))
    # The report's explanation says where that audio really comes from: LONG, 6 frames in.
    why = explain_mismatch(bytes(bad), mism[0], idx)
    assert why["first_frame_known"] is False and "closest_contexts" not in why
    assert (why["first_frame_inside"], why["first_frame_at_byte"]) == (["long"], 6 * FRAME_BYTES)
