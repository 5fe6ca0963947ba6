"""Hang up or redirect a live call with ``twilio.rest.Client``.

The twilio client is synchronous (``requests``), so calls run in a worker
thread. A 404 (code 20404: the call is already gone) is not an error. The
``http_client`` argument lets tests point the real client at a local server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from bridge.logs import log_event

log = logging.getLogger("telephony.rest")


class CallControl:
    """REST control of live calls for one account."""

    def __init__(self, account_sid: str, auth_token: str, http_client: Any = None, timeout_s: float = 10.0) -> None:
        self._client = Client(account_sid, auth_token, http_client=http_client)
        self.timeout_s = timeout_s

    def _update(self, call_sid: str, **kwargs: Any) -> bool:
        try:
            self._client.calls(call_sid).update(**kwargs)
            return True
        except TwilioRestException as exc:
            if exc.status == 404:
                log_event(log, "call_already_gone", call_sid=call_sid)
                return False
            raise

    async def hang_up(self, call_sid: str) -> bool:
        """``status=completed``; False when the call was already gone."""
        return await asyncio.wait_for(asyncio.to_thread(self._update, call_sid, status="completed"), self.timeout_s)

    async def redirect(self, call_sid: str, url: str) -> bool:
        """Move the call to new TwiML at ``url`` (the stream gets ``stop``)."""
        return await asyncio.wait_for(asyncio.to_thread(self._update, call_sid, url=url, method="POST"),
                                      self.timeout_s)
