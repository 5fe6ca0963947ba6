"""Codec: every voice form and ``locale`` survive a round trip; an error's title is never doubled."""

from __future__ import annotations

import pytest

from bridge.cartesia.protocol import (
    EMBEDDING_LENGTH,
    ErrorMessage,
    GenerationRequest,
    RequestError,
    encode_server_message,
    parse_client_message,
)


@pytest.mark.parametrize(
    ("form", "wire_voice"),
    [
        ("id", {"mode": "id", "id": "v1"}),
        ("object", {"id": "v1"}),
        ("bare", "v1"),
        ("embedding", {"mode": "embedding", "embedding": [0.5] * EMBEDDING_LENGTH}),
    ],
)
def test_voice_forms_round_trip(form: str, wire_voice: object) -> None:
    wire = GenerationRequest("c", "Hi", "sonic-3", "v1", locale="es-MX").to_wire()
    wire["voice"] = wire_voice
    req = parse_client_message(wire)
    assert isinstance(req, GenerationRequest) and req.voice_form == form and req.locale == "es-MX"
    assert req.to_wire() == wire
    assert (req.voice_id, req.voice_embedding is not None) == (("", True) if form == "embedding" else ("v1", False))


@pytest.mark.parametrize(
    ("voice", "field"),
    [
        ({"mode": "embedding", "embedding": [1.0, 2.0]}, "voice.embedding"),
        ({"mode": "embedding", "embedding": ["x"] * EMBEDDING_LENGTH}, "voice.embedding"),
        ({"mode": "clone", "id": "v"}, "voice.mode"),
        ({"mode": "id"}, "voice"),
        (7, "voice"),
    ],
)
def test_bad_voices_name_the_field(voice: object, field: str) -> None:
    wire = GenerationRequest("c", "Hi", "sonic-3", "v1").to_wire()
    wire["voice"] = voice
    with pytest.raises(RequestError) as info:
        parse_client_message(wire)
    assert info.value.field == field and info.value.context_id == "c"


def test_language_and_locale_are_checked_and_exclusive() -> None:
    wire = GenerationRequest("c", "Hi", "sonic-3", "v1").to_wire()
    for key, value in (("language", "xx-YY"), ("locale", "en US"), ("language", 5)):
        with pytest.raises(RequestError) as info:
            parse_client_message({**wire, key: value})
        assert info.value.field == key and info.value.message.startswith(key)
    with pytest.raises(RequestError) as both:
        parse_client_message({**wire, "language": "en", "locale": "en-GB"})
    assert both.value.field == "locale"


def test_legacy_error_string_never_repeats_the_title() -> None:
    plain = ErrorMessage("c", 400, "model_id 'x' is unknown", "model_not_found", "Invalid model")
    doubled = ErrorMessage("c", 400, "Invalid model: model_id 'x' is unknown", "model_not_found", "Invalid model")
    for msg in (plain, doubled):
        assert encode_server_message(msg, "2024-11-13")["error"] == "Invalid model: model_id 'x' is unknown"
    structured = encode_server_message(plain, "2025-11-04")
    assert (structured["title"], structured["message"]) == ("Invalid model", "model_id 'x' is unknown")
