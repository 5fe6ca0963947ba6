"""A simulated Twilio call: signed webhook, media stream, and a caller's ear.

``SimulatedCall`` behaves as Twilio does towards a bridge:

1. POSTs the voice webhook (form-encoded, ``X-Twilio-Signature`` when an auth
   token is given) and parses the ``<Connect><Stream>`` TwiML;
2. opens the WebSocket to the stream URL, signed over the ``wss://`` URL with
   empty params, sends ``connected`` and ``start`` (with the ``<Parameter>``s);
3. sends inbound ``media`` every 20 ms on a monotonic clock (no drift):
   silence, or "caller speech" (a loud tone) while ``speak`` is active, or
   audio queued with ``say`` (e.g. the emulator's tone voice saying a sentence,
   from ``fetch_speech``, which the emulator's STT then hears);
4. plays outbound audio through ``EarModel`` at exactly 8000 bytes/s, echoes
   each ``mark`` when the audio before it has played, and on ``clear`` drops
   queued audio and echoes pending marks at once;
5. ends with ``stop`` (``hangup``), or follows the TwiML when the bridge closes
   the socket (POSTs the ``<Connect action>`` URL).

Outbound frames are checked as Twilio would (``parse_outbound``): a binary
frame, bad JSON or unknown event is recorded as a protocol error (31950/31924).
Recorded audio is capped at ``MAX_RECORDED_BYTES`` per call (about 10 min).
"""

from __future__ import annotations

import asyncio
import audioop
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from telephony.caller_clock import OPCODE_BINARY, OPCODE_TEXT, MaskedFrameWriter
from telephony.caller_clock import CallerClock as CallerClock  # re-exported: callers import it from here
from telephony.media import (
    FRAME_BYTES,
    MULAW_SILENCE,
    OutClear,
    OutMark,
    OutMedia,
    TwilioMessageFactory,
    TwilioProtocolError,
    parse_outbound,
)
from telephony.signature import sign
from telephony.twiml import ParsedStream, parse_connect_stream

MAX_RECORDED_BYTES: Final = 8000 * 600
#: Audio ``say`` may hold queued (60 s of μ-law 8 kHz); more is refused, nothing queued.
MAX_SAY_BYTES: Final = 8000 * 60
SILENCE_FRAME: Final = bytes([MULAW_SILENCE]) * FRAME_BYTES


def _speech_frame() -> bytes:
    # A loud 300 Hz tone stands in for a caller talking (well above any VAD threshold).
    samples = [int(12000 * math.sin(2 * math.pi * 300 * n / 8000)) for n in range(FRAME_BYTES)]
    pcm = b"".join(s.to_bytes(2, "little", signed=True) for s in samples)
    return audioop.lin2ulaw(pcm, 2)


SPEECH_FRAME: Final = _speech_frame()


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass(slots=True)
class PlayedSegment:
    """Audio the caller heard: ``start``/``end`` in monotonic seconds."""

    start: float
    end: float
    audio: bytes


class EarModel:
    """The caller's side of Twilio's outbound buffer, consumed at 8000 bytes/s.

    ``buffer_end`` is when everything queued so far will have played. Marks
    are due at the ``buffer_end`` current when they arrived.
    """

    def __init__(self) -> None:
        self.segments: deque[PlayedSegment] = deque()
        self.buffer_end = 0.0
        self.pending_marks: deque[tuple[float, str]] = deque()
        self.recorded = 0
        self.clears = 0
        self.cut_bytes = 0

    def media(self, audio: bytes, now: float) -> None:
        start = max(now, self.buffer_end)
        end = start + len(audio) / 8000.0
        self.buffer_end = end
        if self.recorded < MAX_RECORDED_BYTES:
            self.segments.append(PlayedSegment(start, end, audio))
            self.recorded += len(audio)

    def mark(self, name: str, now: float) -> float:
        """Queue a mark; returns when it is due (when the audio before it has played)."""
        due = max(now, self.buffer_end)
        self.pending_marks.append((due, name))
        return due

    def due_marks(self, now: float) -> list[str]:
        out = []
        while self.pending_marks and self.pending_marks[0][0] <= now:
            out.append(self.pending_marks.popleft()[1])
        return out

    def clear(self, now: float) -> list[str]:
        """Drop what has not played by ``now``; return every pending mark."""
        self.clears += 1
        kept: deque[PlayedSegment] = deque()
        for seg in self.segments:
            if seg.end <= now:
                kept.append(seg)
            elif seg.start < now:
                played = int((now - seg.start) * 8000)
                kept.append(PlayedSegment(seg.start, now, seg.audio[:played]))
                self.cut_bytes += len(seg.audio) - played
            else:
                self.cut_bytes += len(seg.audio)
        self.segments = kept
        self.buffer_end = min(self.buffer_end, now)
        marks = [name for _t, name in self.pending_marks]
        self.pending_marks.clear()
        return marks

    def heard(self, until: float | None = None) -> bytes:
        """Audio played up to ``until`` (default: everything queued)."""
        parts = []
        for seg in self.segments:
            if until is not None and seg.start >= until:
                break
            if until is not None and seg.end > until:
                parts.append(seg.audio[: int((until - seg.start) * 8000)])
                break
            parts.append(seg.audio)
        return b"".join(parts)

    def gaps(self, min_gap_s: float = 0.001) -> list[tuple[float, float]]:
        """Silences between consecutive segments (start, length in seconds)."""
        out = []
        prev_end: float | None = None
        for seg in self.segments:
            if prev_end is not None and seg.start - prev_end > min_gap_s:
                out.append((prev_end, seg.start - prev_end))
            prev_end = seg.end
        return out


@dataclass
class CallRecord:
    """What happened on one simulated call, for assertions and reports."""

    call_sid: str
    stream_sid: str
    timeline: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    media_messages: int = 0
    media_bytes: int = 0
    payload_sizes: list[int] = field(default_factory=list)
    marks_received: int = 0
    marks_echoed: int = 0
    clears: int = 0
    protocol_errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    action_response: str | None = None
    #: Every outbound audio byte in arrival order (capped at ``MAX_RECORDED_BYTES``),
    #: including audio later dropped by a ``clear``; for integrity checks.
    received_audio: bytearray = field(default_factory=bytearray)
    #: One entry per outbound ``media`` message: (arrival monotonic s, offset in
    #: ``received_audio``, length, seconds the caller's buffer had been dry before it).
    arrivals: list[tuple[float, int, int, float]] = field(default_factory=list)
    #: ``len(received_audio)`` when each ``clear`` arrived (an utterance boundary).
    clear_offsets: list[int] = field(default_factory=list)

    def event(self, kind: str, **detail: Any) -> None:
        self.timeline.append((time.monotonic(), kind, detail))

    def first(self, kind: str) -> float | None:
        for t, k, _d in self.timeline:
            if k == kind:
                return t
        return None


class SimulatedCall:
    """One simulated Twilio call against a bridge at ``base_url`` (see module doc).

    Inbound audio (a frame every 20 ms) and mark echoes (when the audio before
    the mark has played) are sent by a ``CallerClock``: a shared one
    (``clock=``) when many calls share a process, else the call's own.
    """

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        auth_token: str | None = None,
        public_url: str | None = None,
        from_: str = "+15550100001",
        to: str = "+15550100002",
        webhook_query: dict[str, str] | None = None,
        send_inbound_audio: bool = True,
        ws_url_override: str | None = None,
        clock: CallerClock | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self._own_clock: CallerClock | None = None  # created by connect() when no clock is shared
        self._frames_sent = 0
        self._audio_t0 = 0.0
        self.public_url = (public_url or base_url).rstrip("/")
        self.session = session
        self.auth_token = auth_token
        self.from_ = from_
        self.to = to
        self.webhook_query = webhook_query or {}
        self.send_inbound_audio = send_inbound_audio
        self.ws_url_override = ws_url_override
        self.account_sid = new_sid("AC")
        self.record = CallRecord(new_sid("CA"), new_sid("MZ"))
        self.ear = EarModel()
        self.stream: ParsedStream | None = None
        self.twiml: str | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._factory: TwilioMessageFactory | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._speaking_until = 0.0
        self._say_queue = bytearray()
        #: Every frame sent from ``say`` audio (μ-law, whole frames, last one padded with silence).
        self.said_frames = 0
        self._writer: MaskedFrameWriter | None = None
        self.closed = asyncio.Event()
        self.got_media = asyncio.Event()

    # ------------------------------------------------------------ webhook

    def _to_local(self, public: str) -> str:
        """Map a public URL from TwiML onto the local bridge address."""
        p, b = urlsplit(public), urlsplit(self.base_url)
        scheme = {"https": "http", "wss": "ws"}.get(p.scheme, p.scheme) if b.scheme == "http" else p.scheme
        return urlunsplit((scheme, b.netloc, p.path, p.query, ""))

    async def post_webhook(self, path: str = "/twilio/voice") -> aiohttp.ClientResponse:
        form = {
            "AccountSid": self.account_sid,
            "CallSid": self.record.call_sid,
            "From": self.from_,
            "To": self.to,
            "Caller": self.from_,
            "Called": self.to,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        query = ("?" + urlencode(self.webhook_query)) if self.webhook_query else ""
        headers = {}
        if self.auth_token:
            headers["X-Twilio-Signature"] = sign(self.auth_token, self.public_url + path + query, form)
        self.record.event("webhook_sent")
        # encoded=True: send the URL exactly as signed (yarl would otherwise re-normalize the query).
        resp = await self.session.post(URL(self.base_url + path + query, encoded=True), data=form, headers=headers)
        return resp

    async def place(self) -> ParsedStream | None:
        """Webhook → TwiML. Returns the stream, or ``None`` for a refusal."""
        resp = await self.post_webhook()
        body = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"webhook answered {resp.status}: {body[:200]}")
        self.twiml = body
        self.stream = parse_connect_stream(body)
        self.record.event("webhook_answered", refused=self.stream is None)
        return self.stream

    # ------------------------------------------------------------- stream

    async def connect(self, *, signature: str | None = None, extra_parameters: dict[str, str] | None = None) -> None:
        """Open the media stream and send ``connected`` + ``start``."""
        assert self.stream is not None, "place() the call first"
        url = self.stream.url
        headers = {"User-Agent": "Twilio.TmeWs/1.0"}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif self.auth_token:
            headers["X-Twilio-Signature"] = sign(self.auth_token, url, {})
        local = self.ws_url_override or self._to_local(url)
        self._ws = await self.session.ws_connect(local, headers=headers, autoping=True, max_msg_size=8 * 1024 * 1024)
        self._writer = MaskedFrameWriter.for_socket(self._ws)
        if self._writer is None:
            await self._ws.close()
            raise RuntimeError("the simulated caller needs aiohttp's uncompressed client transport")
        params = dict(self.stream.parameters)
        params.update(extra_parameters or {})
        self._factory = TwilioMessageFactory(self.record.stream_sid, self.record.call_sid, self.account_sid, params)
        self.write_message(self._factory.connected())
        self.write_message(self._factory.start())
        self.record.event("stream_started")
        self._tasks = [asyncio.create_task(self._receive(), name="sim-receive")]
        if self.clock is None:
            self.clock = self._own_clock = CallerClock()
        self._audio_t0 = time.monotonic()
        self.clock.add(self)

    @property
    def next_frame_due(self) -> float:
        """When the next inbound 20 ms frame is due (monotonic s; anchored at ``connect``)."""
        return self._audio_t0 + self._frames_sent * 0.020

    def send_due_frames(self, now: float) -> float | None:
        """``CallerClock``'s turn: send every inbound frame due by ``now``, each its own write;
        return when the next one is due (None: this call sends no more)."""
        if self.closed.is_set():
            if self.clock is not None:
                self.clock.remove(self)
            return None
        if not self.send_inbound_audio:
            return None
        factory = self._factory
        assert factory is not None
        while self._audio_t0 + self._frames_sent * 0.020 <= now:
            frame = self._next_said_frame() or (SPEECH_FRAME if now < self._speaking_until else SILENCE_FRAME)
            try:
                self.write_message(factory.media(frame, self._frames_sent * 20))
            except (ConnectionError, RuntimeError):
                return None
            self._frames_sent += 1
        return self._audio_t0 + self._frames_sent * 0.020

    def echo_due_marks(self, now: float) -> None:
        """``CallerClock``'s turn: echo the marks whose audio has played by ``now``."""
        if self.closed.is_set():
            return
        for name in self.ear.due_marks(now):
            self._echo(name)

    def write_message(self, text: str | bytes) -> None:
        """Write one message now as its own frame: TEXT for ``str``, BINARY for ``bytes``."""
        if self._writer is None:
            raise RuntimeError("connect() the call first")
        if isinstance(text, str):
            self._writer.write(text.encode(), OPCODE_TEXT)
        else:
            self._writer.write(text, OPCODE_BINARY)

    async def send_raw(self, text: str | bytes) -> None:
        """``write_message`` for coroutine callers (kept for the tests' and tools' use)."""
        self.write_message(text)

    def speak(self, duration_s: float) -> None:
        """Caller speech (loud inbound frames) from now for ``duration_s``."""
        self._speaking_until = time.monotonic() + duration_s
        self.record.event("caller_speech", duration_s=duration_s)

    def say(self, mulaw: bytes) -> float:
        """Queue μ-law 8 kHz audio for the caller to say; returns its length in seconds.

        It replaces the inbound frames that would carry silence (or ``speak``'s tone),
        from the next 20 ms tick on, on the same clock: 160 bytes a frame, the last
        frame padded with μ-law silence. Several calls queue back to back. At most
        ``MAX_SAY_BYTES`` may be queued: beyond it ``ValueError`` and nothing is queued.
        """
        if len(self._say_queue) + len(mulaw) > MAX_SAY_BYTES:
            raise ValueError(
                f"say: {len(mulaw)} bytes would exceed the queue of {MAX_SAY_BYTES} bytes "
                f"({len(self._say_queue)} queued)"
            )
        self._say_queue += mulaw
        seconds = len(mulaw) / 8000.0
        self.record.event("caller_say", seconds=seconds)
        return seconds

    @property
    def saying(self) -> bool:
        """Whether ``say`` audio is still waiting to be sent."""
        return bool(self._say_queue)

    def _next_said_frame(self) -> bytes | None:
        if not self._say_queue:
            return None
        frame = bytes(self._say_queue[:FRAME_BYTES])
        del self._say_queue[:FRAME_BYTES]
        self.said_frames += 1
        return frame + SILENCE_FRAME[len(frame):]

    async def send_dtmf(self, digit: str) -> None:
        assert self._factory is not None
        await self.send_raw(self._factory.dtmf(digit))
        self.record.event("dtmf_sent", digit=digit)

    async def _receive(self) -> None:
        assert self._ws is not None
        ws = self._ws
        record = self.record
        try:
            async for msg in ws:
                now = time.monotonic()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    record.protocol_errors.append("31950 binary frame")
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    event = parse_outbound(msg.data, record.stream_sid)
                except TwilioProtocolError as exc:
                    record.protocol_errors.append(str(exc))
                    continue
                if isinstance(event, OutMedia):
                    if len(event.payload) % FRAME_BYTES:
                        record.protocol_errors.append(f"payload of {len(event.payload)} bytes is not whole frames")
                    if record.media_messages == 0:
                        record.event("first_media")
                        self.got_media.set()
                    record.media_messages += 1
                    record.media_bytes += len(event.payload)
                    record.payload_sizes.append(len(event.payload))
                    ear = self.ear
                    dry = now - ear.buffer_end if ear.buffer_end > 0.0 else 0.0
                    offset = len(record.received_audio)
                    if offset < MAX_RECORDED_BYTES:
                        record.received_audio += event.payload
                        record.arrivals.append((now, offset, len(event.payload), max(0.0, dry)))
                    ear.media(event.payload, now)
                elif isinstance(event, OutMark):
                    record.marks_received += 1
                    due = self.ear.mark(event.name, now)
                    if self.clock is not None:
                        self.clock.mark_due(self, due)
                elif isinstance(event, OutClear):
                    record.clears += 1
                    record.clear_offsets.append(len(record.received_audio))
                    record.event("clear")
                    for name in self.ear.clear(now):
                        self._echo(name)
        finally:
            record.close_code = ws.close_code
            record.event("stream_closed", code=ws.close_code)
            self.closed.set()

    def _echo(self, name: str) -> None:
        assert self._factory is not None
        try:
            self.write_message(self._factory.mark(name))
            self.record.marks_echoed += 1
        except (ConnectionError, RuntimeError):
            pass

    async def hangup(self) -> None:
        """Caller hangs up: ``stop`` then close."""
        if self._ws is not None and not self._ws.closed and self._factory is not None:
            try:
                await self.send_raw(self._factory.stop())
            except (ConnectionError, RuntimeError):
                pass
            self.record.event("stop_sent")
            await self._ws.close()
        await self.close()

    async def follow_action(self) -> str | None:
        """After the bridge closed the stream: POST the <Connect action>, as Twilio does."""
        if self.stream is None or not self.stream.action:
            return None
        form = {"AccountSid": self.account_sid, "CallSid": self.record.call_sid, "CallStatus": "in-progress"}
        headers = {}
        if self.auth_token:
            headers["X-Twilio-Signature"] = sign(self.auth_token, self.stream.action, form)
        resp = await self.session.post(self._to_local(self.stream.action), data=form, headers=headers)
        self.record.action_response = await resp.text()
        self.record.event("action_followed", status=resp.status)
        return self.record.action_response

    async def close(self) -> None:
        self.closed.set()
        if self.clock is not None:
            self.clock.remove(self)
        if self._own_clock is not None:
            await self._own_clock.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks = []
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()

    async def wait_until(self, predicate: Any, timeout: float, interval: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.closed.is_set() and not predicate():
                return bool(predicate())
            await asyncio.sleep(interval)
        return bool(predicate())


async def fetch_speech(
    session: aiohttp.ClientSession,
    http_url: str,
    text: str,
    voice_id: str,
    *,
    api_key: str | None = None,
    speed: float | None = None,
) -> bytes:
    """``text`` spoken by a Cartesia (the emulator's tone voices: what its STT hears) as
    raw μ-law 8 kHz, from ``POST {http_url}/tts/bytes``; ready for ``SimulatedCall.say``."""
    body: dict[str, Any] = {
        "model_id": "sonic-3",
        "transcript": text,
        "voice": {"mode": "id", "id": voice_id},
        "output_format": {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000},
    }
    if speed is not None:
        body["generation_config"] = {"speed": speed}
    headers = {"X-API-Key": api_key} if api_key else {}
    async with session.post(http_url.rstrip("/") + "/tts/bytes", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"/tts/bytes answered {resp.status}: {(await resp.text())[:200]}")
        return await resp.read()
