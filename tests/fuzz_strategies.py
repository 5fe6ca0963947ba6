"""Hypothesis set-up shared by the fuzz tests: one bounded, derandomized profile and JSON strategies.

The profile is derandomized (the same examples on every run, so CI cannot flake on a lucky draw)
and has no per-example deadline (a 2-core noisy machine makes timing deadlines flaky); each test
sets its own ``max_examples`` so the fuzz files together stay well under 60 s.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "bridge-fuzz",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("bridge-fuzz")

#: Integers orjson can carry (it rejects anything wider than 64 bits on input and output).
json_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
#: Text without lone surrogates (orjson refuses them both ways, and so does a WebSocket text frame).
json_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
json_scalars = st.none() | st.booleans() | json_ints | st.floats(allow_nan=False, allow_infinity=False) | json_text


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value orjson can encode."""
    return st.recursive(
        json_scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(json_text, children, max_size=5),
        max_leaves=max_leaves,
    )


_SMALL_JSON = json_values(8)


def mutations(valid: dict[str, Any], keys: list[str] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with one field (or one field of a nested object) deleted or replaced by any JSON value."""
    candidates = keys or list(valid)

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, Any]:
        obj = orjson.loads(orjson.dumps(valid))  # deep copy
        for _ in range(draw(st.integers(1, 3))):
            target = obj
            key = draw(st.sampled_from(candidates))
            nested = target.get(key)
            if isinstance(nested, dict) and nested and draw(st.booleans()):
                target, key = nested, draw(st.sampled_from(sorted(nested)))
            if draw(st.booleans()):
                target.pop(key, None)
            else:
                target[key] = draw(_SMALL_JSON)
        return obj

    return mutate()


def mutations_of(valid: list[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Mutations of any one of ``valid`` (strategies built once, not per example)."""
    return st.one_of([mutations(v) for v in valid])


@st.composite
def text_edits(draw: st.DrawFn, texts: list[str], pieces: list[str]) -> str:
    """One of ``texts`` with 1-3 edits: a character replaced by, or a piece inserted from, ``pieces``,
    or a character deleted (for fast paths that must decline anything but their exact layout)."""
    text = draw(st.sampled_from(texts))
    alphabet = st.sampled_from(pieces)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        piece = draw(alphabet)
        if op == "insert":
            text = text[:at] + piece + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + piece + text[at + 1:]
    return text
