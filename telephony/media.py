"""Twilio Media Streams message codec, both peers, no I/O.

Source: ``../shared/docs/twilio-media-streams.md`` sections 2-3. Twilio sends
JSON text frames whose numeric-looking fields are strings (``sequenceNumber``,
``chunk``, ``timestamp``); ``mediaFormat.sampleRate``/``channels`` are numbers.

Bridge side: ``parse_inbound`` (Twilio -> us) and ``OutboundEncoder``
(us -> Twilio: ``media``, ``mark``, ``clear``). Simulator side:
``TwilioMessageFactory`` (what Twilio sends) and ``parse_outbound`` (what a
bridge sends, checked strictly as Twilio would: 31924 / 31950).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any, Final, Union

import orjson

_a2b_base64 = binascii.a2b_base64

#: Bytes in one 20 ms frame of 8 kHz mu-law.
FRAME_BYTES: Final = 160
FRAME_MS: Final = 20
BYTES_PER_MS: Final = 8
#: mu-law silence (the encoding of 0).
MULAW_SILENCE: Final = 0xFF
#: Largest inbound message the bridge accepts (bytes). A 20 ms media message is
#: ~330 bytes; 64 KiB leaves room for long customParameters.
MAX_INBOUND_MESSAGE_BYTES: Final = 64 * 1024


class MediaError(ValueError):
    """An inbound message the bridge cannot use. ``kind`` is a metric label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    tracks: list[str]
    encoding: str
    sample_rate: int
    channels: int
    sequence_number: str | None = None


@dataclass(slots=True)  # not frozen: one per 20 ms per call, and a frozen __init__ costs ~6x
class Media:
    """Inbound audio. ``payload`` is decoded mu-law bytes."""

    stream_sid: str
    payload: bytes
    track: str
    chunk: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    stream_sid: str
    digit: str


@dataclass(frozen=True, slots=True)
class MarkEcho:
    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    stream_sid: str
    call_sid: str | None


InboundEvent = Union[Connected, Start, Media, Dtmf, MarkEcho, Stop]


def _as_int(value: Any, name: str) -> int:
    if type(value) is str:  # the usual case: Twilio sends numeric strings
        try:
            return int(value)
        except ValueError:
            pass
    if isinstance(value, bool):
        raise MediaError("bad_field", f"{name} must be a number or numeric string")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise MediaError("bad_field", f"{name} must be a number or numeric string, got {value!r}")


def _stream_sid(obj: dict[str, Any]) -> str:
    sid = obj.get("streamSid")
    if not isinstance(sid, str) or not sid:
        raise MediaError("bad_field", "streamSid is missing")
    return sid


def parse_inbound(data: str | bytes) -> InboundEvent:
    """Decode one Twilio -> bridge text frame. Raises ``MediaError``.

    ``MediaError.kind`` is one of ``oversized``, ``malformed_json``,
    ``not_an_object``, ``unknown_event``, ``bad_field``, ``invalid_base64``.
    """
    if len(data) > MAX_INBOUND_MESSAGE_BYTES:
        raise MediaError("oversized", f"{len(data)} bytes > {MAX_INBOUND_MESSAGE_BYTES}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MediaError("malformed_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise MediaError("not_an_object", "message is not a JSON object")
    event = obj.get("event")
    if event == "media":
        media = obj.get("media")
        if not isinstance(media, dict):
            raise MediaError("bad_field", "media object missing")
        sid = obj.get("streamSid")
        if type(sid) is not str or not sid:
            raise MediaError("bad_field", "streamSid is missing")
        payload = media.get("payload")
        if type(payload) is not str:
            raise MediaError("invalid_base64", "media.payload must be a base64 string")
        try:
            audio = _a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError("invalid_base64", f"media.payload is not valid base64 ({exc})") from None
        track = media.get("track")
        return Media(
            sid,
            audio,
            track if type(track) is str and track else str(track or "inbound"),
            _as_int(media.get("chunk", 0), "media.chunk"),
            _as_int(media.get("timestamp", 0), "media.timestamp"),
        )
    if event == "mark":
        mark = obj.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            raise MediaError("bad_field", "mark.name missing")
        return MarkEcho(_stream_sid(obj), name)
    if event == "dtmf":
        dtmf = obj.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCDabcdw":
            raise MediaError("bad_field", f"dtmf.digit invalid: {digit!r}")
        return Dtmf(_stream_sid(obj), digit)
    if event == "start":
        start = obj.get("start")
        if not isinstance(start, dict):
            raise MediaError("bad_field", "start object missing")
        sid = start.get("streamSid") or obj.get("streamSid")
        call_sid = start.get("callSid")
        if not isinstance(sid, str) or not sid or not isinstance(call_sid, str) or not call_sid:
            raise MediaError("bad_field", "start.streamSid and start.callSid are required")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise MediaError("bad_field", "start.customParameters must be an object")
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict):
            raise MediaError("bad_field", "start.mediaFormat must be an object")
        tracks = start.get("tracks") or ["inbound"]
        return Start(
            stream_sid=sid,
            call_sid=call_sid,
            account_sid=str(start.get("accountSid") or ""),
            custom_parameters={str(k): str(v) for k, v in params.items()},
            tracks=[str(t) for t in tracks] if isinstance(tracks, list) else ["inbound"],
            encoding=str(fmt.get("encoding") or "audio/x-mulaw"),
            sample_rate=_as_int(fmt.get("sampleRate", 8000), "mediaFormat.sampleRate"),
            channels=_as_int(fmt.get("channels", 1), "mediaFormat.channels"),
            sequence_number=str(obj["sequenceNumber"]) if "sequenceNumber" in obj else None,
        )
    if event == "stop":
        stop = obj.get("stop")
        call_sid = stop.get("callSid") if isinstance(stop, dict) else None
        return Stop(_stream_sid(obj), call_sid if isinstance(call_sid, str) else None)
    if event == "connected":
        return Connected(str(obj.get("protocol") or ""), str(obj.get("version") or ""))
    raise MediaError("unknown_event", f"event {event!r} is not a Media Streams event")


class InboundFastPath:
    """Recognizes one stream's two commonest Twilio messages without a JSON parser.

    Per call second Twilio sends 50 ``media`` frames and about ten ``mark``
    echoes, always in Twilio's own layout (``twilio-media-streams.md`` §2)::

        {"event":"media","sequenceNumber":"<digits>","media":{"track":"inbound","chunk":"<digits>",
         "timestamp":"<digits>","payload":"<base64>"},"streamSid":"<this stream>"}
        {"event":"mark","sequenceNumber":"<digits>","streamSid":"<this stream>","mark":{"name":"<name>"}}

    ``media`` and ``mark`` accept a text only when it is *exactly* that layout
    for this stream (numbers of 1 to ``FAST_MAX_DIGITS`` ASCII digits, strict
    base64, a mark name of ASCII letters and digits) and return what
    ``parse_inbound`` would (payload and timestamp; mark name). Anything else
    returns ``None`` and must go to ``parse_inbound``. A text accepted here is
    valid for ``parse_inbound`` with the same result, so the validation is the
    same whichever path a message takes (``tests/test_inbound_fast_path.py``).
    Cost (callgrind, CPython 3.11): about 60 % of ``parse_inbound``'s
    instructions for a 20 ms frame (half of what is left is the base64
    decode), about half for a mark echo.
    """

    __slots__ = ("stream_sid", "_media_tail", "_media_body_end", "_mark")

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid
        sid = orjson.dumps(stream_sid).decode()
        self._media_tail = '"},"streamSid":' + sid + "}"
        self._media_body_end = -len(self._media_tail)
        # One pattern per stream (compiled once per call): its SID is part of the layout.
        self._mark = re.compile(_MARK_HEAD + re.escape(',"streamSid":' + sid + ',"mark":{"name":"')
                                + r'([A-Za-z0-9]+)"\}\}')

    def media(self, data: str) -> tuple[bytes, int] | None:
        """``(payload, timestamp_ms)`` of a ``media`` frame in Twilio's layout, else ``None``."""
        head = _MEDIA_HEAD.match(data)
        if head is None or not data.endswith(self._media_tail) or len(data) > MAX_INBOUND_MESSAGE_BYTES:
            return None
        start = head.end()
        if start > len(data) + self._media_body_end:  # the payload's quote is the tail's: not JSON
            return None
        try:
            # strict: only the base64 alphabet with correct padding, so no quote or
            # backslash can hide in the payload and the layout above is the whole text.
            audio = _a2b_base64(data[start:self._media_body_end], strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        return audio, int(head.group(1))

    def mark(self, data: str) -> str | None:
        """The name of a ``mark`` echo in Twilio's layout, else ``None``."""
        found = self._mark.fullmatch(data)
        return None if found is None else found.group(1)


#: Longest number the fast path takes (longer ones go to ``parse_inbound``).
FAST_MAX_DIGITS: Final = 18
_NUMBER: Final = f"[0-9]{{1,{FAST_MAX_DIGITS}}}"
_MEDIA_HEAD: Final = re.compile(
    re.escape('{"event":"media","sequenceNumber":"') + _NUMBER
    + re.escape('","media":{"track":"inbound","chunk":"') + _NUMBER
    + re.escape('","timestamp":"') + "(" + _NUMBER + ")" + re.escape('","payload":"'))
_MARK_HEAD: Final = re.escape('{"event":"mark","sequenceNumber":"') + _NUMBER + '"'


class OutboundEncoder:
    """Builds bridge -> Twilio messages for one stream, as ``str`` text frames.

    The JSON prefix with the stream SID is built once; per frame only the
    base64 payload is formatted in. ``audio`` must be whole 160-byte frames.
    """

    __slots__ = ("stream_sid", "_media_prefix", "_mark_prefix", "_clear")

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid
        sid = orjson.dumps(stream_sid).decode()
        self._media_prefix = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._mark_prefix = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":'
        self._clear = '{"event":"clear","streamSid":' + sid + "}"

    def media(self, audio: bytes) -> str:
        if len(audio) % FRAME_BYTES:
            raise ValueError(f"outbound audio must be whole 160-byte frames, got {len(audio)} bytes")
        # binascii directly: base64.b64encode is a Python wrapper around the same call.
        return self._media_prefix + binascii.b2a_base64(audio, newline=False).decode("ascii") + '"}}'

    def mark(self, name: str) -> str:
        return self._mark_prefix + orjson.dumps(name).decode() + "}}"

    def clear(self) -> str:
        return self._clear


# --------------------------------------------------------------------------
# Simulator side: what Twilio sends, and strict parsing of what a bridge sends.


@dataclass(frozen=True, slots=True)
class OutMedia:
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutMark:
    name: str


@dataclass(frozen=True, slots=True)
class OutClear:
    pass


OutboundEvent = Union[OutMedia, OutMark, OutClear]


class TwilioProtocolError(ValueError):
    """What Twilio would log as a Debugger warning (``code`` 31924 / 31950)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def parse_outbound(data: str | bytes, expected_stream_sid: str) -> OutboundEvent:
    """Strictly decode one bridge -> Twilio frame as Twilio would."""
    if isinstance(data, bytes):
        raise TwilioProtocolError(31950, "binary frame on a media stream")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise TwilioProtocolError(31950, "frame is not JSON") from None
    if not isinstance(obj, dict):
        raise TwilioProtocolError(31924, "message is not an object")
    if obj.get("streamSid") != expected_stream_sid:
        raise TwilioProtocolError(31924, f"streamSid {obj.get('streamSid')!r} does not match")
    event = obj.get("event")
    if event == "media":
        media = obj.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise TwilioProtocolError(31924, "media.payload missing")
        try:
            payload = binascii.a2b_base64(media["payload"], strict_mode=True)
        except (binascii.Error, ValueError):
            raise TwilioProtocolError(31924, "media.payload is not valid base64") from None
        return OutMedia(payload)
    if event == "mark":
        mark = obj.get("mark")
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise TwilioProtocolError(31924, "mark.name missing")
        return OutMark(mark["name"])
    if event == "clear":
        return OutClear()
    raise TwilioProtocolError(31924, f"unsupported event {event!r}")


@dataclass
class TwilioMessageFactory:
    """Builds Twilio -> bridge messages for one stream with correct counters.

    ``sequenceNumber`` starts at 1 on ``start`` and increments for every later
    message; ``media.chunk`` starts at 1; ``timestamp`` is ms since stream start.
    """

    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str] = field(default_factory=dict)
    _sequence: int = 0
    _chunk: int = 0
    #: base64 of recently sent payloads (callers send the same few frames over and over).
    _b64: dict[bytes, str] = field(default_factory=dict)

    def _next_seq(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def connected(self) -> str:
        return orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode()

    def start(self) -> str:
        return orjson.dumps(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": self.custom_parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
                "streamSid": self.stream_sid,
            }
        ).decode()

    def media(self, payload: bytes, timestamp_ms: int) -> str:
        self._chunk += 1
        b64 = self._b64.get(payload)
        if b64 is None:
            if len(self._b64) >= 8:
                self._b64.clear()
            b64 = self._b64[payload] = base64.b64encode(payload).decode("ascii")
        return (
            '{"event":"media","sequenceNumber":"' + self._next_seq() + '","media":{"track":"inbound","chunk":"'
            + str(self._chunk) + '","timestamp":"' + str(timestamp_ms) + '","payload":"'
            + b64 + '"},"streamSid":"' + self.stream_sid + '"}'
        )

    def dtmf(self, digit: str) -> str:
        return orjson.dumps(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_seq(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        ).decode()

    def mark(self, name: str) -> str:
        return orjson.dumps(
            {"event": "mark", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid, "mark": {"name": name}}
        ).decode()

    def stop(self) -> str:
        return orjson.dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next_seq(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        ).decode()
