"""The built-in demo agent: in-process, speaks the agent protocol.

It greets (the ``greeting`` custom parameter, else the configured line),
reads DTMF digits back, speaks a long interruptible passage on ``9``, and on
``0`` says goodbye and ends the call. When the call listens (speech in), it
repeats what the caller said (each final ``prompt``). Its text streams word by word, so it
exercises continuations; it reacts to ``interrupt`` and ``spoken``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

from bridge.agent.link import AgentLink, Closed, Deliver

LONG_PASSAGE: Final = (
    "Here is a longer passage so that you can try interrupting me. "
    "The bridge sends my words to Cartesia as they arrive, cuts the audio into twenty millisecond frames, "
    "and keeps only a short lead over what you have actually heard. "
    "If you start talking, it clears the telephone buffer, cancels the speech that was still being made, "
    "and tells me exactly which words reached your ear, so that I never believe I said something you did not hear. "
    "That is the whole trick, and it is why barge in feels natural on this line."
)

#: Most messages the agent will hold before handling them.
MAX_INBOX: Final = 1000


class BuiltinAgentLink(AgentLink):
    """The demo agent behind the same interface as a remote one."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting
        self._deliver: Deliver | None = None
        self._inbox: deque[dict[str, Any]] = deque(maxlen=MAX_INBOX)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.received: deque[dict[str, Any]] = deque(maxlen=200)  # for tests and the demo timeline

    async def start(self, deliver: Deliver, closed: Closed) -> None:
        self._deliver = deliver
        self._task = asyncio.create_task(self._run(), name="builtin-agent")

    def send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "media":
            return
        self._inbox.append(message)
        self._wake.set()

    def _say(self, text: str, *, interruptible: bool = True) -> None:
        assert self._deliver is not None
        words = text.split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            msg: dict[str, Any] = {"type": "text", "token": word if last else word + " ", "last": last}
            if i == 0 and not interruptible:
                msg["interruptible"] = False
            self._deliver(msg)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._inbox:
                msg = self._inbox.popleft()
                self.received.append(msg)
                self._handle(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "setup":
            params = msg.get("customParameters") or {}
            self._say(str(params.get("greeting") or self.greeting))
        elif kind == "prompt" and msg.get("last") and str(msg.get("voicePrompt") or "").strip():
            self._say(f"You said {str(msg['voicePrompt']).strip()}.")
        elif kind == "dtmf":
            digit = str(msg.get("digit"))
            if digit == "9":
                self._say(LONG_PASSAGE)
            elif digit == "0":
                self._say("Goodbye.")
                assert self._deliver is not None
                self._deliver({"type": "end", "handoffData": None})
            else:
                self._say(f"You pressed {digit}.")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
