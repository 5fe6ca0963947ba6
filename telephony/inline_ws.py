"""The Twilio media socket's fast path: inline receive and one write per batch.

Why: at 300 calls one bridge process receives about 18 000 Twilio messages
per second (50 ``media`` frames and about 10 ``mark`` echoes per call) and
sends about 6 000 (``media`` + ``mark`` pairs). Through aiohttp's public API
every inbound message costs a future, a task wake-up and a ``receive()``
round (about 15 % of a core at 300 calls, py-spy), and every outbound
message its own ``transport.write`` (one syscall each).

``InlineWebSocketResponse`` keeps aiohttp for everything that is not hot
(handshake, frame parsing in aiohttp's C reader, ping/pong, close, errors,
size limits, flow control) and changes two things:

* Receive: a *sink* (``set_sink``) sees each complete TEXT message inside
  the transport's data callback. If it returns ``True`` the message is
  consumed there; otherwise (the sink is busy, or the message is not one it
  handles) the message goes to aiohttp's queue and ``receive()`` as usual.
  While that queue holds anything, the sink is skipped, so messages are
  handled in arrival order whichever path takes them.
* Send: ``send_texts`` frames several TEXT messages itself (server frames
  are unmasked: RFC 6455 §5.1) and hands them to the transport in one
  write.

The receive hook relies on aiohttp internals (``_post_start``, the
``WebSocketDataQueue`` it feeds); ``INLINE_RECEIVE`` is ``False`` when they
are not there, and the socket then works through ``receive()`` only
(correct, just slower). ``tests/test_inline_ws.py`` fails if the installed
aiohttp loses the hook.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from bridge.wsframe import frame_text

#: A sink gets the text of one message and says whether it consumed it.
Sink = Callable[[str], bool]


try:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE

    _post_start_params = list(inspect.signature(web.WebSocketResponse._post_start).parameters)
    # Verified against aiohttp 3.14's _post_start (replicated below); other
    # versions take the plain receive() path rather than a guess.
    INLINE_RECEIVE: bool = (
        _post_start_params == ["self", "request", "protocol", "writer"]
        and tuple(int(p) for p in aiohttp.__version__.split(".")[:2]) == (3, 14)
    )
except (ImportError, AttributeError, ValueError):  # pragma: no cover - depends on the installed aiohttp
    INLINE_RECEIVE = False



if INLINE_RECEIVE:

    class _SinkQueue(WebSocketDataQueue):
        """aiohttp's message queue, with a sink that may take TEXT messages first."""

        def __init__(self, protocol: Any, limit: int, *, loop: Any) -> None:
            super().__init__(protocol, limit, loop=loop)
            self.sink: Sink | None = None
            self.inline_messages = 0

        def feed_data(self, data: Any, size: int) -> None:
            sink = self.sink
            if sink is not None and data.type is WSMsgType.TEXT and not self._buffer and sink(data.data):
                self.inline_messages += 1
                return
            super().feed_data(data, size)


class InlineWebSocketResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` with an inline receive sink and batched sends.

    Limits: ``send_texts`` writes regardless of the transport's buffer; the
    caller checks ``write_buffer_size`` (bytes) first and waits when it is
    high. Messages the sink declines wait in aiohttp's queue, which pauses
    reading beyond ``2 × DEFAULT_CHUNK_SIZE`` (128 KiB) as usual.
    """

    _sink_queue: Any = None

    if INLINE_RECEIVE:

        def _post_start(self, request: Any, protocol: Any, writer: Any) -> None:
            # aiohttp's _post_start with our queue in place of WebSocketDataQueue.
            self._ws_protocol = protocol
            self._writer = writer
            self._reset_heartbeat()
            loop = self._loop
            assert loop is not None
            queue = _SinkQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
            self._sink_queue = queue
            self._reader = queue
            self._parser = WebSocketReader(queue, self._max_msg_size, compress=bool(self._compress),
                                           decode_text=self._decode_text)
            cb = None if self._heartbeat is None else self._on_data_received
            request.protocol.set_parser(self._parser, data_received_cb=cb)
            request.protocol.keep_alive(False)

    @property
    def inline_receive(self) -> bool:
        """Whether a sink can take messages (after ``prepare``)."""
        return self._sink_queue is not None

    @property
    def inline_messages(self) -> int:
        """Messages the sink consumed so far."""
        return int(self._sink_queue.inline_messages) if self._sink_queue is not None else 0

    def set_sink(self, sink: Sink | None) -> bool:
        """Route TEXT messages to ``sink`` first; ``False`` if this aiohttp has no hook."""
        if self._sink_queue is None:
            return False
        self._sink_queue.sink = sink
        return True

    @property
    def write_buffer_size(self) -> int:
        """Bytes the transport holds unsent (0 when there is no transport)."""
        transport = self._req.transport if self._req is not None else None
        return transport.get_write_buffer_size() if transport is not None else 0

    def send_texts(self, texts: Iterable[str]) -> None:
        """Send TEXT messages, in order, in one transport write.

        Raises ``ConnectionResetError`` once the socket is closing or closed
        (a data frame must never follow our close frame).
        """
        transport = self._req.transport if self._req is not None else None
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("Twilio socket is closed")
        transport.write(b"".join([frame_text(t.encode()) for t in texts]))
