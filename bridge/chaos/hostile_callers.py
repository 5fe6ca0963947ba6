"""Simulated callers, a share of them misbehaving towards the bridge's Media Streams socket.

Listening callers (a ``SimulatedCall`` each: signed webhook and upgrade, inbound audio every
20 ms, an ear that echoes marks) talk with the agent (``say`` sentences in the emulator's tone
voice, which the bridge's STT hears) and, by kind, also send:

* ``good``: nothing else;
* ``malformed``: bad JSON, JSON that is not an object, events with missing or wrong fields,
  media whose payload is not base64, an unknown event, a foreign ``streamSid``;
* ``oversized``: a 70 KB text frame (over the bridge's 64 KiB message limit; the call goes on);
* ``binary``: binary frames (Twilio only sends text);
* ``out_of_order``: a second ``start``, marks the bridge never sent, media timestamps going
  backwards, and ``stop`` twice at the end.

Raw callers (their own WebSocket, what they hear is not checked):

* ``media_before_start``: ``media`` before ``start``, then a normal short call;
* ``no_read``: never reads (the socket's receive buffers fill), sends audio, then ``stop``;
* ``reset``: aborts its TCP connection (RST, SO_LINGER 0) 1-2 s into the call;
* ``huge_frame``: a 2 MiB frame (over aiohttp's 1 MiB cap: the bridge closes with 1009).

Every caller is bounded by its ``end_at`` and by ``CONNECT_TIMEOUT_S`` per network step.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import aiohttp

from bridge.loadtest.scenarios import wait_quiet
from telephony.media import FRAME_BYTES, MULAW_SILENCE, TwilioMessageFactory
from telephony.signature import sign
from telephony.simulator import CallerClock, SimulatedCall

LISTENING_KINDS: Final = ("good", "malformed", "oversized", "binary", "out_of_order")
RAW_KINDS: Final = ("media_before_start", "no_read", "reset", "huge_frame")
CALLER_KINDS: Final = LISTENING_KINDS + RAW_KINDS
CONNECT_TIMEOUT_S: Final = 15.0
SILENCE: Final = bytes([MULAW_SILENCE]) * FRAME_BYTES


@dataclass
class CallerOutcome:
    """One call: who it was, how it ended, and (listening callers) its ``SimulatedCall``.

    ``status``: ``completed`` (the caller hung up or did its trick), ``ended_by_bridge``,
    ``refused`` (polite ``<Say>`` TwiML), or ``failed:<reason>`` (no answer, an error).
    """

    index: int
    bridge: str
    kind: str
    agent_mode: str
    status: str = "pending"
    turns: int = 0
    barge_ins: int = 0
    call: SimulatedCall | None = None
    close_code: int | None = None
    error_bodies: list[str] = field(default_factory=list)


def refusal_status(call: SimulatedCall) -> str:
    """A refused call is polite when the TwiML says something and hangs up (``<Say>``, ``<Hangup>``)."""
    twiml = call.twiml or ""
    return "refused" if "<Say" in twiml and "<Hangup" in twiml else "failed:impolite_refusal"


def _factory(call: SimulatedCall) -> TwilioMessageFactory:
    return TwilioMessageFactory(call.record.stream_sid, call.record.call_sid, call.account_sid, {})


def malformed_messages(call: SimulatedCall) -> list[str]:
    sid = call.record.stream_sid
    return [
        "{not json",
        "null",
        "[]",
        '{"event": "media"}',
        f'{{"event": "media", "streamSid": "{sid}", "media": {{"payload": "!!! not base64 !!!"}}}}',
        f'{{"event": "media", "streamSid": "{sid}", "media": {{"payload": 12}}}}',
        f'{{"event": "dance", "streamSid": "{sid}"}}',
        f'{{"event": "mark", "streamSid": "{sid}", "mark": {{}}}}',
        f'{{"event": "dtmf", "streamSid": "{sid}", "dtmf": {{"digit": "xyz"}}}}',
        '{"event": "media", "streamSid": "MZforeign", "media": {"payload": "/w=="}}',
    ]


async def _tricks(kind: str, call: SimulatedCall) -> None:
    """The misbehaviour of a listening caller, sent once mid-call."""
    f = _factory(call)
    if kind == "malformed":
        for text in malformed_messages(call):
            await call.send_raw(text)
    elif kind == "oversized":
        await call.send_raw('{"event": "media", "media": {"payload": "' + "A" * 70_000 + '"}}')
    elif kind == "binary":
        for _ in range(3):
            await call.send_raw(b"\x00\x01\x02 binary from the caller")
    elif kind == "out_of_order":
        await call.send_raw(f.start())
        for name in ("never-sent-1", "never-sent-2", ""):
            await call.send_raw(f.mark(name))
        await call.send_raw(f.media(SILENCE, 0))


def _heard_more(call: SimulatedCall, messages: int) -> bool:
    return call.record.media_messages > messages


async def converse(call: SimulatedCall, out: CallerOutcome, end_at: float, rng: random.Random,
                   speech: Sequence[bytes], barge_in_share: float) -> None:
    """Until ``end_at``: when the line is quiet, say a sentence; sometimes talk over the reply."""
    tricked = out.kind == "good"
    await call.wait_until(lambda: call.got_media.is_set(), max(0.0, min(8.0, end_at - time.monotonic())))
    while time.monotonic() < end_at and not call.closed.is_set():
        if not await wait_quiet(call, end_at, 0.3):
            return
        if call.closed.is_set() or time.monotonic() >= end_at:
            return
        if not tricked:
            tricked = True
            with contextlib.suppress(ConnectionError, RuntimeError):
                await _tricks(out.kind, call)
        n0 = call.record.media_messages
        seconds = call.say(rng.choice(speech))
        out.turns += 1
        await asyncio.sleep(seconds)
        if rng.random() < barge_in_share:
            # Talk over the reply about 0.8 s after it starts.
            await call.wait_until(partial(_heard_more, call, n0 + 5), max(0.0, min(5.0, end_at - time.monotonic())))
            await asyncio.sleep(0.8)
            if time.monotonic() < end_at and not call.closed.is_set():
                call.say(rng.choice(speech))
                out.barge_ins += 1
        await asyncio.sleep(rng.uniform(0.2, 0.8))


async def listening_call(base_url: str, http: aiohttp.ClientSession, token: str, clock: CallerClock,
                         out: CallerOutcome, end_after_s: float, rng: random.Random, speech: Sequence[bytes],
                         barge_in_share: float) -> None:
    call = SimulatedCall(base_url, http, auth_token=token, clock=clock,
                         webhook_query={"chaosAgent": out.agent_mode})
    out.call = call
    stream = await asyncio.wait_for(call.place(), CONNECT_TIMEOUT_S)
    if stream is None:
        out.status = refusal_status(call)
        return
    await asyncio.wait_for(call.connect(), CONNECT_TIMEOUT_S)
    end_at = time.monotonic() + end_after_s
    try:
        await converse(call, out, end_at, rng, speech, barge_in_share)
        ended_by_bridge = call.closed.is_set()
        if not ended_by_bridge and out.kind == "out_of_order":
            with contextlib.suppress(ConnectionError, RuntimeError):
                await call.send_raw(_factory(call).stop())
        await call.hangup()
        out.close_code = call.record.close_code
        out.status = "ended_by_bridge" if ended_by_bridge else "completed"
    finally:
        await call.close()


async def _raw_socket(call: SimulatedCall) -> aiohttp.ClientWebSocketResponse | None:
    """Place the call (signed webhook) and open its stream signed, sending nothing; None if refused."""
    stream = await asyncio.wait_for(call.place(), CONNECT_TIMEOUT_S)
    if stream is None:
        return None
    assert call.auth_token is not None
    headers = {"X-Twilio-Signature": sign(call.auth_token, stream.url, {}), "User-Agent": "Twilio.TmeWs/1.0"}
    return await asyncio.wait_for(call.session.ws_connect(stream.url, headers=headers, max_msg_size=8 << 20),
                                  CONNECT_TIMEOUT_S)


async def _send_audio(ws: aiohttp.ClientWebSocketResponse, f: TwilioMessageFactory, seconds: float,
                      first_ms: int = 0) -> int:
    frames = int(seconds / 0.02)
    t0 = time.monotonic()
    for i in range(frames):
        await ws.send_str(f.media(SILENCE, first_ms + i * 20))
        await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
    return first_ms + frames * 20


def _reset(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Abort the TCP connection with a RST (SO_LINGER 0), as a caller's network dropping would."""
    sock = ws.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn = getattr(ws, "_conn", None)  # aiohttp keeps the transport there; no public abort()
    transport = getattr(conn, "transport", None)
    if transport is not None:
        transport.abort()


async def _drain(ws: aiohttp.ClientWebSocketResponse, until: float) -> None:
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
        while time.monotonic() < until:
            msg = await asyncio.wait_for(ws.receive(), max(0.01, until - time.monotonic()))
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return


async def raw_call(base_url: str, http: aiohttp.ClientSession, token: str, out: CallerOutcome,
                   end_after_s: float, rng: random.Random) -> None:
    call = SimulatedCall(base_url, http, auth_token=token, webhook_query={"chaosAgent": out.agent_mode})
    ws = await _raw_socket(call)
    if ws is None:
        out.status = refusal_status(call)
        return
    f = TwilioMessageFactory(call.record.stream_sid, call.record.call_sid, call.account_sid, {})
    end_at = time.monotonic() + end_after_s
    reader: asyncio.Task[None] | None = None
    try:
        await ws.send_str(f.connected())
        if out.kind == "media_before_start":
            for i in range(5):
                await ws.send_str(f.media(SILENCE, i * 20))
        await ws.send_str(f.start())
        if out.kind != "no_read":
            reader = asyncio.create_task(_drain(ws, end_at + 5.0))
        if out.kind == "reset":
            await _send_audio(ws, f, rng.uniform(1.0, 2.0))
            _reset(ws)
            out.status = "completed"
            return
        if out.kind == "huge_frame":
            await _send_audio(ws, f, 1.0)
            await ws.send_str('{"event": "media", "media": {"payload": "' + "A" * (2 << 20) + '"}}')
            if reader is not None:
                await asyncio.wait({reader}, timeout=5.0)
            out.close_code = ws.close_code
            out.status = "ended_by_bridge" if ws.closed else "failed:huge_frame_not_refused"
            return
        ms = await _send_audio(ws, f, max(0.5, end_at - time.monotonic()))
        ended = ws.closed
        if not ended:
            await ws.send_str(f.stop())
            await _send_audio(ws, f, 0.1, ms)  # audio after stop: ignored, not an error
        out.status = "ended_by_bridge" if ended else "completed"
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        # The bridge closed or reset the socket (a caller that does not read never sees the close
        # frame, only the failed write); whether the bridge itself is healthy is checked on its side.
        out.status = "ended_by_bridge"
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5.0)
