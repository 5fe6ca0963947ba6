"""Per-connection engine: contexts, buffering, pacing, one scheduler, one writer.

Each WebSocket gets one ``Connection``. The reader (the aiohttp handler) only
updates state machines; a single scheduler task owns the clock and is the
only writer of the socket, so frames are never interleaved and there is no
task per chunk or per context. Contexts sit in a heap keyed by the time they
next need attention (a chunk, a TTFB end, a buffer deadline).

Context life: ``open`` (takes inputs) → ``closing`` (``continue:false`` seen,
rendering the rest) → ``finished`` (``done``/cancel/error). Finished ids are
tombstoned (bounded: ``TOMBSTONE_CAP`` per connection) so later inputs for
them get an error: "finished" within ``context_expiry_s`` of the last audio,
"expired" after it.

Bounded structures and their policy when full:

* ``Connection.outbox``: frames waiting for the scheduler to send. Filled only
  by the reader's error replies, one per client message, and drained on every
  scheduler wake; the reader stops reading while it holds more than
  ``OUTBOX_HIGH_WATER`` frames (it awaits the drain), so it is bounded.
* ``Context.jobs``: at most ``MAX_JOBS_PER_CONTEXT`` queued generations; more
  inputs answer a 429 error for the context.
* Text buffered per context: at most ``MAX_BUFFER_CHARS``; beyond it the buffer
  is cut into a job at once.
* Tombstones: ``TOMBSTONE_CAP`` per connection, oldest dropped.
* The socket itself: ``send_frame`` awaits the transport's drain, so a slow
  reader slows the scheduler (back-pressure), never grows memory.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import heapq
import logging
import random
import re
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import WSMsgType, web

from ...logs import log_event
from ...wsframe import frame_text
from ..protocol import (
    CancelRequest,
    Chunk,
    Done,
    ErrorMessage,
    FlushDone,
    GenerationRequest,
    OutputFormat,
    PhonemeTimestamps,
    RequestError,
    WordTimestamps,
    encode_server_message,
    parse_client_message,
)
from .faults import context_seed, hits
from .settings import valid_model
from .voices import Rendered, Voice, normalize_word

if TYPE_CHECKING:
    from .server import Emulator

logger = logging.getLogger("bridge.cartesia.emulator")

MAX_JOBS_PER_CONTEXT: Final = 1024
MAX_BUFFER_CHARS: Final = 4000
TOMBSTONE_CAP: Final = 10000
OUTBOX_HIGH_WATER: Final = 256
#: With rtf 0 a context emits at most this many chunks per scheduler turn, then yields.
MAX_CHUNKS_PER_TURN: Final = 32
#: The scheduler's clock. Not ``loop.time()``: uvloop's has 1 ms resolution, and the
#: configured TTFB should be what a client measures, not TTFB plus up to a millisecond.
clock: Final = time.monotonic
#: Event-loop timers fire at whole milliseconds (libuv), so the scheduler's timer is set
#: this much early and the last stretch before a first chunk is slept exactly (it blocks
#: the loop at most this long, once per generation; paced chunks use the slack instead).
EXACT_WAIT_S: Final = 0.0015
#: "Enough text" heuristic: cut after the last sentence end followed by whitespace.
_SENTENCE_END: Final = re.compile(r"[.!?;:][\"')\]]*\s")
#: Buffer this long is generated even without a sentence end.
ENOUGH_CHARS: Final = 250

#: Back-pressure: the scheduler pauses while the socket's write buffer holds more than this.
WRITE_HIGH_WATER: Final = 256 * 1024

_FLUSH: Final = 1
_DONE: Final = 2
_CANCEL_END: Final = 3


@dataclass(slots=True)
class ContextRecord:
    """What a context produced, for tests and the load tester."""

    context_id: str
    connection_id: int
    model_id: str
    voice_id: str
    output_format: OutputFormat
    transcript_parts: list[str] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    words: list[str] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    flush_dones: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def transcript(self) -> str:
        return "".join(self.transcript_parts)

    def to_json(self, *, with_audio: bool = True) -> dict[str, Any]:
        import hashlib

        audio = bytes(self.audio)
        out: dict[str, Any] = {
            "context_id": self.context_id,
            "connection_id": self.connection_id,
            "model_id": self.model_id,
            "voice_id": self.voice_id,
            "output_format": self.output_format.to_wire(),
            "transcript": self.transcript,
            "bytes": len(audio),
            "sha256": hashlib.sha256(audio).hexdigest(),
            "chunks": self.chunks,
            "cancelled": self.cancelled,
            "done": self.done,
            "error": self.error,
            "flush_dones": list(self.flush_dones),
            "word_timestamps": {"words": self.words, "start": self.starts, "end": self.ends},
        }
        if with_audio:
            out["audio_b64"] = base64.b64encode(audio).decode("ascii")
        return out


class Job:
    """One generation: a slice of a context's text plus what follows its audio."""

    __slots__ = (
        "text", "flush_id", "marker", "rendered", "render_task", "pos", "next_due",
        "t_start", "word_idx", "phon_idx", "delay_checked", "base_samples", "created",
    )

    def __init__(self, text: str, flush_id: int, marker: int | None, created: float) -> None:
        self.text = text
        self.flush_id = flush_id
        self.marker = marker
        self.rendered: Rendered | None = None
        self.render_task: asyncio.Future[Rendered] | None = None
        self.pos = 0
        self.next_due: float | None = None
        self.t_start = 0.0
        self.word_idx = 0
        self.phon_idx = 0
        self.delay_checked = False
        self.base_samples = 0
        self.created = created

    @property
    def started(self) -> bool:
        return self.pos > 0


class Context:
    """One context's state machine (no I/O: it appends frames to ``out``)."""

    def __init__(self, conn: Connection, req: GenerationRequest, voice: Voice, now: float) -> None:
        self.conn = conn
        self.id = req.context_id
        self.req = req
        self.voice = voice
        self.fmt = req.output_format
        settings = conn.emulator.settings
        self.rng = random.Random(context_seed(settings.seed, self.id))
        self.no_done = hits(settings.seed, "no-done", self.id, settings.faults.no_done_fraction)
        delay = req.max_buffer_delay_ms
        self.buffer_delay_s = (settings.default_buffer_delay_ms if delay is None else delay) / 1000.0
        gc = req.generation_config or {}
        self.speed = float(gc.get("speed", 1.0))
        self.volume = float(gc.get("volume", 1.0))
        if req.speed == "slow":
            self.speed *= 0.8
        elif req.speed == "fast":
            self.speed *= 1.25
        self.jobs: deque[Job] = deque()
        self.buffer = ""
        self.buffer_deadline: float | None = None
        self.flush_id = 1
        self.state = "open"
        self.cancelled = False
        self.samples_total = 0
        self.due: float | None = None
        self.last_audio_at = now
        self.prev_end = now  # when the previous generation ended (here: none yet)
        bps = self.fmt.bytes_per_sample
        self.chunk_bytes = max(bps, settings.chunk_ms * self.fmt.sample_rate // 1000 * bps)
        self.record = conn.emulator._new_record(self, req)

    # ---------------------------------------------------------------- input

    def on_request(self, req: GenerationRequest, now: float) -> None:
        if self.record is not None:
            self.record.transcript_parts.append(req.transcript)
        self.buffer += req.transcript
        if req.flush:
            self._cut(now, _FLUSH)
        elif not req.continue_:
            self._cut(now, _DONE)
            self.state = "closing"
        elif self.buffer_delay_s <= 0.0:
            if self.buffer:
                self._cut(now, None)
        else:
            self._cut_enough(now)
            if self.buffer and self.buffer_deadline is None:
                self.buffer_deadline = now + self.buffer_delay_s
        self.conn.schedule(self, now)

    def _cut_enough(self, now: float) -> None:
        last: re.Match[str] | None = None
        for match in _SENTENCE_END.finditer(self.buffer):
            last = match
        if last is not None:
            head, self.buffer = self.buffer[: last.end()], self.buffer[last.end() :]
            self._push_job(head, None, now)
            self.buffer_deadline = now + self.buffer_delay_s if self.buffer else None
        if len(self.buffer) >= ENOUGH_CHARS:
            cut = self.buffer.rfind(" ") + 1 or len(self.buffer)
            head, self.buffer = self.buffer[:cut], self.buffer[cut:]
            self._push_job(head, None, now)
            self.buffer_deadline = now + self.buffer_delay_s if self.buffer else None

    def _cut(self, now: float, marker: int | None) -> None:
        text, self.buffer, self.buffer_deadline = self.buffer, "", None
        self._push_job(text, marker, now)

    def _push_job(self, text: str, marker: int | None, now: float) -> None:
        if len(self.jobs) >= MAX_JOBS_PER_CONTEXT:
            raise RequestError(
                f"too many queued inputs on context (limit {MAX_JOBS_PER_CONTEXT})",
                context_id=self.id, status_code=429, error_code="too_many_inputs", title="Too many inputs",
            )
        job = Job(text, self.flush_id, marker, now)
        if marker == _FLUSH:
            self.flush_id += 1
        self.jobs.append(job)

    def cancel(self, now: float) -> None:
        """Drop unstarted work; keep (or stop) the in-flight generation; then ``done``."""
        settings = self.conn.emulator.settings
        self.cancelled = True
        self.state = "cancelled"
        self.buffer, self.buffer_deadline = "", None
        if self.record is not None:
            self.record.cancelled = True
        head = self.jobs[0] if self.jobs else None
        for job in self.jobs:
            if job is not head or not (settings.cancel_emits_inflight and job.started):
                if job.render_task is not None:
                    job.render_task.cancel()
        if head is not None and settings.cancel_emits_inflight and head.started:
            head.marker = _CANCEL_END
            self.jobs = deque([head])
            self.conn.schedule(self, now)
            return
        self.jobs.clear()
        self._end_cancelled(now)

    def _end_cancelled(self, now: float) -> None:
        if self.conn.emulator.settings.send_done_on_cancel:
            self.conn.emit(Done(self.id))
            if self.record is not None:
                self.record.done = True
        self.conn.finish(self, now)

    # ------------------------------------------------------------- schedule

    def step(self, now: float) -> float | None:
        """Emit whatever is due at ``now``; return when to be called again (None = on input)."""
        conn = self.conn
        emulator = conn.emulator
        settings = emulator.settings
        if self.buffer_deadline is not None and now >= self.buffer_deadline and self.state == "open":
            self._cut(now, None)
        budget = MAX_CHUNKS_PER_TURN
        slack = settings.pacing_slack_ms / 1000.0
        while self.jobs:
            job = self.jobs[0]
            if job.next_due is None:
                # Generation starts when the input arrived or the previous generation ended,
                # whichever is later, not when this turn happens to run (late under load).
                job.t_start = max(job.created, self.prev_end)
                delay = settings.ttfb_ms
                if settings.jitter_ms:
                    delay += self.rng.uniform(0.0, settings.jitter_ms)
                job.next_due = job.t_start + delay / 1000.0
            if job.rendered is None:
                if not job.text.strip():
                    job.rendered = Rendered(b"", 0)
                elif emulator.espeak is not None and self.voice.backend == "espeak":
                    if job.render_task is None:
                        job.render_task = asyncio.ensure_future(
                            emulator.espeak.render(
                                job.text, self.fmt, self.voice, speed=self.speed, volume=self.volume,
                                phonemes=self.req.add_phoneme_timestamps,
                            )
                        )
                        job.render_task.add_done_callback(functools.partial(self._rendered, job))
                    return self.buffer_deadline
                else:
                    job.rendered = emulator.tone.render(
                        job.text, self.fmt, self.voice, speed=self.speed, volume=self.volume,
                        phonemes=self.req.add_phoneme_timestamps,
                    )
                job.base_samples = self.samples_total
            # A paced chunk may go up to the slack early (see EmulatorSettings); a first chunk never.
            if job.next_due > (now + slack if job.pos else now):
                return self._min_due(job.next_due)
            rendered = job.rendered
            audio = rendered.audio
            if job.pos < len(audio):
                if budget <= 0:
                    return now
                faults = settings.faults
                if faults.delay_ms and not job.delay_checked:
                    job.delay_checked = True
                    if self.rng.random() < faults.delay_fraction:
                        job.next_due += faults.delay_ms / 1000.0
                        if job.next_due > now:
                            return self._min_due(job.next_due)
                job.delay_checked = False
                budget -= 1
                end = min(len(audio), job.pos + self.chunk_bytes)
                data = audio[job.pos : end]
                lateness = max(0.0, now - job.next_due)
                first = job.pos == 0
                step_ms = (now - job.t_start) * 1000.0 if first else 0.0
                job.pos = end
                conn.emit_chunk(self, data, job.flush_id, step_ms, lateness, first=first)
                self.last_audio_at = now
                self._emit_timestamps(job, end // self.fmt.bytes_per_sample)
                interval = (len(data) / self.fmt.bytes_per_second) * settings.rtf
                if settings.jitter_ms and settings.rtf:
                    interval += self.rng.uniform(0.0, settings.jitter_ms) / 1000.0
                job.next_due += interval
                if conn.closing:
                    return None
                continue
            # Audio of this job is out: remaining timestamps, then its marker.
            self._emit_timestamps(job, rendered.samples)
            self.samples_total += rendered.samples
            self.jobs.popleft()
            self.prev_end = now
            if job.marker == _FLUSH:
                conn.emit(FlushDone(self.id, job.flush_id))
                if self.record is not None:
                    self.record.flush_dones.append(job.flush_id)
            elif job.marker == _DONE:
                if not self.no_done:
                    conn.emit(Done(self.id))
                    if self.record is not None:
                        self.record.done = True
                conn.finish(self, now)
                return None
            elif job.marker == _CANCEL_END:
                self._end_cancelled(now)
                return None
        return self.buffer_deadline if self.state == "open" else None

    def _min_due(self, due: float) -> float:
        bd = self.buffer_deadline
        return due if bd is None or due < bd else bd

    def _rendered(self, job: Job, fut: asyncio.Future[Rendered]) -> None:
        if fut.cancelled() or self.state == "finished":
            return
        exc = fut.exception()
        if exc is not None:
            log_event(logger, "emulator_render_failed", logging.ERROR, context_id=self.id, error=repr(exc))
            self.conn.emit_error(ErrorMessage(self.id, 500, f"synthesis failed: {exc}", "internal_error", "Internal error"))
            self.conn.finish(self, clock())
            return
        job.rendered = fut.result()
        job.render_task = None
        job.base_samples = self.samples_total
        now = clock()
        self.conn.schedule(self, max(now, job.next_due or now))

    def _emit_timestamps(self, job: Job, upto_sample: int) -> None:
        rendered = job.rendered
        if rendered is None:
            return
        rate = self.fmt.sample_rate
        base = job.base_samples
        req = self.req
        if req.add_timestamps and job.word_idx < len(rendered.words):
            words: list[str] = []
            starts: list[float] = []
            ends: list[float] = []
            normalize = bool(req.use_normalized_timestamps)
            for word, start, end in rendered.words[job.word_idx :]:
                if start >= upto_sample:
                    break
                words.append(normalize_word(word) if normalize else word)
                starts.append((base + start) / rate)
                ends.append((base + end) / rate)
            if words:
                job.word_idx += len(words)
                self.conn.emit(WordTimestamps(self.id, words, starts, ends, job.flush_id))
                if self.record is not None:
                    self.record.words.extend(words)
                    self.record.starts.extend(starts)
                    self.record.ends.extend(ends)
        if req.add_phoneme_timestamps and job.phon_idx < len(rendered.phonemes):
            phons: list[str] = []
            pstarts: list[float] = []
            pends: list[float] = []
            for ph, start, end in rendered.phonemes[job.phon_idx :]:
                if start >= upto_sample:
                    break
                phons.append(ph)
                pstarts.append((base + start) / rate)
                pends.append((base + end) / rate)
            if phons:
                job.phon_idx += len(phons)
                self.conn.emit(PhonemeTimestamps(self.id, phons, pstarts, pends, job.flush_id))

    def abandon(self) -> None:
        for job in self.jobs:
            if job.render_task is not None:
                job.render_task.cancel()
        self.jobs.clear()


class Connection:
    """One accepted WebSocket: reader loop + scheduler/writer task."""

    def __init__(self, emulator: Emulator, ws: web.WebSocketResponse, conn_id: int, version: str) -> None:
        self.emulator = emulator
        self.ws = ws
        self.id = conn_id
        self.version = version
        self.loop = asyncio.get_running_loop()
        self.contexts: dict[str, Context] = {}
        self.tombstones: OrderedDict[str, float] = OrderedDict()
        self.outbox: list[bytes] = []
        self.heap: list[tuple[float, int, Context]] = []
        self._seq = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event = asyncio.Event()
        self.chunks_sent = 0
        self.closing = False
        self.last_activity = self.loop.time()
        self.scheduler: asyncio.Task[None] | None = None
        #: Raw transport for batched frame writes (None → per-frame ``send_frame``).
        self.transport: asyncio.Transport | None = None

    # --------------------------------------------------------------- output

    def emit(self, msg: Any) -> None:
        self.outbox.append(orjson.dumps(encode_server_message(msg, self.version)))

    def emit_error(self, err: ErrorMessage) -> None:
        if err.request_id is None:
            err = ErrorMessage(
                err.context_id, err.status_code, err.message, err.error_code, err.title,
                str(uuid.uuid4()), err.doc_url,
            )
        self.emit(err)
        self.wake()

    def emit_chunk(self, ctx: Context, data: bytes, flush_id: int, step_ms: float, lateness: float,
                   *, first: bool = False) -> None:
        msg = Chunk(ctx.id, base64.b64encode(data).decode("ascii"), round(step_ms, 3), flush_id)
        self.outbox.append(orjson.dumps(encode_server_message(msg, self.version)))
        self.emulator._chunk_sent(lateness, first=first)
        if ctx.record is not None:
            ctx.record.audio += data
            ctx.record.chunks += 1
        self.chunks_sent += 1
        limit = self.emulator.settings.faults.close_after_chunks
        if limit is not None and self.chunks_sent >= limit:
            self.closing = True

    # ------------------------------------------------------------ scheduling

    def schedule(self, ctx: Context, due: float) -> None:
        if ctx.due is not None and ctx.due <= due:
            return
        ctx.due = due
        self._seq += 1
        heapq.heappush(self.heap, (due, self._seq, ctx))
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, ctx: Context, now: float) -> None:
        if ctx.state == "finished":
            return
        ctx.state = "finished"
        ctx.abandon()
        ctx.due = None
        self.contexts.pop(ctx.id, None)
        self.tombstones[ctx.id] = ctx.last_audio_at
        if len(self.tombstones) > TOMBSTONE_CAP:
            self.tombstones.popitem(last=False)
        self.emulator._context_finished(ctx)

    async def run_scheduler(self) -> None:
        loop = self.loop
        ws = self.ws
        slack = self.emulator.settings.pacing_slack_ms / 1000.0
        try:
            while True:
                now = clock()
                heap = self.heap
                # Everything due within the pacing slack is stepped in this turn. Each context is
                # stepped once per turn (it sends all its chunks due by then), so what it asks for
                # next is scheduled after the loop, never re-popped here.
                horizon = now + slack
                again: list[tuple[Context, float]] = []
                while heap and heap[0][0] <= horizon:
                    due, _, ctx = heapq.heappop(heap)
                    if ctx.due != due or ctx.state == "finished":
                        continue
                    ctx.due = None
                    nxt = ctx.step(now)
                    if nxt is not None and ctx.state != "finished":
                        again.append((ctx, nxt))
                    if self.closing:
                        break
                for ctx, nxt in again:
                    self.schedule(ctx, nxt)
                if self.outbox:
                    out, self.outbox = self.outbox, []
                    transport = self.transport
                    if transport is not None and not transport.is_closing() and not ws.closed:
                        # One write (one syscall) per scheduler turn: whole frames, never interleaved.
                        transport.write(b"".join([frame_text(f) for f in out]))
                        # No drain event on a bare transport: poll its buffer.
                        while transport.get_write_buffer_size() > WRITE_HIGH_WATER and not transport.is_closing():  # noqa: ASYNC110
                            await asyncio.sleep(0.002)
                    else:
                        for frame in out:
                            await ws.send_frame(frame, WSMsgType.TEXT)
                    self.last_activity = loop.time()
                    self._drained.set()
                if self.closing:
                    limit = self.emulator.settings.faults.close_after_chunks
                    log_event(logger, "emulator_fault_close", connection_id=self.id, chunks=self.chunks_sent)
                    await ws.close(code=1011, message=f"emulator fault: close after {limit} chunks".encode())
                    return
                # Skip stale heap heads so the wait targets a live entry.
                while self.heap and (self.heap[0][2].due != self.heap[0][0] or self.heap[0][2].state == "finished"):
                    heapq.heappop(self.heap)
                wait = self.heap[0][0] - clock() if self.heap else None
                if wait is not None and wait <= EXACT_WAIT_S:
                    if wait > 0:
                        time.sleep(wait)  # noqa: ASYNC251 - the sub-timer stretch before a first chunk, exact
                    else:
                        await asyncio.sleep(0)
                    continue
                waiter = loop.create_future()
                self._waiter = waiter
                timer = None
                if wait is not None:
                    timer = loop.call_later(wait - EXACT_WAIT_S, self.wake)
                if not self.outbox:
                    await waiter
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        except (ConnectionResetError, RuntimeError) as exc:
            log_event(logger, "emulator_send_failed", logging.DEBUG, connection_id=self.id, error=repr(exc))
        except asyncio.CancelledError:
            raise

    # ----------------------------------------------------------------- input

    async def wait_drained(self) -> None:
        """Reader back-pressure: wait while the outbox holds more than ``OUTBOX_HIGH_WATER`` frames."""
        while len(self.outbox) > OUTBOX_HIGH_WATER and not self.closing:
            self._drained.clear()
            self.wake()
            await self._drained.wait()

    def has_work(self) -> bool:
        return any(c.jobs or c.buffer for c in self.contexts.values())

    def handle_text(self, text: str | bytes) -> None:
        now = clock()
        self.last_activity = self.loop.time()
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.emit_error(ErrorMessage(None, 400, f"invalid JSON: {exc}", "invalid_json", "Invalid JSON"))
            return
        self.emulator._received(self.id, obj)
        ctx_hint = obj.get("context_id") if isinstance(obj, dict) else None
        ctx_hint = ctx_hint if isinstance(ctx_hint, str) else None
        try:
            msg = parse_client_message(obj)
            if isinstance(msg, CancelRequest):
                self._on_cancel(msg, now)
            else:
                self._on_generation(msg, now)
        except RequestError as err:
            ctx_id = err.context_id or ctx_hint
            self.emit_error(ErrorMessage(ctx_id, err.status_code, err.message, err.error_code, err.title))
            ctx = self.contexts.get(ctx_id) if ctx_id else None
            if ctx is not None:
                if ctx.record is not None:
                    ctx.record.error = err.message
                self.finish(ctx, now)

    def _on_cancel(self, msg: CancelRequest, now: float) -> None:
        ctx = self.contexts.get(msg.context_id)
        log_event(logger, "emulator_cancel", logging.DEBUG, connection_id=self.id, context_id=msg.context_id,
                  known=ctx is not None)
        if ctx is None or ctx.state in ("finished", "cancelled"):
            return
        ctx.cancel(now)
        self.wake()

    def _on_generation(self, req: GenerationRequest, now: float) -> None:
        emulator = self.emulator
        settings = emulator.settings
        if not req.context_id:
            req.context_id = str(uuid.uuid4())
        cid = req.context_id
        if not valid_model(req.model_id):
            raise RequestError(
                f"Invalid model: model_id {req.model_id!r} is not a valid model ID",
                field="model_id", context_id=cid, error_code="model_not_found", title="Invalid model",
            )
        ctx = self.contexts.get(cid)
        if ctx is None:
            finished_at = self.tombstones.get(cid)
            if finished_at is not None:
                expired = now - finished_at >= settings.context_expiry_s
                raise RequestError(
                    f"context_id {cid!r} has {'expired' if expired else 'finished'}; start a new context",
                    field="context_id", context_id=cid,
                    error_code="context_expired" if expired else "context_closed",
                    title="Context expired" if expired else "Context closed",
                )
            voice = emulator.voice_for(req.voice_id, cid)
            if hits(settings.seed, "reject-429", cid, settings.faults.reject_429_fraction) or (
                settings.max_concurrency is not None and emulator.active_contexts >= settings.max_concurrency
            ):
                raise RequestError(
                    "You have exceeded your plan's concurrency limit.",
                    context_id=cid, status_code=429, error_code="concurrency_limited",
                    title="Too many concurrent requests",
                )
            ctx = Context(self, req, voice, now)
            self.contexts[cid] = ctx
            emulator._context_started(ctx)
        elif ctx.state != "open":
            raise RequestError(
                f"context_id {cid!r} is closed for input (continue:false already sent)",
                field="context_id", context_id=cid, error_code="context_closed", title="Context closed",
            )
        ctx.on_request(req, now)

    def close_all(self) -> None:
        self.closing = True
        for ctx in list(self.contexts.values()):
            self.finish(ctx, clock())
        if self._timer is not None:
            self._timer.cancel()
