"""A local Cartesia TTS: the real wire protocol, offline voices, latency model, faults.

Embed it on your event loop::

    emu = Emulator(EmulatorSettings(ttfb_ms=50, rtf=0.5))
    ws_url = await emu.start()          # "ws://127.0.0.1:PORT"
    ...
    await emu.stop()

or run ``media-bridge emulator --port 8765`` (see ``cli``).

Names are imported from their modules on first use, so ``from bridge.cartesia.emulator.voices
import DEFAULT_VOICE_ID`` (or ``models``, ``versions``, ``settings``) loads neither aiohttp nor
asyncio's server side: the bridge's configuration can share these constants without the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Public name → the module that defines it.
_HOMES = {
    "FaultSettings": "faults", "parse_fault": "faults", "parse_faults": "faults",
    "MODEL_IDS": "models", "valid_model": "models",
    "Emulator": "server",
    "EmulatorSettings": "settings",
    "ContextRecord": "state", "EmulatorState": "state",
    "VERSIONS": "versions", "VersionRules": "versions", "rules_for": "versions",
    "DEFAULT_ESPEAK_VOICE_ID": "voices", "DEFAULT_VOICE_ID": "voices", "ESPEAK_VOICES": "voices",
    "TONE_VOICES": "voices", "EspeakUnavailable": "voices", "Voice": "voices",
}

__all__ = [
    "DEFAULT_ESPEAK_VOICE_ID",
    "DEFAULT_VOICE_ID",
    "ESPEAK_VOICES",
    "MODEL_IDS",
    "TONE_VOICES",
    "VERSIONS",
    "ContextRecord",
    "Emulator",
    "EmulatorSettings",
    "EmulatorState",
    "EspeakUnavailable",
    "FaultSettings",
    "Voice",
    "VersionRules",
    "parse_fault",
    "parse_faults",
    "rules_for",
    "valid_model",
]


assert set(__all__) == set(_HOMES), "every public name has a home module"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
