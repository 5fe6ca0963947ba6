"""Rendered audio: one generation's bytes and timings, and the bounded cache of whole renders."""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final


@dataclass(slots=True)
class Rendered:
    """A job's audio in the output format plus timings as sample offsets. Never mutated once
    made (a cached render is shared by every context that says the same text)."""

    audio: bytes
    samples: int
    words: list[tuple[str, int, int]] = field(default_factory=list)
    phonemes: list[tuple[str, int, int]] = field(default_factory=list)
    #: base64 of ``audio[start:end]`` by ``(start, end)``: a cached render is sent by many
    #: contexts in the same chunks, encoded once (at most one entry per chunk of ``audio``).
    _b64: dict[tuple[int, int], str] = field(default_factory=dict, repr=False, compare=False)

    def b64_slice(self, start: int, end: int) -> str:
        """``base64(audio[start:end])`` as text, computed once per slice."""
        key = (start, end)
        text = self._b64.get(key)
        if text is None:
            text = self._b64[key] = base64.b64encode(self.audio[start:end]).decode("ascii")
        return text


class RenderCache:
    """LRU of whole renders by their inputs, at most ``max_entries`` and ``max_bytes`` of audio.

    Generations repeat (a load test says the same sentences on every call), and rendering
    ~20 words costs more than sending their chunks.
    """

    MAX_ENTRIES: Final = 512
    MAX_BYTES: Final = 16 * 1024 * 1024

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Rendered] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Rendered | None:
        rendered = self._items.get(key)
        if rendered is not None:
            self._items.move_to_end(key)
        return rendered

    def put(self, key: Hashable, rendered: Rendered) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old.audio)
        self._items[key] = rendered
        self.bytes += len(rendered.audio)
        while self._items and (len(self._items) > self.max_entries or self.bytes > self.max_bytes):
            _key, evicted = self._items.popitem(last=False)
            self.bytes -= len(evicted.audio)
