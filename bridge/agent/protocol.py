"""Agent protocol codec: Twilio ConversationRelay's WebSocket messages, exactly; no I/O.

Names, fields and types follow Twilio's ConversationRelay WebSocket reference
(``../shared/docs/conversationrelay.md``), so an agent written for ConversationRelay
works unchanged. Extensions of ours are marked as such and are ignored by such agents.

Agent → bridge (JSON objects with ``type``):

* ``text``: ``token`` (str), ``last`` (bool), ``interruptible`` (bool, or
  ``none|dtmf|speech|any``), ``preemptible`` (bool), ``lang`` (BCP-47). Extensions:
  ``voice``, ``language``, ``speed`` (0.6-1.5), ``emotion``.
* ``play``: ``source`` (http(s) URL of an audio file), ``loop`` (int, 0 = until
  interrupted, at most ``MAX_PLAY_LOOPS``), ``interruptible``, ``preemptible``.
* ``sendDigits``: ``digits`` (0-9 * # A-D, ``w`` = 0.5 s pause, ``W`` = 1 s).
* ``language``: ``ttsLanguage`` and/or ``transcriptionLanguage`` (BCP-47).
* ``end``: ``handoffData`` (string, usually JSON).
* ``config``: mid-call settings (ConversationRelay's dynamic configuration names:
  ``interruptible interruptSensitivity partialPrompts reportInputDuringAgentSpeech
  dtmfDetection hints ttsLanguage transcriptionLanguage``; extensions ``voice language
  speed emotion media vad``). ``hints``: the same as a ``config`` with only hints.
* ``interrupt`` (extension): stop speaking now.

Bridge → agent: ``setup``, ``prompt``, ``interrupt``, ``dtmf``, ``info``, ``error``;
extensions ``spoken`` and ``media`` (built by the functions at the bottom).

``streamed_text`` recognizes the commonest message, a streamed word in the
layouts agents write, without the parser (what it accepts, the parser reads the same).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Union

from bridge.cartesia.protocol import SPEED_RANGE
from bridge.cartesia.protocol import cartesia_language as _cartesia_language
from bridge.jsonwire import WireJsonError, load_object

#: Largest agent message accepted (bytes).
MAX_AGENT_MESSAGE_BYTES: Final = 64 * 1024
#: ``play`` with ``loop: 0`` repeats until interrupted, but never more than this.
MAX_PLAY_LOOPS: Final = 100
#: Longest ``sendDigits`` string accepted (characters).
MAX_DIGITS: Final = 64
#: ConversationRelay's interruptible modes: what may cut the agent's speech.
INTERRUPT_MODES: Final = ("none", "dtmf", "speech", "any")
SENSITIVITIES: Final = ("low", "medium", "high")
#: ``info`` event names an agent can ask for (TwiML ``events`` attribute).
INFO_EVENTS: Final = frozenset({"agentSpeaking", "clientSpeaking", "tokensPlayed"})
_DIGITS_RE: Final = re.compile(r"[0-9*#A-DwW]+")


class AgentMessageError(ValueError):
    """An agent message the bridge cannot use; sent back as ``error`` (the call goes on)."""


def cartesia_language(code: object) -> str:
    """The Cartesia language for a BCP-47 tag (``es-MX`` → ``es``): ``bridge.cartesia.protocol``'s
    mapping, with the agent protocol's error (``AgentMessageError``, sent back as ``error``)."""
    try:
        return _cartesia_language(code)
    except ValueError as exc:
        raise AgentMessageError(f"language {exc}") from None


def interrupt_mode(value: Any, field: str = "interruptible") -> str:
    """ConversationRelay's ``interruptible``: true → ``any``, false → ``none``, or a mode name."""
    if isinstance(value, bool):
        return "any" if value else "none"
    if isinstance(value, str) and value.lower() in INTERRUPT_MODES:
        return value.lower()
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return "any" if value.lower() == "true" else "none"
    raise AgentMessageError(f"{field} must be a boolean or one of {', '.join(INTERRUPT_MODES)}")


@dataclass(frozen=True, slots=True)
class VoiceOverrides:
    voice: str | None = None
    language: str | None = None  # a Cartesia language code (already mapped)
    speed: float | None = None
    emotion: str | None = None


@dataclass(frozen=True, slots=True)
class Text:
    token: str
    last: bool
    interruptible: str | None  # an INTERRUPT_MODES name, None = the call's default
    overrides: VoiceOverrides
    preemptible: bool | None = None


@dataclass(frozen=True, slots=True)
class Play:
    source: str
    loop: int = 1  # 0 = until interrupted (bounded by MAX_PLAY_LOOPS)
    interruptible: str | None = None
    preemptible: bool | None = None


@dataclass(frozen=True, slots=True)
class SendDigits:
    digits: str


@dataclass(frozen=True, slots=True)
class Language:
    tts_language: str | None = None  # Cartesia code
    transcription_language: str | None = None  # Cartesia code
    tts_tag: str | None = None  # the BCP-47 tag as the agent sent it
    transcription_tag: str | None = None


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
    interruptible: str | None = None
    interrupt_sensitivity: str | None = None
    partial_prompts: bool | None = None
    report_input_during_agent_speech: bool | None = None
    dtmf_detection: bool | None = None
    hints: tuple[str, ...] | None = None
    transcription_language: str | None = None
    transcription_tag: str | None = None


AgentMessage = Union[Text, Play, SendDigits, Language, Interrupt, End, ConfigUpdate]


def _overrides(obj: dict[str, Any]) -> VoiceOverrides:
    voice = obj.get("voice")
    if voice is not None and (not isinstance(voice, str) or not voice):
        raise AgentMessageError("voice must be a voice id string")
    raw_language = obj.get("lang", obj.get("language", obj.get("ttsLanguage")))
    language = None if raw_language is None else cartesia_language(raw_language)
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


def _opt_mode(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return None if value is None else interrupt_mode(value, key)


def parse_hints(value: Any) -> tuple[str, ...]:
    """``hints``: a comma-separated string or a list of strings (ConversationRelay takes both)."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise AgentMessageError("hints must be a comma-separated string or a list of strings")
    return tuple(h.strip() for h in items if h.strip())


def _opt_language(obj: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    raw = obj.get(key)
    if raw is None:
        return None, None
    return cartesia_language(raw), raw


def _config(obj: dict[str, Any]) -> ConfigUpdate:
    sensitivity = obj.get("interruptSensitivity")
    if sensitivity is not None and sensitivity not in SENSITIVITIES:
        raise AgentMessageError(f"interruptSensitivity must be one of {', '.join(SENSITIVITIES)}")
    hints = None if obj.get("hints") is None else parse_hints(obj["hints"])
    stt_code, stt_tag = _opt_language(obj, "transcriptionLanguage")
    return ConfigUpdate(
        _overrides(obj), _opt_bool(obj, "media"), _opt_bool(obj, "vad"),
        interruptible=_opt_mode(obj, "interruptible"), interrupt_sensitivity=sensitivity,
        partial_prompts=_opt_bool(obj, "partialPrompts"),
        report_input_during_agent_speech=_opt_bool(obj, "reportInputDuringAgentSpeech"),
        dtmf_detection=_opt_bool(obj, "dtmfDetection"), hints=hints,
        transcription_language=stt_code, transcription_tag=stt_tag,
    )


#: The streamed-text layouts ``streamed_text`` recognizes: (head, tail if ``last`` is false, tail if true).
#: Compact (``orjson``, JavaScript's ``JSON.stringify``, Go's ``json.Marshal``) and Python's
#: ``json.dumps`` defaults, keys in the order of Twilio's examples.
TEXT_LAYOUTS: Final = (
    ('{"type":"text","token":"', '","last":false}', '","last":true}'),
    ('{"type": "text", "token": "', '", "last": false}', '", "last": true}'),
)
#: What cannot appear raw inside a JSON string (quote, backslash, control characters), or in a
#: ``str`` orjson takes (lone surrogates): a token with any of these goes to the full parser.
_NOT_PLAIN: Final = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')


def streamed_text(data: str) -> tuple[str, bool] | None:
    """``(token, last)`` of a ``text`` message with only ``token`` and ``last`` in one of
    ``TEXT_LAYOUTS``, the token without escapes; else ``None`` (use ``parse_agent_message``).

    An agent streams a reply a word per message (~50 per second per call); this
    takes such a message without building a dict, a ``Text`` and its
    ``VoiceOverrides``. What it accepts, ``parse_agent_message`` parses to
    ``Text(token, last, None, VoiceOverrides(), None)``; anything else (other
    fields, another order or spacing, an escape, an oversized message) is left to
    it (``tests/test_agent_fast_path.py``).
    """
    size = len(data)
    if size > MAX_AGENT_MESSAGE_BYTES:
        return None
    for head, tail_false, tail_true in TEXT_LAYOUTS:
        if not data.startswith(head):
            continue
        if data.endswith(tail_false):
            last, end = False, size - len(tail_false)
        elif data.endswith(tail_true):
            last, end = True, size - len(tail_true)
        else:
            return None
        token = data[len(head):end]
        # end < len(head): the head's closing quote is the tail's opening one (not this layout).
        if end < len(head) or _NOT_PLAIN.search(token) is not None:
            return None
        return token, last
    return None


def parse_agent_message(data: str | bytes | dict[str, Any]) -> AgentMessage:
    """Decode one agent message; raises ``AgentMessageError`` with a reason."""
    if isinstance(data, dict):
        obj: dict[str, Any] = data
    else:
        try:
            obj = load_object(data, MAX_AGENT_MESSAGE_BYTES)
        except WireJsonError as exc:
            raise AgentMessageError(str(exc)) from None
    kind = obj.get("type")
    if kind == "text":
        token = obj.get("token")
        if not isinstance(token, str):
            raise AgentMessageError("text.token must be a string")
        last = obj.get("last", False)
        if not isinstance(last, bool):
            raise AgentMessageError("text.last must be a boolean")
        return Text(token, last, _opt_mode(obj, "interruptible"), _overrides(obj), _opt_bool(obj, "preemptible"))
    if kind == "play":
        source = obj.get("source")
        if not isinstance(source, str) or not source.lower().startswith(("http://", "https://")):
            raise AgentMessageError("play.source must be an http(s) URL")
        loop = obj.get("loop", 1)
        if isinstance(loop, bool) or not isinstance(loop, int) or not 0 <= loop <= MAX_PLAY_LOOPS:
            raise AgentMessageError(f"play.loop must be an integer in [0, {MAX_PLAY_LOOPS}]")
        return Play(source, loop, _opt_mode(obj, "interruptible"), _opt_bool(obj, "preemptible"))
    if kind == "sendDigits":
        digits = obj.get("digits")
        if not isinstance(digits, str) or not digits or len(digits) > MAX_DIGITS or not _DIGITS_RE.fullmatch(digits):
            raise AgentMessageError(f"sendDigits.digits must be 1-{MAX_DIGITS} of 0-9 * # A-D w W")
        return SendDigits(digits)
    if kind == "language":
        tts, tts_tag = _opt_language(obj, "ttsLanguage")
        stt, stt_tag = _opt_language(obj, "transcriptionLanguage")
        if tts is None and stt is None:
            raise AgentMessageError("language needs ttsLanguage or transcriptionLanguage")
        return Language(tts, stt, tts_tag, stt_tag)
    if kind == "interrupt":
        return Interrupt()
    if kind == "end":
        return End(obj.get("handoffData"))
    if kind == "config":
        return _config(obj)
    if kind == "hints":
        return ConfigUpdate(VoiceOverrides(), hints=parse_hints(obj.get("hints")))
    raise AgentMessageError(
        f"unknown message type {kind!r} (expected text, play, sendDigits, language, end, config, hints or interrupt)")


# ------------------------------------------------------------------ bridge → agent


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
    parent_call_sid: str = "",
    forwarded_from: str = "",
    call_type: str = "PSTN",
    caller_name: str = "",
    call_status: str = "IN-PROGRESS",
) -> dict[str, Any]:
    """ConversationRelay's ``setup``, every field it sends; ``streamSid`` is our extension."""
    return {
        "type": "setup",
        "sessionId": session_id,
        "accountSid": account_sid,
        "parentCallSid": parent_call_sid,
        "callSid": call_sid,
        "from": from_,
        "to": to,
        "forwardedFrom": forwarded_from,
        "callType": call_type,
        "callerName": caller_name,
        "direction": direction,
        "callStatus": call_status,
        "customParameters": custom_parameters,
        "streamSid": stream_sid,
    }


def prompt_message(voice_prompt: str, lang: str, *, last: bool = True) -> dict[str, Any]:
    """What the caller said; ``last`` false for a partial prompt (cumulative text so far)."""
    return {"type": "prompt", "voicePrompt": voice_prompt, "lang": lang, "last": last}


def dtmf_message(digit: str) -> dict[str, Any]:
    return {"type": "dtmf", "digit": digit}


def interrupt_message(heard: str, duration_ms: int, utterance_id: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "interrupt",
        "utteranceUntilInterrupt": heard,
        "durationUntilInterruptMs": duration_ms,
    }
    if utterance_id is not None:
        msg["utteranceId"] = utterance_id  # extension
    return msg


def info_message(name: str, value: str, ts_ms: int) -> dict[str, Any]:
    """``info`` (opt-in with ``events``): agentSpeaking/clientSpeaking on|off, tokensPlayed text."""
    return {"type": "info", "name": name, "value": value, "ts": ts_ms}


def spoken_message(text: str, duration_ms: int, utterance_id: str, *, complete: bool = True) -> dict[str, Any]:
    """Extension. ``complete`` is false when speech failed part-way: ``text`` is then only the words heard."""
    return {"type": "spoken", "text": text, "durationMs": duration_ms, "utteranceId": utterance_id,
            "complete": complete}


def error_message(description: str) -> dict[str, Any]:
    return {"type": "error", "description": description}


def media_message(payload_b64: str, timestamp_ms: int) -> dict[str, Any]:
    """Extension: inbound caller audio, after ``config {"media": true}``."""
    return {"type": "media", "payload": payload_b64, "timestamp": timestamp_ms}
