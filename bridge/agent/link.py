"""Agent connections: the seam between a call and the customer's agent.

``AgentLink`` is what a call talks to. Two kinds:

* ``BuiltinAgentLink`` runs an in-process agent (``bridge.agent.builtin``).
* ``RemoteAgentLink`` is a WebSocket to ``AGENT_URL`` (optional bearer
  token). Outbound messages wait in a FIFO of at most ``MAX_OUTBOX``
  messages (policy when full: the oldest ``media`` message is dropped first,
  then the link is closed as too slow and the call is told). Inbound
  messages are at most ``AGENT_SOCKET_MAX_MSG_BYTES``; beyond it the socket
  fails (1009) and the call is told. On a session made by ``AgentConnector``
  each TEXT message is delivered inside the socket's data callback
  (``bridge/agent/inline_client.py``: no task wake-up per message), anything
  else by the link's reader task, in arrival order either way.

Both deliver agent -> bridge messages through the ``deliver`` callback given
to ``start``, always from the event loop, never re-entrantly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson

from bridge.agent.inline_client import InlineClientWebSocketResponse
from bridge.agent.protocol import MAX_AGENT_MESSAGE_BYTES
from bridge.errors import AgentUnavailable as AgentUnavailable  # re-exported
from bridge.logs import log_event, loggable_url

log = logging.getLogger("bridge.agent")

MAX_OUTBOX: Final = 1000
#: Largest agent -> bridge message the socket takes (bytes; ``max_msg_size``, 1009 beyond it).
AGENT_SOCKET_MAX_MSG_BYTES: Final = MAX_AGENT_MESSAGE_BYTES * 4

Deliver = Callable[[str | dict[str, Any]], None]
Closed = Callable[[str], None]


class AgentLink:
    """Interface: ``start`` (connect), ``send`` (non-blocking), ``close``."""

    async def start(self, deliver: Deliver, closed: Closed) -> None:
        raise NotImplementedError

    def send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def _path_escapes(path: str) -> bool:
    """True for ``.``/``..`` segments, encoded separators or backslashes, also percent-encoded (twice).

    The client resolves dot segments before connecting (``/agent/../admin`` dials ``/admin``), and an
    agent's server may decode ``%2F``; either would leave the allowlisted path prefix.
    """
    decoded = unquote(unquote(path))
    if "\\" in decoded or decoded.count("/") != path.count("/"):
        return True
    return any(segment in (".", "..") for segment in decoded.split("/"))


def agent_url_allowed(url: str, allowlist: tuple[str, ...]) -> bool:
    """True when ``url`` starts with an allowlisted prefix at a path boundary.

    Refused outright: other schemes, userinfo, malformed URLs, and paths with dot segments or
    encoded separators (which would resolve outside the allowlisted prefix).
    """
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc or parts.username or parts.password:
            return False
    except ValueError:
        return False
    if _path_escapes(parts.path):
        return False
    for prefix in allowlist:
        p = urlsplit(prefix)
        if (parts.scheme, parts.netloc.lower()) != (p.scheme, p.netloc.lower()):
            continue
        base = p.path.rstrip("/")
        if parts.path == base or parts.path.startswith(base + "/") or not base:
            return True
    return False


class RemoteAgentLink(AgentLink):
    """A WebSocket to the customer's agent."""

    def __init__(self, url: str, token: str | None, session: aiohttp.ClientSession, connect_timeout_s: float) -> None:
        self.url = url
        self._token = token
        self._session = session
        self._timeout = connect_timeout_s
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._outbox: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._deliver: Deliver | None = None  # set while the inline sink delivers
        #: True once TEXT messages are delivered inline (the session's socket has the hook).
        self.inline = False

    #: Set by the connector when TWILIO_AUTH_TOKEN is: ``X-Twilio-Signature`` for the upgrade,
    #: computed as Twilio does for ConversationRelay (the URL, no params), so agents that
    #: validate it (as Twilio tells them to) accept the bridge.
    signature: str | None = None

    async def start(self, deliver: Deliver, closed: Closed) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        if self.signature is not None:
            headers["X-Twilio-Signature"] = self.signature
        try:
            self._ws = await asyncio.wait_for(
                self._session.ws_connect(
                    self.url,
                    headers=headers,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                    max_msg_size=AGENT_SOCKET_MAX_MSG_BYTES,
                    heartbeat=30.0,
                ),
                self._timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # The exception text may repeat the URL with its query: name the error, log a clean URL.
            raise AgentUnavailable(f"{type(exc).__name__} connecting to {loggable_url(self.url)}") from None
        if isinstance(self._ws, InlineClientWebSocketResponse):
            # TEXT messages are handled as they are parsed; the reader task gets the rest.
            self._deliver = deliver
            self.inline = self._ws.set_sink(self._take_inline)
        self._tasks = [
            asyncio.create_task(self._read(deliver, closed), name="agent-read"),
            asyncio.create_task(self._write(closed), name="agent-write"),
        ]

    def _take_inline(self, text: str) -> bool:
        """The socket's sink: one TEXT message, inside the transport's data callback."""
        deliver = self._deliver
        if deliver is None or self._closed:
            return False  # left in aiohttp's queue, never read
        try:  # _handle's body, one call less per message
            deliver(text)
        except Exception:  # noqa: BLE001 - a handler bug must not drop the agent (and the call)
            self._handler_failed()
        return True

    def _handle(self, deliver: Deliver, message: str | dict[str, Any]) -> None:
        try:
            deliver(message)
        except Exception:  # noqa: BLE001 - a handler bug must not drop the agent (and the call)
            self._handler_failed()

    def _handler_failed(self) -> None:
        log.exception("agent_message_handler_failed")
        self.send({"type": "error", "description": "the bridge failed to handle that message"})

    async def _read(self, deliver: Deliver, closed: Closed) -> None:
        assert self._ws is not None
        reason = "agent closed the connection"
        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    # aiohttp puts the cause (e.g. 1009, a message over the size cap) in the message itself.
                    reason = f"agent socket error: {self._ws.exception() or msg.data!r}"
                    break
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._handle(deliver, msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._handle(deliver, {"type": "__binary__"})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            reason = f"agent socket error: {exc}"
        if not self._closed:
            closed(reason)

    async def _write(self, closed: Closed) -> None:
        assert self._ws is not None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    await self._ws.send_str(orjson.dumps(self._outbox.popleft()).decode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            if not self._closed:
                closed(f"agent send failed: {exc}")

    def send(self, message: dict[str, Any]) -> None:
        if self._closed:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            for i, queued in enumerate(self._outbox):
                if queued.get("type") == "media":
                    del self._outbox[i]
                    break
            else:
                log_event(log, "agent_outbox_full", logging.WARNING, url=loggable_url(self.url), limit=MAX_OUTBOX)
                return
        self._outbox.append(message)
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        self._deliver = None
        if isinstance(self._ws, InlineClientWebSocketResponse):
            self._ws.set_sink(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._ws is not None:
            try:
                await asyncio.wait_for(self._ws.close(), 2.0)
            except Exception:  # noqa: BLE001
                pass
