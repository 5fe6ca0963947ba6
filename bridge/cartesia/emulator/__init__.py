"""A local Cartesia TTS: the real wire protocol, offline voices, latency model, faults.

Embed it on your event loop::

    emu = Emulator(EmulatorSettings(ttfb_ms=50, rtf=0.5))
    ws_url = await emu.start()          # "ws://127.0.0.1:PORT"
    ...
    await emu.stop()

or run ``media-bridge emulator --port 8765`` (see ``cli``).
"""

from .faults import FaultSettings, parse_fault, parse_faults
from .server import Emulator
from .settings import EmulatorSettings, valid_model
from .state import ContextRecord, EmulatorState
from .voices import (
    DEFAULT_ESPEAK_VOICE_ID,
    DEFAULT_VOICE_ID,
    ESPEAK_VOICES,
    TONE_VOICES,
    EspeakUnavailable,
    Voice,
)

__all__ = [
    "DEFAULT_ESPEAK_VOICE_ID",
    "DEFAULT_VOICE_ID",
    "ESPEAK_VOICES",
    "TONE_VOICES",
    "ContextRecord",
    "Emulator",
    "EmulatorSettings",
    "EmulatorState",
    "EspeakUnavailable",
    "FaultSettings",
    "Voice",
    "parse_fault",
    "parse_faults",
    "valid_model",
]
