"""The Cartesia message chain's shortcuts (issue 18) decide exactly as the general code.

* ``parse_server_text`` keeps the decoded lists of a ``timestamps`` message instead of
  copying them: same result as ``parse_server_message`` on the documented shapes, the
  seed pages' pretty-printed ones and other key orders.
* ``CallCore.on_cartesia`` checks a one-word ``timestamps`` message inline: same words,
  horizon and refusals as the general path (the pre-issue-18 code, kept here as reference).
* ``_Socket._on_raw`` routes ``chunk``/``timestamps`` straight to the context's owner:
  late ones are still counted, a failing owner is counted and does not stop the socket.
"""

from __future__ import annotations

import math

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.call import MAX_TIMESTAMP_S, _times_valid
from bridge.cartesia import protocol as cp
from bridge.cartesia.client import CartesiaPool
from metrics import BridgeMetrics
from tests.fuzz_strategies import FUZZ
from tests.test_call_core import make_core

#: Server messages as Cartesia documents them (cartesia-websocket.md §3, seed 004), in the
#: emulator's layout, in other key orders and pretty-printed as the seed pages show them.
CORPUS: list[bytes] = [
    b'{"type":"chunk","data":"aSDinaTvuI8gbWludGxpZnk=","done":false,"status_code":206,"step_time":123,'
    b'"context_id":"c1","flush_id":1}',
    b'{"type":"timestamps","done":false,"status_code":206,"context_id":"c1","word_timestamps":'
    b'{"words":["Hello","world"],"start":[0,0.5],"end":[0.4,0.9]}}',
    b'{"type":"timestamps","done":false,"status_code":206,"context_id":"c1","word_timestamps":'
    b'{"words":["word"],"start":[0.2],"end":[0.25333333333333335]},"flush_id":1}',
    b'{"type":"timestamps","done":false,"status_code":206,"context_id":"c1","word_timestamps":'
    b'{"words":[],"start":[],"end":[]},"flush_id":2}',
    b'{"context_id":"c1","word_timestamps":{"end":[0.4],"start":[0.1],"words":["hi"]},"type":"timestamps"}',
    b'{"word_timestamps":{"words":["a","b"],"start":[0.1,1],"end":[0.2,true]},"type":"timestamps"}',
    b'{"word_timestamps":{"words":["a",2],"start":[0.1],"end":[0.2]},"type":"timestamps","context_id":"c"}',
    b'{"type":"timestamps","context_id":"c1","word_timestamps":{"words":["a"],"start":[0.1],"end":[0.2,0.3]}}',
    b'{"type":"timestamps","context_id":"c1","word_timestamps":{"words":["a"],"start":"x","end":[0.2]}}',
    b'{"type":"timestamps","context_id":"c1","word_timestamps":{"words":["\\u00e9t\\u00e9"],"start":[0],"end":[1]}}',
    b'{"context_id":"c1","step_time":0.5,"data":"AAAA","type":"chunk","status_code":206,"done":false}',
    b'{"type":"flush_done","done":false,"flush_done":true,"flush_id":1,"status_code":206,"context_id":"c1"}',
    b'{"type":"done","done":true,"status_code":206,"context_id":"c1"}',
]


#: The seed page's examples (docs.cartesia.ai, seed 004) as it prints them: one field per line.
SEED_PAGES: list[bytes] = [
    b'{\n"type": "chunk",\n"data": "aSDinaTvuI8gbWludGxpZnk=",\n"done": false,\n"status_code": 206,\n'
    b'"step_time": 123,\n"context_id": "50dc3b5e-5841-4aa1-9f94-60cfb9aead79"\n}',
    b'{\n"type": "timestamps",\n"done": false,\n"status_code": 206,\n'
    b'"context_id": "872ec12d-bc63-4e1e-a241-4f58c879d105",\n"word_timestamps": {\n"words": [\n"Hello",\n'
    b'"world"\n],\n"start": [\n0,\n0.5\n],\n"end": [\n0.4,\n0.9\n]\n}\n}',
]


def _assert_same(raw: bytes) -> None:
    expected = cp.parse_server_message(orjson.loads(raw))
    got = cp.parse_server_text(raw)
    assert type(got) is type(expected) and repr(got) == repr(expected), raw


def test_corpus_decodes_as_the_general_parser() -> None:
    for raw in CORPUS:
        _assert_same(raw)
    stamps = cp.parse_server_text(CORPUS[1])
    assert stamps == cp.WordTimestamps("c1", ["Hello", "world"], [0.0, 0.5], [0.4, 0.9])
    assert [type(t) for t in stamps.start] == [float, float]  # the integer 0 became a float


def test_seed_pages_decode_as_the_general_parser() -> None:
    for raw in SEED_PAGES:
        _assert_same(raw)
    assert cp.parse_server_text(SEED_PAGES[1]) == cp.WordTimestamps(
        "872ec12d-bc63-4e1e-a241-4f58c879d105", ["Hello", "world"], [0.0, 0.5], [0.4, 0.9])


def test_each_message_owns_its_lists() -> None:
    first = cp.parse_server_text(CORPUS[2])
    second = cp.parse_server_text(CORPUS[2])
    assert isinstance(first, cp.WordTimestamps) and isinstance(second, cp.WordTimestamps)
    first.words.append("x")
    first.start.append(9.0)
    assert second.words == ["word"] and second.start == [0.2]


# ------------------------------------------------------------ CallCore timestamps


def _reference(words: list[tuple[str, float, float]], horizon: int, off: float,
               msg: cp.WordTimestamps) -> tuple[list[tuple[str, float, float]], int, bool, bool]:
    """The general path before issue 18: (words, horizon_bytes, timestamps_seen, refused)."""
    w, s, e = msg.words, msg.start, msg.end
    count = min(len(w), len(s), len(e))
    w, s, e = w[:count], s[:count], e[:count]
    if count and not _times_valid(s, e):
        return words, horizon, False, True
    words = words + ([(a, b + off, c + off) for a, b, c in zip(w, s, e, strict=True)]
                     if off else list(zip(w, s, e, strict=True)))
    if count:
        return words, max(horizon, int(round(words[-1][2] * 8000))), True, False
    return words, horizon, False, False


times = (st.floats(0.0, MAX_TIMESTAMP_S) | st.sampled_from([-0.0, -1e-9, MAX_TIMESTAMP_S + 1e-6, 1e305])
         | st.floats(allow_nan=True, allow_infinity=True))


@settings(FUZZ, max_examples=400)
@given(st.lists(st.text(max_size=4), max_size=3), st.lists(times, max_size=3), st.lists(times, max_size=3),
       st.sampled_from([0.0, 1.25]), st.integers(0, 40_000))
def test_timestamps_update_the_utterance_as_the_general_path(
        words: list[str], starts: list[float], ends: list[float], off: float, horizon: int) -> None:
    core = make_core()
    actions = core.speak("Hello there.", last=True, now=0.0)
    ctx = next(a.context_id for a in actions if hasattr(a, "request"))
    utt = core.contexts[ctx]
    utt.word_offset_s = off
    utt.horizon_bytes = horizon
    utt.words = [("before", 0.0, 0.1)]
    msg = cp.WordTimestamps(ctx, words, starts, ends)
    expected_words, expected_horizon, seen, refused = _reference(list(utt.words), horizon, off, msg)
    bad = core.metrics.bad_input.labels(source="cartesia", kind="invalid_timestamps")
    bad_before = bad._value.get()
    core.on_cartesia(ctx, msg, 0.0)
    assert repr(utt.words) == repr(expected_words)  # repr: NaN never equals itself, -0.0 equals 0.0
    assert utt.horizon_bytes == expected_horizon and utt.timestamps_seen == seen
    assert bad._value.get() - bad_before == (1 if refused else 0)


def test_one_word_at_the_limits() -> None:
    for start, end, valid in [(0.0, MAX_TIMESTAMP_S, True), (-0.0, 0.0, True), (math.nan, 0.1, False),
                              (0.1, math.inf, False), (0.1, -0.5, False), (MAX_TIMESTAMP_S, 1e305, False)]:
        assert _times_valid([start], [end]) == valid
        core = make_core()
        actions = core.speak("Hi.", last=True, now=0.0)
        ctx = next(a.context_id for a in actions if hasattr(a, "request"))
        core.on_cartesia(ctx, cp.WordTimestamps(ctx, ["w"], [start], [end]), 0.0)
        assert core.contexts[ctx].timestamps_seen == valid


# ------------------------------------------------------------ socket routing


class Listener:
    def __init__(self, fail: bool = False) -> None:
        self.got: list[cp.ServerMessage] = []
        self.fail = fail

    def on_cartesia_message(self, msg: cp.ServerMessage, received_at: float) -> None:
        self.got.append(msg)
        if self.fail:
            raise RuntimeError("owner bug")

    def on_context_lost(self, context_id: str, reason: str) -> None:
        raise AssertionError("not lost")


def _chunk(ctx: str) -> bytes:
    return orjson.dumps(cp.encode_server_message(cp.Chunk(ctx, "AAAA", 0.0, 1)))


def _stamps(ctx: str) -> bytes:
    return orjson.dumps(cp.encode_server_message(cp.WordTimestamps(ctx, ["a"], [0.0], [0.1], 1)))


def test_socket_routes_audio_and_times_straight_to_the_owner() -> None:
    metrics = BridgeMetrics()
    pool = CartesiaPool(url="ws://127.0.0.1:9", api_key=None, version="2026-03-01", metrics=metrics, size=1)
    sock = pool._sockets[0]
    ok, failing = Listener(), Listener(fail=True)
    sock.contexts.update({"ok": ok, "bad": failing})
    late = metrics.late_chunks_dropped._value.get()
    handler_errors = metrics.bad_input.labels(source="cartesia", kind="handler_error")
    for raw in (_chunk("ok"), _stamps("ok"), _chunk("bad"), _stamps("bad"), _chunk("ok"), _chunk("gone"),
                _stamps("gone"), _chunk("")):
        sock._on_raw(raw)
    assert [type(m).__name__ for m in ok.got] == ["Chunk", "WordTimestamps", "Chunk"]
    assert len(failing.got) == 2 and handler_errors._value.get() == 2
    assert metrics.late_chunks_dropped._value.get() - late == 2  # "gone" and no context: chunks only
    pool._active.add("ok")
    metrics.active_contexts.inc()
    sock._on_raw(orjson.dumps(cp.encode_server_message(cp.Done("ok"))))
    assert "ok" not in sock.contexts and pool.active_contexts == 0 and type(ok.got[-1]) is cp.Done
