"""Twilio and Cartesia codecs, without sockets."""

from __future__ import annotations

import base64

import orjson
import pytest

from bridge.cartesia import protocol as cp
from telephony import media as tm


def test_twilio_inbound_events_with_numeric_strings() -> None:
    f = tm.TwilioMessageFactory("MZ1", "CA1", "AC1", {"k": "v"})
    assert isinstance(tm.parse_inbound(f.connected()), tm.Connected)
    start = tm.parse_inbound(f.start())
    assert isinstance(start, tm.Start)
    assert (start.stream_sid, start.call_sid, start.custom_parameters, start.sample_rate) == ("MZ1", "CA1", {"k": "v"}, 8000)
    assert start.sequence_number == "1"
    media = tm.parse_inbound(f.media(b"\xff" * 160, 20))
    assert isinstance(media, tm.Media) and media.payload == b"\xff" * 160 and media.chunk == 1 and media.timestamp_ms == 20
    raw = orjson.loads(f.media(b"\x00", 40))
    assert raw["sequenceNumber"] == "3" and raw["media"]["chunk"] == "2" and raw["media"]["timestamp"] == "40"
    assert tm.parse_inbound(f.dtmf("7")) == tm.Dtmf("MZ1", "7")
    assert tm.parse_inbound(f.mark("m1")) == tm.MarkEcho("MZ1", "m1")
    assert tm.parse_inbound(f.stop()) == tm.Stop("MZ1", "CA1")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("{", "malformed_json"),
        ("[]", "not_an_object"),
        ('{"event":"nope"}', "unknown_event"),
        ('{"event":"media","streamSid":"MZ","media":{"payload":"!!"}}', "invalid_base64"),
        ('{"event":"media","streamSid":"MZ","media":{"payload":"/w==","chunk":"x"}}', "bad_field"),
        ('{"event":"dtmf","streamSid":"MZ","dtmf":{"digit":"12"}}', "bad_field"),
        ('{"event":"start","start":{}}', "bad_field"),
        ('{"event":"mark","streamSid":"MZ"}', "bad_field"),
        ("x" * (tm.MAX_INBOUND_MESSAGE_BYTES + 1), "oversized"),
    ],
)
def test_twilio_inbound_errors_have_kinds(text: str, kind: str) -> None:
    with pytest.raises(tm.MediaError) as info:
        tm.parse_inbound(text)
    assert info.value.kind == kind


def test_twilio_outbound_messages_are_exact() -> None:
    enc = tm.OutboundEncoder("MZ\"odd")
    media = orjson.loads(enc.media(b"\x01" * 320))
    assert media == {"event": "media", "streamSid": "MZ\"odd", "media": {"payload": base64.b64encode(b"\x01" * 320).decode()}}
    assert orjson.loads(enc.mark("m1")) == {"event": "mark", "streamSid": "MZ\"odd", "mark": {"name": "m1"}}
    assert orjson.loads(enc.clear()) == {"event": "clear", "streamSid": "MZ\"odd"}
    with pytest.raises(ValueError):
        enc.media(b"\x01" * 100)
    # The simulator's strict parser accepts exactly what the bridge sends.
    assert tm.parse_outbound(enc.media(b"\x02" * 160), "MZ\"odd") == tm.OutMedia(b"\x02" * 160)
    with pytest.raises(tm.TwilioProtocolError) as info:
        tm.parse_outbound(b"binary", "MZ")
    assert info.value.code == 31950
    with pytest.raises(tm.TwilioProtocolError) as info:
        tm.parse_outbound(enc.clear(), "MZother")
    assert info.value.code == 31924


def test_cartesia_request_wire_shape_is_exact() -> None:
    req = cp.GenerationRequest("c1", "Hi ", "sonic-3", "v1", continue_=True, language="en", add_timestamps=True,
                               max_buffer_delay_ms=0)
    assert req.to_wire() == {
        "model_id": "sonic-3", "transcript": "Hi ", "voice": {"mode": "id", "id": "v1"},
        "output_format": {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000},
        "context_id": "c1", "continue": True, "language": "en", "add_timestamps": True, "max_buffer_delay_ms": 0,
    }
    back = cp.parse_client_message(req.to_wire())
    assert back == req
    assert cp.CancelRequest("c1").to_wire() == {"context_id": "c1", "cancel": True}


def test_cartesia_client_parse_is_tolerant_but_names_fields() -> None:
    base = cp.GenerationRequest("c", "t", "sonic-3", "v").to_wire()
    tolerated = dict(base, unknown_field=1, language=None, generation_config=None, stream=True, voice="v")
    assert isinstance(cp.parse_client_message(tolerated), cp.GenerationRequest)
    for field, bad in [("output_format", {"container": "raw", "encoding": "pcm_x", "sample_rate": 8000}),
                       ("output_format", {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 7000}),
                       ("language", "xx"), ("voice", {"mode": "embedding"}), ("model_id", "")]:
        with pytest.raises(cp.RequestError) as info:
            cp.parse_client_message(dict(base, **{field: bad}))
        assert info.value.field is not None and info.value.field.startswith(field)
        assert info.value.context_id == "c"


def test_cartesia_server_messages_round_trip_and_error_shapes() -> None:
    msgs: list[cp.ServerMessage] = [
        cp.Chunk("c", "AAAA", 1.5, 1), cp.WordTimestamps("c", ["a"], [0.0], [0.1]), cp.FlushDone("c", 2), cp.Done("c"),
    ]
    for m in msgs:
        assert cp.parse_server_message(cp.encode_server_message(m)) == m
    err = cp.ErrorMessage("c", 429, "too many", "concurrency_limited", "Too many concurrent requests", "r1")
    new = cp.encode_server_message(err, "2026-03-01")
    assert new["error_code"] == "concurrency_limited" and "error" not in new and new["context_id"] == "c"
    old = cp.encode_server_message(err, "2024-11-13")
    assert old == {"type": "error", "done": True, "error": "Too many concurrent requests: too many",
                   "status_code": 429, "context_id": "c"}
    assert cp.parse_server_message(old).status_code == 429
    assert isinstance(cp.parse_server_message({"type": "future_thing"}), cp.UnknownMessage)


def test_timestamps_with_a_bad_entry_are_dropped_whole() -> None:
    msg = cp.parse_server_message({"type": "timestamps", "context_id": "c",
                                   "word_timestamps": {"words": ["a", "b"], "start": [0, None], "end": [0.1, 0.2]}})
    assert isinstance(msg, cp.WordTimestamps)
    assert msg.start == [], "a null must not shift later times onto the wrong word"


def _req(text: str, **kw: object) -> cp.GenerationRequest:
    base: dict[str, object] = {"context_id": "c1", "transcript": text, "model_id": "sonic-3", "voice_id": "v1",
                               "continue_": True}
    base.update(kw)
    return cp.GenerationRequest(**base)  # type: ignore[arg-type]


def test_merge_continuation_joins_text_and_takes_the_later_flags() -> None:
    merged = cp.merge_continuation(_req("Hello "), _req("there.", continue_=False))
    assert merged is not None
    assert merged.transcript == "Hello there." and merged.continue_ is False and merged.flush is False
    flushed = cp.merge_continuation(_req("Hello "), _req("", flush=True))
    assert flushed is not None and flushed.flush is True and flushed.continue_ is True
    assert flushed.to_wire()["transcript"] == "Hello "


@pytest.mark.parametrize("first, then", [
    (_req("a ", continue_=False), _req("b ")),  # the first closed the context
    (_req("a ", flush=True), _req("b ")),  # a flush marks a point in the stream
    (_req("a "), _req("b ", context_id="c2")),
    (_req("a "), _req("b ", voice_id="v2")),
    (_req("a "), _req("b ", generation_config={"speed": 1.2})),
    (_req("a "), _req("b ", max_buffer_delay_ms=0)),
])
def test_merge_continuation_refuses_inputs_that_differ_in_more_than_text(
        first: cp.GenerationRequest, then: cp.GenerationRequest) -> None:
    assert cp.merge_continuation(first, then) is None
