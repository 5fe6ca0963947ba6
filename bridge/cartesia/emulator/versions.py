"""What each ``Cartesia-Version`` sends and accepts: the emulator's one table of version rules.

A request's version is ``?cartesia_version=`` or the ``Cartesia-Version`` header
(``httpapi.version_of``). A dated version between two listed ones behaves as the
older one (versions are release dates); before the first one, or not a date, it
is refused with 400 naming the parameter.

Evidence per rule (``../shared/docs/cartesia-websocket.md`` plus the SDK sources):

* error shape: legacy ``{"error": "<title>: <message>"}`` up to 2025-04-16 (docs
  2024-11-13; SDK 2.x's models require a string ``error``); structured
  ``title``/``message``/``error_code``/``request_id`` from 2025-11-04 (SDK 3.x's
  ``Error`` model has no ``error`` field) and in the 2026-03-01 docs;
* ``flush_id`` numbering: SDK 2.x's async client (sent 2024-11-13) files every
  message into ``queues[flush_id]``, a list that starts with one queue and gains
  one per ``flush()``, so the text before the first flush must carry 0 (a 1 on
  chunks before any flush raised IndexError in its reader task and the client
  heard nothing); the current docs number from 1 (chunks before the first flush
  carry 1). 0-based up to 2024-11-13, 1-based from 2025-04-16;
* ``{"mode": "embedding"}`` voices: accepted before 2026-03-01 (docs
  api-changes: embeddings stopped with 2026-03-01 and for everyone on 2026-06-01);
* a bare voice id string or ``{"id": …}`` without ``mode``: 2026-08-14 (SDK 4.x's
  ``VoiceSpecifierParam = str | {id}``); earlier versions want ``{"mode":"id","id":…}``;
* ``locale`` (instead of ``language``, never both): 2026-08-14 (SDK 4.x).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..protocol import GenerationRequest, RequestError, uses_structured_errors


@dataclass(frozen=True, slots=True)
class VersionRules:
    """The behaviour of one API version (see the module doc for the evidence)."""

    version: str
    #: ``flush_id`` of the text before the first flush (0 or 1).
    first_flush_id: int
    embedding_voices: bool
    bare_voice_ids: bool
    locale_field: bool
    #: Who sends it by default, for the README's compatibility table.
    sent_by: str

    @property
    def structured_errors(self) -> bool:
        """Errors as ``title``/``message``/``error_code`` (else the legacy ``error`` string)."""
        return uses_structured_errors(self.version)


#: Oldest first. Dates are the versions Cartesia documents or an SDK sends.
VERSIONS: Final = (
    VersionRules("2024-06-10", 0, True, False, False, "-"),
    VersionRules("2024-11-13", 0, True, False, False, "cartesia 1.x/2.x"),
    VersionRules("2025-04-16", 1, True, False, False, "livekit-plugins-cartesia 1.8"),
    VersionRules("2025-11-04", 1, True, False, False, "cartesia 3.x"),
    VersionRules("2026-03-01", 1, False, False, False, "pipecat-ai 1.14, this bridge"),
    VersionRules("2026-08-14", 1, False, True, True, "cartesia 4.x"),
)
_DATE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def rules_for(version: str) -> VersionRules:
    """The rules of ``version``; ``ValueError`` naming it when it is no date or predates 2024-06-10."""
    if not _DATE.match(version):
        raise ValueError(f"Cartesia-Version {version!r} is not a date (YYYY-MM-DD, e.g. 2026-03-01)")
    if version < VERSIONS[0].version:
        raise ValueError(f"Cartesia-Version {version!r} predates the oldest version, {VERSIONS[0].version}")
    return next(r for r in reversed(VERSIONS) if r.version <= version)


def check_request(req: GenerationRequest, rules: VersionRules) -> None:
    """Refuse what ``rules.version`` does not accept, naming the field."""
    ctx = req.context_id or None
    if req.voice_form == "embedding" and not rules.embedding_voices:
        raise RequestError(
            f"voice mode 'embedding' is not accepted by Cartesia-Version {rules.version} (since 2026-03-01); "
            "use {'mode': 'id', 'id': <voice id>}",
            field="voice", context_id=ctx,
        )
    if req.voice_form in ("bare", "object") and not rules.bare_voice_ids:
        raise RequestError(
            f"voice must be {{'mode': 'id', 'id': <voice id>}} in Cartesia-Version {rules.version} "
            "(a bare id or {'id': …} needs 2026-08-14)",
            field="voice", context_id=ctx,
        )
    if req.locale is not None and not rules.locale_field:
        raise RequestError(
            f"locale is not a field of Cartesia-Version {rules.version} (needs 2026-08-14); use language",
            field="locale", context_id=ctx,
        )
