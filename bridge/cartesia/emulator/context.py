"""One context's life on the emulator: buffering, generations (jobs), pacing, timestamps.

A ``Context`` is a state machine without sockets: it is fed inputs
(``on_request``, ``cancel``), stepped by its connection's scheduler (``step``)
and hands every outgoing message to its ``ContextHost`` (the connection).
Generation text comes from the buffering rules of the Cartesia docs: managed
buffering cuts at sentence ends or after ``max_buffer_delay_ms``; ``flush``
and ``continue:false`` cut at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
from collections import deque
from typing import Final, Protocol

import orjson

from ...logs import log_event
from ..protocol import (
    Done,
    ErrorMessage,
    FlushDone,
    GenerationRequest,
    PhonemeTimestamps,
    RequestError,
    ServerMessage,
    WordTimestamps,
)
from .faults import context_seed, hits
from .rendered import Rendered
from .settings import EmulatorSettings
from .state import ContextRecord
from .synth import Synthesizer
from .voices import Voice, normalize_word

logger = logging.getLogger("bridge.cartesia.emulator")

MAX_JOBS_PER_CONTEXT: Final = 1024
#: With rtf 0 a context emits at most this many chunks per scheduler turn, then yields.
MAX_CHUNKS_PER_TURN: Final = 32
#: The scheduler's clock. Not ``loop.time()``: uvloop's has 1 ms resolution, and the
#: configured TTFB should be what a client measures, not TTFB plus up to a millisecond.
clock: Final = time.monotonic
#: "Enough text" heuristic: cut after the last sentence end followed by whitespace.
SENTENCE_END: Final = re.compile(r"[.!?;:][\"')\]]*\s")
#: Buffer this long is generated even without a sentence end.
ENOUGH_CHARS: Final = 250

#: What follows a job's audio: a ``flush_done``, the context's ``done``, or the end of a cancel.
FLUSH: Final = 1
DONE: Final = 2
CANCEL_END: Final = 3


class ContextHost(Protocol):
    """What a context needs from its connection (``Connection`` implements it)."""

    settings: EmulatorSettings
    synth: Synthesizer
    #: Set when the socket is going away: a context stops emitting.
    closing: bool

    def emit(self, msg: ServerMessage) -> None: ...

    def emit_error(self, err: ErrorMessage) -> None: ...

    def emit_chunk(
        self, ctx: Context, data: bytes, b64: str, flush_id: int, step_ms: float, lateness: float, *, first: bool
    ) -> None: ...

    def schedule(self, ctx: Context, due: float) -> None: ...

    def finish(self, ctx: Context, now: float) -> None: ...


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
    """One context's state machine; its output goes through its ``ContextHost``.

    States: ``open`` (takes inputs) → ``closing`` (``continue:false`` seen,
    rendering the rest) or ``cancelled`` → ``finished`` (set by the host).
    Limits: at most ``MAX_JOBS_PER_CONTEXT`` queued generations (more → 429
    ``too_many_inputs``); streamed text is cut into a generation at a sentence
    end, at ``ENOUGH_CHARS`` characters, or ``max_buffer_delay_ms`` after it
    arrived. Times are ``clock()`` seconds.
    """

    def __init__(
        self,
        host: ContextHost,
        req: GenerationRequest,
        voice: Voice,
        now: float,
        record: ContextRecord | None,
        *,
        first_flush_id: int = 1,
    ) -> None:
        self.host = host
        self.id = req.context_id
        #: The id as JSON (quoted, escaped), for the pre-encoded chunk messages.
        self.json_id = orjson.dumps(self.id)
        self.req = req
        self.voice = voice
        self.fmt = req.output_format
        settings = host.settings
        self.rng = random.Random(context_seed(settings.seed, self.id))
        self.no_done = hits(settings.seed, "no-done", self.id, settings.faults.no_done_fraction)
        delay = req.max_buffer_delay_ms
        self.buffer_delay_s = (settings.default_buffer_delay_ms if delay is None else delay) / 1000.0
        self.jobs: deque[Job] = deque()
        self.buffer = ""
        self.buffer_deadline: float | None = None
        #: ``flush_id`` of the text not yet flushed (the API version decides where it starts).
        self.flush_id = first_flush_id
        self.state = "open"
        self.samples_total = 0
        self.due: float | None = None
        self.last_audio_at = now
        self.prev_end = now  # when the previous generation ended (here: none yet)
        bps = self.fmt.bytes_per_sample
        self.chunk_bytes = max(bps, settings.chunk_ms * self.fmt.sample_rate // 1000 * bps)
        self.record = record

    # ---------------------------------------------------------------- input

    def on_request(self, req: GenerationRequest, now: float) -> None:
        if self.record is not None:
            self.record.transcript_parts.append(req.transcript)
        self.buffer += req.transcript
        if req.flush:
            self._cut(now, FLUSH)
        elif not req.continue_:
            self._cut(now, DONE)
            self.state = "closing"
        elif self.buffer_delay_s <= 0.0:
            if self.buffer:
                self._cut(now, None)
        else:
            self._cut_enough(now)
            if self.buffer and self.buffer_deadline is None:
                self.buffer_deadline = now + self.buffer_delay_s
        self.host.schedule(self, now)

    def _cut_enough(self, now: float) -> None:
        last: re.Match[str] | None = None
        for match in SENTENCE_END.finditer(self.buffer):
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
        if marker == FLUSH:
            self.flush_id += 1
        self.jobs.append(job)

    def cancel(self, now: float) -> None:
        """Drop unstarted work; keep (or stop) the in-flight generation; then ``done``."""
        settings = self.host.settings
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
            head.marker = CANCEL_END
            self.jobs = deque([head])
            self.host.schedule(self, now)
            return
        self.jobs.clear()
        self._end_cancelled(now)

    def _end_cancelled(self, now: float) -> None:
        if self.host.settings.send_done_on_cancel:
            self.host.emit(Done(self.id))
            if self.record is not None:
                self.record.done = True
        self.host.finish(self, now)

    # ------------------------------------------------------------- schedule

    def step(self, now: float) -> float | None:
        """Emit whatever is due at ``now``; return when to be called again (None = on input)."""
        host = self.host
        settings = host.settings
        synth = host.synth
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
                if job.text.strip() and synth.renders_in_thread(self.voice):
                    if job.render_task is None:
                        job.render_task = synth.render_later(job.text, self.fmt, self.voice, self.req)
                        job.render_task.add_done_callback(functools.partial(self._rendered, job))
                    return self.buffer_deadline
                job.rendered = synth.render_now(job.text, self.fmt, self.voice, self.req)
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
                start = job.pos
                end = min(len(audio), start + self.chunk_bytes)
                data = audio[start:end]
                lateness = max(0.0, now - job.next_due)
                first = job.pos == 0
                step_ms = (now - job.t_start) * 1000.0 if first else 0.0
                job.pos = end
                host.emit_chunk(self, data, rendered.b64_slice(start, end), job.flush_id, step_ms,
                                lateness, first=first)
                self.last_audio_at = now
                self._emit_timestamps(job, end // self.fmt.bytes_per_sample)
                interval = (len(data) / self.fmt.bytes_per_second) * settings.rtf
                if settings.jitter_ms and settings.rtf:
                    interval += self.rng.uniform(0.0, settings.jitter_ms) / 1000.0
                job.next_due += interval
                if host.closing:
                    return None
                continue
            # Audio of this job is out: remaining timestamps, then its marker.
            self._emit_timestamps(job, rendered.samples)
            self.samples_total += rendered.samples
            self.jobs.popleft()
            self.prev_end = now
            if job.marker == FLUSH:
                host.emit(FlushDone(self.id, job.flush_id))
                if self.record is not None:
                    self.record.flush_dones.append(job.flush_id)
            elif job.marker == DONE:
                if not self.no_done:
                    host.emit(Done(self.id))
                    if self.record is not None:
                        self.record.done = True
                host.finish(self, now)
                return None
            elif job.marker == CANCEL_END:
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
            self.host.emit_error(ErrorMessage(self.id, 500, f"synthesis failed: {exc}", "internal_error", "Internal error"))
            self.host.finish(self, clock())
            return
        job.rendered = fut.result()
        job.render_task = None
        job.base_samples = self.samples_total
        now = clock()
        self.host.schedule(self, max(now, job.next_due or now))

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
                self.host.emit(WordTimestamps(self.id, words, starts, ends, job.flush_id))
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
                self.host.emit(PhonemeTimestamps(self.id, phons, pstarts, pends, job.flush_id))

    def abandon(self) -> None:
        for job in self.jobs:
            if job.render_task is not None:
                job.render_task.cancel()
        self.jobs.clear()
