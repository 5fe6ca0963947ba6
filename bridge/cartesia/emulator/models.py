"""Cartesia TTS model ids: the one list the emulator checks ``model_id`` against.

Sources (checked 2026-12):

* official SDK ``cartesia`` 4.2.0, ``cartesia/types/tts_model.py`` (``TTSModel``):
  ``sonic-3.5``, ``sonic-3``, ``sonic-3.5-2026-05-04``, ``sonic-3-2026-01-12``,
  ``sonic-3-2025-10-27``, ``sonic-latest``;
* docs.cartesia.ai changelog, April 2026: the ``sonic-3-latest`` alias;
* docs.cartesia.ai /build-with-cartesia/tts-models/api-changes ("Stable offerings"):
  ``sonic-2`` with ``sonic-2-2025-04-16``, ``-2025-05-08``, ``-2025-06-11`` and
  ``sonic-turbo`` with ``sonic-turbo-2025-06-04``; and the ids sunsetted on
  2026-06-01, which answer ``model_sunsetted`` ("Model sunsetted");
* newer Sonic 3 minor versions (``sonic-3.6`` is pipecat-ai 1.14's default) follow
  the documented naming ``sonic-3.N`` / ``sonic-3.N-YYYY-MM-DD`` and are accepted
  by pattern, so a client pinned to a newer model still gets audio.

Anything else is ``model_not_found`` naming the id.
"""

from __future__ import annotations

import re
from typing import Final

from ..protocol import RequestError

#: Ids served, with the source of each group (see the module doc).
MODEL_IDS: Final = frozenset({
    # SDK 4.2.0 TTSModel
    "sonic-3.5", "sonic-3.5-2026-05-04", "sonic-3", "sonic-3-2026-01-12", "sonic-3-2025-10-27", "sonic-latest",
    # changelog 2026-04
    "sonic-3-latest",
    # api-changes "Stable offerings"
    "sonic-2", "sonic-2-2025-04-16", "sonic-2-2025-05-08", "sonic-2-2025-06-11",
    "sonic-turbo", "sonic-turbo-2025-06-04",
})
#: Ids that stopped serving on 2026-06-01 (api-changes "Fully sunsetted models"; ``sonic``: all snapshots).
SUNSET_MODEL_IDS: Final = frozenset({
    "sonic", "sonic-english", "sonic-multilingual", "sonic-2024-10-19", "sonic-2024-12-12",
    "sonic-2-2025-03-07", "sonic-turbo-2025-03-07",
})
#: Sonic 3 minor versions after 3.5 and their dated snapshots.
NEWER_SONIC_3: Final = re.compile(r"^sonic-3\.(?:[6-9]|[1-9]\d+)(?:-\d{4}-\d{2}-\d{2})?$")


def valid_model(model_id: str) -> bool:
    """Whether ``model_id`` is served (see ``check_model`` for the error otherwise)."""
    return model_id in MODEL_IDS or bool(NEWER_SONIC_3.match(model_id))


def check_model(model_id: str, context_id: str | None) -> None:
    """Raise ``RequestError`` (field ``model_id``) unless ``model_id`` is served."""
    if valid_model(model_id):
        return
    if model_id in SUNSET_MODEL_IDS:
        raise RequestError(
            f"model_id {model_id!r} stopped serving on 2026-06-01; use sonic-3.5 or sonic-3",
            field="model_id", context_id=context_id, error_code="model_sunsetted", title="Model sunsetted",
        )
    raise RequestError(
        f"model_id {model_id!r} is not a Cartesia model (e.g. sonic-3.5, sonic-3, sonic-latest)",
        field="model_id", context_id=context_id, error_code="model_not_found", title="Invalid model",
    )
