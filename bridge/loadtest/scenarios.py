"""What a simulated caller does once its stream is up: the ``talk``, ``conversation``,
``barge-in``, ``idle`` and ``spoken`` (in ``spoken``) scenarios (see ``bridge.loadtest``)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Final

from telephony.simulator import SimulatedCall

from .results import CallResult

#: Quiet this long (buffer played out, nothing new) = the agent has finished its turn.
QUIET_S: Final = 0.12
#: ``talk`` waits longer: a stall mid-passage (an underrun) taken for the end of the turn would
#: queue another long passage behind the first and feed an overload with more load.
TALK_QUIET_S: Final = 1.0
#: A trigger not answered with audio within this long counts as "no_response".
RESPONSE_TIMEOUT_S: Final = 8.0
#: How long the ``barge-in`` caller talks, s.
BARGE_IN_SPEECH_S: Final = 0.6


async def sleep_until(t: float) -> None:
    """Sleep to the ``time.monotonic`` instant ``t`` (no-op when it is past)."""
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def wait_for(pred: Callable[[], bool], until: float, interval: float = 0.02) -> bool:
    """Poll ``pred`` every ``interval`` s until it holds (True) or ``until`` passes (its last value)."""
    while time.monotonic() < until:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


async def wait_quiet(call: SimulatedCall, until: float, quiet_s: float = QUIET_S) -> bool:
    """Until the line has been quiet for ``quiet_s`` or is closed; sleeps to the
    moment it could next be quiet instead of polling."""
    arr = call.record.arrivals
    while True:
        if call.closed.is_set():
            return True
        now = time.monotonic()
        quiet_at = max(call.ear.buffer_end, arr[-1][0] if arr else 0.0) + quiet_s
        if now > quiet_at:
            return True
        if now >= until:
            return False
        await asyncio.sleep(min(quiet_at, until) - now + 0.001)


async def trigger(call: SimulatedCall, res: CallResult, digit: str, end_at: float) -> float | None:
    """Send ``digit`` and wait for audio; return when the answer's first media arrived."""
    n0 = len(call.record.arrivals)
    t = time.monotonic()
    await call.send_dtmf(digit)
    res.triggers.append((t, "dtmf"))
    ok = await wait_for(lambda: len(call.record.arrivals) > n0 or call.closed.is_set(),
                        min(end_at, t + RESPONSE_TIMEOUT_S), 0.005)
    if not ok and time.monotonic() < end_at:
        res.no_response += 1
    if len(call.record.arrivals) > n0:
        first = call.record.arrivals[n0][0]
        res.live_ttfa.append(first - t)
        return first
    return None


async def run_scenario(name: str, call: SimulatedCall, res: CallResult, end_at: float, rng: random.Random) -> None:
    """Play scenario ``name`` on a connected call until ``end_at`` (monotonic s) or until the bridge closes it."""
    closed = call.closed.is_set
    if not await wait_for(lambda: call.got_media.is_set() or closed(),
                          min(end_at, time.monotonic() + RESPONSE_TIMEOUT_S)):
        if time.monotonic() < end_at:
            res.no_response += 1
    elif call.record.arrivals and res.t_started is not None:
        res.live_ttfa.append(call.record.arrivals[0][0] - res.t_started)
    if name == "idle":
        await wait_for(closed, end_at, 0.25)
        return
    if name == "spoken":
        from .spoken import SpokenCall, run_spoken

        assert isinstance(call, SpokenCall), "the runner places SpokenCalls for the spoken scenario"
        await run_spoken(call, res, end_at, rng)
        return
    while time.monotonic() < end_at and not closed():
        if not await wait_quiet(call, end_at, TALK_QUIET_S if name == "talk" else QUIET_S):
            return
        if closed():
            return
        if name == "talk":
            await trigger(call, res, "9", end_at)
        elif name == "conversation":
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            if time.monotonic() >= end_at:
                return
            await trigger(call, res, rng.choice("12345678"), end_at)
        elif not await _barge_in(call, res, end_at, rng):
            return


async def _barge_in(call: SimulatedCall, res: CallResult, end_at: float, rng: random.Random) -> bool:
    """DTMF 9, then talk over the passage 1-2 s into it; False when the call is over."""
    first = await trigger(call, res, "9", end_at)
    if first is None:
        return True
    await sleep_until(first + rng.uniform(1.0, 2.0))
    if time.monotonic() >= end_at or call.closed.is_set():
        return False
    clears0 = call.record.clears
    call.speak(BARGE_IN_SPEECH_S)
    t_speak = time.monotonic()
    if await wait_for(lambda: call.record.clears > clears0 or call.closed.is_set(), min(end_at, t_speak + 3.0), 0.005):
        for t, kind, _d in reversed(call.record.timeline):
            if kind == "clear":
                if t >= t_speak:
                    res.barge_in_s.append(t - t_speak)
                break
    await sleep_until(t_speak + BARGE_IN_SPEECH_S + 0.3)  # caller stops talking; VAD hangover passes
    return True
