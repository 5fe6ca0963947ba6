"""Defaults that several rooms need, each written once (no imports, no I/O).

Import these instead of repeating the literal: the configuration, the state
machines, the emulator and the load tester all meet them.
"""

from __future__ import annotations

from typing import Final

#: Audio sent to Twilio ahead of what the caller has heard, at most (ms); ``PLAYOUT_LEAD_MS``.
PLAYOUT_LEAD_MS: Final = 300
#: The local emulator's "Tone Alto" voice: ``CARTESIA_VOICE_ID``'s default. A real deployment
#: sets one of its own Cartesia voices (the configuration refuses this one against api.cartesia.ai).
EMULATOR_DEFAULT_VOICE_ID: Final = "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a01"
