"""A WebSocket client whose messages are handled in the socket's data callback.

The Cartesia TTS sockets carry every call's chunks and word timestamps (tens
of messages per call-second). Through a general client each message costs a
parser generator step, a queue, a future and a reader-task wake-up; here
``data_received`` parses the frames (``bridge.wsframe.FrameReader``) and
hands each TEXT/BINARY message to ``on_message`` at once, in order.

* ``connect_inline`` opens TCP (TLS for ``wss://``), does the HTTP/1.1
  upgrade (RFC 6455 §4.1) with the caller's headers and checks the answer:
  a status other than 101 raises ``HandshakeRefused`` (its ``status_code``);
  a 101 that is not a valid WebSocket answer raises ``HandshakeFailed``.
  The response head may be at most ``MAX_RESPONSE_HEAD_BYTES``. The whole
  handshake has one deadline (``TimeoutError``).
* ``InlineWebSocket`` (the protocol): ``send_text`` writes one masked frame
  at once; ``write_buffer_size`` and ``drain()`` let the owner hold back
  when the peer reads slowly. Pings are answered at once. When nothing has
  arrived for ``ping_interval_s`` a ping goes out, and if still nothing has
  arrived ``ping_timeout_s`` later the connection is dropped (reason
  ``keepalive_timeout``). A frame that breaks RFC 6455, or a message over
  ``max_message_bytes``, closes the connection with 1002/1009.
* ``closed`` (a future) resolves with a ``CloseInfo`` once the transport is
  gone: the peer's close code and reason if it sent a CLOSE frame.
* Proxies: this client connects directly. ``proxy_for(url)`` tells whether
  the environment (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``) routes the
  URL through a proxy; callers then use a proxy-capable client instead.

An exception raised by ``on_message`` is logged and counted by the owner's
callback wrapper, never allowed to break the socket's parsing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from bridge.errors import HandshakeFailed as HandshakeFailed  # re-exported
from bridge.errors import HandshakeRefused as HandshakeRefused
from bridge.logs import log_event
from bridge.wsframe import (
    CLOSE_NORMAL,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Control,
    Event,
    FrameError,
    FrameReader,
    MaskKeys,
    close_payload,
    frame_masked,
)

log = logging.getLogger("bridge.wsclient")

#: The longest HTTP response head (status line + headers) accepted in the handshake, bytes.
MAX_RESPONSE_HEAD_BYTES: Final = 16 * 1024
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Above this many unsent bytes, ``drain`` waits; it returns once the transport is below the low mark.
WRITE_HIGH_WATER: Final = 64 * 1024
WRITE_LOW_WATER: Final = 16 * 1024

MessageCallback = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection ended: ``code``/``reason`` from the peer's CLOSE frame
    (``received`` is False when none came: the TCP connection just ended), and
    ``error`` naming what we closed it for (``""`` when we did not)."""

    received: bool
    code: int
    reason: str
    error: str = ""


def proxy_for(url: str) -> str | None:
    """The proxy the environment routes ``url`` (``ws://`` or ``wss://``) through, or None."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class InlineWebSocket(asyncio.Protocol):
    """One client WebSocket; see the module docstring for limits and timers."""

    def __init__(self, on_message: MessageCallback, *, max_message_bytes: int,
                 ping_interval_s: float = 20.0, ping_timeout_s: float = 20.0) -> None:
        self._on_message = on_message
        self._reader = FrameReader(max_message_bytes)
        self._masks = MaskKeys()
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[CloseInfo] = self._loop.create_future()
        self._head = b""  # the HTTP response head, while the handshake is on
        self._handshake: asyncio.Future[bytes] | None = self._loop.create_future()
        self._open = False
        self._close_sent = False
        self._received: Control | None = None
        self._error = ""
        self._last_heard = time.monotonic()
        self._ping_sent_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self.messages = 0

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            self._head_received(data)
            return
        self._last_heard = time.monotonic()
        self._ping_sent_at = None
        try:
            events = self._reader.feed(data)
        except FrameError as exc:
            # What came before the bad frame is delivered; then the connection is closed for it.
            if self._deliver(exc.events):
                self._fail(exc.code, str(exc))
            return
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> bool:
        """Hand messages to the owner, answer control frames; False once the connection is ending."""
        on_message = self._on_message
        for event in events:
            if type(event) is Control:
                self._on_control(event)
                if self.transport is None or self._received is not None:
                    return False
            elif self._open:
                self.messages += 1
                try:
                    on_message(event.payload)
                except Exception:  # noqa: BLE001 - one message's handler must not break the socket
                    log.exception("websocket_message_handler_failed")
        return True

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost resolves ``closed``

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self.transport = None
        for handle in (self._keepalive, self._close_timer):
            if handle is not None:
                handle.cancel()
        self._keepalive = self._close_timer = None
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionResetError("connection closed during the handshake"))
        self._handshake = None
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.closed.done():
            received = self._received
            if received is not None:
                info = CloseInfo(True, received.code, received.reason, self._error)
            else:
                info = CloseInfo(False, 1006, str(exc) if exc else "", self._error)
            self.closed.set_result(info)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ handshake

    def _head_received(self, data: bytes) -> None:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        waiter = self._handshake
        assert waiter is not None
        if end < 0:
            if len(head) > MAX_RESPONSE_HEAD_BYTES:
                self._handshake = None
                waiter.set_exception(HandshakeFailed(f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes"))
            else:
                self._head = head
            return
        self._head = b""
        self._handshake = None
        if not waiter.done():
            waiter.set_result(head[:end])
        rest = head[end + 4:]
        if rest:
            # Frames sent right after the 101: parsed once the handshake is checked and we are open.
            self._loop.call_soon(self._replay, rest)

    def _replay(self, data: bytes) -> None:
        if self.transport is not None:
            self.data_received(data)

    def opened(self) -> None:
        """The handshake checked out: messages flow, keepalive starts."""
        self._open = True
        self._last_heard = time.monotonic()
        if self._ping_interval_s > 0:
            self._keepalive = self._loop.call_later(self._ping_interval_s, self._keepalive_check)

    # ------------------------------------------------------------ sending

    @property
    def is_open(self) -> bool:
        """Open for sending: handshake done, no CLOSE sent or received, transport up."""
        transport = self.transport
        return self._open and not self._close_sent and transport is not None and not transport.is_closing()

    @property
    def write_buffer_size(self) -> int:
        """Bytes the transport holds unsent (0 once it is gone)."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def send_text(self, payload: bytes) -> None:
        """Write one TEXT message (UTF-8 ``payload``) now. Raises ``ConnectionResetError`` when not open."""
        if not self.is_open:
            raise ConnectionResetError("WebSocket is not open")
        assert self.transport is not None
        self.transport.write(frame_masked(OP_TEXT, payload, self._masks.next()))

    async def drain(self) -> None:
        """Wait until the transport can take more (returns at once when it is gone)."""
        while self.transport is not None and self.write_buffer_size > WRITE_LOW_WATER:
            if self._writable is None:
                if self.write_buffer_size <= WRITE_HIGH_WATER:
                    return
                self._writable = self._loop.create_future()
            await self._writable

    # ------------------------------------------------------------ control and closing

    def _on_control(self, event: Control) -> None:
        transport = self.transport
        assert transport is not None
        if event.opcode == OP_PING:
            if not self._close_sent:
                transport.write(frame_masked(OP_PONG, event.payload, self._masks.next()))
        elif event.opcode == OP_CLOSE:
            self._received = event
            self._open = False
            if not self._close_sent:
                # Echo the code (RFC 6455 §5.5.1), then the server closes TCP; we close it if it does not.
                self._close_sent = True
                code = event.code if event.code != 1005 else CLOSE_NORMAL
                transport.write(frame_masked(OP_CLOSE, close_payload(code), self._masks.next()))
            self._arm_close_timer(2.0)
        # PONG: _last_heard was already updated by the data that carried it.

    def _fail(self, code: int, detail: str) -> None:
        self._error = detail
        log_event(log, "websocket_protocol_error", logging.WARNING, code=code, detail=detail[:200])
        self.start_close(code, detail[:100])

    def start_close(self, code: int = CLOSE_NORMAL, reason: str = "", timeout_s: float = 2.0) -> None:
        """Send CLOSE (once) and drop the transport if the peer has not ended it within ``timeout_s``."""
        transport = self.transport
        self._open = False
        if transport is None:
            return
        if not self._close_sent and not transport.is_closing():
            self._close_sent = True
            transport.write(frame_masked(OP_CLOSE, close_payload(code, reason), self._masks.next()))
        self._arm_close_timer(timeout_s)

    def _arm_close_timer(self, timeout_s: float) -> None:
        if self._close_timer is None and self.transport is not None:
            self._close_timer = self._loop.call_later(timeout_s, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection now."""
        if self.transport is not None:
            self.transport.abort()

    async def close(self, timeout_s: float = 2.0) -> CloseInfo:
        """Close politely (CLOSE, then wait for the peer's) within ``timeout_s``, else drop it."""
        self.start_close(CLOSE_NORMAL, "", timeout_s)
        return await asyncio.shield(self.closed)

    def _keepalive_check(self) -> None:
        self._keepalive = None
        transport = self.transport
        if transport is None or not self._open:
            return
        now = time.monotonic()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self._ping_timeout_s:
            self._error = "keepalive_timeout"
            log_event(log, "websocket_keepalive_timeout", logging.WARNING, silent_s=round(now - self._last_heard, 1))
            self.abort()
            return
        idle = now - self._last_heard
        if self._ping_sent_at is None and idle >= self._ping_interval_s:
            self._ping_sent_at = now
            transport.write(frame_masked(OP_PING, b"", self._masks.next()))
            delay = self._ping_timeout_s
        elif self._ping_sent_at is not None:
            delay = self._ping_timeout_s - (now - self._ping_sent_at)
        else:
            delay = self._ping_interval_s - idle
        self._keepalive = self._loop.call_later(max(0.05, delay), self._keepalive_check)


def _accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def check_handshake_response(head: bytes, key: str) -> None:
    """Check the server's answer to an upgrade carrying ``Sec-WebSocket-Key: key``.
    Raises ``HandshakeRefused`` (status other than 101) or ``HandshakeFailed``."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HandshakeFailed("response head is not text") from None
    status_line, _, rest = text.partition("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HandshakeFailed(f"not an HTTP response: {status_line[:80]!r}")
    status = int(parts[1])
    if status != 101:
        raise HandshakeRefused(status, parts[2] if len(parts) > 2 else "")
    headers: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeFailed(f"malformed header line: {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if headers.get("upgrade", "").lower() != "websocket":
        raise HandshakeFailed("101 without Upgrade: websocket")
    if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
        raise HandshakeFailed("101 without Connection: Upgrade")
    if headers.get("sec-websocket-accept") != _accept_for(key):
        raise HandshakeFailed("Sec-WebSocket-Accept does not match our key")
    if headers.get("sec-websocket-extensions"):
        raise HandshakeFailed("server chose an extension we did not offer")


def build_upgrade_request(host_header: str, target: str, key: str, headers: Mapping[str, str]) -> bytes:
    """The HTTP/1.1 upgrade request (RFC 6455 §4.1). Header values must not contain CR/LF."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains CR/LF")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def connect_inline(url: str, on_message: MessageCallback, *, headers: Mapping[str, str],
                         timeout_s: float, max_message_bytes: int, ping_interval_s: float = 20.0,
                         ping_timeout_s: float = 20.0, ssl_context: ssl.SSLContext | None = None) -> InlineWebSocket:
    """Open ``url`` (``ws://`` or ``wss://``) and return the open socket; see the module docstring."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {parts.scheme}://{parts.hostname}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname
    default_port = (secure and port == 443) or (not secure and port == 80)
    host_name = f"[{host}]" if ":" in host else host
    host_header = host_name if default_port else f"{host_name}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    loop = asyncio.get_running_loop()
    context = (ssl_context or ssl.create_default_context()) if secure else None
    async with asyncio.timeout(timeout_s):
        _transport, protocol = await loop.create_connection(
            lambda: InlineWebSocket(on_message, max_message_bytes=max_message_bytes,
                                    ping_interval_s=ping_interval_s, ping_timeout_s=ping_timeout_s),
            host, port, ssl=context, server_hostname=host if secure else None)
        try:
            assert protocol.transport is not None and protocol._handshake is not None
            waiter = protocol._handshake
            protocol.transport.write(build_upgrade_request(host_header, target, key, headers))
            head = await waiter
            check_handshake_response(head, key)
        except BaseException:
            protocol.abort()
            raise
    protocol.opened()
    return protocol


class LibraryWebSocket:
    """The same interface over a ``websockets`` client connection, for the
    case ``connect_inline`` does not cover (a proxy). A reader task (owned
    here, cancelled when the connection ends) hands messages to ``on_message``."""

    def __init__(self, conn: ClientConnection, on_message: MessageCallback) -> None:
        self._conn = conn
        self._on_message = on_message
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[CloseInfo] = loop.create_future()
        self.messages = 0
        self._reader = loop.create_task(self._read(), name="websocket-reader")

    async def _read(self) -> None:
        conn = self._conn
        error = ""
        try:
            while True:
                raw = await conn.recv(decode=False)
                self.messages += 1
                try:
                    self._on_message(raw if isinstance(raw, bytes) else raw.encode())
                except Exception:  # noqa: BLE001 - one message's handler must not break the socket
                    log.exception("websocket_message_handler_failed")
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - any read failure ends this connection
            error = repr(exc)[:200]
        finally:
            received = conn.protocol.close_rcvd
            info = (CloseInfo(True, received.code, received.reason, error) if received is not None
                    else CloseInfo(False, 1006, "", error))
            if not self.closed.done():
                self.closed.set_result(info)

    @property
    def is_open(self) -> bool:
        return self._conn.protocol.state is State.OPEN and not self._conn.transport.is_closing()

    @property
    def write_buffer_size(self) -> int:
        return self._conn.transport.get_write_buffer_size()

    def send_text(self, payload: bytes) -> None:
        if not self.is_open:
            raise ConnectionResetError("WebSocket is not open")
        self._conn.protocol.send_text(payload)
        self._conn.send_data()

    async def drain(self) -> None:
        while not self._conn.transport.is_closing() and self.write_buffer_size > WRITE_LOW_WATER:
            await asyncio.sleep(0.005)

    def abort(self) -> None:
        self._conn.transport.abort()

    async def close(self, timeout_s: float = 2.0) -> CloseInfo:
        try:
            await asyncio.wait_for(self._conn.close(), timeout_s)
        except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
            self._conn.transport.abort()
        try:
            return await asyncio.wait_for(asyncio.shield(self.closed), timeout_s)
        except TimeoutError:
            self._reader.cancel()
            return CloseInfo(False, 1006, "", "close timed out")
