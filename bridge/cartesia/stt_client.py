"""Cartesia STT WebSocket client: one socket per call (speech in).

Every message is built and parsed by ``bridge/cartesia/stt_protocol.py``; this module is
the I/O edge. Limits and policies (bytes are of the stream's encoding; at the bridge's
8 kHz μ-law one byte is 0.125 ms, a 20 ms Twilio frame is 160 bytes):

* **Admission** (``SttAdmission``): at most ``limit`` STT sockets per process (Cartesia
  counts STT concurrency per plan, separately from TTS). A call holds its slot from
  ``start`` to ``close``, reconnects included. Policy when full: refused at once
  (``SttUnavailable``), counted in ``bridge_stt_admission_refused_total``.
* **Direct write**: an audio frame or command is written straight to the transport when
  nothing is queued ahead and the transport holds at most ``DIRECT_WRITE_MAX_BUFFERED``
  (16 KiB = 2 s) unsent bytes; no task hop per 20 ms frame.
* **Coalescing** (optional, ``coalesce_bytes``; default 0 = every ``send_audio`` is its own
  message): audio is held until that many bytes are pending and then written as one
  message; ``finalize`` and ``close`` write what is pending first, so the end of a turn is
  never delayed. Fewer, larger messages cost less CPU per second of audio (Cartesia
  suggests ~100 ms chunks); interim results come up to ``coalesce_bytes`` later.
* **Outbox** (otherwise): a FIFO drained by one writer task that awaits the socket's
  drain, at most ``outbox_limit_bytes`` of audio (default ``replay_limit_bytes`` + 5 s,
  160 000 bytes = 20 s at 8 kHz μ-law, so a whole replay always fits). Policy when full:
  the OLDEST audio is dropped (commands never are), counted in
  ``bridge_stt_audio_dropped_bytes_total``, one WARNING per episode (an episode ends when
  the outbox empties).
* **Replay buffer**: the audio sent since the last acknowledged ``finalize`` (its
  ``flush_done``), at most ``replay_limit_bytes`` (default 120 000 = 15 s); when full the
  oldest audio is forgotten and the turn is marked as overflowed. Finalizes not yet
  acknowledged are remembered in place (at most ``MAX_UNACKED_FINALIZES``; beyond that the
  oldest is taken as acknowledged: the server is not answering).
* **Loss**: when the socket dies the stream reconnects with exponential backoff and
  jitter (``backoff_base_s`` doubling up to ``backoff_max_s``, times 0.5-1.0) for at most
  ``reconnect_window_s``. On success it writes the replay buffer first (with the pending
  finalizes where they were), then carries on; the listener gets
  ``on_stt_lost(reason, turn_lost=<the buffer overflowed during the turn>)`` and then
  ``on_stt_restored()``. When the window passes it gives up on the turn:
  ``on_stt_lost(reason, turn_lost=<any audio or finalize unacknowledged>)``, the replay
  buffer and pending finalizes are dropped, and it **keeps trying** every ``slow_retry_s``
  (times 0.5-1.0) until ``close``; meanwhile audio is kept (bounded) in the replay buffer
  and sent first when a socket opens again, followed by ``on_stt_restored()`` only.
  ``on_stt_lost`` is called once per loss, when the outcome for the turn is known.
  A socket that dies again before any progress (a final transcript or ``flush_done``)
  does not start a new episode: back-off keeps growing and the window keeps running from
  the first loss, so a server that kills every socket (say, while it replays the turn)
  costs one turn and then one attempt per ``slow_retry_s``, not a reconnect every 100 ms.
* **Word times after a replay restart from 0** on the new socket (Cartesia times words
  from the start of each socket's audio), and a turn whose final transcript arrived but
  whose ``flush_done`` was lost with the socket is transcribed again. Use the text.
* **close**: sends ``close``, waits at most ``close_timeout_s`` (1 s) for ``done`` (final
  transcripts still reach the listener), closes the socket (handshake at most
  ``CLOSE_HANDSHAKE_TIMEOUT_S``, then aborted), cancels and awaits both tasks it owns
  (reader/supervisor and writer) and releases the admission slot. Idempotent.
* Handshake failures are told apart: 401/403 (ERROR naming ``CARTESIA_API_KEY``, never its
  value), 429 (the plan's STT concurrency), timeouts and others. ``websockets``' own logger
  for these sockets is pinned above DEBUG so the ``Authorization`` header is never logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import traceback
from collections import deque
from typing import Any, Final, Protocol

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from bridge.cartesia.stt_protocol import (
    CLOSE,
    FINALIZE,
    MAX_STT_MESSAGE_BYTES,
    STT_PATH,
    SttDone,
    SttError,
    SttFlushDone,
    SttParams,
    SttProtocolError,
    SttServerMessage,
    SttTranscript,
    parse_stt_server_message,
)
from bridge.logs import log_event
from metrics.speech import SpeechMetrics

log = logging.getLogger("bridge.cartesia.stt")
# websockets logs handshake headers (our Authorization: Bearer key) at DEBUG; its logger
# for our sockets is pinned above DEBUG so no log level leaks it.
_wire_log = logging.getLogger("bridge.cartesia.stt.wire")
_wire_log.setLevel(logging.INFO)

#: Above this many unsent bytes in the transport, audio queues in the outbox (2 s of μ-law).
DIRECT_WRITE_MAX_BUFFERED: Final = 16 * 1024
#: Closing handshake bound after ``done`` (or its timeout); then the transport is aborted.
CLOSE_HANDSHAKE_TIMEOUT_S: Final = 0.5
#: Finalizes awaiting ``flush_done``; a turn sends one, so more means the server is not answering.
MAX_UNACKED_FINALIZES: Final = 64
#: Outbox room beyond the replay buffer, in seconds of audio.
OUTBOX_EXTRA_S: Final = 5.0
CREDENTIAL_ENV: Final = "CARTESIA_API_KEY"

_stream_ids = itertools.count(1)


class SttListener(Protocol):
    """What the owner of an STT stream (a call) receives."""

    def on_stt_message(self, msg: SttServerMessage, received_at: float) -> None: ...

    def on_stt_lost(self, reason: str, *, turn_lost: bool) -> None: ...

    def on_stt_restored(self) -> None: ...


class SttUnavailable(RuntimeError):
    """Admission refused, or the socket could not be opened at start; ``reason`` is short
    and stable (``admission``, ``http_401``, ``http_429``, ``connect_timeout``, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SttAdmission:
    """Process-wide STT socket budget (Cartesia counts STT concurrency per plan, separately
    from TTS): at most ``limit`` sockets; no queue, a refusal is immediate and counted."""

    def __init__(self, limit: int, metrics: SpeechMetrics) -> None:
        if limit < 0:
            raise ValueError("STT admission limit must be >= 0")
        self.limit = limit
        self._metrics = metrics
        self._in_use = 0

    def try_acquire(self) -> bool:
        if self._in_use >= self.limit:
            self._metrics.stt_admission_refused.inc()
            return False
        self._in_use += 1
        return True

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("SttAdmission.release() without a matching acquire")
        self._in_use -= 1

    @property
    def in_use(self) -> int:
        return self._in_use


class SttStream:
    """One call's Cartesia STT socket. Limits, units and policies: see the module docstring.

    ``send_audio``, ``finalize`` and ``forget_replay`` are synchronous and never block;
    ``start`` and ``close`` are the only awaits. The stream owns two tasks (the reader,
    which also reconnects, and the writer of the current socket); ``close`` ends both.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        version: str,
        params: SttParams,
        listener: SttListener,
        metrics: SpeechMetrics,
        admission: SttAdmission,
        log_fields: dict[str, Any],
        connect_timeout_s: float = 5.0,
        replay_limit_bytes: int = 15 * 8000,
        reconnect_window_s: float = 10.0,
        outbox_limit_bytes: int | None = None,
        close_timeout_s: float = 1.0,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 2.0,
        slow_retry_s: float = 5.0,
        coalesce_bytes: int = 0,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}{STT_PATH}?{params.query()}"
        self._api_key = api_key
        self.version = version
        self.params = params
        self.listener = listener
        self.metrics = metrics
        self.admission = admission
        self.log_fields = dict(log_fields)
        self.connect_timeout_s = connect_timeout_s
        self.replay_limit_bytes = replay_limit_bytes
        self.reconnect_window_s = reconnect_window_s
        self.outbox_limit_bytes = (
            outbox_limit_bytes if outbox_limit_bytes is not None
            else replay_limit_bytes + int(OUTBOX_EXTRA_S * params.bytes_per_second())
        )
        self.close_timeout_s = close_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.slow_retry_s = slow_retry_s
        self.coalesce_bytes = coalesce_bytes
        self._id = next(_stream_ids)

        # Replay: (epoch, audio); epoch = finalizes issued before the audio. Finalize k ends
        # epoch k, so it sits before the first audio of an epoch > k.
        self._replay: deque[tuple[int, bytes]] = deque()
        self._replay_bytes = 0
        self._epoch = 0
        self._unacked: deque[int] = deque()
        self._overflow_epoch: int | None = None  # newest epoch that lost audio to the limit

        # Audio held back to make messages of ``coalesce_bytes`` (already in the replay buffer).
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._outbox: deque[bytes | str] = deque()
        self._outbox_bytes = 0
        self._outbox_event = asyncio.Event()
        self._dropping = False
        self._dropped_in_episode = 0

        self._ws: ClientConnection | None = None
        self._live = False
        self._writer: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._done = asyncio.Event()  # ``done`` received, or the reader ended
        self._closed = asyncio.Event()
        self._started = False
        self._closing = False
        self._admitted = False
        self._gave_up = False
        # A socket that dies again before it made progress (a final transcript or flush_done) continues
        # the same loss episode: back-off and the give-up window run on, instead of restarting per socket.
        self._unhealthy_since: float | None = None
        self._losses_in_a_row = 0

    # ------------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        return self._live

    @property
    def replay_bytes(self) -> int:
        """Audio bytes held for replay (sent since the last acknowledged finalize)."""
        return self._replay_bytes

    @property
    def outbox_bytes(self) -> int:
        """Audio bytes queued for the writer task (not yet handed to the transport)."""
        return self._outbox_bytes

    async def start(self) -> None:
        """Take an admission slot and open the socket (one attempt, at most
        ``connect_timeout_s``); raises ``SttUnavailable``. Audio given before ``start``
        returns is kept in the replay buffer and sent first."""
        if self._started:
            raise RuntimeError("SttStream.start() called twice")
        self._started = True
        if self._closing:
            raise SttUnavailable("STT stream already closed", "closed")
        if not self.admission.try_acquire():
            self._log("stt_admission_refused", logging.WARNING, limit=self.admission.limit)
            raise SttUnavailable(f"STT concurrency limit of {self.admission.limit} sockets reached", "admission")
        self._admitted = True
        try:
            ws = await self._connect(self.connect_timeout_s)
        except asyncio.CancelledError:
            self._release()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure here means "no STT for this call"
            reason = self._connect_failed(exc, first_of_episode=True)
            self._release()
            raise SttUnavailable(f"Cartesia STT unavailable: {reason}", reason) from exc
        if self._closing:  # close() ran while we were connecting
            ws.transport.abort()
            self._release()
            raise SttUnavailable("STT stream closed while connecting", "closed")
        self._attach(ws)
        self._supervisor = asyncio.create_task(self._run(ws), name=f"stt-reader-{self._id}")
        self._log("stt_connected", logging.INFO, model=self.params.model, language=self.params.language)

    def send_audio(self, audio: bytes) -> None:
        """Queue one chunk of caller audio (any size; the bridge gives 20 ms frames).
        Never blocks, never raises; dropped silently after ``close``."""
        if self._closing or not audio:
            return
        if type(audio) is not bytes:  # a view or bytearray may change under us; replay keeps it
            audio = bytes(audio)
        self._replay.append((self._epoch, audio))
        self._replay_bytes += len(audio)
        if self._replay_bytes > self.replay_limit_bytes:
            self._trim_replay()
        if not self._live:
            return
        if self.coalesce_bytes <= 0:
            self._send(audio)
            return
        self._pending.append(audio)
        self._pending_bytes += len(audio)
        if self._pending_bytes >= self.coalesce_bytes:
            self._flush_pending()

    def finalize(self) -> None:
        """Ask for the final transcript of what was said so far (answered by ``flush_done``,
        which releases the audio held for replay up to this point)."""
        if self._closing:
            return
        self._unacked.append(self._epoch)
        self._epoch += 1
        if len(self._unacked) > MAX_UNACKED_FINALIZES:
            self._log("stt_finalize_unanswered", logging.WARNING, pending=len(self._unacked))
            self._acknowledge_oldest_finalize()
        if self._live:
            self._flush_pending()
            self._send(FINALIZE)

    def forget_replay(self) -> None:
        """Drop the audio held for replay (no turn in progress, e.g. after long silence),
        so a later loss does not report the silence before it as a lost turn."""
        self._replay.clear()
        self._replay_bytes = 0
        self._overflow_epoch = None

    async def close(self) -> None:
        """Send ``close``, wait at most ``close_timeout_s`` for ``done``, close the socket,
        end every task and release the admission slot. Idempotent and bounded."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            await self._say_goodbye()
        finally:
            tasks = [t for t in (self._supervisor, self._writer) if t is not None]
            for task in tasks:
                task.cancel()
            if self._ws is not None:
                self._detach(self._ws)
            self._release()
            self._replay.clear()
            self._replay_bytes = 0
            self._unacked.clear()
            try:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                self._closed.set()

    # ------------------------------------------------------------------ sending

    def _flush_pending(self) -> None:
        if self._pending:
            audio = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._send(audio)

    def _send(self, item: bytes | str) -> None:
        if not self._outbox:
            try:
                if self._write_now(item):
                    return
            except Exception:  # noqa: BLE001 - a socket failing under us: queue; the reader reconnects
                pass
        self._outbox.append(item)
        if isinstance(item, bytes):
            self._outbox_bytes += len(item)
            if self._outbox_bytes > self.outbox_limit_bytes:
                self._drop_oldest_queued_audio()
        self._outbox_event.set()

    def _write_now(self, item: bytes | str) -> bool:
        """Write straight to the transport when it has room: the bytes ``ws.send`` would
        write, without a hop through the writer task. ``False``: use the outbox."""
        ws = self._ws
        if ws is None or ws.protocol.state is not State.OPEN:
            return False
        transport = ws.transport
        if transport.is_closing() or transport.get_write_buffer_size() > DIRECT_WRITE_MAX_BUFFERED:
            return False
        if isinstance(item, bytes):
            ws.protocol.send_binary(item)
        else:
            ws.protocol.send_text(item.encode())
        ws.send_data()
        return True

    def _drop_oldest_queued_audio(self) -> None:
        kept: list[str] = []
        dropped = 0
        while self._outbox_bytes > self.outbox_limit_bytes and self._outbox:
            item = self._outbox.popleft()
            if isinstance(item, str):
                kept.append(item)  # commands are never dropped
                continue
            self._outbox_bytes -= len(item)
            dropped += len(item)
        self._outbox.extendleft(reversed(kept))
        self._count_dropped(dropped)
        if not self._dropping:
            self._dropping = True
            self._log("stt_audio_dropped", logging.WARNING, reason="send_queue_full",
                      limit_bytes=self.outbox_limit_bytes, dropped_bytes=dropped)

    def _count_dropped(self, nbytes: int) -> None:
        if nbytes:
            self._dropped_in_episode += nbytes
            self.metrics.stt_audio_dropped_bytes.inc(nbytes)

    def _end_drop_episode(self) -> None:
        if self._dropping:
            self._log("stt_audio_drop_ended", logging.INFO, dropped_bytes=self._dropped_in_episode)
        self._dropping = False
        self._dropped_in_episode = 0

    async def _write_loop(self, ws: ClientConnection) -> None:
        try:
            while True:
                await self._outbox_event.wait()
                self._outbox_event.clear()
                while self._outbox:
                    item = self._outbox.popleft()
                    if isinstance(item, bytes):
                        self._outbox_bytes -= len(item)
                    await ws.send(item)  # awaits the transport's drain
                self._end_drop_episode()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reader sees the closed socket and reconnects
            self._log("stt_write_failed", logging.DEBUG, error=str(exc))
            ws.transport.abort()

    # ------------------------------------------------------------------ replay

    def _trim_replay(self) -> None:
        dropped_unsent = 0
        while self._replay_bytes > self.replay_limit_bytes and self._replay:
            epoch, audio = self._replay.popleft()
            self._replay_bytes -= len(audio)
            if self._overflow_epoch is None or epoch > self._overflow_epoch:
                self._overflow_epoch = epoch
            if not self._live:
                dropped_unsent += len(audio)  # never reached the socket that will replay
        if dropped_unsent:
            self._count_dropped(dropped_unsent)

    def _acknowledge_oldest_finalize(self) -> None:
        if not self._unacked:
            return
        acked = self._unacked.popleft()
        while self._replay and self._replay[0][0] <= acked:
            self._replay_bytes -= len(self._replay.popleft()[1])
        if self._overflow_epoch is not None and self._overflow_epoch <= acked:
            self._overflow_epoch = None

    def _replay_items(self) -> list[bytes | str]:
        """The replay buffer as it goes on the wire: audio with each pending finalize where it was."""
        pending = list(self._unacked)
        items: list[bytes | str] = []
        i = 0
        for epoch, audio in self._replay:
            while i < len(pending) and pending[i] < epoch:
                items.append(FINALIZE)
                i += 1
            items.append(audio)
        items.extend(FINALIZE for _ in range(len(pending) - i))
        return items

    # ------------------------------------------------------------------ socket lifecycle

    async def _connect(self, timeout_s: float) -> ClientConnection:
        headers = {"Cartesia-Version": self.version, "User-Agent": "media-bridge/0.1"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"  # as the official SDK sends it
        return await connect(
            self.url,
            additional_headers=headers,
            open_timeout=timeout_s,
            close_timeout=CLOSE_HANDSHAKE_TIMEOUT_S,
            max_size=MAX_STT_MESSAGE_BYTES,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
            max_queue=64,
            logger=_wire_log,
        )

    def _attach(self, ws: ClientConnection) -> None:
        """Adopt a fresh socket: queue the replay buffer ahead of everything, then go live."""
        self._ws = ws
        self.metrics.stt_sockets.inc()
        for item in self._replay_items():
            self._outbox.append(item)
            if isinstance(item, bytes):
                self._outbox_bytes += len(item)
        if self._outbox:
            self._outbox_event.set()
        self._live = True
        self._done.clear()
        self._writer = asyncio.create_task(self._write_loop(ws), name=f"stt-writer-{self._id}")

    def _detach(self, ws: ClientConnection) -> asyncio.Task[None] | None:
        """Forget a socket (idempotent); returns its writer task, cancelled, for awaiting."""
        if self._ws is not ws:
            return None
        self._ws = None
        self._live = False
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
        self._outbox.clear()
        self._outbox_bytes = 0
        self._outbox_event.clear()
        self._pending.clear()  # still in the replay buffer
        self._pending_bytes = 0
        self._end_drop_episode()
        self.metrics.stt_sockets.dec()
        if ws.protocol.state is not State.CLOSED:
            ws.transport.abort()
        return writer

    async def _run(self, ws: ClientConnection) -> None:
        """The reader: serve the socket, and after a loss reconnect until ``close``."""
        try:
            while True:
                try:
                    reason = await self._read_loop(ws)
                finally:
                    writer = self._detach(ws)
                    if writer is not None:
                        await asyncio.gather(writer, return_exceptions=True)
                if self._closing:
                    return
                self.metrics.stt_errors.labels(kind="lost").inc()
                self._log("stt_socket_lost", logging.WARNING, reason=reason, replay_bytes=self._replay_bytes,
                          pending_finalizes=len(self._unacked))
                ws = await self._reconnect(reason)
        finally:
            self._done.set()

    async def _read_loop(self, ws: ClientConnection) -> str:
        try:
            while True:
                raw = await ws.recv()
                self._handle(raw, time.monotonic())
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None:
                return f"closed_by_server: {exc.rcvd.code} {exc.rcvd.reason}".rstrip()
            return "connection_lost"
        except (OSError, asyncio.IncompleteReadError):
            return "connection_lost"

    def _handle(self, raw: str | bytes, received_at: float) -> None:
        try:
            msg = parse_stt_server_message(raw)
        except SttProtocolError as exc:
            self.metrics.stt_errors.labels(kind="malformed").inc()
            self._log("stt_bad_message", logging.WARNING, error=str(exc)[:200], bytes=len(raw))
            return
        if isinstance(msg, SttFlushDone) or (isinstance(msg, SttTranscript) and msg.is_final):
            self._unhealthy_since = None
            self._losses_in_a_row = 0
        if isinstance(msg, SttFlushDone):
            self._acknowledge_oldest_finalize()
        elif isinstance(msg, SttDone):
            self._done.set()
        elif isinstance(msg, SttError):
            self.metrics.stt_errors.labels(kind="server_error").inc()
            self._log("stt_server_error", logging.WARNING, status=msg.status_code, title=msg.title,
                      message=msg.message[:200], error_code=msg.error_code)
        try:
            self.listener.on_stt_message(msg, received_at)
        except Exception:  # noqa: BLE001 - the owner's bug must not kill the reader
            self._log_listener_failure()

    async def _reconnect(self, reason: str) -> ClientConnection:
        """Back off and reconnect until it works (or ``close`` cancels us); gives up on the
        turn after ``reconnect_window_s`` (see the module docstring)."""
        if self._unhealthy_since is None:
            self._unhealthy_since = time.monotonic()
        lost_at = self._unhealthy_since
        attempt = self._losses_in_a_row
        last_failure = "no attempt finished"
        while True:
            attempt += 1
            elapsed = time.monotonic() - lost_at
            if not self._gave_up and elapsed >= self.reconnect_window_s:
                self._give_up(reason, last_failure, attempt - 1)
            if self._gave_up:
                delay = self.slow_retry_s
                timeout = self.connect_timeout_s
            else:
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
                remaining = self.reconnect_window_s - elapsed
                delay = min(delay, remaining)
                timeout = max(0.1, min(self.connect_timeout_s, remaining - delay))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                ws = await self._connect(timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure means "retry later"
                last_failure = self._connect_failed(exc, first_of_episode=attempt == 1)
                continue
            self.metrics.stt_reconnects.inc()
            self._losses_in_a_row = attempt
            turn_lost = self._overflow_epoch is not None
            self._overflow_epoch = None  # reported now; not again for the same overflow
            was_given_up, self._gave_up = self._gave_up, False
            replayed = self._replay_bytes
            self._attach(ws)
            self._log("stt_reconnected", logging.INFO, attempts=attempt, replayed_bytes=replayed,
                      down_ms=round((time.monotonic() - lost_at) * 1000), turn_lost=turn_lost and not was_given_up)
            if not was_given_up:
                self._notify_lost(reason, turn_lost)
            try:
                self.listener.on_stt_restored()
            except Exception:  # noqa: BLE001
                self._log_listener_failure()
            return ws

    def _give_up(self, reason: str, last_failure: str, attempts: int) -> None:
        self._gave_up = True
        turn_lost = bool(self._replay) or bool(self._unacked) or self._overflow_epoch is not None
        self._log("stt_reconnect_gave_up", logging.WARNING, reason=reason, last_failure=last_failure, attempts=attempts,
                  window_s=self.reconnect_window_s, turn_lost=turn_lost, retry_every_s=self.slow_retry_s)
        self._replay.clear()
        self._replay_bytes = 0
        self._unacked.clear()
        self._overflow_epoch = None
        self._notify_lost(f"{reason}; no reconnect within {self.reconnect_window_s:g} s (last: {last_failure})",
                          turn_lost)

    def _notify_lost(self, reason: str, turn_lost: bool) -> None:
        if turn_lost:
            self.metrics.stt_turns_lost.inc()
        try:
            self.listener.on_stt_lost(reason, turn_lost=turn_lost)
        except Exception:  # noqa: BLE001
            self._log_listener_failure()

    def _connect_failed(self, exc: BaseException, *, first_of_episode: bool) -> str:
        """Count and log a failed handshake; returns a short reason. Only the first failure
        of an episode is logged above DEBUG (a retry loop must not flood the log)."""
        level = logging.WARNING if first_of_episode else logging.DEBUG
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            reason = f"http_{status}"
            if status in (401, 403):
                self.metrics.stt_errors.labels(kind="handshake_401").inc()
                self._log("stt_auth_failed", logging.ERROR if first_of_episode else logging.DEBUG, status=status,
                          credential=CREDENTIAL_ENV,
                          hint=f"Cartesia refused the STT handshake: check {CREDENTIAL_ENV} (set: "
                               f"{bool(self._api_key)}) and that the plan includes STT")
                return reason
            if status == 429:
                self.metrics.stt_errors.labels(kind="handshake_429").inc()
                self._log("stt_concurrency_limited", level, status=status,
                          hint="the Cartesia plan's STT concurrency is exhausted; lower STT admission per replica")
                return reason
        elif isinstance(exc, TimeoutError):
            reason = "connect_timeout"
        else:
            reason = f"connect_failed: {type(exc).__name__}: {str(exc)[:200]}"
        self.metrics.stt_errors.labels(kind="connect").inc()
        self._log("stt_connect_failed", level, reason=reason)
        return reason

    async def _say_goodbye(self) -> None:
        ws = self._ws
        if ws is None or not self._live:
            return
        self._flush_pending()
        self._send(CLOSE)
        try:
            await asyncio.wait_for(self._done.wait(), self.close_timeout_s)
        except TimeoutError:
            self._log("stt_close_without_done", logging.INFO, timeout_s=self.close_timeout_s)
        try:
            await asyncio.wait_for(ws.close(), CLOSE_HANDSHAKE_TIMEOUT_S * 2)
        except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
            pass

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.admission.release()

    def _log_listener_failure(self) -> None:
        self._log("stt_listener_failed", logging.ERROR, exc=traceback.format_exc())

    def _log(self, event: str, level: int, **fields: Any) -> None:
        log_event(log, event, level, **{**self.log_fields, **fields})
