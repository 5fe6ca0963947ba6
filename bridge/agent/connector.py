"""Which agent a call talks to, and the shared HTTP client that reaches it.

``AgentConnector`` opens one ``AgentLink`` per call: a ``RemoteAgentLink``
to ``AGENT_URL`` (or to the call's own ``agentUrl`` when it matches
``AGENT_URL_ALLOWLIST``), else the built-in demo agent.

Limits: remote links share one ``aiohttp.ClientSession`` whose connector
holds at most ``max_links + LINK_HEADROOM`` connections (aiohttp's default of
100 would make call 101 wait for a free connection: every link holds its
connection for the whole call). ``max_links`` is ``MAX_CALLS``, which the
voice webhook already enforces, so the pool never is the bound; a link beyond
it waits for a connection up to the connect timeout, then the caller hears
the fallback line. Its WebSockets are ``inline_client`` responses (agent
TEXT messages handled in the data callback; aiohttp's plain path when the
guard there does not know the installed aiohttp or ``inline_receive`` is off).
"""

from __future__ import annotations

from typing import Final

import aiohttp

from bridge.agent.builtin import BuiltinAgentLink
from bridge.agent.inline_client import inline_response_class
from bridge.agent.link import (
    AGENT_SOCKET_MAX_MSG_BYTES,
    AgentLink,
    AgentUnavailable,
    Closed,
    Deliver,
    RemoteAgentLink,
    agent_url_allowed,
)
from bridge.logs import loggable_url
from metrics import BridgeMetrics
from telephony.signature import sign

#: Connections beyond ``max_links`` (calls that are ending while new ones connect).
LINK_HEADROOM: Final = 32


class AgentConnector:
    """Opens each call's agent link (see the module docstring for limits)."""

    def __init__(
        self,
        *,
        agent_url: str | None,
        allowlist: tuple[str, ...],
        token: str | None,
        connect_timeout_s: float,
        greeting: str,
        max_links: int,
        metrics: BridgeMetrics,
        twilio_auth_token: str | None = None,
        inline_receive: bool = True,
    ) -> None:
        self.agent_url = agent_url
        self.allowlist = allowlist
        self._token = token
        self.connect_timeout_s = connect_timeout_s
        self.greeting = greeting
        self.connection_limit = max_links + LINK_HEADROOM
        self.metrics = metrics
        self.http: aiohttp.ClientSession | None = None
        self._twilio_auth_token = twilio_auth_token
        #: Agent TEXT messages handled in the socket's data callback (``inline_client``; off = reader task).
        self.inline_receive = inline_receive

    def start(self) -> None:
        """Create the shared HTTP client (inside the running event loop)."""
        if self.http is None:
            # Every ws_connect on it passes AGENT_SOCKET_MAX_MSG_BYTES (RemoteAgentLink.start).
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connection_limit),
                ws_response_class=inline_response_class(AGENT_SOCKET_MAX_MSG_BYTES, inline=self.inline_receive))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    def is_external(self, requested_url: str | None) -> bool:
        """Whether a call with this ``agentUrl`` parameter talks to a remote agent."""
        return bool(requested_url or self.agent_url)

    async def connect(self, requested_url: str | None, deliver: Deliver, closed: Closed) -> AgentLink:
        """The call's agent, started. ``requested_url``: the call's own
        ``agentUrl`` parameter, if any. Raises ``AgentUnavailable``."""
        url = self.agent_url
        if requested_url:
            if not agent_url_allowed(requested_url, self.allowlist):
                self.metrics.agent_failures.labels(reason="not_allowlisted").inc()
                raise AgentUnavailable(
                    f"agent URL from call data is not allowlisted: {loggable_url(requested_url)[:100]}")
            url = requested_url
        link: AgentLink
        if url:
            self.start()
            assert self.http is not None
            remote = RemoteAgentLink(url, self._token, self.http, self.connect_timeout_s)
            if self._twilio_auth_token:
                remote.signature = sign(self._twilio_auth_token, url)
            link = remote
        else:
            link = BuiltinAgentLink(self.greeting)
        await link.start(deliver, closed)
        return link
