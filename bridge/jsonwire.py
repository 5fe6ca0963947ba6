"""One JSON object off the wire, bounded: the first step of every JSON codec of ours. No I/O."""

from __future__ import annotations

from typing import Any

import orjson


class WireJsonError(ValueError):
    """``kind``: ``oversized``, ``malformed_json`` or ``not_an_object``; the message says more."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def load_object(data: str | bytes, max_bytes: int) -> dict[str, Any]:
    """``data`` decoded as a JSON object of at most ``max_bytes`` (characters for ``str``)."""
    if len(data) > max_bytes:
        raise WireJsonError("oversized", f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireJsonError("malformed_json", f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireJsonError("not_an_object", "message must be a JSON object")
    return obj
