"""Defaults that several rooms need, each written once (no imports, no I/O).

Import these instead of repeating the literal: the configuration, the state
machines, the emulator and the load tester all meet them.
"""

from __future__ import annotations

from typing import Final

#: Audio sent to Twilio ahead of what the caller has heard, at most (ms); ``PLAYOUT_LEAD_MS``.
#: Lead minus mark interval is the audio Twilio still holds when an echo frees the window: 200 ms.
PLAYOUT_LEAD_MS: Final = 400
#: A Twilio mark every this many ms of audio (``PLAYOUT_MARK_INTERVAL_MS``). Each mark costs an
#: echo to read and a write to answer it (about a fifth of the bridge's CPU at 100 ms); what the
#: caller heard at a barge-in is interpolated between echoes (``Playout.heard_position``).
PLAYOUT_MARK_INTERVAL_MS: Final = 200
#: The local emulator's "Tone Alto" voice: ``CARTESIA_VOICE_ID``'s default. A real deployment
#: sets one of its own Cartesia voices (the configuration refuses this one against api.cartesia.ai).
EMULATOR_DEFAULT_VOICE_ID: Final = "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a01"
