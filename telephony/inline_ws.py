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
  are unmasked: RFC 6455 §5.1) and hands them to the request's transport
  (public API) in one write.

The guard. The receive hook replaces aiohttp's private
``WebSocketResponse._post_start`` with a copy that installs our queue. That
copy is right only for the ``_post_start`` it was made from, so the hook is
enabled only when the installed method's fingerprint (SHA-256 of its
tokens, comments and layout ignored) is one of ``KNOWN_POST_START``, the
private names it uses import, and ``WebSocketDataQueue.feed_data`` takes
``(data, size)``. Otherwise ``INLINE_RECEIVE`` is ``False`` with the reason
in ``INLINE_RECEIVE_REASON``, and every message takes ``receive()``
(correct, just more CPU per call). At start-up ``self_test`` opens one
loopback WebSocket to an ``InlineWebSocketResponse`` and reports which path
really ran (the bridge logs it and sets ``bridge_twilio_fast_path``).

To accept a new aiohttp: diff its ``_post_start`` with the copy below,
update the copy if needed, and add ``post_start_fingerprint()`` to
``KNOWN_POST_START``.
"""

from __future__ import annotations

import asyncio
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import WSMsgType, web

from bridge.sink_queue import SINK_QUEUE, SINK_QUEUE_REASON, SinkHost, source_fingerprint
from bridge.wsframe import frame_text

#: Fingerprints of aiohttp's ``WebSocketResponse._post_start`` that the copy
#: below replicates: aiohttp 3.14.4 and 3.14.5 (3.14.0-3.14.3 did not keep
#: the parser on the response, and get the plain path).
KNOWN_POST_START: Final = frozenset({
    "8e7edec106603053816569af611c0c67cbc1b609e1c1fab1885b65f66039baf8",
})
#: How long the start-up self-test may take before it reports the plain path.
SELF_TEST_TIMEOUT_S: Final = 5.0
_PROBE: Final = "fast-path-probe"


def post_start_fingerprint() -> str:
    """The installed aiohttp's ``WebSocketResponse._post_start`` fingerprint."""
    return source_fingerprint(web.WebSocketResponse._post_start)


def check_hook(post_start: Any = None, known: frozenset[str] = KNOWN_POST_START) -> tuple[bool, str]:
    """Whether the receive hook may replace ``post_start`` (default: the
    installed aiohttp's), and why not."""
    try:
        from aiohttp._websocket.reader import WebSocketReader  # noqa: F401
        from aiohttp.helpers import DEFAULT_CHUNK_SIZE  # noqa: F401
    except ImportError as exc:
        return False, f"aiohttp internals moved: {exc}"
    try:
        fingerprint = source_fingerprint(post_start or web.WebSocketResponse._post_start)
    except (OSError, TypeError, ValueError, tokenize.TokenError) as exc:
        return False, f"cannot inspect aiohttp: {exc}"
    if fingerprint not in known:
        return False, f"WebSocketResponse._post_start changed (fingerprint {fingerprint[:16]}…)"
    if not SINK_QUEUE:
        return False, SINK_QUEUE_REASON
    return True, "aiohttp internals as verified"


INLINE_RECEIVE, INLINE_RECEIVE_REASON = check_hook()


if INLINE_RECEIVE:
    from aiohttp._websocket.reader import WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE

    from bridge.sink_queue import SinkQueue


class InlineWebSocketResponse(SinkHost, web.WebSocketResponse):
    """A ``WebSocketResponse`` with an inline receive sink and batched sends.

    ``inline=False`` (or an aiohttp the guard does not know) gives the plain
    ``receive()`` path: ``set_sink`` then returns ``False``.

    Limits: ``send_texts`` writes regardless of the transport's buffer; the
    caller checks ``write_buffer_size`` (bytes) first and waits when it is
    high. Messages the sink declines wait in aiohttp's queue, which pauses
    reading beyond ``2 × DEFAULT_CHUNK_SIZE`` (128 KiB) as usual.
    """

    _request: web.BaseRequest | None = None

    def __init__(self, *args: Any, inline: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inline = inline and INLINE_RECEIVE

    async def prepare(self, request: web.BaseRequest) -> Any:
        self._request = request  # its transport is where send_texts writes
        return await super().prepare(request)

    if INLINE_RECEIVE:

        def _post_start(self, request: Any, protocol: Any, writer: Any) -> None:
            if not self._inline:
                super()._post_start(request, protocol, writer)
                return
            # aiohttp 3.14.4's _post_start with our queue in place of WebSocketDataQueue.
            self._ws_protocol = protocol
            self._writer = writer
            self._reset_heartbeat()
            loop = self._loop
            assert loop is not None
            queue = SinkQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
            self._sink_queue = queue
            self._reader = queue
            # The response owns the parser (aiohttp keeps only a weak reference to a stalled one).
            self._parser = WebSocketReader(queue, self._max_msg_size, compress=bool(self._compress),
                                           decode_text=self._decode_text)
            cb = None if self._heartbeat is None else self._on_data_received
            request.protocol.set_parser(self._parser, data_received_cb=cb)
            request.protocol.keep_alive(False)

    def _transport(self) -> asyncio.Transport | None:
        request = self._request
        return request.transport if request is not None else None

    @property
    def write_buffer_size(self) -> int:
        """Bytes the transport holds unsent (0 when there is no transport)."""
        transport = self._transport()
        return transport.get_write_buffer_size() if transport is not None else 0

    def send_texts(self, texts: Iterable[str]) -> None:
        """Send TEXT messages, in order, in one transport write.

        Raises ``ConnectionResetError`` once the socket is closing or closed
        (a data frame must never follow our close frame).
        """
        transport = self._transport()
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("Twilio socket is closed")
        transport.write(b"".join([frame_text(t.encode()) for t in texts]))


# ---------------------------------------------------------------- self-test

@dataclass(frozen=True)
class FastPathStatus:
    """Which receive path Twilio sockets take in this process, and why."""

    active: bool
    reason: str
    aiohttp_version: str = aiohttp.__version__


async def self_test(inline: bool = True, timeout_s: float = SELF_TEST_TIMEOUT_S) -> FastPathStatus:
    """Open one loopback WebSocket (127.0.0.1, ephemeral port) to an
    ``InlineWebSocketResponse`` and send one message: active when the sink
    consumed it in the data callback and the batched reply arrived."""
    if not INLINE_RECEIVE:
        inline = False
    taken: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = InlineWebSocketResponse(inline=inline)
        await ws.prepare(request)

        def sink(text: str) -> bool:
            taken.append("inline")
            ws.send_texts([text, "inline"])
            return True

        ws.set_sink(sink)
        async for msg in ws:  # whatever the sink did not take
            if msg.type == WSMsgType.TEXT:
                taken.append("queued")
                ws.send_texts([msg.data, "queued"])
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(timeout_s):
                async with http.ws_connect(f"http://127.0.0.1:{port}/") as client:
                    await client.send_str(_PROBE)
                    echoed = await client.receive_str()
                    path = await client.receive_str()
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        return FastPathStatus(False, f"self-test failed: {type(exc).__name__}: {exc}")
    finally:
        await runner.cleanup()
    if echoed != _PROBE or not taken or path != taken[-1]:
        return FastPathStatus(False, f"self-test got {echoed!r}/{path!r}")
    if path == "inline":
        return FastPathStatus(True, "inline receive verified on a loopback socket")
    reason = INLINE_RECEIVE_REASON if not INLINE_RECEIVE else "disabled (TWILIO_FAST_PATH=false)"
    return FastPathStatus(False, reason)
