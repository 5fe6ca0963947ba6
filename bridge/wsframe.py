"""RFC 6455 framing without I/O, for the bridge's own WebSocket paths.

* ``frame_text``: an unmasked TEXT frame, as a server writes it. The bridge's
  Twilio socket and the emulator's Cartesia socket batch several of these into
  one transport write.
* ``frame_masked``: a masked frame, as a client writes it (RFC 6455 §5.3).
  ``MaskKeys`` hands out the 4-byte keys from a block of ``os.urandom``, so a
  frame costs no system call of its own.
* ``FrameReader``: the client side's parser of server frames. Feed it bytes;
  it returns whole messages and control frames, and raises ``FrameError``
  (with the close code to send) for anything RFC 6455 forbids a server to send.

This is the one place that knows the frame header layout (RFC 6455 §5.2).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")
_LEN_16: Final = struct.Struct("!H")
_LEN_64: Final = struct.Struct("!Q")
_FIN_TEXT: Final = 0x81

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_TOO_BIG: Final = 1009
#: Close codes a peer may send (RFC 6455 §7.4.1; 1004-1006 and 1015 are never sent on the wire).
_SENDABLE_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
#: Control frames carry at most this many payload bytes (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD: Final = 125

_apply_mask_c: Callable[[bytes, bytes], bytes] | None
try:  # websockets' C helper (a dependency anyway); the pure-Python XOR below is the fallback.
    from websockets.speedups import apply_mask as _apply_mask_c
except ImportError:  # pragma: no cover - depends on how websockets was built
    _apply_mask_c = None


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final TEXT frame (server -> client) carrying ``payload`` (UTF-8 bytes)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 65536:
        return _HEADER_16.pack(_FIN_TEXT, 126, n) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, n) + payload


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking and unmasking are the same)."""
    if _apply_mask_c is not None:
        return bytes(_apply_mask_c(data, mask))
    n = len(data)
    if not n:
        return b""
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


class MaskKeys:
    """Masking keys for client frames, drawn from ``os.urandom`` in blocks.

    RFC 6455 §5.3 wants each key unpredictable; a block of ``block_bytes``
    (default 4096, 1024 keys) from the OS's CSPRNG keeps that, with one
    ``getrandom`` call per block instead of one per frame.
    """

    __slots__ = ("_block", "_pos", "_block_bytes")

    def __init__(self, block_bytes: int = 4096) -> None:
        self._block_bytes = block_bytes - block_bytes % 4
        self._block = b""
        self._pos = 0

    def next(self) -> bytes:
        pos = self._pos
        if pos >= len(self._block):
            self._block = os.urandom(self._block_bytes)
            pos = 0
        self._pos = pos + 4
        return self._block[pos:pos + 4]


def frame_masked(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final, masked frame (client -> server) of ``opcode`` carrying ``payload``."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = _HEADER_16.pack(first, 0x80 | 126, n)
    else:
        header = _HEADER_64.pack(first, 0x80 | 127, n)
    return header + mask + apply_mask(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a CLOSE frame: the code, then the reason (UTF-8, cut to fit 125 bytes)."""
    return _LEN_16.pack(code) + reason.encode()[:MAX_CONTROL_PAYLOAD - 2]


class FrameError(ValueError):
    """The peer broke RFC 6455: close the connection with ``code``. ``events``:
    what the same ``feed`` call parsed before the bad frame (deliver those first)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.events: list[Event] = []


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message: ``opcode`` is ``OP_TEXT`` or ``OP_BINARY``."""

    opcode: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Control:
    """A PING, PONG or CLOSE frame. For CLOSE, ``code``/``reason`` are parsed
    (``code`` 1005 when the frame had no payload, as RFC 6455 §7.1.5 says)."""

    opcode: int
    payload: bytes
    code: int = 0
    reason: str = ""


Event = Message | Control


class FrameReader:
    """Parses the frames a server sends (unmasked), reassembling fragments.

    Limits: a message (all its fragments) of at most ``max_message_bytes``
    bytes, else ``FrameError(1009)``; the unparsed tail held between ``feed``
    calls is at most one frame header plus that many bytes. Raises
    ``FrameError(1002)`` for a masked frame, reserved bits (no extension is
    negotiated), an unknown opcode, a fragmented or oversized control frame,
    a continuation with nothing to continue, a new message inside a
    fragmented one, or a malformed CLOSE payload. After a ``FrameError`` the
    reader must not be fed again (the connection is being closed).
    """

    __slots__ = ("max_message_bytes", "_buf", "_waiting", "_waiting_len", "_need", "_parts", "_parts_len",
                 "_parts_opcode")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = b""
        # A large frame arriving in many reads: the pieces wait here, joined once it is whole
        # (not re-joined per read, which would copy the frame's bytes once per read).
        self._waiting: list[bytes] = []
        self._waiting_len = 0
        self._need = 0  # bytes the incomplete frame in _buf needs in all (0: unknown yet)
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._parts_opcode = 0

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame plus the fragments of an unfinished message."""
        return len(self._buf) + self._waiting_len + self._parts_len

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data`` (appended to what was left over); return the complete events in order."""
        if self._need:
            if len(self._buf) + self._waiting_len + len(data) < self._need:
                self._waiting.append(data)
                self._waiting_len += len(data)
                return []
            data = b"".join([*self._waiting, data])
            self._waiting.clear()
            self._waiting_len = 0
            self._need = 0
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        try:
            return self._parse(buf, events)
        except FrameError as exc:
            exc.events = events
            raise

    def _parse(self, buf: bytes, events: list[Event]) -> list[Event]:
        pos = 0
        end = len(buf)
        limit = self.max_message_bytes
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = _LEN_16.unpack_from(buf, pos + 2)[0]
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = _LEN_64.unpack_from(buf, pos + 2)[0]
                header = 10
            if b1 & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "server frame is masked")
            if b0 & 0x70:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension negotiated)")
            opcode = b0 & 0x0F
            if opcode >= 0x8:
                if length > MAX_CONTROL_PAYLOAD or not b0 & 0x80:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
            elif length + self._parts_len > limit:
                raise FrameError(CLOSE_TOO_BIG, f"message over {limit} bytes")
            if end - pos - header < length:
                self._need = header + length
                break
            start = pos + header
            pos = start + length
            payload = buf[start:pos]
            if opcode == OP_TEXT or opcode == OP_BINARY:
                if self._parts:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if b0 & 0x80:
                    events.append(Message(opcode, payload))
                else:
                    self._parts.append(payload)
                    self._parts_len = length
                    self._parts_opcode = opcode
            elif opcode == OP_CONTINUATION:
                if not self._parts:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message to continue")
                self._parts.append(payload)
                self._parts_len += length
                if b0 & 0x80:
                    events.append(Message(self._parts_opcode, b"".join(self._parts)))
                    self._parts.clear()
                    self._parts_len = 0
            elif opcode == OP_CLOSE:
                events.append(_parse_close(payload))
            elif opcode == OP_PING or opcode == OP_PONG:
                events.append(Control(opcode, payload))
            else:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        self._buf = buf[pos:] if pos < end else b""
        return events


def _parse_close(payload: bytes) -> Control:
    if not payload:
        return Control(OP_CLOSE, payload, 1005, "")
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = _LEN_16.unpack_from(payload)[0]
    if code not in _SENDABLE_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"close code {code} is not allowed on the wire")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close reason is not UTF-8") from None
    return Control(OP_CLOSE, payload, code, reason)
