"""Cartesia TTS WebSocket message codec, both peers, no I/O.

One module for the bridge's client and the local emulator's server, so a wire
shape is written once. Sources: ``../shared/docs/cartesia-websocket.md``
(sections 2-4) and the seed pages in ``../shared/seeds/``.

Rules kept here:

* *Exact in what we send.* ``GenerationRequest.to_wire`` and
  ``encode_server_message`` emit exactly the documented fields; optional
  fields that are ``None`` are left out.
* *Tolerant in what we accept.* ``parse_client_message`` and
  ``parse_server_message`` ignore unknown fields and treat ``null`` like an
  absent field. Values that cannot be honoured raise ``RequestError`` naming
  the field, so a server can answer with a 400 ``error`` for that context.

Audio stays base64 text in ``Chunk.data``: the bridge decodes it only to cut
20 ms frames, never to PCM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Final, Union

import orjson

#: Versions at or after this date use the structured error shape: documented for 2026-03-01 (D5),
#: and the official SDK 3.x (which sends 2025-11-04) already models errors as title/message/error_code.
STRUCTURED_ERRORS_SINCE: Final = "2025-11-04"
#: Version the bridge sends and the emulator assumes when none is given.
DEFAULT_VERSION: Final = "2026-03-01"

#: Bytes per sample for each raw encoding Cartesia can produce.
BYTES_PER_SAMPLE: Final[dict[str, int]] = {
    "pcm_mulaw": 1,
    "pcm_alaw": 1,
    "pcm_s16le": 2,
    "pcm_f32le": 4,
}
SAMPLE_RATES: Final = (8000, 16000, 22050, 24000, 44100, 48000)
#: Cartesia's language codes: the 42 of the 2026-03-01 OpenAPI (seed 001, ``SupportedLanguage``)
#: plus ``or`` and ``ur`` added by the official SDK 4.x (``cartesia/types/supported_language.py``).
LANGUAGES: Final = frozenset(
    "en fr de es pt zh ja hi it ko nl pl ru sv tr tl bg ro ar cs el fi hr ms sk "
    "da ta uk hu no vi bn th he ka id te gu kn ml mr pa or ur".split()
)
#: BCP-47 primary subtags that name a Cartesia language under another code (ISO 639 synonyms,
#: macrolanguage members, deprecated codes that telephony platforms still send).
LANGUAGE_ALIASES: Final[dict[str, str]] = {
    "nb": "no", "nn": "no",            # Norwegian Bokmål / Nynorsk → Norwegian
    "fil": "tl",                        # Filipino → Tagalog
    "cmn": "zh", "yue": "zh",           # Mandarin, Cantonese → Chinese
    "iw": "he", "in": "id",             # deprecated ISO 639 codes for Hebrew, Indonesian
    "zsm": "ms",                        # Standard Malay
}
_BCP47_RE: Final = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*$")
#: ``generation_config`` ranges (seed 001, ``GenerationConfig``).
SPEED_RANGE: Final = (0.6, 1.5)
VOLUME_RANGE: Final = (0.5, 2.0)
LEGACY_SPEEDS: Final = frozenset({"slow", "normal", "fast"})
#: ``max_buffer_delay_ms`` range accepted (current docs: [0, 5000]).
MAX_BUFFER_DELAY_RANGE_MS: Final = (0, 5000)

_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def cartesia_language(code: object) -> str:
    """The Cartesia ``language`` for a BCP-47 tag: ``"es-MX"`` → ``"es"``, ``"pt-BR"`` → ``"pt"``.

    Accepts a bare Cartesia code (``"en"``), any case, ``_`` or ``-`` as the
    separator, and script/region/variant subtags (``"zh-Hant-TW"`` → ``"zh"``);
    the primary subtag decides, through ``LANGUAGE_ALIASES`` for synonyms
    (``"nb-NO"`` → ``"no"``, ``"fil-PH"`` → ``"tl"``). Pure; no I/O.
    Raises ``ValueError`` naming ``code`` when it is not a well-formed tag or
    its language is not one Cartesia speaks.
    """
    if not isinstance(code, str) or not _BCP47_RE.match(code):
        raise ValueError(f"{code!r} is not a BCP-47 language tag (e.g. 'en', 'es-MX')")
    primary = re.split(r"[-_]", code, maxsplit=1)[0].lower()
    language = LANGUAGE_ALIASES.get(primary, primary)
    if language not in LANGUAGES:
        raise ValueError(f"{code!r} names no language Cartesia speaks (supported: {', '.join(sorted(LANGUAGES))})")
    return language


def uses_structured_errors(version: str | None) -> bool:
    """True when ``version`` expects the ≥2026-03-01 structured error shape.

    A missing or unparseable version is treated as current (structured).
    """
    if not version or not _VERSION_RE.match(version):
        return True
    return version >= STRUCTURED_ERRORS_SINCE


class RequestError(ValueError):
    """A client message that cannot be honoured.

    ``field`` names the offending request field (``None`` for the whole
    message); ``status_code`` is the HTTP-like status for the ``error`` reply.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        context_id: str | None = None,
        status_code: int = 400,
        error_code: str | None = "invalid_request",
        title: str = "Invalid request",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.context_id = context_id
        self.status_code = status_code
        self.error_code = error_code
        self.title = title


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Raw output format. Only ``container="raw"`` is valid on the WebSocket."""

    encoding: str = "pcm_mulaw"
    sample_rate: int = 8000
    container: str = "raw"

    @property
    def bytes_per_sample(self) -> int:
        return BYTES_PER_SAMPLE[self.encoding]

    @property
    def bytes_per_second(self) -> int:
        return self.bytes_per_sample * self.sample_rate

    def to_wire(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "encoding": self.encoding,
            "sample_rate": self.sample_rate,
        }


#: What the bridge asks for: Twilio's own format, so audio passes through.
TWILIO_FORMAT: Final = OutputFormat("pcm_mulaw", 8000, "raw")


@dataclass(slots=True)
class GenerationRequest:
    """One input on a context: the first, a continuation, a flush or the close.

    ``voice_id`` is the voice UUID; the wire form is ``{"mode":"id","id":…}``.
    ``voice_form`` says how a parsed request named its voice: ``id``
    (``{"mode":"id"}``), ``object`` (``{"id":…}`` without mode), ``bare`` (a
    string) or ``embedding`` (``voice_embedding`` floats, ``voice_id`` empty).
    ``language`` is as sent (a Cartesia code or a BCP-47 tag, see
    ``cartesia_language``); ``locale`` is the 2026-08-14 alternative to it.
    ``generation_config`` holds ``speed`` (0.6-1.5), ``volume`` (0.5-2.0) and
    ``emotion`` as documented; ``max_buffer_delay_ms`` is in ms, 0-5000.
    """

    context_id: str
    transcript: str
    model_id: str
    voice_id: str
    output_format: OutputFormat = TWILIO_FORMAT
    continue_: bool = False
    flush: bool = False
    language: str | None = None
    add_timestamps: bool = False
    add_phoneme_timestamps: bool = False
    use_normalized_timestamps: bool | None = None
    max_buffer_delay_ms: int | None = None
    generation_config: dict[str, Any] | None = None
    speed: str | None = None
    pronunciation_dict_id: str | None = None
    duration: float | None = None
    locale: str | None = None
    voice_form: str = "id"
    voice_embedding: tuple[float, ...] | None = None

    def wire_voice(self) -> Any:
        """The ``voice`` value in the form this request was made with."""
        if self.voice_form == "embedding":
            return {"mode": "embedding", "embedding": list(self.voice_embedding or ())}
        if self.voice_form == "bare":
            return self.voice_id
        if self.voice_form == "object":
            return {"id": self.voice_id}
        return {"mode": "id", "id": self.voice_id}

    def to_wire(self) -> dict[str, Any]:
        """The exact JSON object to send (``None`` options omitted)."""
        wire: dict[str, Any] = {
            "model_id": self.model_id,
            "transcript": self.transcript,
            "voice": self.wire_voice(),
            "output_format": self.output_format.to_wire(),
            "context_id": self.context_id,
            "continue": self.continue_,
        }
        if self.flush:
            wire["flush"] = True
        if self.language is not None:
            wire["language"] = self.language
        if self.locale is not None:
            wire["locale"] = self.locale
        if self.add_timestamps:
            wire["add_timestamps"] = True
        if self.add_phoneme_timestamps:
            wire["add_phoneme_timestamps"] = True
        if self.use_normalized_timestamps is not None:
            wire["use_normalized_timestamps"] = self.use_normalized_timestamps
        if self.max_buffer_delay_ms is not None:
            wire["max_buffer_delay_ms"] = self.max_buffer_delay_ms
        if self.generation_config:
            wire["generation_config"] = dict(self.generation_config)
        if self.speed is not None:
            wire["speed"] = self.speed
        if self.pronunciation_dict_id is not None:
            wire["pronunciation_dict_id"] = self.pronunciation_dict_id
        if self.duration is not None:
            wire["duration"] = self.duration
        return wire


#: Fields two requests may differ in and still be sent as one.
_MERGEABLE: Final = frozenset({"transcript", "continue_", "flush"})
#: Text that ends a sentence (what Cartesia waits for before generating streamed text).
ENDS_SENTENCE: Final = re.compile(r"[.!?;:][\"')\]]*\s+$")


#: Every field but the mergeable ones, as one tuple (derived, so a new field is never ignored).
_identity: Final = attrgetter(*(f.name for f in fields(GenerationRequest) if f.name not in _MERGEABLE))
#: Every field, in ``__init__``'s positional order (all are init fields), and where the merged ones sit.
_FIELD_NAMES: Final = tuple(f.name for f in fields(GenerationRequest))
assert all(f.init for f in fields(GenerationRequest)), "merge_continuation passes every field to __init__"
_every_field: Final = attrgetter(*_FIELD_NAMES)
_TRANSCRIPT_AT: Final = _FIELD_NAMES.index("transcript")
_CONTINUE_AT: Final = _FIELD_NAMES.index("continue_")
_FLUSH_AT: Final = _FIELD_NAMES.index("flush")


def merge_continuation(first: GenerationRequest, then: GenerationRequest) -> GenerationRequest | None:
    """``first`` followed by ``then`` as one request, or ``None`` when they must go separately.

    Cartesia concatenates the transcripts of a context's inputs, so two inputs
    that differ only in text are one input with the texts joined, as long as
    the first leaves the context open (``continue``) and does not ask for a
    flush (a flush marks a point in the stream). The result takes ``then``'s
    ``continue`` and ``flush``.
    """
    if not first.continue_ or first.flush or _identity(first) != _identity(then):
        return None
    # ``dataclasses.replace`` without its per-call field walk (a third of the time; one call per agent token).
    values = list(_every_field(first))
    values[_TRANSCRIPT_AT] = first.transcript + then.transcript
    values[_CONTINUE_AT] = then.continue_
    values[_FLUSH_AT] = then.flush
    return GenerationRequest(*values)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """``{"context_id": …, "cancel": true}``."""

    context_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"context_id": self.context_id, "cancel": True}


ClientMessage = Union[GenerationRequest, CancelRequest]


def _require_str(obj: dict[str, Any], key: str, ctx: str | None, *, allow_empty: bool = True) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not allow_empty and not value):
        raise RequestError(f"{key} is required and must be a string", field=key, context_id=ctx)
    return value


def _parse_bool(obj: dict[str, Any], key: str, ctx: str | None, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be a boolean", field=key, context_id=ctx)
    return value


#: Length of a Cartesia voice embedding (docs 2024-11-13: 192 floats).
EMBEDDING_LENGTH: Final = 192


@dataclass(frozen=True, slots=True)
class VoiceSpec:
    """A parsed ``voice``: its id (empty for an embedding), its wire form, its embedding."""

    voice_id: str
    form: str = "id"
    embedding: tuple[float, ...] | None = None


def parse_voice(value: Any, ctx: str | None) -> VoiceSpec:
    """``{"mode":"id","id":…}``, ``{"id":…}``, a bare id string, or ``{"mode":"embedding","embedding":[…]}``.

    Which forms a given API version accepts is the server's business (the
    emulator's ``versions``); this only checks the shape, naming ``voice``.
    """
    if isinstance(value, str) and value:
        return VoiceSpec(value, "bare")
    if isinstance(value, dict):
        mode = value.get("mode")
        if mode == "embedding":
            emb = value.get("embedding")
            if (
                not isinstance(emb, list)
                or len(emb) != EMBEDDING_LENGTH
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in emb)
            ):
                raise RequestError(
                    f"voice.embedding must be a list of {EMBEDDING_LENGTH} numbers", field="voice.embedding",
                    context_id=ctx,
                )
            return VoiceSpec("", "embedding", tuple(float(v) for v in emb))
        if mode not in (None, "id"):
            raise RequestError(
                f"voice.mode {mode!r} is not supported; use mode 'id'", field="voice.mode", context_id=ctx
            )
        voice_id = value.get("id")
        if isinstance(voice_id, str) and voice_id:
            return VoiceSpec(voice_id, "id" if mode == "id" else "object")
    raise RequestError("voice must be {'mode':'id','id':<voice id>}", field="voice", context_id=ctx)


def parse_output_format(value: Any, ctx: str | None, *, containers: tuple[str, ...] = ("raw",)) -> OutputFormat:
    """Validate an ``output_format`` object; errors name the sub-field."""
    if not isinstance(value, dict):
        raise RequestError("output_format is required", field="output_format", context_id=ctx)
    container = value.get("container") or "raw"
    if container not in containers:
        raise RequestError(
            f"output_format.container {container!r} is not supported here (use {', '.join(containers)})",
            field="output_format.container",
            context_id=ctx,
        )
    encoding = value.get("encoding")
    if container == "mp3":
        encoding = "mp3"
    elif not isinstance(encoding, str) or encoding not in BYTES_PER_SAMPLE:  # a list/dict is unhashable
        raise RequestError(
            f"output_format.encoding {encoding!r} is invalid (use one of {sorted(BYTES_PER_SAMPLE)})",
            field="output_format.encoding",
            context_id=ctx,
        )
    rate = value.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in SAMPLE_RATES:
        raise RequestError(
            f"output_format.sample_rate {rate!r} is invalid (use one of {list(SAMPLE_RATES)})",
            field="output_format.sample_rate",
            context_id=ctx,
        )
    return OutputFormat(str(encoding), rate, str(container))


def parse_generation_config(value: Any, ctx: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("generation_config must be an object", field="generation_config", context_id=ctx)
    out: dict[str, Any] = {}
    for key, (low, high) in (("speed", SPEED_RANGE), ("volume", VOLUME_RANGE)):
        item = value.get(key)
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not low <= item <= high:
            raise RequestError(
                f"generation_config.{key} must be a number in [{low}, {high}]",
                field=f"generation_config.{key}",
                context_id=ctx,
            )
        out[key] = float(item)
    emotion = value.get("emotion")
    if emotion is not None:
        if not isinstance(emotion, str):
            raise RequestError(
                "generation_config.emotion must be a string", field="generation_config.emotion", context_id=ctx
            )
        out["emotion"] = emotion
    return out


def parse_client_message(obj: Any) -> ClientMessage:
    """Server side: decode one client JSON object (already ``json.loads``-ed).

    Raises ``RequestError`` naming the field for anything that cannot be
    honoured. Model and voice *existence* are the server's catalogue's
    business, not the codec's.
    """
    if not isinstance(obj, dict):
        raise RequestError("message must be a JSON object")
    raw_ctx = obj.get("context_id")
    if raw_ctx is not None and not isinstance(raw_ctx, str):
        raise RequestError("context_id must be a string", field="context_id")
    ctx: str | None = raw_ctx
    if obj.get("cancel") is True:
        if not ctx:
            raise RequestError("cancel requires a context_id", field="context_id")
        return CancelRequest(ctx)
    transcript = _require_str(obj, "transcript", ctx)
    model_id = _require_str(obj, "model_id", ctx, allow_empty=False)
    voice = parse_voice(obj.get("voice"), ctx)
    output_format = parse_output_format(obj.get("output_format"), ctx)
    language = _parse_language(obj, "language", ctx)
    locale = _parse_language(obj, "locale", ctx)
    if language is not None and locale is not None:
        raise RequestError("locale cannot be sent with language: set one of them", field="locale", context_id=ctx)
    delay = obj.get("max_buffer_delay_ms")
    if delay is not None:
        low, high = MAX_BUFFER_DELAY_RANGE_MS
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not low <= delay <= high:
            raise RequestError(
                f"max_buffer_delay_ms must be in [{low}, {high}]", field="max_buffer_delay_ms", context_id=ctx
            )
        delay = int(delay)
    speed = obj.get("speed")
    if speed is not None and (not isinstance(speed, str) or speed not in LEGACY_SPEEDS):
        raise RequestError("speed must be slow, normal or fast", field="speed", context_id=ctx)
    pron = obj.get("pronunciation_dict_id")
    if pron is not None and not isinstance(pron, str):
        raise RequestError("pronunciation_dict_id must be a string", field="pronunciation_dict_id", context_id=ctx)
    duration = obj.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))):
        raise RequestError("duration must be a number of seconds", field="duration", context_id=ctx)
    normalized = obj.get("use_normalized_timestamps")
    if normalized is None:
        legacy = obj.get("use_original_timestamps")
        normalized = (not legacy) if isinstance(legacy, bool) else None
    elif not isinstance(normalized, bool):
        raise RequestError(
            "use_normalized_timestamps must be a boolean", field="use_normalized_timestamps", context_id=ctx
        )
    return GenerationRequest(
        context_id=ctx or "",
        transcript=transcript,
        model_id=model_id,
        voice_id=voice.voice_id,
        output_format=output_format,
        continue_=_parse_bool(obj, "continue", ctx, False),
        flush=_parse_bool(obj, "flush", ctx, False),
        language=language,
        add_timestamps=_parse_bool(obj, "add_timestamps", ctx, False),
        add_phoneme_timestamps=_parse_bool(obj, "add_phoneme_timestamps", ctx, False),
        use_normalized_timestamps=normalized,
        max_buffer_delay_ms=delay,
        generation_config=parse_generation_config(obj.get("generation_config"), ctx),
        speed=speed,
        pronunciation_dict_id=pron,
        duration=float(duration) if duration is not None else None,
        locale=locale,
        voice_form=voice.form,
        voice_embedding=voice.embedding,
    )


def _parse_language(obj: dict[str, Any], key: str, ctx: str | None) -> str | None:
    """``language``/``locale`` as sent, if ``cartesia_language`` knows it; errors name ``key``."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a string such as 'en' or 'es-MX'", field=key, context_id=ctx)
    try:
        cartesia_language(value)
    except ValueError as exc:
        raise RequestError(f"{key} {exc}", field=key, context_id=ctx) from None
    return value


# --------------------------------------------------------------------------
# Server -> client


@dataclass(slots=True)  # not frozen: one per chunk, and a frozen __init__ costs several times more
class Chunk:
    """Audio for a context. ``data`` is base64 text exactly as on the wire."""

    context_id: str
    data: str
    step_time: float = 0.0
    flush_id: int | None = None


@dataclass(slots=True)  # not frozen: one per chunk with a word start (see ``Chunk``)
class WordTimestamps:
    """Word timings in seconds from the start of the context's audio."""

    context_id: str
    words: list[str]
    start: list[float]
    end: list[float]
    flush_id: int | None = None


@dataclass(frozen=True, slots=True)
class PhonemeTimestamps:
    context_id: str
    phonemes: list[str]
    start: list[float]
    end: list[float]
    flush_id: int | None = None


@dataclass(frozen=True, slots=True)
class FlushDone:
    context_id: str
    flush_id: int


@dataclass(frozen=True, slots=True)
class Done:
    context_id: str


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An ``error``; ``context_id`` is ``None`` only for socket-level errors."""

    context_id: str | None
    status_code: int
    message: str
    error_code: str | None = None
    title: str | None = None
    request_id: str | None = None
    doc_url: str | None = None

    @property
    def description(self) -> str:
        """``title: message`` (the legacy ``error`` string), never repeating a title the message starts with."""
        if not self.title or self.message.startswith(self.title):
            return self.message
        return f"{self.title}: {self.message}"


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A server message of a type this codec does not know (kept, not fatal)."""

    context_id: str | None
    type: str | None
    raw: dict[str, Any] = field(default_factory=dict)


ServerMessage = Union[Chunk, WordTimestamps, PhonemeTimestamps, FlushDone, Done, ErrorMessage, UnknownMessage]


def encode_server_message(msg: ServerMessage, version: str | None = DEFAULT_VERSION) -> dict[str, Any]:
    """The exact JSON object for ``msg``; the error shape follows ``version``."""
    if isinstance(msg, Chunk):
        out: dict[str, Any] = {
            "type": "chunk",
            "data": msg.data,
            "done": False,
            "status_code": 206,
            "step_time": msg.step_time,
            "context_id": msg.context_id,
        }
        if msg.flush_id is not None:
            out["flush_id"] = msg.flush_id
        return out
    if isinstance(msg, WordTimestamps):
        out = {
            "type": "timestamps",
            "done": False,
            "status_code": 206,
            "context_id": msg.context_id,
            "word_timestamps": {"words": list(msg.words), "start": list(msg.start), "end": list(msg.end)},
        }
        if msg.flush_id is not None:
            out["flush_id"] = msg.flush_id
        return out
    if isinstance(msg, PhonemeTimestamps):
        out = {
            "type": "phoneme_timestamps",
            "done": False,
            "status_code": 206,
            "context_id": msg.context_id,
            "phoneme_timestamps": {
                "phonemes": list(msg.phonemes),
                "start": list(msg.start),
                "end": list(msg.end),
            },
        }
        if msg.flush_id is not None:
            out["flush_id"] = msg.flush_id
        return out
    if isinstance(msg, FlushDone):
        return {
            "type": "flush_done",
            "done": False,
            "flush_done": True,
            "flush_id": msg.flush_id,
            "status_code": 206,
            "context_id": msg.context_id,
        }
    if isinstance(msg, Done):
        return {"type": "done", "done": True, "status_code": 206, "context_id": msg.context_id}
    if isinstance(msg, ErrorMessage):
        if uses_structured_errors(version):
            out = {
                "type": "error",
                "done": True,
                "status_code": msg.status_code,
                "error_code": msg.error_code,
                "title": msg.title or "Error",
                "message": msg.message,
                "request_id": msg.request_id,
                "context_id": msg.context_id,
            }
            if msg.doc_url:
                out["doc_url"] = msg.doc_url
            return out
        return {
            "type": "error",
            "done": True,
            "error": msg.description,
            "status_code": msg.status_code,
            "context_id": msg.context_id,
        }
    raise TypeError(f"cannot encode {type(msg).__name__}")


_NUMBER_TYPES: Final = frozenset((int, float))
_FLOAT_ONLY: Final = frozenset((float,))
_STR_ONLY: Final = frozenset((str,))


def _floats(value: Any) -> list[float]:
    """All-or-nothing: one bad entry would shift every later time onto the wrong word."""
    if not isinstance(value, list):
        return []
    # Element types collected in C (``map(type)``); bool is its own type, so it is refused as before.
    kinds = set(map(type, value))
    if kinds <= _FLOAT_ONLY:
        return list(value)
    if kinds <= _NUMBER_TYPES:
        return [float(v) for v in value]
    return []


def _strs(value: list[Any]) -> list[str]:
    """Word texts as ``str`` (a list of strings is copied in C)."""
    if set(map(type, value)) <= _STR_ONLY:
        return list(value)
    return [str(w) for w in value]


def parse_server_text(raw: str | bytes) -> ServerMessage:
    """Client side: decode one server text frame (the read loop's hot path).

    Same result as ``parse_server_message(orjson.loads(raw))``; the two
    messages of every generated second, ``chunk`` and ``timestamps``, are
    decoded inline. Raises ``ValueError`` (bad JSON, not an object).
    """
    obj = orjson.loads(raw)
    if type(obj) is dict:
        kind = obj.get("type")
        if kind == "chunk":
            ctx = obj.get("context_id")
            data = obj.get("data")
            step = obj.get("step_time")
            flush_id = obj.get("flush_id")
            # ``type(…) is`` first: the usual float step and int flush id skip the general checks.
            return Chunk(
                ctx if type(ctx) is str else "",
                data if type(data) is str else "",
                step if type(step) is float else float(step) if isinstance(step, (int, float)) else 0.0,
                flush_id if type(flush_id) is int or isinstance(flush_id, int) else None,
            )
        if kind == "timestamps":
            wt = obj.get("word_timestamps")
            if type(wt) is dict:
                ctx = obj.get("context_id")
                words = wt.get("words")
                starts = wt.get("start")
                ends = wt.get("end")
                flush_id = obj.get("flush_id")
                # The lists are this decode's own, so they are kept, not copied. The usual message
                # (words all strings, times all floats) is checked with one type set per kind.
                if type(words) is list and set(map(type, words)) <= _STR_ONLY:
                    pass
                else:
                    words = _strs(words) if type(words) is list else []
                if type(starts) is list and type(ends) is list and set(map(type, starts + ends)) <= _FLOAT_ONLY:
                    pass
                else:
                    starts, ends = _floats(starts), _floats(ends)
                return WordTimestamps(ctx if type(ctx) is str else "", words, starts, ends,
                                      flush_id if type(flush_id) is int or isinstance(flush_id, int) else None)
    return parse_server_message(obj)


def parse_server_message(obj: Any) -> ServerMessage:
    """Client side: decode one server JSON object, tolerating both error shapes.

    Raises ``ValueError`` only when ``obj`` is not a JSON object.
    """
    if not isinstance(obj, dict):
        raise ValueError("Cartesia message is not a JSON object")
    kind = obj.get("type")
    ctx = obj.get("context_id")
    ctx = ctx if isinstance(ctx, str) else None
    if kind == "chunk":
        data = obj.get("data")
        flush_id = obj.get("flush_id")
        step = obj.get("step_time")
        return Chunk(
            ctx or "",
            data if isinstance(data, str) else "",
            float(step) if isinstance(step, (int, float)) else 0.0,
            flush_id if isinstance(flush_id, int) else None,
        )
    if kind == "timestamps":
        wt = obj.get("word_timestamps") or {}
        words = wt.get("words") if isinstance(wt, dict) else None
        return WordTimestamps(
            ctx or "",
            _strs(words) if isinstance(words, list) else [],
            _floats(wt.get("start") if isinstance(wt, dict) else None),
            _floats(wt.get("end") if isinstance(wt, dict) else None),
            obj.get("flush_id") if isinstance(obj.get("flush_id"), int) else None,
        )
    if kind == "phoneme_timestamps":
        pt = obj.get("phoneme_timestamps") or {}
        phonemes = pt.get("phonemes") if isinstance(pt, dict) else None
        return PhonemeTimestamps(
            ctx or "",
            [str(p) for p in phonemes] if isinstance(phonemes, list) else [],
            _floats(pt.get("start") if isinstance(pt, dict) else None),
            _floats(pt.get("end") if isinstance(pt, dict) else None),
        )
    if kind == "flush_done":
        flush_id = obj.get("flush_id")
        return FlushDone(ctx or "", flush_id if isinstance(flush_id, int) else 0)
    if kind == "done":
        return Done(ctx or "")
    if kind == "error" or ("error" in obj and kind is None):
        status = obj.get("status_code")
        legacy = obj.get("error")
        message = obj.get("message")
        if not isinstance(message, str):
            message = legacy if isinstance(legacy, str) else "unknown error"
        title = obj.get("title")
        code = obj.get("error_code")
        request_id = obj.get("request_id")
        return ErrorMessage(
            ctx,
            status if isinstance(status, int) else 500,
            message,
            code if isinstance(code, str) else None,
            title if isinstance(title, str) else None,
            request_id if isinstance(request_id, str) else None,
        )
    return UnknownMessage(ctx, kind if isinstance(kind, str) else None, obj)


# --------------------------------------------------------------------------
# HTTP (/tts/bytes, /tts/sse) request bodies

#: Containers the HTTP endpoints accept (the WebSocket only takes ``raw``).
HTTP_CONTAINERS: Final = ("raw", "wav", "mp3")


def parse_http_tts_request(obj: Any, *, containers: tuple[str, ...] = HTTP_CONTAINERS) -> GenerationRequest:
    """Server side: decode a ``POST /tts/bytes`` or ``/tts/sse`` JSON body.

    Same fields and errors as ``parse_client_message`` (``continue``/``flush``
    are meaningless here and ignored), except that ``output_format.container``
    may be ``raw``, ``wav`` or ``mp3``; for ``mp3`` the returned format has
    ``encoding="mp3"`` (its ``bytes_per_sample`` is undefined).
    """
    if not isinstance(obj, dict):
        raise RequestError("request body must be a JSON object")
    raw_ctx = obj.get("context_id")
    ctx = raw_ctx if isinstance(raw_ctx, str) else None
    fmt = parse_output_format(obj.get("output_format"), ctx, containers=containers)
    patched = dict(obj)
    patched.pop("cancel", None)
    patched["output_format"] = {
        "container": "raw",
        "encoding": "pcm_s16le" if fmt.container == "mp3" else fmt.encoding,
        "sample_rate": fmt.sample_rate,
    }
    req = parse_client_message(patched)
    if not isinstance(req, GenerationRequest):  # pragma: no cover - cancel was removed above
        raise RequestError("not a generation request")
    req.output_format = fmt
    return req
