"""aiohttp's WebSocket message queue with an inline *sink*: one class for both sockets' fast paths.

A sink sees each complete TEXT message inside the transport's data callback
(no future, no task wake-up per message). If it returns ``True`` the message
is consumed there; otherwise it goes to aiohttp's queue and ``receive()`` as
usual. While that queue holds anything the sink is skipped, so messages are
handled in arrival order whichever path takes them.

``SinkQueue`` exists only when ``SINK_QUEUE`` is ``True``: aiohttp's
``WebSocketDataQueue`` imports from where it is expected and its
``feed_data`` takes ``(data, size)`` (else ``SINK_QUEUE_REASON`` says why).
Where the queue is put in place is each side's business and guard:
``bridge/agent/inline_client.py`` for the agent (client) socket,
``telephony/inline_ws.py`` for the Twilio (server) socket. Both guard the
private aiohttp methods they replace with ``source_fingerprint``.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import textwrap
import tokenize
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType

#: A sink gets the text of one message and says whether it consumed it.
Sink = Callable[[str], bool]


class SinkHost:
    """What a WebSocket response with a ``SinkQueue`` offers (client and server alike):
    ``set_sink`` and the count of messages the sink consumed. ``_sink_queue`` is None
    when the socket took aiohttp's plain path."""

    _sink_queue: Any = None

    @property
    def inline_messages(self) -> int:
        """Messages the sink consumed so far."""
        return int(self._sink_queue.inline_messages) if self._sink_queue is not None else 0

    def set_sink(self, sink: Sink | None) -> bool:
        """Route TEXT messages to ``sink`` first; ``False`` if this socket has no hook."""
        if self._sink_queue is None:
            return False
        self._sink_queue.sink = sink
        return True


def source_fingerprint(func: Any) -> str:
    """SHA-256 of ``func``'s source tokens (comments, blank lines and indentation ignored)."""
    source = textwrap.dedent(inspect.getsource(func))
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENDMARKER}
    tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in ignored]
    return hashlib.sha256(" ".join(tokens).encode()).hexdigest()


def check_queue() -> tuple[bool, str]:
    """Whether ``SinkQueue`` can subclass the installed aiohttp's queue, and why not."""
    try:
        from aiohttp._websocket.reader import WebSocketDataQueue
    except ImportError as exc:
        return False, f"aiohttp internals moved: {exc}"
    try:
        feed_params = list(inspect.signature(WebSocketDataQueue.feed_data).parameters)
    except (TypeError, ValueError) as exc:
        return False, f"cannot inspect aiohttp: {exc}"
    if feed_params != ["self", "data", "size"]:
        return False, f"WebSocketDataQueue.feed_data takes {feed_params}"
    return True, "aiohttp's WebSocketDataQueue as verified"


SINK_QUEUE, SINK_QUEUE_REASON = check_queue()

if SINK_QUEUE:
    from aiohttp._websocket.reader import WebSocketDataQueue

    class SinkQueue(WebSocketDataQueue):
        """aiohttp's message queue, with a sink that may take TEXT messages first.

        Limits: as aiohttp's queue (reading pauses beyond ``2 × limit`` bytes
        of queued messages); what the sink consumes is never queued.
        """

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
