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
* A context's inputs are joined (``merge_continuation``, same text) into one
  held input of at most ``MAX_MERGED_CHARS`` characters; at most one is held
  per context. It is written at once when it ends a sentence, closes the
  context (``continue: false``) or asks for a flush (where Cartesia starts
  generating), or when the next input cannot be joined (another voice,
  language or settings; the length cap). Otherwise it is written at the end
  of the event-loop turn when it is the context's first input (Cartesia's
  own buffer clock, ``max_buffer_delay_ms``, starts with the first word) or
  ends a clause, and else ``text_hold_ms`` after the first input held (one
  timer per context). An agent that streams a word per loop turn (50
  words/s) so costs one Cartesia message per ~4 words instead of one per
  word; ``text_hold_ms`` = 0 writes every input at the end of its turn.
  ``append_text`` joins such a word without a request object per word (the
  request is built once, when the joined input is written).
* A closed context (``continue: false``) that hears nothing from Cartesia for
  ``context_timeout_s`` seconds is cancelled and reported as failed with
  ``retry=True, cause="no_done"`` (the owner resumes what is missing).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
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
    Chunk,
    Done,
    ErrorMessage,
    GenerationRequest,
    ServerMessage,
    WordTimestamps,
    merge_continuation,
)
from metrics import BridgeMetrics

MAX_PENDING_REQUESTS: Final = 10_000
#: Longest transcript made by joining one turn's inputs for a context (characters).
MAX_MERGED_CHARS: Final = 1000
#: Only this many trailing characters of a joined input are checked for a sentence end.
SENTENCE_END_WINDOW: Final = 16
#: A clause end (the held text goes at the end of the loop turn) or a sentence end (at once,
#: its mark in ``SENTENCE_MARKS``: ``ENDS_SENTENCE``, with one search per input for both).
ENDS_CLAUSE: Final = re.compile(r"[.!?;:,\u2014\u2026][\"')\]]*\s+$")
SENTENCE_MARKS: Final = frozenset(".!?;:")
#: Default ``text_hold_ms`` (``CARTESIA_TEXT_HOLD_MS``): streamed text waits at most this long (ms).
DEFAULT_TEXT_HOLD_MS: Final = 80

#: Every field of a request in ``__init__``'s positional order (all are init fields), and where the text sits.
_REQUEST_FIELDS: Final = tuple(f.name for f in fields(GenerationRequest))
assert all(f.init for f in fields(GenerationRequest)), "_with_transcript passes every field to __init__"
_request_values: Final = attrgetter(*_REQUEST_FIELDS)
_TRANSCRIPT_AT: Final = _REQUEST_FIELDS.index("transcript")


def _with_transcript(request: GenerationRequest, transcript: str) -> GenerationRequest:
    """``request`` with another transcript (``dataclasses.replace`` without its per-call field walk)."""
    values = list(_request_values(request))
    values[_TRANSCRIPT_AT] = transcript
    return GenerationRequest(*values)


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
        text_hold_ms: int = DEFAULT_TEXT_HOLD_MS,
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
        self._hold_s = text_hold_ms / 1000.0
        # The joined input not yet written, per context; it goes at a sentence end, at the
        # turn's end (context in _turn_end, one call_soon for all) or when its hold timer fires.
        # Text joined by ``append_text`` is kept as the whole transcript in _held_text (the
        # request in _held has the first part): the request is built once, when it is written.
        self._held: dict[str, GenerationRequest] = {}
        self._held_text: dict[str, str] = {}
        # The last input written per context: the settings ``append_text`` continues with when
        # nothing is held (its transcript is not used). Dropped with the context.
        self._last_written: dict[str, GenerationRequest] = {}
        self._turn_end: set[str] = set()
        self._held_write: asyncio.Handle | None = None
        self._hold_timers: dict[str, asyncio.TimerHandle] = {}
        self._written: set[str] = set()  # contexts whose first input went out (later ones may be held)

    @classmethod
    def factory(cls, pool: CartesiaPool, metrics: BridgeMetrics, *, admission_timeout_s: float,
                context_timeout_s: float, text_hold_ms: int) -> Callable[[ContextOwner], CallContexts]:
        """A ``CallServices.tts`` factory: each call's contexts on ``pool``."""
        def open_contexts(owner: ContextOwner) -> CallContexts:
            return cls(pool, owner, metrics, admission_timeout_s=admission_timeout_s,
                       context_timeout_s=context_timeout_s, text_hold_ms=text_hold_ms)
        return open_contexts

    @property
    def held_inputs(self) -> int:
        """Contexts with an input held back (not yet written to Cartesia)."""
        return len(self._held)

    @property
    def timers(self) -> int:
        """Hold timers, context deadlines and the turn-end write still scheduled."""
        return len(self._hold_timers) + len(self._deadlines) + (self._held_write is not None)

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
            self._hold(context_id, request)
            return
        pending = self._pending[context_id]
        merged = merge_continuation(pending[-1], request)
        if merged is not None and len(merged.transcript) <= MAX_MERGED_CHARS:
            pending[-1] = merged
        elif len(pending) >= MAX_PENDING_REQUESTS:
            self._failed(context_id, "too many inputs waiting for admission")
        else:
            pending.append(request)

    def append_text(self, context_id: str, text: str) -> bool:
        """``text`` as the next input of ``context_id``, with the settings of its last input
        (the one held back, else the last written), ``continue`` and no ``flush``: what
        ``send`` does with that request, without building it (an agent's streamed words, one
        call each). The caller must know that request's settings are the last input's.
        ``False``, and nothing done, when the context is not admitted, its last input closed
        it or asked for a flush, it has had no input here yet, or the joined text would
        exceed ``MAX_MERGED_CHARS``: then ``send`` the request instead."""
        held = self._held.get(context_id)
        if held is None:
            last = self._last_written.get(context_id)
            if last is None or not last.continue_ or last.flush or context_id not in self._leases:
                return False
            # A new held input: the last one's settings, this text (built when it is written).
            self._held[context_id] = last
            self._held_text[context_id] = text
            self._schedule_held(context_id, text, False)
            return True
        if not held.continue_ or held.flush or context_id not in self._leases:
            return False
        joined = self._held_text.get(context_id, held.transcript) + text
        if len(joined) > MAX_MERGED_CHARS:
            return False
        self._held_text[context_id] = joined
        self._schedule_held(context_id, joined, False)
        return True

    def _hold(self, context_id: str, request: GenerationRequest) -> None:
        """Join ``request`` with the context's held input; write or schedule the result."""
        held = self._held.get(context_id)
        if held is not None:
            joined = self._held_text.pop(context_id, None)
            if joined is not None:
                held = self._held[context_id] = _with_transcript(held, joined)
            merged = merge_continuation(held, request)
            if merged is not None and len(merged.transcript) <= MAX_MERGED_CHARS:
                request = merged
            else:
                self._write_one_held(context_id)  # keep the order: what was held goes first
                if context_id not in self._leases:
                    return  # that write failed and the utterance is being resumed from its text
        self._held[context_id] = request
        self._schedule_held(context_id, request.transcript, not request.continue_ or request.flush)

    def _schedule_held(self, context_id: str, text: str, closes: bool) -> None:
        """Write the context's held input (``text`` joined so far) now, at the end of the loop
        turn or when its hold timer fires; ``closes``: it ends the context or asks for a flush."""
        # Only the tail can end a sentence: no rescan of the whole joined text per token.
        clause = ENDS_CLAUSE.search(text, max(0, len(text) - SENTENCE_END_WINDOW))
        if closes or (clause is not None and clause.group()[0] in SENTENCE_MARKS):
            # Cartesia starts generating here: do not make it wait.
            self._write_one_held(context_id)
        elif context_id in self._turn_end:
            return
        elif self._hold_s <= 0.0 or context_id not in self._written or clause is not None:
            self._turn_end.add(context_id)
            if self._held_write is None:
                self._held_write = asyncio.get_running_loop().call_soon(self._write_held)
        elif context_id not in self._hold_timers:
            self._hold_timers[context_id] = asyncio.get_running_loop().call_later(
                self._hold_s, self._hold_expired, context_id)

    def _write_held(self) -> None:
        """End of the loop turn: write the held input of every context marked for it."""
        self._held_write = None
        for context_id in list(self._turn_end):
            self._write_one_held(context_id)

    def _hold_expired(self, context_id: str) -> None:
        self._hold_timers.pop(context_id, None)
        self._write_one_held(context_id)

    def _write_one_held(self, context_id: str) -> None:
        self._turn_end.discard(context_id)
        timer = self._hold_timers.pop(context_id, None)
        if timer is not None:
            timer.cancel()
        request = self._held.pop(context_id, None)
        joined = self._held_text.pop(context_id, None)
        lease = self._leases.get(context_id)
        if request is None or lease is None or self._owner.closed:
            return
        if joined is not None:
            request = _with_transcript(request, joined)
        self._written.add(context_id)
        self._last_written[context_id] = request
        self._metrics.cartesia_text_inputs.inc()
        try:
            lease.send(request)
        except ContextError as exc:  # socket just died / queue full: transient, resume elsewhere
            self._failed(context_id, str(exc), retry=True, cause=retry_cause(exc))

    def _drop_held(self, context_id: str) -> None:
        """Forget the context's held input and its timer (the context is over)."""
        self._held.pop(context_id, None)
        self._held_text.pop(context_id, None)
        self._last_written.pop(context_id, None)
        self._turn_end.discard(context_id)
        self._written.discard(context_id)
        timer = self._hold_timers.pop(context_id, None)
        if timer is not None:
            timer.cancel()

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
        self._written.add(context_id)
        for request in self._pending.pop(context_id, []):
            self._metrics.cartesia_text_inputs.inc()
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
        self._drop_held(context_id)  # its text is resumed from what the owner knows was sent
        lease = self._leases.pop(context_id, None)
        if lease is not None:
            lease.cancel()
        self._drop_deadline(context_id)
        self._owner.on_tts_failed(context_id, reason, retry=retry, cause=cause)

    def cancel(self, context_id: str) -> None:
        """Stop ``context_id`` now: Cartesia ``cancel``, slot freed, late chunks dropped."""
        self._drop_held(context_id)
        task = self._admissions.pop(context_id, None)
        if task is not None:
            task.cancel()
        self._pending.pop(context_id, None)
        lease = self._leases.pop(context_id, None)
        if lease is not None:
            lease.cancel()
        self._drop_deadline(context_id)

    def close(self) -> None:
        """Cancel every context, admission, held input and timer (hold timers too) of the call."""
        for context_id in list(self._leases):
            self.cancel(context_id)
        for task in list(self._admissions.values()):
            task.cancel()
        self._admissions.clear()
        self._pending.clear()
        for context_id in list(self._held):
            self._drop_held(context_id)
        self._written.clear()
        self._last_written.clear()
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
        last_heard = self._last_heard
        if context_id in last_heard:
            last_heard[context_id] = received_at
        cls = type(msg)
        # Audio and word times (nearly every message) skip the end-of-context check.
        if cls is not Chunk and cls is not WordTimestamps and isinstance(msg, (Done, ErrorMessage)):
            self._drop_held(context_id)
            lease = self._leases.pop(context_id, None)
            if lease is not None:
                lease.abandon()
            self._drop_deadline(context_id)
        self._owner.on_tts_message(context_id, msg, received_at)

    def on_context_lost(self, context_id: str, reason: str) -> None:
        self._drop_held(context_id)
        self._leases.pop(context_id, None)
        self._drop_deadline(context_id)
        if self._owner.closed:
            return
        self._owner.on_tts_failed(context_id, f"Cartesia socket {reason}", retry=True, cause="socket_lost")
