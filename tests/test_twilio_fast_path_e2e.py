"""A real call's Twilio messages take the inbound fast path, and what it declines still gets its answer.

Real bridge, real Twilio simulator socket on 127.0.0.1. The call's recognizer
(``TwilioStream.bind`` made it at ``start``) is swapped for a counting subclass
so the test can see which path each message took.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any

import telephony.media
from metrics.scrape import value
from telephony.media import InboundFastPath

from .build_mode import skip_if_compiled
from .conftest import BridgeFactory
from .test_call_e2e import wait_for
from .test_inline_ws import requires_fast_path


class CountingFastPath(InboundFastPath):
    """The stream's recognizer, counting what it accepted."""

    __slots__ = ("media_hits", "mark_hits")

    def __init__(self, stream_sid: str) -> None:
        super().__init__(stream_sid)
        self.media_hits = 0
        self.mark_hits = 0

    def media(self, data: str) -> tuple[bytes, int] | None:
        found = super().media(data)
        self.media_hits += found is not None
        return found

    def mark(self, data: str) -> str | None:
        name = super().mark(data)
        self.mark_hits += name is not None
        return name


def twilio_media(sid: str, payload_b64: str, n: int) -> str:
    return ('{"event":"media","sequenceNumber":"' + str(n + 2) + '","media":{"track":"inbound","chunk":"'
            + str(n) + '","timestamp":"' + str(20 * n) + '","payload":"' + payload_b64
            + '"},"streamSid":"' + sid + '"}')


@requires_fast_path
@skip_if_compiled(telephony.media, "spies on InboundFastPath with a subclass")
async def test_media_and_marks_take_the_fast_path_and_the_rest_the_parser(make_bridge: BridgeFactory) -> None:
    bridge = await make_bridge({"GREETING": " ".join(["fast"] * 20)})
    call = bridge.call(send_inbound_audio=False)
    await call.place()
    await call.connect()
    assert await wait_for(lambda: bool(bridge.server.calls), 5)
    session = next(iter(bridge.server.calls))
    sid = call.record.stream_sid
    assert sid and session.twilio.stream_sid == sid
    counting = CountingFastPath(sid)
    session.twilio._fast = counting  # noqa: SLF001 - the spy sees which path each message takes
    assert await call.wait_until(lambda: call.record.marks_echoed >= 3, 10)
    frame = base64.b64encode(b"\xff" * 160).decode()
    for n in range(1, 31):
        await call.send_raw(twilio_media(sid, frame, n))
    assert await wait_for(lambda: value_in(bridge) >= 30, 5)
    assert counting.media_hits == 30
    assert counting.mark_hits >= 1  # the simulator echoes marks in Twilio's layout
    # Twilio's layout, but not for the fast path: bad base64 and another stream's SID.
    await call.send_raw(twilio_media(sid, "AAA", 31))
    await call.send_raw(twilio_media("MZ000", frame, 32))
    for kind in ("invalid_base64", "wrong_stream_sid"):
        assert await eventually(bridge, lambda samples, kind=kind: value(  # type: ignore[misc]
            samples, "bridge_bad_input_total", source="twilio", kind=kind) == 1), kind
    assert counting.media_hits == 30
    await call.hangup()
    assert await wait_for(lambda: not bridge.server.calls, 5)
    samples = await bridge.metrics()
    assert value(samples, "bridge_twilio_frames_in_total") == 30
    assert value(samples, "bridge_twilio_bytes_in_total") == 30 * 160


async def eventually(bridge: Any, check: Callable[[Any], bool], timeout_s: float = 5.0) -> bool:
    """Scrape the bridge's metrics until ``check`` holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check(await bridge.metrics()):
            return True
        await asyncio.sleep(0.05)
    return False


def value_in(bridge: object) -> int:
    """Frames the live call has taken in (its batched count, before a flush)."""
    calls = bridge.server.calls  # type: ignore[attr-defined]
    return sum(s._n_frames_in for s in calls)  # noqa: SLF001
