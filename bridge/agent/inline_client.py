"""The agent socket's fast path: an inline receive sink on aiohttp's *client* WebSocket.

Why: an external agent streams a reply a word per message (50 words/s per
call). Through aiohttp's public API every such message costs a future, a
task wake-up and a ``receive()`` round in the link's reader task (about 12 %
of the bridge's CPU at 200 calls, py-spy). The Twilio side does the same cut
for the server socket (``telephony/inline_ws.py``); this is its client twin.

``InlineClientWebSocketResponse`` (made by ``inline_response_class``, given
to the agents' ``aiohttp.ClientSession`` as ``ws_response_class``) keeps
aiohttp for everything that is not hot (handshake, TLS, frame parsing in
aiohttp's C reader, ping/pong, close, errors, the message size cap, flow
control) and changes one thing: a *sink* (``set_sink``) sees each complete
TEXT message inside the transport's data callback (``bridge.sink_queue``:
consumed there when it returns ``True``, else queued for ``receive()``, in
arrival order either way).

How: ``ClientSession._ws_connect`` builds the message queue, hands it to the
response's ``__init__``, then assigns ``ws_resp._parser`` (a frame reader
feeding that queue) and registers ``ws_resp._parser`` with the connection.
The response here swaps in its own queue in ``__init__`` and, when
``_parser`` is assigned, builds the frame reader on that queue instead
(same size cap, compression and text decoding), before any byte is parsed.

The guard. That is right only for the ``_ws_connect`` and the
``ClientWebSocketResponse.__init__`` it was checked against, so the hook is
enabled only when both fingerprints (``bridge.sink_queue.source_fingerprint``:
SHA-256 of the source tokens) are known, the private names it uses import,
and ``bridge.sink_queue.SinkQueue`` (shared with the Twilio side) is
available. Otherwise
``INLINE_CLIENT`` is ``False`` with the reason in ``INLINE_CLIENT_REASON``
and ``inline_response_class`` returns aiohttp's own class: every message
takes ``receive()`` (correct, just more CPU per call). ``self_test`` opens
one loopback socket and reports which path really ran.

To accept a new aiohttp: diff its ``_ws_connect`` (the lines from the
queue's creation to ``set_parser``) and ``ClientWebSocketResponse.__init__``
with what this module relies on, then add ``client_fingerprints()``.
"""

from __future__ import annotations

import asyncio
import tokenize
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web

from bridge.sink_queue import SINK_QUEUE, SINK_QUEUE_REASON, SinkHost, source_fingerprint

#: (``ClientSession._ws_connect``, ``ClientWebSocketResponse.__init__``) fingerprints
#: this module was checked against: aiohttp 3.14.5.
KNOWN_CLIENT: Final = frozenset({
    ("dc008dc9c3834db13fab0eeed10e980f0d644dbad44346d4ef59b8b8f566ed2e",
     "7de69a61ddd885289a7d07e1eb6fea2a0782252bc4c40021712f6a8aa9033658"),
})
#: How long ``self_test`` may take before it reports the plain path.
SELF_TEST_TIMEOUT_S: Final = 5.0
_PROBE: Final = "agent-fast-path-probe"


def client_fingerprints() -> tuple[str, str]:
    """The installed aiohttp's (``_ws_connect``, ``ClientWebSocketResponse.__init__``) fingerprints."""
    return (source_fingerprint(aiohttp.ClientSession._ws_connect),
            source_fingerprint(aiohttp.ClientWebSocketResponse.__init__))


def check_client_hook(known: frozenset[tuple[str, str]] = KNOWN_CLIENT) -> tuple[bool, str]:
    """Whether the client receive hook may be used with the installed aiohttp, and why not."""
    if not SINK_QUEUE:
        return False, SINK_QUEUE_REASON
    try:
        from aiohttp._websocket.reader import WebSocketReader  # noqa: F401
        from aiohttp.helpers import DEFAULT_CHUNK_SIZE  # noqa: F401
    except ImportError as exc:
        return False, f"aiohttp internals moved: {exc}"
    try:
        fingerprints = client_fingerprints()
    except (OSError, TypeError, ValueError, tokenize.TokenError) as exc:
        return False, f"cannot inspect aiohttp: {exc}"
    if fingerprints not in known:
        return False, (f"ClientSession._ws_connect / ClientWebSocketResponse.__init__ changed "
                       f"(fingerprints {fingerprints[0][:16]}… / {fingerprints[1][:16]}…)")
    return True, "aiohttp internals as verified"


INLINE_CLIENT, INLINE_CLIENT_REASON = check_client_hook()


if INLINE_CLIENT:
    from aiohttp._websocket.reader import WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE

    from bridge.sink_queue import SinkQueue


class InlineClientWebSocketResponse(SinkHost, aiohttp.ClientWebSocketResponse):
    """A client WebSocket with an inline receive sink (see the module docstring).

    Made only by ``inline_response_class``, which fixes ``inline_max_msg_size``
    (bytes; the frame reader's cap, which must equal the ``max_msg_size``
    given to ``ws_connect``). Messages the sink declines wait in aiohttp's
    queue, which pauses reading beyond ``2 × DEFAULT_CHUNK_SIZE`` (128 KiB).
    """

    inline_max_msg_size: int = 0
    _inline_parser: Any = None

    def __init__(self, reader: Any, writer: Any, protocol: str | None, response: aiohttp.ClientResponse,
                 timeout: aiohttp.ClientWSTimeout, autoclose: bool, autoping: bool,
                 loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        # aiohttp's queue (``reader``) is left unused: the frame reader is built on this one.
        connection = response.connection
        assert connection is not None and connection.protocol is not None
        self._sink_queue = SinkQueue(connection.protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        super().__init__(self._sink_queue, writer, protocol, response, timeout, autoclose, autoping, loop,
                         **kwargs)

    # _ws_connect assigns the frame reader it built on its own queue; build ours on our queue.
    @property
    def _parser(self) -> Any:
        return self._inline_parser

    @_parser.setter
    def _parser(self, parser: Any) -> None:
        if parser is None or self._sink_queue is None:
            self._inline_parser = parser
            return
        self._inline_parser = WebSocketReader(self._sink_queue, self.inline_max_msg_size,
                                              compress=bool(self._compress), decode_text=True)


_classes: dict[int, type[aiohttp.ClientWebSocketResponse]] = {}


def inline_response_class(max_msg_size: int, inline: bool = True) -> type[aiohttp.ClientWebSocketResponse]:
    """The ``ws_response_class`` for a ``ClientSession`` whose ``ws_connect`` calls all pass
    ``max_msg_size`` (bytes); aiohttp's own class when the guard failed or ``inline`` is off."""
    if not (inline and INLINE_CLIENT):
        return aiohttp.ClientWebSocketResponse
    cls = _classes.get(max_msg_size)
    if cls is None:
        cls = type("InlineClientWebSocketResponse", (InlineClientWebSocketResponse,),
                   {"inline_max_msg_size": max_msg_size})
        _classes[max_msg_size] = cls
    return cls


# ---------------------------------------------------------------- self-test

@dataclass(frozen=True)
class ClientFastPathStatus:
    """Which receive path agent sockets take in this process, and why."""

    active: bool
    reason: str
    aiohttp_version: str = aiohttp.__version__


async def self_test(timeout_s: float = SELF_TEST_TIMEOUT_S) -> ClientFastPathStatus:
    """Serve one loopback WebSocket (127.0.0.1, ephemeral port) that sends one message and
    connect to it with ``inline_response_class``: active when the sink consumed it."""
    max_msg_size = 4096

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the client's sink is set: now send
        await ws.send_str(_PROBE)
        await ws.receive()  # until the client closes
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    taken: list[str] = []
    got = asyncio.get_running_loop().create_future()

    def sink(text: str) -> bool:
        taken.append(text)
        if not got.done():
            got.set_result("inline")
        return True

    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession(ws_response_class=inline_response_class(max_msg_size)) as http:
            async with asyncio.timeout(timeout_s):
                async with http.ws_connect(f"http://127.0.0.1:{port}/", max_msg_size=max_msg_size) as client:
                    hooked = isinstance(client, InlineClientWebSocketResponse) and client.set_sink(sink)
                    await client.send_str("ready")
                    if hooked:
                        path = await got
                    else:
                        msg = await client.receive()
                        path, taken[:] = "queued", [msg.data]
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        return ClientFastPathStatus(False, f"self-test failed: {type(exc).__name__}: {exc}")
    finally:
        await runner.cleanup()
    if taken != [_PROBE]:
        return ClientFastPathStatus(False, f"self-test got {taken!r}")
    if path == "inline":
        return ClientFastPathStatus(True, "inline receive verified on a loopback socket")
    return ClientFastPathStatus(False, INLINE_CLIENT_REASON)
