"""Cartesia STT WebSocket protocol, both sides, without I/O.

Sources: ``../shared/docs/cartesia-stt.md`` and the official ``cartesia`` SDK 4.x
(``resources/stt/manual_finalize.py``, ``types/stt/*``):

- ``GET /stt/websocket?model=&language=&encoding=&sample_rate=&min_volume=&max_silence_duration_secs=&keyterm=``
  (manual finalize) and ``/stt/turns/websocket`` (automatic turns, ``ink-2``, English only).
- Client → server: binary frames of raw audio in ``encoding`` at ``sample_rate``; TEXT
  frames ``finalize`` (turn what was said so far into a final transcript, answered by
  ``flush_done``) and ``close`` (finish, answered by ``done``). These are plain strings,
  not JSON.
- Server → client (JSON): ``transcript`` {is_final, text, words [{word,start,end}],
  duration, language, request_id}; ``flush_done`` {request_id}; ``done`` {request_id};
  ``error`` {message, title, status_code, error_code, doc_url, request_id}; turn events
  ``connected``, ``turn.start``, ``turn.update``, ``turn.eager_end``, ``turn.resume``,
  ``turn.end`` with ``transcript``.

``text`` of a transcript is a delta since the last final one; concatenating every final
``text`` gives the whole transcript (the SDK says not to strip or add whitespace).
Parsing is tolerant (unknown fields ignored, numbers may be ints) and exact in what it
builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Union
from urllib.parse import urlencode

import orjson

from bridge.jsonwire import WireJsonError, load_object

STT_PATH: Final = "/stt/websocket"
STT_TURNS_PATH: Final = "/stt/turns/websocket"
#: Models with manual finalize (SDK ``STTManualFinalizeModel``) and automatic turns.
STT_MODELS: Final = frozenset({"ink-2", "ink-whisper", "ink-whisper-2025-06-04"})
STT_TURN_MODELS: Final = frozenset({"ink-2"})
DEFAULT_STT_MODEL: Final = "ink-whisper"
#: SDK ``STTEncoding``.
STT_ENCODINGS: Final = frozenset({"pcm_s16le", "pcm_s32le", "pcm_f16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw"})
#: Bytes per sample of each encoding (to turn audio bytes into seconds).
STT_SAMPLE_BYTES: Final = {
    "pcm_s16le": 2, "pcm_s32le": 4, "pcm_f16le": 2, "pcm_f32le": 4, "pcm_mulaw": 1, "pcm_alaw": 1,
}
FINALIZE: Final = "finalize"
CLOSE: Final = "close"
#: Keyterms: up to 100 terms, 1200 characters in all (Cartesia's limit).
MAX_KEYTERMS: Final = 100
MAX_KEYTERM_CHARS: Final = 1200
#: The largest server message the bridge accepts (bytes); a transcript of a long turn is far smaller.
MAX_STT_MESSAGE_BYTES: Final = 1 << 20
TURN_EVENTS: Final = frozenset({"connected", "turn.start", "turn.update", "turn.eager_end", "turn.resume", "turn.end"})


class SttProtocolError(ValueError):
    """A message or parameter that does not follow the STT protocol; ``field`` names the culprit."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True, slots=True)
class SttParams:
    """What a client asks for when it opens an STT socket (the handshake's query string)."""

    model: str = DEFAULT_STT_MODEL
    language: str = "en"
    encoding: str = "pcm_mulaw"
    sample_rate: int = 8000
    #: ink-whisper endpointing: silence (s) after which the server finalizes by itself.
    max_silence_duration_secs: float | None = None
    min_volume: float | None = None
    keyterms: tuple[str, ...] = ()

    def query(self) -> str:
        """The URL query string, exact: only the fields that are set, keyterms repeated."""
        pairs: list[tuple[str, str]] = [
            ("model", self.model), ("language", self.language),
            ("encoding", self.encoding), ("sample_rate", str(self.sample_rate)),
        ]
        if self.max_silence_duration_secs is not None:
            pairs.append(("max_silence_duration_secs", _num(self.max_silence_duration_secs)))
        if self.min_volume is not None:
            pairs.append(("min_volume", _num(self.min_volume)))
        pairs.extend(("keyterm", term) for term in self.keyterms)
        return urlencode(pairs)

    def bytes_per_second(self) -> int:
        return self.sample_rate * STT_SAMPLE_BYTES[self.encoding]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_stt_params(query: Mapping[str, str], keyterms: list[str] | None = None, *, turns: bool = False) -> SttParams:
    """Validate a handshake's query parameters (server side); errors name the field."""
    models = STT_TURN_MODELS if turns else STT_MODELS
    model = query.get("model", DEFAULT_STT_MODEL if not turns else "ink-2")
    if model not in models:
        raise SttProtocolError(f"model {model!r} is not an STT model here (known: {', '.join(sorted(models))})", "model")
    encoding = query.get("encoding")
    if encoding is None:
        raise SttProtocolError("encoding is required", "encoding")
    if encoding not in STT_ENCODINGS:
        raise SttProtocolError(f"encoding {encoding!r} is not supported", "encoding")
    raw_rate = query.get("sample_rate")
    if raw_rate is None:
        raise SttProtocolError("sample_rate is required", "sample_rate")
    try:
        sample_rate = int(raw_rate)
    except ValueError:
        raise SttProtocolError(f"sample_rate must be an integer, not {raw_rate!r}", "sample_rate") from None
    if not 4000 <= sample_rate <= 192000:
        raise SttProtocolError(f"sample_rate {sample_rate} is out of range 4000-192000", "sample_rate")
    language = query.get("language", "en")
    if not language or len(language) > 16:
        raise SttProtocolError(f"language {language!r} is not a language code", "language")
    terms = tuple(keyterms or ())
    if len(terms) > MAX_KEYTERMS or sum(len(t) for t in terms) > MAX_KEYTERM_CHARS:
        raise SttProtocolError(f"at most {MAX_KEYTERMS} keyterms of {MAX_KEYTERM_CHARS} characters in all", "keyterm")
    return SttParams(
        model=model, language=language, encoding=encoding, sample_rate=sample_rate,
        max_silence_duration_secs=_opt_float(query, "max_silence_duration_secs", 0.0, 60.0),
        min_volume=_opt_float(query, "min_volume", 0.0, 1.0),
        keyterms=terms,
    )


def _opt_float(query: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    """``query[name]`` as a number in ``[lo, hi]`` (a string, as in a query, or a JSON number)."""
    raw = query.get(name)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise SttProtocolError(f"{name} must be a number", name)
    try:
        value = float(raw)
    except ValueError:
        raise SttProtocolError(f"{name} must be a number, not {raw!r}", name) from None
    if not lo <= value <= hi:
        raise SttProtocolError(f"{name} {value} is out of range {lo}-{hi}", name)
    return value


# --------------------------------------------------------------------------- server → client


@dataclass(frozen=True, slots=True)
class SttWord:
    word: str
    start: float  # seconds from the start of the socket's audio
    end: float


@dataclass(frozen=True, slots=True)
class SttTranscript:
    is_final: bool
    text: str
    words: tuple[SttWord, ...] = ()
    duration: float | None = None  # seconds of audio behind this chunk
    language: str | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class SttFlushDone:
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class SttDone:
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class SttError:
    message: str
    title: str = "Error"
    status_code: int = 500
    error_code: str | None = None
    doc_url: str | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class SttTurnEvent:
    """An event of ``/stt/turns/websocket``; ``transcript`` is cumulative for the turn."""

    kind: str
    transcript: str = ""
    request_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SttServerMessage = Union[SttTranscript, SttFlushDone, SttDone, SttError, SttTurnEvent]


def _str(obj: dict[str, Any], key: str, default: str = "") -> str:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise SttProtocolError(f"{key} must be a string", key)
    return value


def _words(raw: Any) -> tuple[SttWord, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SttProtocolError("words must be a list", "words")
    out: list[SttWord] = []
    for item in raw:
        if not isinstance(item, dict):
            raise SttProtocolError("each word must be an object", "words")
        word, start, end = item.get("word"), item.get("start"), item.get("end")
        if not isinstance(word, str) or not isinstance(start, int | float) or not isinstance(end, int | float):
            raise SttProtocolError("a word needs word (string), start and end (seconds)", "words")
        out.append(SttWord(word, float(start), float(end)))
    return tuple(out)


def parse_stt_server_message(data: str | bytes) -> SttServerMessage:
    """Decode one server message; ``SttProtocolError`` for anything that is not one."""
    try:
        obj = load_object(data, MAX_STT_MESSAGE_BYTES)
    except WireJsonError as exc:
        raise SttProtocolError(str(exc)) from None
    kind = obj.get("type")
    request_id = _str(obj, "request_id")
    if kind == "transcript":
        is_final = obj.get("is_final")
        if not isinstance(is_final, bool):
            raise SttProtocolError("is_final must be a boolean", "is_final")
        duration = obj.get("duration")
        if duration is not None and not isinstance(duration, int | float):
            raise SttProtocolError("duration must be a number", "duration")
        language = obj.get("language")
        return SttTranscript(
            is_final=is_final, text=_str(obj, "text"), words=_words(obj.get("words")),
            duration=None if duration is None else float(duration),
            language=language if isinstance(language, str) else None, request_id=request_id,
        )
    if kind == "flush_done":
        return SttFlushDone(request_id)
    if kind == "done":
        return SttDone(request_id)
    if kind == "error":
        status = obj.get("status_code", 500)
        return SttError(
            message=_str(obj, "message", "unknown error"), title=_str(obj, "title", "Error"),
            status_code=status if isinstance(status, int) else 500,
            error_code=obj.get("error_code") if isinstance(obj.get("error_code"), str) else None,
            doc_url=obj.get("doc_url") if isinstance(obj.get("doc_url"), str) else None,
            request_id=request_id,
        )
    if isinstance(kind, str) and kind in TURN_EVENTS:
        extra = {k: v for k, v in obj.items() if k not in ("type", "transcript", "request_id")}
        return SttTurnEvent(kind, _str(obj, "transcript"), request_id, extra)
    raise SttProtocolError(f"unknown message type {kind!r}", "type")


def encode_stt_server_message(msg: SttServerMessage) -> str:
    """The exact JSON a Cartesia STT server sends for ``msg`` (the emulator's side)."""
    obj: dict[str, Any]
    if isinstance(msg, SttTranscript):
        obj = {"type": "transcript", "request_id": msg.request_id, "is_final": msg.is_final, "text": msg.text}
        if msg.duration is not None:
            obj["duration"] = round(msg.duration, 3)
        if msg.language is not None:
            obj["language"] = msg.language
        obj["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in msg.words]
    elif isinstance(msg, SttFlushDone):
        obj = {"type": "flush_done", "request_id": msg.request_id}
    elif isinstance(msg, SttDone):
        obj = {"type": "done", "request_id": msg.request_id}
    elif isinstance(msg, SttError):
        obj = {"type": "error", "request_id": msg.request_id, "status_code": msg.status_code,
               "title": msg.title, "message": msg.message}
        if msg.error_code is not None:
            obj["error_code"] = msg.error_code
        if msg.doc_url is not None:
            obj["doc_url"] = msg.doc_url
    else:
        obj = {"type": msg.kind, "request_id": msg.request_id, **msg.extra}
        if msg.kind != "connected":
            obj["transcript"] = msg.transcript
    return orjson.dumps(obj).decode()


# --------------------------------------------------------------------------- client → server


@dataclass(frozen=True, slots=True)
class SttTurnConfig:
    """Turn detection settings of ``/stt/turns/websocket`` (query ``turn_*`` or a ``config`` command)."""

    start_threshold: float | None = None  # default 0.8
    eager_end_threshold: float | None = None  # default 0.4, 0.3-0.6
    end_threshold: float | None = None  # default 0.2, 0.05-0.5
    end_timeout_ms: float | None = None  # default 5600, 640-11200


def parse_stt_turn_config(values: Mapping[str, Any], prefix: str = "turn_") -> SttTurnConfig:
    """Turn settings from a query (``turn_end_timeout_ms``…) or a ``config`` command's ``turn``
    object (``prefix=""``: ``end_timeout_ms``…); ranges as Cartesia documents them."""

    def get(name: str, lo: float, hi: float) -> float | None:
        return _opt_float(values, prefix + name, lo, hi)

    return SttTurnConfig(
        start_threshold=get("start_threshold", 0.0, 1.0),
        eager_end_threshold=get("eager_end_threshold", 0.3, 0.6),
        end_threshold=get("end_threshold", 0.05, 0.5),
        end_timeout_ms=get("end_timeout_ms", 640.0, 11200.0),
    )


def parse_stt_turns_client_text(text: str) -> str | SttTurnConfig:
    """A TEXT frame of ``/stt/turns/websocket``: JSON ``{"type":"close"}`` → ``CLOSE``,
    ``{"type":"config","turn":{...}}`` → ``SttTurnConfig``; anything else is an error."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise SttProtocolError(f"not JSON: {text[:40]!r} (expected a close or config command)", "command") from None
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == CLOSE:
        return CLOSE
    if kind == "config":
        turn = obj.get("turn", {})
        if not isinstance(turn, dict):
            raise SttProtocolError("config.turn must be an object", "turn")
        return parse_stt_turn_config(turn, prefix="")
    raise SttProtocolError(f"unknown command type {kind!r} (expected 'close' or 'config')", "type")


def parse_stt_client_text(text: str) -> str:
    """A client TEXT frame: ``finalize`` or ``close`` (surrounding whitespace and a JSON
    string form such as ``"finalize"`` tolerated); anything else is an error."""
    command = text.strip()
    if len(command) >= 2 and command[0] == command[-1] == '"':
        command = command[1:-1]
    if command in (FINALIZE, CLOSE):
        return command
    raise SttProtocolError(f"unknown command {text[:40]!r} (expected 'finalize' or 'close')", "command")
