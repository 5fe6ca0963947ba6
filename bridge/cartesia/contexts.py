"""One call's Cartesia contexts: leases on the shared pool, admission, input joining, deadlines.

``CallContexts`` is the call's Cartesia peer. The call's state machine names
a context per utterance; this class gets each one admitted on the pool
(``CartesiaPool``, at once when a slot and a socket are free, else through a
waiting task), writes the utterance's inputs into it, ends a context that
Cartesia never finishes, and reports back to its owner (``ContextOwner``, the
call session) every Cartesia message and every context that failed.

Limits:

* Per context, at most ``MAX_PENDING_REQUESTS`` inputs wait for admission;
  beyond that the context fails (the owner is told, without retry).
* Inputs made in one event-loop turn (an agent that delivers a passage as a
  burst of tokens) are joined into one input of at most ``MAX_MERGED_CHARS``
  characters, written as soon as it ends a sentence or closes the context
  (where Cartesia starts generating) and otherwise when the turn ends: one
  message per sentence instead of one per token, same text
  (``merge_continuation``). A token that arrives alone waits one loop turn at
  most. At most one such input is held per context.
* A closed context (``continue: false``) that hears nothing from Cartesia for
  ``context_timeout_s`` seconds is cancelled and reported as failed with
  ``retry=True, cause="no_done"`` (the owner resumes what is missing).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Protocol

from bridge.cartesia.client import (
    AdmissionError,
    CartesiaPool,
    CartesiaUnavailable,
    ContextError,
    ContextLease,
    SendQueueFull,
)
from bridge.cartesia.protocol import (
    ENDS_SENTENCE,
    Done,
    ErrorMessage,
    GenerationRequest,
    ServerMessage,
    merge_continuation,
)
from metrics import BridgeMetrics

MAX_PENDING_REQUESTS: Final = 10_000
#: Longest transcript made by joining one turn's inputs for a context (characters).
MAX_MERGED_CHARS: Final = 1000
#: Only this many trailing characters of a joined input are checked for a sentence end.
SENTENCE_END_WINDOW: Final = 16


class ContextOwner(Protocol):
    """What the owner of a call's contexts (the call session) provides."""

    @property
    def closed(self) -> bool:
        """The call is over: hold nothing back, write nothing more."""
        ...

    def on_tts_message(self, context_id: str, msg: ServerMessage, received_at: float) -> None:
        """A Cartesia message for one of the call's contexts (after the bookkeeping here)."""
        ...

    def on_tts_failed(self, context_id: str, reason: str, *, retry: bool, cause: str) -> None:
        """A context is gone without ``done``; with ``retry`` the utterance
        should go on on a new context (``cause`` labels the retry metric)."""
        ...


def retry_cause(exc: ContextError) -> str:
    """Retry-metric label for a failed write: a full send queue is congestion."""
    return "congested" if isinstance(exc, SendQueueFull) else "socket_lost"


class CallContexts:
    """The Cartesia contexts of one call (see the module docstring for limits).

    Every task and timer it starts is cancelled by ``close``; every lease is
    cancelled (slot freed, late chunks dropped) by ``cancel`` or ``close``.
    """

    def __init__(
        self,
        pool: CartesiaPool,
        owner: ContextOwner,
        metrics: BridgeMetrics,
        *,
        admission_timeout_s: float,
        context_timeout_s: float,
    ) -> None:
        self._pool = pool
        self._owner = owner
        self._metrics = metrics
        self._admission_timeout_s = admission_timeout_s
        self._context_timeout_s = context_timeout_s
        self._leases: dict[str, ContextLease] = {}
        self._pending: dict[str, list[GenerationRequest]] = {}
        self._admissions: dict[str, asyncio.Task[None]] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._last_heard: dict[str, float] = {}  # context_id -> last Cartesia message (monotonic s)
        # Inputs joined during this loop turn, per context, written by _write_held at its end.
        self._held: dict[str, GenerationRequest] = {}
        self._held_write: asyncio.Handle | None = None

    # ---------------------------------------------------------------- input

    def send(self, context_id: str, request: GenerationRequest) -> None:
        """One input for ``context_id`` (a new id opens a context). Never blocks."""
        if not request.continue_:
            self._arm_deadline(context_id)
        if context_id not in self._leases and context_id not in self._pending:
            # A new context: admitted at once when a slot and a socket are free, else it waits.
            lease = self._pool.try_open_context(context_id, self)
            if lease is None:
                self._pending[context_id] = [request]
                self._admissions[context_id] = asyncio.get_running_loop().create_task(
                    self._admit(context_id), name=f"admit-{context_id}"
                )
                return
            self._leases[context_id] = lease
            self._last_heard[context_id] = time.monotonic()
        if context_id in self._leases:
            # Join it with the rest of this turn's inputs; written at a sentence end or the turn's end.
            held = self._held.get(context_id)
            if held is not None:
                merged = merge_continuation(held, request)
                if merged is not None and len(merged.transcript) <= MAX_MERGED_CHARS:
                    request = merged
                else:
                    self._write_one_held(context_id)  # keep the order: what was held goes first
                    if context_id not in self._leases:
                        return  # that write failed and the utterance is being resumed from its text
            self._held[context_id] = request
            # Only the tail can end a sentence: no rescan of the whole joined text per token.
            text = request.transcript
            if not request.continue_ or ENDS_SENTENCE.search(text, max(0, len(text) - SENTENCE_END_WINDOW)):
                # Cartesia starts generating at a sentence end (or at the close): do not make it wait.
                self._write_one_held(context_id)
            elif self._held_write is None:
                self._held_write = asyncio.get_running_loop().call_soon(self._write_held)
            return
        pending = self._pending[context_id]
        merged = merge_continuation(pending[-1], request)
        if merged is not None and len(merged.transcript) <= MAX_MERGED_CHARS:
            pending[-1] = merged
        elif len(pending) >= MAX_PENDING_REQUESTS:
            self._failed(context_id, "too many inputs waiting for admission")
        else:
            pending.append(request)

    def _write_held(self) -> None:
        """End of the loop turn: write every context's joined input."""
        self._held_write = None
        for context_id in list(self._held):
            self._write_one_held(context_id)

    def _write_one_held(self, context_id: str) -> None:
        request = self._held.pop(context_id, None)
        lease = self._leases.get(context_id)
        if request is None or lease is None or self._owner.closed:
            return
        try:
            lease.send(request)
        except ContextError as exc:  # socket just died / queue full: transient, resume elsewhere
            self._failed(context_id, str(exc), retry=True, cause=retry_cause(exc))

    async def _admit(self, context_id: str) -> None:
        try:
            lease = await self._pool.open_context(context_id, self, self._admission_timeout_s)
        except AdmissionError as exc:
            self._admissions.pop(context_id, None)
            self._pending.pop(context_id, None)
            # cartesia_unavailable: no socket could connect (the call's outcome names it, see session.py).
            cause = "cartesia_unavailable" if isinstance(exc, CartesiaUnavailable) else "admission"
            self._metrics.utterances_failed.labels(reason=cause).inc()
            self._failed(context_id, f"admission: {exc}", cause=cause)
            return
        self._admissions.pop(context_id, None)
        if self._owner.closed:
            lease.cancel()
            return
        self._leases[context_id] = lease
        self._last_heard[context_id] = time.monotonic()
        for request in self._pending.pop(context_id, []):
            try:
                lease.send(request)
            except ContextError as exc:
                self._failed(context_id, str(exc), retry=True, cause=retry_cause(exc))
                return

    # ----------------------------------------------------------- deadlines

    def _arm_deadline(self, context_id: str) -> None:
        """Once a context is closed (continue:false), Cartesia must finish it:
        no message for ``context_timeout_s`` ends it."""
        if context_id in self._deadlines:
            return
        self._last_heard.setdefault(context_id, time.monotonic())
        self._deadlines[context_id] = asyncio.get_running_loop().call_later(
            self._context_timeout_s, self._context_deadline, context_id)

    def _drop_deadline(self, context_id: str) -> None:
        self._last_heard.pop(context_id, None)
        handle = self._deadlines.pop(context_id, None)
        if handle is not None:
            handle.cancel()

    def _context_deadline(self, context_id: str) -> None:
        self._deadlines.pop(context_id, None)
        timeout = self._context_timeout_s
        quiet = time.monotonic() - self._last_heard.get(context_id, 0.0)
        waiting = context_id in self._admissions  # admission has its own deadline; check again after
        if waiting or (quiet < timeout and context_id in self._leases):
            # Still producing (or not yet admitted): check again when it could next be overdue.
            self._deadlines[context_id] = asyncio.get_running_loop().call_later(
                timeout if waiting else timeout - quiet, self._context_deadline, context_id)
            return
        lease = self._leases.pop(context_id, None)
        if lease is None:
            return
        lease.cancel()
        self._metrics.context_timeouts.inc()
        # Resume what is missing on a new context (or finish, if every word already arrived).
        self._failed(context_id, "no done from Cartesia before the context deadline", retry=True, cause="no_done")

    # ------------------------------------------------------------ endings

    def _failed(self, context_id: str, reason: str, *, retry: bool = False, cause: str = "socket_lost") -> None:
        self._held.pop(context_id, None)  # its text is resumed from what the owner knows was sent
        lease = self._leases.pop(context_id, None)
        if lease is not None:
            lease.cancel()
        self._drop_deadline(context_id)
        self._owner.on_tts_failed(context_id, reason, retry=retry, cause=cause)

    def cancel(self, context_id: str) -> None:
        """Stop ``context_id`` now: Cartesia ``cancel``, slot freed, late chunks dropped."""
        self._held.pop(context_id, None)
        task = self._admissions.pop(context_id, None)
        if task is not None:
            task.cancel()
        self._pending.pop(context_id, None)
        lease = self._leases.pop(context_id, None)
        if lease is not None:
            lease.cancel()
        self._drop_deadline(context_id)

    def close(self) -> None:
        """Cancel every context, admission, held input and timer of the call."""
        for context_id in list(self._leases):
            self.cancel(context_id)
        for task in list(self._admissions.values()):
            task.cancel()
        self._admissions.clear()
        self._pending.clear()
        self._held.clear()
        if self._held_write is not None:
            self._held_write.cancel()
            self._held_write = None
        for handle in self._deadlines.values():
            handle.cancel()
        self._deadlines.clear()
        self._last_heard.clear()

    # ------------------------------------------- ContextListener (the pool)

    def on_cartesia_message(self, msg: ServerMessage, received_at: float) -> None:
        context_id = msg.context_id or ""
        if context_id in self._last_heard:
            self._last_heard[context_id] = received_at
        if isinstance(msg, (Done, ErrorMessage)):
            self._held.pop(context_id, None)
            lease = self._leases.pop(context_id, None)
            if lease is not None:
                lease.abandon()
            self._drop_deadline(context_id)
        self._owner.on_tts_message(context_id, msg, received_at)

    def on_context_lost(self, context_id: str, reason: str) -> None:
        self._held.pop(context_id, None)
        self._leases.pop(context_id, None)
        self._drop_deadline(context_id)
        if self._owner.closed:
            return
        self._owner.on_tts_failed(context_id, f"Cartesia socket {reason}", retry=True, cause="socket_lost")
