"""A local Cartesia TTS: the real wire protocol, offline voices, latency model, faults.

Embed it on your event loop::

    emu = Emulator(EmulatorSettings(ttfb_ms=50, rtf=0.5))
    ws_url = await emu.start()          # "ws://127.0.0.1:PORT"
    ...
    await emu.stop()

or run ``media-bridge emulator --port 8765`` (see ``cli``).
"""

from .faults import FaultSettings, parse_fault, parse_faults
from .models import MODEL_IDS, valid_model
from .server import Emulator
from .settings import EmulatorSettings
from .state import ContextRecord, EmulatorState
from .versions import VERSIONS, VersionRules, rules_for
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
    "MODEL_IDS",
    "ESPEAK_VOICES",
    "TONE_VOICES",
    "ContextRecord",
    "Emulator",
    "EmulatorSettings",
    "EmulatorState",
    "EspeakUnavailable",
    "FaultSettings",
    "VERSIONS",
    "Voice",
    "VersionRules",
    "parse_fault",
    "parse_faults",
    "rules_for",
    "valid_model",
]
