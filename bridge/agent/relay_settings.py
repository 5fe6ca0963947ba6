"""Per-call conversation settings named as ConversationRelay's TwiML attributes; no I/O.

A call's settings come, later over earlier, from the environment defaults
(``RELAY_*`` variables, see ``bridge.config``), the voice webhook's query string and
the stream's ``<Parameter>``s, each under the ``<ConversationRelay>`` attribute name
(``welcomeGreeting``, ``interruptible``, ...). An agent can change several of them
mid-call with ``config``. Values are strings on the way in (query, TwiML), validated
here with an error that names the attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from bridge.agent.protocol import (
    INFO_EVENTS,
    SENSITIVITIES,
    AgentMessageError,
    cartesia_language,
    interrupt_mode,
    parse_hints,
)

#: The attribute names read from a query string / ``<Parameter>``s, in the order documented.
RELAY_ATTRIBUTES: Final = (
    "welcomeGreeting", "welcomeGreetingInterruptible", "interruptible", "interruptSensitivity",
    "preemptible", "dtmfDetection", "partialPrompts", "reportInputDuringAgentSpeech", "language",
    "ttsLanguage", "transcriptionLanguage", "voice", "hints", "events", "speechTimeout", "transcription",
)
#: Longest welcome greeting (characters) and ``speechTimeout`` range (ms).
MAX_GREETING_CHARS: Final = 2000
SPEECH_TIMEOUT_RANGE_MS: Final = (100, 10_000)
#: ``interruptSensitivity`` → energy VAD (threshold RMS, minimum speech ms) and how many
#: recognised words STT speech onset needs before it counts as barge-in.
SENSITIVITY_VAD: Final = {"high": (800, 80, 1), "medium": (1200, 120, 1), "low": (2000, 250, 2)}


class RelaySettingsError(ValueError):
    """A setting that cannot be used; the message names the attribute."""


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What ConversationRelay's TwiML attributes set, for one call.

    ``speech_timeout_ms``: silence after the caller's speech that ends their turn
    (the bridge then asks Cartesia STT to ``finalize``). ``transcription``: whether the
    caller's audio goes to STT at all (None = on for external agents, off for the
    built-in one unless it asks).
    """

    welcome_greeting: str = ""
    welcome_greeting_interruptible: str = "any"
    interruptible: str = "any"
    interrupt_sensitivity: str = "medium"
    preemptible: bool = False
    dtmf_detection: bool = True
    partial_prompts: bool = False
    report_input_during_agent_speech: bool = False
    tts_language: str = "en-US"  # BCP-47, as the agent sees it in ``prompt.lang``
    transcription_language: str = "en-US"
    voice: str | None = None
    hints: tuple[str, ...] = ()
    events: frozenset[str] = field(default_factory=frozenset)
    speech_timeout_ms: int = 600
    transcription: bool | None = None

    @property
    def cartesia_tts_language(self) -> str:
        return cartesia_language(self.tts_language)

    @property
    def cartesia_stt_language(self) -> str:
        return cartesia_language(self.transcription_language)

    def vad_tuning(self) -> tuple[int, int, int]:
        """(threshold RMS, min speech ms, STT onset words) for ``interruptSensitivity``."""
        return SENSITIVITY_VAD[self.interrupt_sensitivity]

    def merged(self, values: Mapping[str, str]) -> RelaySettings:
        """These settings with the attributes in ``values`` applied (others ignored)."""
        changes: dict[str, Any] = {}
        for name in RELAY_ATTRIBUTES:
            raw = values.get(name)
            if raw is None:
                continue
            try:
                changes.update(_parse_attribute(name, raw))
            except AgentMessageError as exc:
                raise RelaySettingsError(f"{name}: {exc}") from None
        return replace(self, **changes) if changes else self


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise RelaySettingsError(f"{name} must be true or false, not {raw!r}")


def _parse_attribute(name: str, raw: str) -> dict[str, Any]:
    if name == "welcomeGreeting":
        if len(raw) > MAX_GREETING_CHARS:
            raise RelaySettingsError(f"welcomeGreeting is longer than {MAX_GREETING_CHARS} characters")
        return {"welcome_greeting": raw}
    if name == "welcomeGreetingInterruptible":
        return {"welcome_greeting_interruptible": interrupt_mode(raw, name)}
    if name == "interruptible":
        return {"interruptible": interrupt_mode(raw, name)}
    if name == "interruptSensitivity":
        if raw not in SENSITIVITIES:
            raise RelaySettingsError(f"interruptSensitivity must be one of {', '.join(SENSITIVITIES)}")
        return {"interrupt_sensitivity": raw}
    if name in ("preemptible", "dtmfDetection", "partialPrompts", "reportInputDuringAgentSpeech", "transcription"):
        key = {"preemptible": "preemptible", "dtmfDetection": "dtmf_detection", "partialPrompts": "partial_prompts",
               "reportInputDuringAgentSpeech": "report_input_during_agent_speech",
               "transcription": "transcription"}[name]
        return {key: _bool(name, raw)}
    if name == "language":
        cartesia_language(raw)
        return {"tts_language": raw, "transcription_language": raw}
    if name in ("ttsLanguage", "transcriptionLanguage"):
        cartesia_language(raw)
        return {"tts_language" if name == "ttsLanguage" else "transcription_language": raw}
    if name == "voice":
        if not raw.strip():
            raise RelaySettingsError("voice must not be empty")
        return {"voice": raw.strip()}
    if name == "hints":
        return {"hints": parse_hints(raw)}
    if name == "events":
        names = frozenset(e.strip() for e in raw.split(",") if e.strip())
        unknown = names - INFO_EVENTS
        if unknown:
            raise RelaySettingsError(f"events: unknown {', '.join(sorted(unknown))} "
                                     f"(known: {', '.join(sorted(INFO_EVENTS))})")
        return {"events": names}
    if name == "speechTimeout":
        try:
            ms = int(raw)
        except ValueError:
            raise RelaySettingsError(f"speechTimeout must be an integer (ms), not {raw!r}") from None
        low, high = SPEECH_TIMEOUT_RANGE_MS
        if not low <= ms <= high:
            raise RelaySettingsError(f"speechTimeout must be in [{low}, {high}] ms")
        return {"speech_timeout_ms": ms}
    raise RelaySettingsError(f"unknown attribute {name}")  # pragma: no cover - RELAY_ATTRIBUTES is closed
