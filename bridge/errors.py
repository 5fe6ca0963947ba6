"""Exceptions that cross module boundaries on the Cartesia, agent and WebSocket client paths.

They live in this plain-Python module, apart from the code that raises them,
because they subclass ``RuntimeError`` / ``ConnectionError``, which mypyc
cannot compile as native classes: that code (``bridge.cartesia.client``,
``bridge.wsclient``, ``bridge.agent.link``) is compiled in the optional
compiled build (``setup.py``). Those modules re-export them, so either
import path works.
"""

from __future__ import annotations


class AdmissionError(RuntimeError):
    """No Cartesia concurrency slot within the deadline, or the wait queue is full."""


class CartesiaUnavailable(AdmissionError):
    """No Cartesia socket could be connected within the deadline (Cartesia down, unreachable or refusing the key)."""


class ContextError(RuntimeError):
    """A Cartesia context could not be used (socket gone, send queue full)."""


class SendQueueFull(ContextError):
    """The Cartesia socket's outbound queue is full: Cartesia is not reading. Retry later, not at once."""


class AgentUnavailable(RuntimeError):
    """The agent could not be reached."""


class HandshakeRefused(ConnectionError):
    """The server answered a WebSocket upgrade with an HTTP status other than 101."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"server rejected WebSocket connection: HTTP {status_code} {reason}".rstrip())
        self.status_code = status_code


class HandshakeFailed(ConnectionError):
    """The server's answer to a WebSocket upgrade was not a valid handshake."""
