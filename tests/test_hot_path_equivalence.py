"""The hot-path shortcuts of issue 18 decide exactly as the general code they replace."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge.call import MAX_TIMESTAMP_S, _times_valid
from bridge.cartesia import protocol as cp
from tests.fuzz_strategies import FUZZ, json_values, mutations_of

_SHAPES = [
    cp.encode_server_message(m) for m in (
        cp.Chunk("c1", "/w==", 0.1, 3),
        cp.Chunk("c1", "/w==", 0.0, None),
        cp.WordTimestamps("c1", ["a", "b"], [0.0, 0.1], [0.1, 0.2], 4),
        cp.WordTimestamps("c1", [], [], []),
        cp.Done("c1"),
    )
]

odd_values = st.sampled_from([True, False, None, 1, -3, 2.5, "x", "", [], {}, [1, 2.0], ["a", 1], [True], [float("inf")]])


@settings(FUZZ, max_examples=300)
@given(mutations_of(_SHAPES) | json_values())
@example({"type": "chunk", "context_id": "c", "data": "AA==", "step_time": True, "flush_id": False})
@example({"type": "timestamps", "context_id": 3, "word_timestamps": {"words": ["a", 2], "start": [0, 1.5], "end": [1, True]}})
@example({"type": "timestamps", "word_timestamps": [], "flush_id": 1})
@example({"type": "timestamps", "word_timestamps": {"words": "ab", "start": "x"}})
def test_parse_server_text_equals_the_general_parser(obj: Any) -> None:
    _same_as_general(obj)


def _same_as_general(obj: Any) -> None:
    raw = orjson.dumps(obj)
    try:
        expected = cp.parse_server_message(orjson.loads(raw))
    except ValueError:
        try:
            cp.parse_server_text(raw)
        except ValueError:
            return
        raise AssertionError("the fast parser accepted what the general one refuses") from None
    got = cp.parse_server_text(raw)
    assert type(got) is type(expected) and repr(got) == repr(expected)


@given(st.dictionaries(st.sampled_from(["type", "context_id", "data", "step_time", "flush_id", "word_timestamps"]),
                       odd_values | st.sampled_from(["chunk", "timestamps"])))
@settings(FUZZ, max_examples=300)
def test_parse_server_text_equals_the_general_parser_on_odd_fields(obj: dict[str, Any]) -> None:
    _same_as_general(obj)


def test_parse_server_text_refuses_bad_json_and_takes_bytes() -> None:
    for raw in (b"{", b"[1]", "\"chunk\"", b"\xff"):
        try:
            cp.parse_server_text(raw)
        except ValueError:
            continue
        raise AssertionError(raw)
    msg = cp.parse_server_text(b'{"type":"chunk","context_id":"c","data":"AA==","step_time":1,"flush_id":2}')
    assert msg == cp.Chunk("c", "AA==", 1.0, 2) and type(msg.step_time) is float


def _times_valid_reference(starts: list[float], ends: list[float]) -> bool:
    return all(0.0 <= t <= MAX_TIMESTAMP_S for t in (*starts, *ends))


times = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, MAX_TIMESTAMP_S)


@settings(FUZZ, max_examples=500)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(st.lists(times, min_size=n, max_size=n),
                                                     st.lists(times, min_size=n, max_size=n))))
@example(([math.nan, 1.0], [1.0, 2.0]))
@example(([1.0, math.nan], [1.0, 2.0]))
@example(([1.0], [math.inf]))
@example(([-0.0], [MAX_TIMESTAMP_S]))
@example(([MAX_TIMESTAMP_S, MAX_TIMESTAMP_S], [MAX_TIMESTAMP_S, math.nextafter(MAX_TIMESTAMP_S, math.inf)]))
def test_times_valid_equals_the_per_value_check(pair: tuple[list[float], list[float]]) -> None:
    starts, ends = pair
    assert _times_valid(starts, ends) == _times_valid_reference(starts, ends)


texts = st.text(max_size=20)


@settings(FUZZ, max_examples=200)
@given(texts, texts, st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([None, {"speed": 1.1}]), st.sampled_from(["c1", "c2"]))
def test_merge_continuation_equals_replace(a: str, b: str, cont_a: bool, cont_b: bool, flush_a: bool, flush_b: bool,
                                           config: dict[str, float] | None, ctx_b: str) -> None:
    first = cp.GenerationRequest(context_id="c1", transcript=a, model_id="sonic-3", voice_id="v", continue_=cont_a,
                                 flush=flush_a, add_timestamps=True, max_buffer_delay_ms=100)
    then = cp.GenerationRequest(context_id=ctx_b, transcript=b, model_id="sonic-3", voice_id="v", continue_=cont_b,
                                flush=flush_b, add_timestamps=True, max_buffer_delay_ms=100, generation_config=config)
    merged = cp.merge_continuation(first, then)
    if not cont_a or flush_a or config is not None or ctx_b != "c1":
        assert merged is None
        return
    assert merged == replace(first, transcript=a + b, continue_=cont_b, flush=flush_b)
