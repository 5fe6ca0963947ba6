"""Cartesia TTS WebSocket client: one pool of sockets shared by every call.

* ``CartesiaPool`` keeps ``size`` sockets open (prewarmed at start and again
  when a voice webhook arrives), multiplexes the contexts of all calls on
  them and routes every server message by ``context_id`` to its owner.
* Admission control: at most ``max_concurrency`` contexts are active at once
  (Cartesia counts concurrency per active context). A new context beyond that
  waits in a FIFO of at most ``max_waiters`` (policy when full: refused at
  once with ``AdmissionError``) until a slot frees or its deadline passes.
* Cancelled contexts are tombstoned per socket (at most ``TOMBSTONES`` ids,
  oldest forgotten first) so late chunks are dropped and counted, never
  routed to a newer utterance.
* Each socket's messages are parsed and routed in its data callback
  (``bridge.wsclient``: no reader task, no per-message wake-up), at full
  speed: a slow call never stalls the socket, its own playout buffer absorbs
  the audio. Behind a proxy from the environment the ``websockets`` client
  is used instead, with a reader task. A message is
  written at once when nothing is queued ahead and the transport holds at
  most ``DIRECT_WRITE_MAX_BUFFERED`` bytes; otherwise one writer task drains
  an outbound FIFO of at most ``MAX_PENDING_SENDS`` messages,
  of which one call may hold ``MAX_PENDING_SENDS_PER_CALL`` (so an agent that
  floods text cannot starve the calls sharing its socket). Policy when full:
  the context's send fails with ``SendQueueFull`` and the call resumes that
  utterance after a back-off, so a congested socket is not flooded with
  retries. ``cancel`` messages are exempt (they only free capacity).
* A socket that dies is reconnected with exponential backoff and jitter; its
  live contexts are reported to their owners via ``on_context_lost`` so they
  can re-send what was not yet heard. A socket idle for ``max_age_s`` is
  replaced before Cartesia's 5-minute idle close.
* A connect that fails is counted in ``bridge_cartesia_errors_total{status}``
  (the HTTP status of a refused handshake, or ``connect_failure_kind``'s name
  for the rest) and retried with the same back-off. A 401/403 is an ERROR
  naming the credential (``CARTESIA_API_KEY``, never its value). Repeats of
  one kind are logged at most once per ``FAILURE_LOG_INTERVAL_S`` per pool,
  with how many were folded in.
* Health: ``healthy`` while a socket is open; ``down_for_s`` counts from the
  last socket closing, or from ``start()`` when none ever connected, so a
  pool that never connected is down, not "down for 0 s".
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final, Protocol
from urllib.parse import urlencode

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from bridge.cartesia.protocol import (
    CancelRequest,
    Chunk,
    Done,
    ErrorMessage,
    GenerationRequest,
    ServerMessage,
    WordTimestamps,
    parse_server_text,
)
from bridge.errors import AdmissionError as AdmissionError  # re-exported: callers catch them from here
from bridge.errors import CartesiaUnavailable as CartesiaUnavailable
from bridge.errors import ContextError as ContextError
from bridge.errors import HandshakeFailed, HandshakeRefused
from bridge.errors import SendQueueFull as SendQueueFull
from bridge.logs import log_event, loggable_url
from bridge.wsclient import (
    InlineWebSocket,
    LibraryWebSocket,
    connect_inline,
    proxy_for,
)
from metrics import BridgeMetrics

log = logging.getLogger("bridge.cartesia")
# websockets logs handshake headers (our Authorization: Bearer key) at DEBUG;
# its logger for our sockets is pinned above DEBUG so no log level leaks it.
_wire_log = logging.getLogger("bridge.cartesia.wire")
_wire_log.setLevel(logging.INFO)

TOMBSTONES: Final = 4096
MAX_PENDING_SENDS: Final = 10_000
#: Above this many unsent bytes in a socket's transport, sends queue for the
#: writer task (which awaits the drain) instead of being written at once.
DIRECT_WRITE_MAX_BUFFERED: Final = 64 * 1024
#: One call's share of a socket's queue (messages); a normal call has a handful queued at most.
MAX_PENDING_SENDS_PER_CALL: Final = 500
#: Largest server message accepted (bytes); chunks are a few KiB.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: One kind of connect failure is logged at most this often per pool (seconds); the rest are counted.
FAILURE_LOG_INTERVAL_S: Final = 30.0
#: Handshake statuses that mean the credential is wrong, not that Cartesia is down.
AUTH_STATUSES: Final = frozenset({401, 403})
#: The setting to fix when Cartesia refuses the credential (named in logs; its value never is).
CREDENTIAL_SETTING: Final = "CARTESIA_API_KEY"


def connect_failure_kind(exc: BaseException) -> str:
    """The ``status`` label of a failed connect: the HTTP status of a refused
    handshake (``"401"``, ``"503"``), else one of ``connection_refused``,
    ``dns``, ``timeout``, ``handshake``, ``network`` (a small fixed set)."""
    if isinstance(exc, HandshakeRefused):
        return str(exc.status_code)
    if isinstance(exc, InvalidStatus):
        return str(exc.response.status_code)
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (InvalidHandshake, HandshakeFailed)):
        return "handshake"
    return "network"


class ContextListener(Protocol):
    """What the owner of a context (a call) receives."""

    def on_cartesia_message(self, msg: ServerMessage, received_at: float) -> None: ...

    def on_context_lost(self, context_id: str, reason: str) -> None: ...


def handshake_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, or None for any other failure."""
    if isinstance(exc, HandshakeRefused):
        return exc.status_code
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code
    return None


#: What a pool socket is: our inline client, or the ``websockets`` one behind a proxy.
MessageSocket = InlineWebSocket | LibraryWebSocket


class _Socket:
    """One Cartesia WebSocket: messages are routed in its data callback; a
    writer task drains the outbox when the transport is backed up."""

    def __init__(self, pool: CartesiaPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.ws: MessageSocket | None = None
        self.contexts: dict[str, ContextListener] = {}
        self.tombstones: OrderedDict[str, None] = OrderedDict()
        self.outbox: deque[tuple[ContextListener | None, bytes]] = deque()
        self.queued_by_owner: dict[ContextListener, int] = {}
        self.outbox_event = asyncio.Event()
        self.ready = asyncio.Event()
        self.last_activity = time.monotonic()
        self.supervisor: asyncio.Task[None] | None = None
        self.closing = False
        self.rotating = False  # closed by us for idleness, to beat Cartesia's idle close
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.ws is not None and self.ready.is_set()

    def send(self, message: dict[str, Any], owner: ContextListener | None = None) -> None:
        """Queue one message. ``owner`` (the call) is held to its share of the
        queue, so one call flooding text cannot starve its neighbours; a
        message without owner (``cancel``) always goes, since it only ever
        frees Cartesia capacity and is bounded by the contexts open."""
        if not self.outbox and self._write_now(message):
            return
        if owner is not None:
            if len(self.outbox) >= MAX_PENDING_SENDS:
                raise SendQueueFull("Cartesia send queue full")
            queued = self.queued_by_owner.get(owner, 0)
            if queued >= MAX_PENDING_SENDS_PER_CALL:
                raise SendQueueFull("Cartesia send queue full for this call")
            self.queued_by_owner[owner] = queued + 1
        self.outbox.append((owner, orjson.dumps(message)))
        self.outbox_event.set()
        self.last_activity = time.monotonic()

    def _write_now(self, message: dict[str, Any]) -> bool:
        """Write straight to the socket when nothing is queued ahead and the
        transport has room: the same bytes ``ws.send`` would write, without a
        hop through the writer task (one event-loop turn on the TTFB path,
        several ms on a loaded loop). ``False``: use the queue."""
        ws = self.ws
        if ws is None or not self.ready.is_set() or not ws.is_open:
            return False
        if ws.write_buffer_size > DIRECT_WRITE_MAX_BUFFERED:
            return False
        ws.send_text(orjson.dumps(message))
        self.last_activity = time.monotonic()
        return True

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff until the pool closes."""
        attempt = 0
        while not self.closing:
            try:
                self.ws = await self.pool._connect(self._on_raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure means "retry later"
                attempt += 1
                delay = min(self.pool.backoff_max_s, self.pool.backoff_base_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                self.pool._connect_failed(self.slot, exc, delay)
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self.pool._connected(self.slot)
            self.pool.metrics.cartesia_handshakes.inc()
            self.pool.metrics.cartesia_sockets.inc()
            self.last_activity = time.monotonic()
            self.ready.set()
            self.pool._health_changed()
            reason = "closed"
            writer = asyncio.create_task(self._write_loop(self.ws))
            self.rotating = False
            idle_timer = asyncio.get_running_loop().call_later(self.pool.max_age_s, self._idle_check)
            try:
                reason = await self._until_closed(self.ws)
            finally:
                writer.cancel()
                idle_timer.cancel()
                if self._idle_timer is not None:
                    self._idle_timer.cancel()
                    self._idle_timer = None
                self.ready.clear()
                self.pool._health_changed()
                self.pool.metrics.cartesia_sockets.dec()
                ws, self.ws = self.ws, None
                self.outbox.clear()
                self.queued_by_owner.clear()
                # Tell owners before awaiting anything, so none sends into a dead socket meanwhile.
                lost = list(self.contexts.items())
                self.contexts.clear()
                for context_id, listener in lost:
                    self.pool._release_slot(context_id)
                    try:
                        listener.on_context_lost(context_id, reason)
                    except Exception:  # noqa: BLE001 - one owner's bug must not stop the others
                        log.exception("context_lost handler failed")
                await _quiet_close(ws)
            if not self.closing:
                self.pool.metrics.cartesia_reconnects.labels(reason=reason).inc()
                log_event(log, "cartesia_socket_replaced", logging.WARNING if lost else logging.INFO,
                          slot=self.slot, reason=reason, contexts_lost=len(lost))

    async def _write_loop(self, ws: MessageSocket) -> None:
        try:
            while True:
                await self.outbox_event.wait()
                self.outbox_event.clear()
                while self.outbox:
                    await ws.drain()
                    owner, data = self.outbox.popleft()
                    if owner is not None:
                        left = self.queued_by_owner.pop(owner) - 1
                        if left:
                            self.queued_by_owner[owner] = left
                    ws.send_text(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log_event(log, "cartesia_write_failed", logging.WARNING, slot=self.slot, error=str(exc))
            await _quiet_close(ws)

    def _idle_check(self) -> None:
        """Timer: replace a socket idle for ``max_age_s`` (no contexts, no traffic)."""
        ws = self.ws
        if ws is None or self.closing:
            return
        idle = time.monotonic() - self.last_activity
        max_age = self.pool.max_age_s
        if not self.contexts and idle >= max_age:
            self.rotating = True
            self._closer = asyncio.get_running_loop().create_task(_quiet_close(ws), name=f"cartesia-rotate-{self.slot}")
            return
        # Busy sockets are re-checked often enough that idleness is caught within
        # max_age + 30 s (240 + 30 < Cartesia's 300 s by default).
        delay = max_age - idle if not self.contexts else min(30.0, max_age)
        self._idle_timer = asyncio.get_running_loop().call_later(max(0.05, delay), self._idle_check)

    def _on_raw(self, raw: bytes) -> None:
        """The socket's data callback, per server message: parse and route it now."""
        now = time.monotonic()
        self.last_activity = now
        try:
            msg = parse_server_text(raw)
        except ValueError as exc:
            self.pool.metrics.bad_input.labels(source="cartesia", kind="malformed").inc()
            log_event(log, "cartesia_bad_message", logging.WARNING, slot=self.slot, error=str(exc))
            return
        self._route(msg, now)

    async def _until_closed(self, ws: MessageSocket) -> str:
        """Wait for the connection to end; the reason label for ``cartesia_reconnects``."""
        info = await asyncio.shield(ws.closed)
        if self.rotating:
            return "max_age"
        if info.received and info.reason:
            return "idle_timeout" if "idle" in info.reason else "closed"
        return "connection_lost"

    def _route(self, msg: ServerMessage, now: float) -> None:
        context_id = msg.context_id or ""
        listener = self.contexts.get(context_id) if context_id else None
        if listener is None:
            if isinstance(msg, Chunk):
                self.pool.metrics.late_chunks_dropped.inc()
            if context_id and isinstance(msg, (Done, ErrorMessage)):
                self.tombstones.pop(context_id, None)
            if isinstance(msg, ErrorMessage) and not context_id:
                self.pool.metrics.cartesia_errors.labels(status=str(msg.status_code)).inc()
                log_event(log, "cartesia_socket_error", logging.WARNING, slot=self.slot,
                          status=msg.status_code, message=msg.message)
            return
        cls = type(msg)
        # Audio and word times (nearly every message) skip the end-of-context check.
        if cls is not Chunk and cls is not WordTimestamps and isinstance(msg, (Done, ErrorMessage)):
            del self.contexts[context_id]
            self.pool._release_slot(context_id)
            if isinstance(msg, ErrorMessage):
                self.pool.metrics.cartesia_errors.labels(status=str(msg.status_code)).inc()
        try:
            listener.on_cartesia_message(msg, now)
        except Exception:  # noqa: BLE001 - one call's bug must not stop the shared reader
            self._handler_failed(context_id)

    def _handler_failed(self, context_id: str) -> None:
        """A listener raised (called from its ``except``): counted and logged with the traceback."""
        self.pool.metrics.bad_input.labels(source="cartesia", kind="handler_error").inc()
        log.exception("cartesia_handler_failed", extra={"context_id": context_id})

    def tombstone(self, context_id: str) -> None:
        self.contexts.pop(context_id, None)
        self.tombstones[context_id] = None
        while len(self.tombstones) > TOMBSTONES:
            self.tombstones.popitem(last=False)


async def _quiet_close(ws: MessageSocket | None) -> None:
    if ws is None:
        return
    try:
        await ws.close(2.0)
    except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
        ws.abort()


class ContextLease:
    """One admitted Cartesia context on one socket. Not reusable after release."""

    __slots__ = ("context_id", "_socket", "_pool", "_owner", "released")

    def __init__(self, pool: CartesiaPool, sock: _Socket, context_id: str, owner: ContextListener) -> None:
        self._pool = pool
        self._socket = sock
        self.context_id = context_id
        self._owner = owner
        self.released = False

    def send(self, request: GenerationRequest) -> None:
        """Queue one input for this context (non-blocking)."""
        if self.released:
            raise ContextError(f"context {self.context_id} is closed")
        if not self._socket.open:
            raise ContextError("Cartesia socket is not connected")
        self._socket.send(request.to_wire(), self._owner)

    def cancel(self) -> None:
        """Send ``cancel``, tombstone the id (late chunks dropped), free the slot."""
        if self.released:
            return
        self.released = True
        sock = self._socket
        if sock.contexts.pop(self.context_id, None) is not None:
            self._pool._release_slot(self.context_id)
        sock.tombstone(self.context_id)
        if sock.open:
            try:
                sock.send(CancelRequest(self.context_id).to_wire())
            except ContextError:
                pass

    def abandon(self) -> None:
        """Forget the context without telling Cartesia (it already ended)."""
        if self.released:
            return
        self.released = True
        if self._socket.contexts.pop(self.context_id, None) is not None:
            self._pool._release_slot(self.context_id)

    @property
    def active(self) -> bool:
        return not self.released and self.context_id in self._socket.contexts


class CartesiaPool:
    """Shared Cartesia sockets; see the module docstring for limits and policies."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str | None,
        version: str,
        metrics: BridgeMetrics,
        size: int = 2,
        max_concurrency: int = 64,
        max_waiters: int = 1000,
        max_age_s: float = 240.0,
        connect_timeout_s: float = 5.0,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._api_key = api_key
        self.version = version
        self.metrics = metrics
        self.size = size
        self.max_concurrency = max_concurrency
        self.max_waiters = max_waiters
        self.max_age_s = max_age_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sockets = [_Socket(self, i) for i in range(size)]
        self._active: set[str] = set()
        # Slots handed to a woken waiter that has not yet taken them.
        self._reserved = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._started = False
        self._down_since: float | None = None
        self._ever_connected = False
        self._attempted: set[int] = set()  # slots that connected or failed at least once
        self._attempts_done = asyncio.Event()
        #: failure kind -> (last logged at, repeats since), for ``FAILURE_LOG_INTERVAL_S``.
        self._failure_log: dict[str, tuple[float, int]] = {}
        #: Called (no arguments) whenever ``healthy`` may have changed.
        self.on_health_change: list[Callable[[], object]] = []

    # ------------------------------------------------------------ lifecycle

    async def _connect(self, on_message: Callable[[bytes], None]) -> MessageSocket:
        headers = {"Cartesia-Version": self.version, "User-Agent": "media-bridge/0.1"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.url}/tts/websocket?{urlencode({'cartesia_version': self.version})}"
        if proxy_for(url) is None:
            return await connect_inline(url, on_message, headers=headers, timeout_s=self.connect_timeout_s,
                                        max_message_bytes=MAX_MESSAGE_BYTES, ping_interval_s=20.0,
                                        ping_timeout_s=20.0)
        # Behind an HTTP(S) proxy from the environment: the websockets client knows how to tunnel.
        conn = await connect(
            url,
            additional_headers=headers,
            open_timeout=self.connect_timeout_s,
            max_size=MAX_MESSAGE_BYTES,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
            max_queue=256,
            logger=_wire_log,
        )
        return LibraryWebSocket(conn, on_message)

    def start(self) -> None:
        """Start every socket's supervisor (connects in the background)."""
        if self._started:
            return
        self._started = True
        self._health_changed()  # none open yet: down since now
        for sock in self._sockets:
            sock.supervisor = asyncio.create_task(sock.run(), name=f"cartesia-socket-{sock.slot}")

    async def prewarm(self, timeout_s: float = 5.0) -> bool:
        """Make sure every socket is connected; True when all are."""
        self.start()
        if all(s.open for s in self._sockets):
            return True
        waits = [asyncio.ensure_future(s.ready.wait()) for s in self._sockets]
        try:
            done, pending = await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for w in waits:
                w.cancel()
        return not pending

    async def wait_attempted(self, timeout_s: float) -> bool:
        """Wait until every socket has connected or failed at least once
        (at most ``timeout_s``); True when they all have. Start-up uses it so a
        refused key does not hold start-up for the whole prewarm timeout."""
        self.start()
        try:
            await asyncio.wait_for(self._attempts_done.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _attempt_finished(self, slot: int) -> None:
        self._attempted.add(slot)
        if len(self._attempted) >= self.size:
            self._attempts_done.set()

    def _connected(self, slot: int) -> None:
        self._ever_connected = True
        self._attempt_finished(slot)
        self._failure_log.clear()  # after a recovery, the next failure is news again

    def _connect_failed(self, slot: int, exc: BaseException, retry_in_s: float) -> None:
        """Count a failed connect and log it (rate-limited per kind; never the key)."""
        kind = connect_failure_kind(exc)
        self.metrics.cartesia_errors.labels(status=kind).inc()
        self._attempt_finished(slot)
        now = time.monotonic()
        logged_at, repeats = self._failure_log.get(kind, (None, 0))
        if logged_at is not None and now - logged_at < FAILURE_LOG_INTERVAL_S:
            self._failure_log[kind] = (logged_at, repeats + 1)
            return
        self._failure_log[kind] = (now, 0)
        fields: dict[str, Any] = {"slot": slot, "status": kind, "retry_in_s": round(retry_in_s, 3),
                                  "repeats_not_logged": repeats, "url": loggable_url(self.url)}
        if handshake_status(exc) in AUTH_STATUSES:
            log_event(log, "cartesia_auth_failed", logging.ERROR, credential=CREDENTIAL_SETTING, **fields,
                      detail=f"Cartesia refused the handshake with HTTP {kind}: check {CREDENTIAL_SETTING} "
                             "(the key is wrong, revoked or lacks access); retrying with back-off")
            return
        # The message of a failed connect names host and errno, never request headers.
        log_event(log, "cartesia_connect_failed", logging.WARNING, error=str(exc)[:300], **fields)

    @property
    def healthy(self) -> bool:
        """At least one socket is open."""
        return any(s.open for s in self._sockets)

    @property
    def open_sockets(self) -> int:
        """How many sockets are open now."""
        return sum(1 for s in self._sockets if s.open)

    @property
    def ever_connected(self) -> bool:
        """Some socket has completed a handshake since the pool started."""
        return self._ever_connected

    def _health_changed(self) -> None:
        if self.healthy:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = time.monotonic()
        for callback in self.on_health_change:
            callback()

    @property
    def down_for_s(self) -> float:
        """Seconds with no socket open: since the last one closed, or since
        ``start()`` when none has connected yet (0 when healthy or not started)."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    async def close(self) -> None:
        for sock in self._sockets:
            sock.closing = True
            if sock.supervisor is not None:
                sock.supervisor.cancel()
        for sock in self._sockets:
            if sock.supervisor is not None:
                try:
                    await sock.supervisor
                except asyncio.CancelledError:
                    pass
            if sock.ws is not None:
                await _quiet_close(sock.ws)
            if sock._closer is not None:  # an idle-rotation close still running
                sock._closer.cancel()
                sock._closer = None
        for waiter in self._waiters:
            self.metrics.admission_queue.dec()
            if not waiter.done():
                waiter.set_exception(AdmissionError("pool closed"))
        self._waiters.clear()

    # ------------------------------------------------------------ admission

    @property
    def active_contexts(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _release_slot(self, context_id: str) -> None:
        if context_id in self._active:
            self._active.discard(context_id)
            self.metrics.active_contexts.dec()
            self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters and len(self._active) + self._reserved < self.max_concurrency:
            waiter = self._waiters.popleft()
            self.metrics.admission_queue.dec()
            if not waiter.done():
                self._reserved += 1
                waiter.set_result(None)
                return

    def _unreserve(self) -> None:
        self._reserved -= 1
        self._wake_waiter()

    def _pick_socket(self) -> _Socket | None:
        candidates = [s for s in self._sockets if s.open]
        if not candidates:
            return None
        return min(candidates, key=lambda s: len(s.contexts))

    def try_open_context(self, context_id: str, listener: ContextListener) -> ContextLease | None:
        """Admit a new context at once if a slot and an open socket are free
        and nobody is queued ahead; else ``None`` (use ``open_context``).
        Saves the first request of an utterance a task hop on the TTFB path."""
        if len(self._active) + self._reserved >= self.max_concurrency or self._waiters:
            return None
        sock = self._pick_socket()
        if sock is None:
            return None
        return self._lease(context_id, listener, sock)

    def _lease(self, context_id: str, listener: ContextListener, sock: _Socket) -> ContextLease:
        self._active.add(context_id)
        self.metrics.active_contexts.inc()
        sock.contexts[context_id] = listener
        return ContextLease(self, sock, context_id, listener)

    async def open_context(self, context_id: str, listener: ContextListener, deadline_s: float) -> ContextLease:
        """Admit a new context (waiting at most ``deadline_s``) on the least
        loaded open socket. Raises ``AdmissionError``."""
        self.start()
        started = time.monotonic()
        reserved = False
        if len(self._active) + self._reserved >= self.max_concurrency or self._waiters:
            if len(self._waiters) >= self.max_waiters:
                raise AdmissionError("admission queue full")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.metrics.admission_queue.inc()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), deadline_s)
            except TimeoutError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self.metrics.admission_queue.dec()
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._unreserve()  # we were woken just as we gave up: pass the slot on
                raise AdmissionError(f"no Cartesia slot within {deadline_s:.1f} s") from None
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self.metrics.admission_queue.dec()
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._unreserve()
                raise
            reserved = True
            self.metrics.admission_wait.observe(time.monotonic() - started)
        try:
            sock = self._pick_socket()
            if sock is None:
                remaining = max(0.0, deadline_s - (time.monotonic() - started))
                await self.prewarm(remaining)
                sock = self._pick_socket()
                if sock is None:
                    raise CartesiaUnavailable("no Cartesia socket connected")
        except BaseException:
            # Cancelled (barge-in, hang-up) or no socket: a reserved slot goes back, never leaks.
            if reserved:
                self._unreserve()
            raise
        if reserved:
            self._reserved -= 1
        return self._lease(context_id, listener, sock)
