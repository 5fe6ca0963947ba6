"""Agent protocol codec (ConversationRelay names where the meaning is the same), no I/O.

Agent -> bridge (JSON objects with ``type``):

* ``text``: ``token`` (str), ``last`` (bool), optional ``interruptible``
  (bool, default true), and per-utterance overrides ``voice`` (voice id),
  ``language``, ``speed`` (0.6-1.5), ``emotion`` (str). Tokens stream into one
  Cartesia context until ``last: true`` closes it.
* ``interrupt``: stop speaking now.
* ``end``: optional ``handoffData`` (string or object); hang up or hand off.
* ``config``: new defaults for later utterances: ``voice``, ``language``,
  ``speed``, ``emotion``, ``media`` (bool: stream inbound audio to the agent),
  ``vad`` (bool: barge-in from caller speech).

Bridge -> agent: ``setup``, ``dtmf``, ``interrupt``, ``spoken``, ``error``,
``media`` (built by the functions at the bottom).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import orjson

from bridge.cartesia.protocol import LANGUAGES, SPEED_RANGE

#: Largest agent message accepted (bytes).
MAX_AGENT_MESSAGE_BYTES = 64 * 1024


class AgentMessageError(ValueError):
    """An agent message the bridge cannot use; sent back as ``error``."""


@dataclass(frozen=True, slots=True)
class VoiceOverrides:
    voice: str | None = None
    language: str | None = None
    speed: float | None = None
    emotion: str | None = None


@dataclass(frozen=True, slots=True)
class Text:
    token: str
    last: bool
    interruptible: bool | None
    overrides: VoiceOverrides


@dataclass(frozen=True, slots=True)
class Interrupt:
    pass


@dataclass(frozen=True, slots=True)
class End:
    handoff_data: Any = None


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    overrides: VoiceOverrides
    media: bool | None = None
    vad: bool | None = None


AgentMessage = Union[Text, Interrupt, End, ConfigUpdate]


def _overrides(obj: dict[str, Any]) -> VoiceOverrides:
    voice = obj.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice):
        raise AgentMessageError("voice must be a voice id string")
    language = obj.get("language")
    if language is not None and (not isinstance(language, str) or language not in LANGUAGES):
        raise AgentMessageError(f"language {language!r} is not supported")
    speed = obj.get("speed")
    if speed is not None:
        low, high = SPEED_RANGE
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not low <= speed <= high:
            raise AgentMessageError(f"speed must be a number in [{low}, {high}]")
        speed = float(speed)
    emotion = obj.get("emotion")
    if emotion is not None and not isinstance(emotion, str):
        raise AgentMessageError("emotion must be a string")
    return VoiceOverrides(voice, language, speed, emotion)


def _opt_bool(obj: dict[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise AgentMessageError(f"{key} must be a boolean")
    return value


def parse_agent_message(data: str | bytes | dict[str, Any]) -> AgentMessage:
    """Decode one agent message; raises ``AgentMessageError`` with a reason."""
    if isinstance(data, dict):
        obj: Any = data
    else:
        if len(data) > MAX_AGENT_MESSAGE_BYTES:
            raise AgentMessageError(f"message of {len(data)} bytes exceeds {MAX_AGENT_MESSAGE_BYTES}")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise AgentMessageError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise AgentMessageError("message must be a JSON object")
    kind = obj.get("type")
    if kind == "text":
        token = obj.get("token")
        if not isinstance(token, str):
            raise AgentMessageError("text.token must be a string")
        last = obj.get("last", False)
        if not isinstance(last, bool):
            raise AgentMessageError("text.last must be a boolean")
        return Text(token, last, _opt_bool(obj, "interruptible"), _overrides(obj))
    if kind == "interrupt":
        return Interrupt()
    if kind == "end":
        return End(obj.get("handoffData"))
    if kind == "config":
        return ConfigUpdate(_overrides(obj), _opt_bool(obj, "media"), _opt_bool(obj, "vad"))
    raise AgentMessageError(f"unknown message type {kind!r} (expected text, interrupt, end or config)")


def setup_message(
    *,
    session_id: str,
    call_sid: str,
    stream_sid: str,
    account_sid: str,
    from_: str,
    to: str,
    direction: str,
    custom_parameters: dict[str, str],
) -> dict[str, Any]:
    return {
        "type": "setup",
        "sessionId": session_id,
        "callSid": call_sid,
        "streamSid": stream_sid,
        "accountSid": account_sid,
        "from": from_,
        "to": to,
        "direction": direction,
        "customParameters": custom_parameters,
    }


def dtmf_message(digit: str) -> dict[str, Any]:
    return {"type": "dtmf", "digit": digit}


def interrupt_message(heard: str, duration_ms: int, utterance_id: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "interrupt",
        "utteranceUntilInterrupt": heard,
        "durationUntilInterruptMs": duration_ms,
    }
    if utterance_id is not None:
        msg["utteranceId"] = utterance_id
    return msg


def spoken_message(text: str, duration_ms: int, utterance_id: str, *, complete: bool = True) -> dict[str, Any]:
    """``complete`` is false when speech failed part-way: ``text`` is then only the words heard."""
    return {"type": "spoken", "text": text, "durationMs": duration_ms, "utteranceId": utterance_id,
            "complete": complete}


def error_message(description: str) -> dict[str, Any]:
    return {"type": "error", "description": description}


def media_message(payload_b64: str, timestamp_ms: int) -> dict[str, Any]:
    return {"type": "media", "payload": payload_b64, "timestamp": timestamp_ms}
