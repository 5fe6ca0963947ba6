"""RFC 6455 frames a server writes itself (no masking), for the fast paths.

The bridge's Twilio socket and the emulator's Cartesia socket both batch
several server→client TEXT messages into one transport write; this is the one
place that knows the frame header layout (RFC 6455 §5.2).
"""

from __future__ import annotations

import struct
from typing import Final

_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")
_FIN_TEXT: Final = 0x81


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final TEXT frame (server -> client) carrying ``payload`` (UTF-8 bytes)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 65536:
        return _HEADER_16.pack(_FIN_TEXT, 126, n) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, n) + payload
