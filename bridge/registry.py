"""The process's calls: live calls, webhooks waiting for their stream, handoffs.

``CallRegistry`` is what the routes and the calls share about calls, and
nothing else. Bounded: webhook call data waiting for its media stream is kept
for at most ``pending_ttl_s`` seconds and ``max_entries`` entries (oldest
evicted first); handoff data from agents likewise (``max_entries``, oldest
evicted), until Twilio's ``<Connect action>`` request takes it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Final, Generic, Protocol, TypeVar

#: How long a webhook's call data waits for its media stream (seconds).
PENDING_CALL_TTL_S: Final = 120.0


class LiveCall(Protocol):
    """What the registry needs of a live call."""

    def flush_metrics(self) -> None: ...

    async def hang_up(self, reason: str) -> None: ...


CallT = TypeVar("CallT", bound=LiveCall)


class CallRegistry(Generic[CallT]):
    """Live calls, pending webhook call data and handoff data (see the module docstring)."""

    def __init__(self, max_entries: int, pending_ttl_s: float = PENDING_CALL_TTL_S) -> None:
        self.max_entries = max_entries
        self.pending_ttl_s = pending_ttl_s
        self.calls: set[CallT] = set()
        # call_sid -> (webhook answered at, monotonic s; call data for the agent's setup)
        self._pending: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()
        self._handoffs: OrderedDict[str, Any] = OrderedDict()

    # ----------------------------------------------------------- live calls

    def add(self, call: CallT) -> None:
        self.calls.add(call)

    def discard(self, call: CallT) -> None:
        self.calls.discard(call)

    @property
    def occupancy(self) -> int:
        """Live calls plus answered webhooks whose stream has not started yet."""
        return len(self.calls) + len(self._pending)

    def flush_call_metrics(self) -> None:
        """Add every live call's batched frame/byte/message counts to the counters."""
        for call in self.calls:
            call.flush_metrics()

    # -------------------------------------------------------- webhook data

    def _remember(self, store: OrderedDict[str, Any], key: str, value: Any) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > self.max_entries:
            store.popitem(last=False)

    def expect(self, call_sid: str, info: dict[str, str]) -> None:
        """A webhook was answered: keep its call data for the stream to come."""
        self._remember(self._pending, call_sid, (time.monotonic(), info))

    def take_call_info(self, call_sid: str) -> tuple[dict[str, str], float | None]:
        """The webhook's call data and when it was answered (``({}, None)`` if unknown or expired)."""
        entry = self._pending.pop(call_sid, None)
        if entry is None or time.monotonic() - entry[0] > self.pending_ttl_s:
            return {}, None
        return entry[1], entry[0]

    def expire_pending(self) -> None:
        """Forget webhooks whose stream never came (caller hung up while ringing)."""
        cutoff = time.monotonic() - self.pending_ttl_s
        while self._pending:
            answered_at = next(iter(self._pending.values()))[0]
            if answered_at > cutoff:
                break
            self._pending.popitem(last=False)

    # ------------------------------------------------------------- handoffs

    def store_handoff(self, call_sid: str, data: Any) -> None:
        """The agent ended the call with handoff data for ``<Connect action>``."""
        self._remember(self._handoffs, call_sid, data)

    def has_handoff(self, call_sid: str) -> bool:
        return call_sid in self._handoffs

    def take_handoff(self, call_sid: str) -> tuple[bool, Any]:
        """``(found, data)``; the entry is removed."""
        if call_sid not in self._handoffs:
            return False, None
        return True, self._handoffs.pop(call_sid)
