"""Cartesia STT codec (sans-I/O): both directions, tolerant parsing, exact building."""

from __future__ import annotations

import orjson
import pytest

from bridge.cartesia.stt_protocol import (
    SttDone,
    SttError,
    SttFlushDone,
    SttParams,
    SttProtocolError,
    SttTranscript,
    SttTurnEvent,
    SttWord,
    encode_stt_server_message,
    parse_stt_client_text,
    parse_stt_params,
    parse_stt_server_message,
)


def test_params_query_is_exact_and_round_trips() -> None:
    params = SttParams(max_silence_duration_secs=0.4, keyterms=("Cartesia", "media bridge"))
    query = params.query()
    assert query == ("model=ink-whisper&language=en&encoding=pcm_mulaw&sample_rate=8000"
                     "&max_silence_duration_secs=0.4&keyterm=Cartesia&keyterm=media+bridge")
    parsed = parse_stt_params({"model": "ink-whisper", "language": "en", "encoding": "pcm_mulaw",
                               "sample_rate": "8000", "max_silence_duration_secs": "0.4"},
                              ["Cartesia", "media bridge"])
    assert parsed == params
    assert parsed.bytes_per_second() == 8000


@pytest.mark.parametrize(("query", "field"), [
    ({"encoding": "pcm_mulaw"}, "sample_rate"),
    ({"sample_rate": "8000"}, "encoding"),
    ({"encoding": "mp3", "sample_rate": "8000"}, "encoding"),
    ({"encoding": "pcm_mulaw", "sample_rate": "8k"}, "sample_rate"),
    ({"encoding": "pcm_mulaw", "sample_rate": "8000", "model": "sonic-3"}, "model"),
    ({"encoding": "pcm_mulaw", "sample_rate": "8000", "min_volume": "2"}, "min_volume"),
])
def test_params_errors_name_the_field(query: dict[str, str], field: str) -> None:
    with pytest.raises(SttProtocolError) as err:
        parse_stt_params(query)
    assert err.value.field == field


def test_too_many_keyterms_refused() -> None:
    with pytest.raises(SttProtocolError):
        parse_stt_params({"encoding": "pcm_mulaw", "sample_rate": "8000"}, ["w"] * 101)


def test_server_messages_round_trip() -> None:
    messages = [
        SttTranscript(True, " hello there", (SttWord("hello", 0.1, 0.4), SttWord("there", 0.5, 0.9)), 1.0, "en", "r1"),
        SttTranscript(False, "hel", (), None, None, "r1"),
        SttFlushDone("r1"),
        SttDone("r1"),
        SttError("sample_rate is required", "Invalid request", 400, "invalid_request", None, "r1"),
        SttTurnEvent("turn.end", "hello there", "r1"),
    ]
    for msg in messages:
        assert parse_stt_server_message(encode_stt_server_message(msg)) == msg


def test_transcript_parsing_is_tolerant_of_ints_and_extra_fields() -> None:
    raw = orjson.dumps({"type": "transcript", "is_final": True, "text": "hi", "duration": 1,
                        "words": [{"word": "hi", "start": 0, "end": 1}], "new_field": 3})
    msg = parse_stt_server_message(raw)
    assert msg == SttTranscript(True, "hi", (SttWord("hi", 0.0, 1.0),), 1.0, None, "")


@pytest.mark.parametrize("raw", [
    b"not json", b"[1]", b'{"type":"transcript","text":"x"}', b'{"type":"transcript","is_final":true,"words":[1]}',
    b'{"type":"weird"}', b'{"type":"transcript","is_final":false,"text":5}',
])
def test_bad_server_messages_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(SttProtocolError):
        parse_stt_server_message(raw)


def test_client_commands() -> None:
    assert parse_stt_client_text("finalize") == "finalize"
    assert parse_stt_client_text(' "close" ') == "close"
    with pytest.raises(SttProtocolError):
        parse_stt_client_text("flush")
