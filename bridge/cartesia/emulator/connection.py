"""One Cartesia TTS WebSocket on the emulator: the reader, the scheduler/writer, the socket.

Each WebSocket gets one ``Connection``. The reader (``serve_websocket``) only
updates state machines; a single scheduler task owns the clock and is the
only writer of the socket, so frames are never interleaved and there is no
task per chunk or per context. Contexts sit in a heap keyed by the time they
next need attention (a chunk, a TTFB end, a buffer deadline).

Finished context ids are tombstoned so later inputs for them get an error:
"finished" within ``context_expiry_s`` of the last audio, "expired" after it.

Bounded structures and their policy when full:

* ``Connection.outbox``: frames waiting for the scheduler to send. Filled only
  by the reader's error replies, one per client message, and drained on every
  scheduler wake; the reader stops reading while it holds more than
  ``OUTBOX_HIGH_WATER`` frames (it awaits the drain), so it is bounded.
* Tombstones: ``TOMBSTONE_CAP`` per connection, oldest dropped.
* The socket itself: the scheduler pauses while the transport buffers more
  than ``WRITE_HIGH_WATER`` bytes (or awaits ``send_frame``), so a slow reader
  slows the scheduler (back-pressure), never grows memory.
* Client messages: at most ``MAX_MESSAGE_BYTES`` each (aiohttp closes with 1009 beyond).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import WSMsgType, web

from ...logs import log_event
from ...wsframe import frame_text
from ..protocol import (
    CancelRequest,
    ErrorMessage,
    GenerationRequest,
    RequestError,
    ServerMessage,
    encode_server_message,
    parse_client_message,
)
from .context import Context, clock
from .faults import hits
from .models import check_model
from .settings import EmulatorSettings
from .state import EmulatorState
from .synth import Synthesizer
from .versions import VersionRules, check_request

logger = logging.getLogger("bridge.cartesia.emulator")

#: Max size of one client WebSocket message.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
TOMBSTONE_CAP: Final = 10000
OUTBOX_HIGH_WATER: Final = 256
#: Event-loop timers fire at whole milliseconds (libuv), so the scheduler's timer is set
#: this much early and the last stretch before a first chunk is slept exactly (it blocks
#: the loop at most this long, once per generation; paced chunks use the slack instead).
EXACT_WAIT_S: Final = 0.0015
#: Back-pressure: the scheduler pauses while the socket's write buffer holds more than this.
WRITE_HIGH_WATER: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Services:
    """What a connection needs from its emulator: settings, shared state, voices."""

    settings: EmulatorSettings
    state: EmulatorState
    synth: Synthesizer


def chunk_json(json_context_id: bytes, b64: str, step_time: float, flush_id: int | None) -> bytes:
    """A ``chunk`` message, byte for byte ``orjson.dumps(encode_server_message(Chunk(...)))``
    (the same for every API version), built without the dict: it is the emulator's most
    frequent message. ``json_context_id`` is ``orjson.dumps(context_id)``."""
    out = (b'{"type":"chunk","data":"' + b64.encode("ascii") + b'","done":false,"status_code":206,"step_time":'
           + orjson.dumps(step_time) + b',"context_id":' + json_context_id)
    if flush_id is not None:
        out += b',"flush_id":' + orjson.dumps(flush_id)
    return out + b"}"


class Connection:
    """One accepted WebSocket: the reader feeds contexts, one scheduler task writes.

    Implements ``ContextHost`` for its contexts. Limits: see the module doc
    (outbox high water, tombstones, write buffer).
    """

    def __init__(self, services: Services, ws: web.WebSocketResponse, conn_id: int, rules: VersionRules) -> None:
        self.settings = services.settings
        self.synth = services.synth
        self.state = services.state
        self.ws = ws
        self.id = conn_id
        self.rules = rules
        self.version = rules.version
        self.loop = asyncio.get_running_loop()
        self.contexts: dict[str, Context] = {}
        self.tombstones: OrderedDict[str, float] = OrderedDict()
        self.outbox: list[bytes] = []
        self.heap: list[tuple[float, int, Context]] = []
        self._seq = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Event = asyncio.Event()
        self.chunks_sent = 0
        self.closing = False
        self.last_activity = self.loop.time()
        self.scheduler: asyncio.Task[None] | None = None
        #: Raw transport for batched frame writes (None → per-frame ``send_frame``).
        self.transport: asyncio.Transport | None = None

    # --------------------------------------------------------------- output

    def emit(self, msg: ServerMessage) -> None:
        self.outbox.append(orjson.dumps(encode_server_message(msg, self.version)))

    def emit_error(self, err: ErrorMessage) -> None:
        if err.request_id is None:
            err = ErrorMessage(
                err.context_id, err.status_code, err.message, err.error_code, err.title,
                str(uuid.uuid4()), err.doc_url,
            )
        self.emit(err)
        self.wake()

    def emit_chunk(self, ctx: Context, data: bytes, b64: str, flush_id: int, step_ms: float, lateness: float,
                   *, first: bool) -> None:
        """``data`` as a ``chunk`` message; ``b64`` is its base64 (cached with the render)."""
        self.outbox.append(chunk_json(ctx.json_id, b64, round(step_ms, 3), flush_id))
        self.state.chunk_sent(lateness, first=first)
        if ctx.record is not None:
            ctx.record.audio += data
            ctx.record.chunks += 1
        self.chunks_sent += 1
        limit = self.settings.faults.close_after_chunks
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
        self.state.context_finished(ctx.record)

    async def run_scheduler(self) -> None:
        loop = self.loop
        ws = self.ws
        slack = self.settings.pacing_slack_ms / 1000.0
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
                    limit = self.settings.faults.close_after_chunks
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
        self.state.message_received(self.id, obj)
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
        settings = self.settings
        if not req.context_id:
            req.context_id = str(uuid.uuid4())
        cid = req.context_id
        check_model(req.model_id, cid)
        check_request(req, self.rules)
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
            voice = self.synth.voice_of(req)
            if hits(settings.seed, "reject-429", cid, settings.faults.reject_429_fraction) or (
                settings.max_concurrency is not None and self.state.active_contexts >= settings.max_concurrency
            ):
                raise RequestError(
                    "You have exceeded your plan's concurrency limit.",
                    context_id=cid, status_code=429, error_code="concurrency_limited",
                    title="Too many concurrent requests",
                )
            record = self.state.open_record(cid, self.id, req.model_id, voice.id, req.output_format)
            ctx = Context(self, req, voice, now, record, first_flush_id=self.rules.first_flush_id)
            self.contexts[cid] = ctx
            self.state.context_started()
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


async def serve_websocket(
    services: Services, request: web.Request, conn_id: int, rules: VersionRules, live: dict[int, Connection]
) -> web.WebSocketResponse:
    """Upgrade ``request`` and run the connection until either side closes.

    ``live`` holds the open connections by id (the emulator closes them on
    shutdown); this function adds and removes its own. Auth and the connection
    limit are the caller's checks, done before the upgrade.
    """
    state = services.state
    # compress=False: frames are written pre-built (see Connection.run_scheduler).
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=True, compress=False)
    state.active_connections += 1
    try:
        await ws.prepare(request)
    except BaseException:
        state.active_connections -= 1
        raise
    state.handshakes += 1
    conn = Connection(services, ws, conn_id, rules)
    transport = request.transport
    # uvloop's transports are not asyncio.Transport subclasses; what matters is the interface.
    conn.transport = transport if hasattr(transport, "get_write_buffer_size") else None
    live[conn.id] = conn
    scheduler = asyncio.create_task(conn.run_scheduler(), name=f"emulator-conn-{conn.id}")
    conn.scheduler = scheduler
    log_event(logger, "emulator_connection_open", connection_id=conn.id, version=rules.version)
    loop = asyncio.get_running_loop()
    idle = services.settings.idle_timeout_s
    reason = "client closed"
    try:
        while True:
            timeout = max(0.005, conn.last_activity + idle - loop.time())
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                if scheduler.done():
                    reason = "server closed"
                    break
                if loop.time() - conn.last_activity >= idle and not conn.has_work():
                    reason = "idle timeout"
                    await ws.close(code=1000, message=b"connection idle timeout")
                    break
                continue
            if msg.type == WSMsgType.TEXT:
                conn.handle_text(msg.data)
                if len(conn.outbox) > OUTBOX_HIGH_WATER:
                    await conn.wait_drained()
            elif msg.type == WSMsgType.BINARY:
                conn.last_activity = loop.time()
                conn.emit_error(ErrorMessage(None, 400, "binary frames are not supported; send JSON text",
                                             "invalid_request", "Invalid request"))
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                break
    finally:
        conn.close_all()
        scheduler.cancel()
        try:
            await scheduler
        except (asyncio.CancelledError, Exception):
            pass
        if not ws.closed:
            await ws.close()
        live.pop(conn.id, None)
        state.active_connections -= 1
        log_event(logger, "emulator_connection_closed", connection_id=conn.id, reason=reason,
                  chunks=conn.chunks_sent)
    return ws
