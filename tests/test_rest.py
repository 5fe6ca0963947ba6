"""Hang-up over Twilio's REST API with the real twilio client, against a local fake API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient

from bridge.demo import free_port
from telephony.rest import CallControl

from .conftest import BridgeFactory
from .test_agent_e2e import AgentServer, agent  # noqa: F401  (fixture)
from .test_call_e2e import wait_for

ACCOUNT = "AC" + "1" * 32


class LocalTwilioHttpClient(TwilioHttpClient):
    """The real twilio HTTP client, sent to 127.0.0.1 instead of api.twilio.com."""

    def __init__(self, base: str) -> None:
        super().__init__(timeout=5)
        self.base = urlsplit(base)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        parts = urlsplit(url)
        local = urlunsplit((self.base.scheme, self.base.netloc, parts.path, parts.query, ""))
        return super().request(method, local, *args, **kwargs)


class FakeTwilioApi:
    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, str], str | None]] = []
        self.gone: set[str] = set()
        self.base = ""
        self._runner: web.AppRunner | None = None

    async def _update(self, request: web.Request) -> web.Response:
        call_sid = request.match_info["call"]
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.updates.append((call_sid, form, request.headers.get("Authorization")))
        if call_sid in self.gone:
            return web.json_response({"code": 20404, "message": "The requested resource was not found",
                                      "status": 404}, status=404)
        return web.json_response({"sid": call_sid, "account_sid": request.match_info["account"],
                                  "status": form.get("Status", "in-progress")})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._update)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def twilio_api() -> AsyncIterator[FakeTwilioApi]:
    api = FakeTwilioApi()
    await api.start()
    yield api
    await api.stop()


async def test_hang_up_and_redirect_and_a_gone_call_is_not_an_error(twilio_api: FakeTwilioApi) -> None:
    control = CallControl(ACCOUNT, "rest-token", http_client=LocalTwilioHttpClient(twilio_api.base))
    assert await control.hang_up("CA" + "2" * 32) is True
    sid, form, auth = twilio_api.updates[-1]
    assert sid == "CA" + "2" * 32 and form == {"Status": "completed"} and auth and auth.startswith("Basic ")
    assert await control.redirect("CA" + "2" * 32, "https://example.com/next") is True
    assert twilio_api.updates[-1][1] == {"Url": "https://example.com/next", "Method": "POST"}
    twilio_api.gone.add("CA" + "3" * 32)
    assert await control.hang_up("CA" + "3" * 32) is False, "404: the call already ended, which is fine"


async def test_other_rest_errors_are_raised(twilio_api: FakeTwilioApi) -> None:
    control = CallControl(ACCOUNT, "rest-token", http_client=LocalTwilioHttpClient("http://127.0.0.1:1"))
    with pytest.raises(Exception) as info:  # noqa: PT011 - connection refused surfaces from requests
        await control.hang_up("CA" + "4" * 32)
    assert not isinstance(info.value, TwilioRestException) or info.value.status != 404


async def test_agent_end_hangs_up_over_rest_when_configured(make_bridge: BridgeFactory, agent: AgentServer,  # noqa: F811
                                                            twilio_api: FakeTwilioApi) -> None:
    bridge = await make_bridge({"AGENT_URL": agent.url, "TWILIO_ACCOUNT_SID": ACCOUNT})
    assert bridge.server.call_control is not None
    assert bridge.server.services is not None
    bridge.server.services = replace(bridge.server.services, call_control=CallControl(
        ACCOUNT, bridge.token or "", http_client=LocalTwilioHttpClient(twilio_api.base)))
    call = bridge.call()
    await call.place()
    await call.connect()
    await agent.next("setup")
    await agent.send({"type": "text", "token": "Bye now.", "last": True})
    await agent.send({"type": "end"})
    assert await wait_for(lambda: call.closed.is_set(), 10)
    assert await wait_for(lambda: bool(twilio_api.updates), 5)
    assert twilio_api.updates[0][0] == call.record.call_sid
    assert twilio_api.updates[0][1] == {"Status": "completed"}
    assert call.record.media_bytes > 0, "the goodbye played before the hang-up"
    await asyncio.sleep(0)
