"""Property-based fuzz of the sans-I/O codecs: Twilio media, Cartesia TTS and STT, agent protocol.

Each parser is fed arbitrary bytes, arbitrary JSON values and mutations of valid messages: it must
return a message or raise its documented parse error, nothing else. Where both directions exist,
what the builder makes parses back to the same thing.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge.agent import protocol as ap
from bridge.cartesia import protocol as cp
from bridge.cartesia import stt_protocol as sp
from telephony import media as tm
from tests.fuzz_strategies import FUZZ, json_text, json_values, mutations, mutations_of

raw_inputs = st.binary(max_size=300) | st.text(max_size=300)
#: Sids as Twilio makes them: letters and digits (the simulator's factory writes them unescaped).
sids = st.text("ABCDEFabcdef0123456789", min_size=1, max_size=34)


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


# --------------------------------------------------------------------------- Twilio media


def _inbound_ok(data: str | bytes) -> None:
    try:
        tm.parse_inbound(data)
    except tm.MediaError as exc:
        assert exc.kind in {"oversized", "malformed_json", "not_an_object", "unknown_event", "bad_field",
                            "invalid_base64"}


@FUZZ
@given(raw_inputs)
def test_twilio_inbound_survives_any_bytes(data: str | bytes) -> None:
    _inbound_ok(data)


@FUZZ
@given(json_values())
def test_twilio_inbound_survives_any_json(value: Any) -> None:
    _inbound_ok(_json(value))


_FACTORY = tm.TwilioMessageFactory("MZ1", "CA1", "AC1", {"agentUrl": "wss://a.example/x"})
_VALID_INBOUND = [orjson.loads(m) for m in (
    _FACTORY.connected(), _FACTORY.start(), _FACTORY.media(b"\xff" * 160, 20), _FACTORY.dtmf("5"),
    _FACTORY.mark("m1"), _FACTORY.stop())]


@settings(FUZZ, max_examples=150)
@given(mutations_of(_VALID_INBOUND))
def test_twilio_inbound_survives_mutated_valid_messages(obj: dict[str, Any]) -> None:
    _inbound_ok(_json(obj))


@FUZZ
@given(sids, sids, st.dictionaries(json_text, json_text, max_size=4), st.binary(max_size=800),
       st.integers(0, 2**40), st.sampled_from("0123456789*#ABCD"), json_text)
def test_twilio_inbound_round_trips(stream_sid: str, call_sid: str, params: dict[str, str], payload: bytes,
                                    timestamp_ms: int, digit: str, mark: str) -> None:
    factory = tm.TwilioMessageFactory(stream_sid, call_sid, "AC1", params)
    start = tm.parse_inbound(factory.start())
    assert isinstance(start, tm.Start)
    assert (start.stream_sid, start.call_sid, start.custom_parameters) == (stream_sid, call_sid, params)
    media = tm.parse_inbound(factory.media(payload, timestamp_ms))
    assert isinstance(media, tm.Media)
    assert (media.payload, media.timestamp_ms, media.stream_sid) == (payload, timestamp_ms, stream_sid)
    assert tm.parse_inbound(factory.dtmf(digit)) == tm.Dtmf(stream_sid, digit)
    assert tm.parse_inbound(factory.mark(mark)) == tm.MarkEcho(stream_sid, mark)
    assert tm.parse_inbound(factory.stop()) == tm.Stop(stream_sid, call_sid)


@FUZZ
@given(json_text.filter(bool), st.integers(0, 8).map(lambda n: n * tm.FRAME_BYTES).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)), json_text)
def test_twilio_outbound_round_trips(stream_sid: str, audio: bytes, mark: str) -> None:
    enc = tm.OutboundEncoder(stream_sid)
    assert tm.parse_outbound(enc.media(audio), stream_sid) == tm.OutMedia(audio)
    assert tm.parse_outbound(enc.mark(mark), stream_sid) == tm.OutMark(mark)
    assert tm.parse_outbound(enc.clear(), stream_sid) == tm.OutClear()


@FUZZ
@given(raw_inputs | json_values().map(_json))
def test_twilio_outbound_parser_survives_anything(data: str | bytes) -> None:
    try:
        tm.parse_outbound(data, "MZ1")
    except tm.TwilioProtocolError as exc:
        assert exc.code in (31924, 31950)


# --------------------------------------------------------------------------- Cartesia TTS


def _server_ok(value: Any) -> None:
    try:
        msg = cp.parse_server_message(value)
    except ValueError:
        assert not isinstance(value, dict)  # documented: only a non-object is refused
        return
    assert msg.context_id is None or isinstance(msg.context_id, str)


@FUZZ
@given(json_values())
def test_cartesia_server_parser_survives_any_json(value: Any) -> None:
    _server_ok(value)


_VALID_SERVER = [
    cp.encode_server_message(m) for m in (
        cp.Chunk("c1", "/w==", 0.1, 3),
        cp.WordTimestamps("c1", ["a", "b"], [0.0, 0.1], [0.1, 0.2]),
        cp.PhonemeTimestamps("c1", ["a"], [0.0], [0.1]),
        cp.FlushDone("c1", 1), cp.Done("c1"),
        cp.ErrorMessage("c1", 429, "slow down", "rate_limited", "Too many", "r1"),
    )
] + [cp.encode_server_message(cp.ErrorMessage("c1", 500, "x"), version="2024-06-10")]


@settings(FUZZ, max_examples=150)
@given(mutations_of(_VALID_SERVER))
def test_cartesia_server_parser_survives_mutated_valid_messages(obj: dict[str, Any]) -> None:
    _server_ok(obj)


finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)
ctx_ids = json_text.filter(bool)


@st.composite
def server_messages(draw: st.DrawFn) -> cp.ServerMessage:
    ctx = draw(ctx_ids)
    kind = draw(st.sampled_from(["chunk", "ts", "ph", "flush", "done", "error"]))
    if kind == "chunk":
        data = base64.b64encode(draw(st.binary(max_size=400))).decode()
        return cp.Chunk(ctx, data, draw(finite), draw(st.none() | st.integers(0, 2**31)))
    if kind in ("ts", "ph"):
        n = draw(st.integers(0, 5))
        words = draw(st.lists(json_text, min_size=n, max_size=n))
        start = draw(st.lists(finite, min_size=n, max_size=n))
        end = draw(st.lists(finite, min_size=n, max_size=n))
        flush_id = draw(st.none() | st.integers(0, 2**31))
        if kind == "ts":
            return cp.WordTimestamps(ctx, words, start, end, flush_id)
        return cp.PhonemeTimestamps(ctx, words, start, end)
    if kind == "flush":
        return cp.FlushDone(ctx, draw(st.integers(0, 2**31)))
    if kind == "done":
        return cp.Done(ctx)
    return cp.ErrorMessage(draw(st.none() | ctx_ids), draw(st.integers(100, 599)), draw(json_text),
                           draw(st.none() | json_text), draw(st.none() | json_text.filter(bool)),
                           draw(st.none() | json_text))


@FUZZ
@given(server_messages())
def test_cartesia_server_messages_round_trip(msg: cp.ServerMessage) -> None:
    parsed = cp.parse_server_message(orjson.loads(_json(cp.encode_server_message(msg))))
    if isinstance(msg, cp.ErrorMessage):
        # The structured shape always carries a title ("Error" when none was given).
        assert parsed == cp.ErrorMessage(msg.context_id, msg.status_code, msg.message, msg.error_code,
                                         msg.title or "Error", msg.request_id)
        legacy = cp.parse_server_message(orjson.loads(_json(cp.encode_server_message(msg, "2024-06-10"))))
        assert isinstance(legacy, cp.ErrorMessage)
        assert (legacy.context_id, legacy.status_code, legacy.message) == (
            msg.context_id, msg.status_code, msg.description)
    else:
        assert parsed == msg


_VALID_REQUEST = cp.GenerationRequest(
    context_id="c1", transcript="Hello there. ", model_id="sonic-3", voice_id="v1", continue_=True,
    language="en", add_timestamps=True, max_buffer_delay_ms=0, generation_config={"speed": 1.0, "emotion": "calm"},
).to_wire()


def _client_ok(value: Any) -> None:
    try:
        msg = cp.parse_client_message(value)
    except cp.RequestError as exc:
        assert 400 <= exc.status_code < 500
        return
    assert isinstance(msg, (cp.GenerationRequest, cp.CancelRequest))


@FUZZ
@given(json_values())
def test_cartesia_client_parser_survives_any_json(value: Any) -> None:
    _client_ok(value)


@settings(FUZZ, max_examples=250)
@given(mutations(_VALID_REQUEST))
@example({**_VALID_REQUEST, "speed": []})  # was: TypeError (unhashable) instead of a 400
@example({**_VALID_REQUEST, "output_format": {"container": "raw", "encoding": {}, "sample_rate": 8000}})
@example({**_VALID_REQUEST, "output_format": {"container": [], "encoding": "pcm_mulaw", "sample_rate": 8000}})
def test_cartesia_client_parser_survives_mutated_requests(obj: dict[str, Any]) -> None:
    _client_ok(obj)


@settings(FUZZ, max_examples=150)
@given(mutations(_VALID_REQUEST))
def test_cartesia_http_request_parser_survives_mutations(obj: dict[str, Any]) -> None:
    try:
        cp.parse_http_tts_request(obj)
    except cp.RequestError as exc:
        assert 400 <= exc.status_code < 500


@st.composite
def generation_requests(draw: st.DrawFn) -> cp.GenerationRequest:
    config: dict[str, Any] | None = draw(st.none() | st.fixed_dictionaries(
        {}, optional={"speed": st.floats(*cp.SPEED_RANGE), "volume": st.floats(*cp.VOLUME_RANGE),
                      "emotion": json_text}))
    return cp.GenerationRequest(
        context_id=draw(ctx_ids), transcript=draw(json_text), model_id=draw(json_text.filter(bool)),
        voice_id=draw(json_text.filter(bool)),
        output_format=cp.OutputFormat(draw(st.sampled_from(sorted(cp.BYTES_PER_SAMPLE))),
                                      draw(st.sampled_from(cp.SAMPLE_RATES))),
        continue_=draw(st.booleans()), flush=draw(st.booleans()),
        language=draw(st.none() | st.sampled_from(sorted(cp.LANGUAGES))),
        add_timestamps=draw(st.booleans()), add_phoneme_timestamps=draw(st.booleans()),
        use_normalized_timestamps=draw(st.none() | st.booleans()),
        max_buffer_delay_ms=draw(st.none() | st.integers(*cp.MAX_BUFFER_DELAY_RANGE_MS)),
        generation_config=config or None,
        speed=draw(st.none() | st.sampled_from(sorted(cp.LEGACY_SPEEDS))),
        pronunciation_dict_id=draw(st.none() | json_text),
        duration=draw(st.none() | st.floats(0, 600)),
    )


@FUZZ
@given(generation_requests())
def test_cartesia_generation_requests_round_trip(req: cp.GenerationRequest) -> None:
    assert cp.parse_client_message(orjson.loads(_json(req.to_wire()))) == req
    cancel = cp.CancelRequest(req.context_id)
    assert cp.parse_client_message(cancel.to_wire()) == cancel


@FUZZ
@given(generation_requests(), json_text, st.booleans(), st.booleans())
def test_merged_continuations_keep_the_text(first: cp.GenerationRequest, text: str, cont: bool, flush: bool) -> None:
    then = replace(first, transcript=text, continue_=cont, flush=flush)
    merged = cp.merge_continuation(first, then)
    if first.continue_ and not first.flush:
        assert merged is not None
        assert (merged.transcript, merged.continue_, merged.flush) == (first.transcript + text, cont, flush)
    else:
        assert merged is None


# --------------------------------------------------------------------------- agent protocol


def _agent_ok(data: str | bytes | dict[str, Any]) -> None:
    try:
        msg = ap.parse_agent_message(data)
    except ap.AgentMessageError:
        return
    assert isinstance(msg, (ap.Text, ap.Interrupt, ap.End, ap.ConfigUpdate))


@FUZZ
@given(raw_inputs)
def test_agent_parser_survives_any_bytes(data: str | bytes) -> None:
    _agent_ok(data)


@FUZZ
@given(json_values())
def test_agent_parser_survives_any_json(value: Any) -> None:
    _agent_ok(_json(value))
    if isinstance(value, dict):
        _agent_ok(value)  # the built-in agent hands over dicts


_VALID_AGENT = [
    {"type": "text", "token": "Hello ", "last": False, "interruptible": True, "voice": "v", "language": "en",
     "speed": 1.1, "emotion": "calm"},
    {"type": "interrupt"},
    {"type": "end", "handoffData": {"to": "queue"}},
    {"type": "config", "voice": "v", "language": "fr", "speed": 0.8, "emotion": "x", "media": True, "vad": False},
]


@settings(FUZZ, max_examples=150)
@given(mutations_of(_VALID_AGENT))
def test_agent_parser_survives_mutated_valid_messages(obj: dict[str, Any]) -> None:
    _agent_ok(_json(obj))


overrides = st.builds(
    ap.VoiceOverrides,
    voice=st.none() | json_text.filter(bool),
    language=st.none() | st.sampled_from(sorted(cp.LANGUAGES)),
    speed=st.none() | st.floats(*cp.SPEED_RANGE),
    emotion=st.none() | json_text,
)


def _wire_overrides(ov: ap.VoiceOverrides) -> dict[str, Any]:
    return {k: v for k, v in (("voice", ov.voice), ("language", ov.language), ("speed", ov.speed),
                              ("emotion", ov.emotion)) if v is not None}


@FUZZ
@given(json_text, st.booleans(), st.none() | st.booleans(), overrides, st.none() | st.booleans(),
       st.none() | st.booleans(), json_values(6))
def test_agent_messages_round_trip(token: str, last: bool, interruptible: bool | None, ov: ap.VoiceOverrides,
                                   media: bool | None, vad: bool | None, handoff: Any) -> None:
    text: dict[str, Any] = {"type": "text", "token": token, "last": last, **_wire_overrides(ov)}
    if interruptible is not None:
        text["interruptible"] = interruptible
    mode = None if interruptible is None else ap.interrupt_mode(interruptible)
    assert ap.parse_agent_message(_json(text)) == ap.Text(token, last, mode, ov)
    config: dict[str, Any] = {"type": "config", **_wire_overrides(ov)}
    config.update({k: v for k, v in (("media", media), ("vad", vad)) if v is not None})
    assert ap.parse_agent_message(_json(config)) == ap.ConfigUpdate(ov, media, vad)
    assert ap.parse_agent_message(_json({"type": "end", "handoffData": handoff})) == ap.End(handoff)
    # What the bridge sends the agent always encodes.
    for msg in (ap.interrupt_message(token, 5, "u1"), ap.spoken_message(token, 5, "u1", complete=last),
                ap.error_message(token), ap.dtmf_message("5"), ap.media_message("/w==", 20)):
        assert orjson.loads(_json(msg)) == msg


# --------------------------------------------------------------------------- Cartesia STT


def _stt_ok(data: str | bytes) -> None:
    try:
        sp.parse_stt_server_message(data)
    except sp.SttProtocolError:
        pass


@FUZZ
@given(raw_inputs | json_values().map(_json))
def test_stt_server_parser_survives_anything(data: str | bytes) -> None:
    _stt_ok(data)


_VALID_STT = [orjson.loads(sp.encode_stt_server_message(m)) for m in (
    sp.SttTranscript(True, "hi there", (sp.SttWord("hi", 0.0, 0.2), sp.SttWord("there", 0.2, 0.5)), 0.5, "en", "r"),
    sp.SttFlushDone("r"), sp.SttDone("r"), sp.SttError("bad", "Bad", 400, "invalid", "https://d", "r"),
    sp.SttTurnEvent("turn.update", "hi", "r", {"turn_id": 3}))]


@settings(FUZZ, max_examples=150)
@given(mutations_of(_VALID_STT))
def test_stt_server_parser_survives_mutated_valid_messages(obj: dict[str, Any]) -> None:
    _stt_ok(_json(obj))


millis = st.integers(0, 10_000_000).map(lambda n: n / 1000)  # the encoder rounds times to 1 ms


@st.composite
def stt_messages(draw: st.DrawFn) -> sp.SttServerMessage:
    rid = draw(json_text)
    kind = draw(st.sampled_from(["transcript", "flush", "done", "error", "turn"]))
    if kind == "transcript":
        words = tuple(draw(st.lists(st.builds(sp.SttWord, json_text, millis, millis), max_size=4)))
        return sp.SttTranscript(draw(st.booleans()), draw(json_text), words, draw(st.none() | millis),
                                draw(st.none() | json_text), rid)
    if kind == "flush":
        return sp.SttFlushDone(rid)
    if kind == "done":
        return sp.SttDone(rid)
    if kind == "error":
        return sp.SttError(draw(json_text), draw(json_text), draw(st.integers(100, 599)), draw(st.none() | json_text),
                           draw(st.none() | json_text), rid)
    event = draw(st.sampled_from(sorted(sp.TURN_EVENTS)))
    extra = draw(st.dictionaries(json_text.filter(lambda k: k not in ("type", "transcript", "request_id")),
                                 json_values(4), max_size=3))
    return sp.SttTurnEvent(event, "" if event == "connected" else draw(json_text), rid, extra)


@FUZZ
@given(stt_messages())
def test_stt_server_messages_round_trip(msg: sp.SttServerMessage) -> None:
    assert sp.parse_stt_server_message(sp.encode_stt_server_message(msg)) == msg


@FUZZ
@given(st.builds(
    sp.SttParams,
    model=st.sampled_from(sorted(sp.STT_MODELS)),
    language=st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=16),
    encoding=st.sampled_from(sorted(sp.STT_ENCODINGS)),
    sample_rate=st.integers(4000, 192000),
    max_silence_duration_secs=st.none() | st.floats(0, 60),
    min_volume=st.none() | st.floats(0, 1),
    keyterms=st.lists(json_text.filter(bool), max_size=5).map(tuple),
))
def test_stt_params_round_trip_through_the_query_string(params: sp.SttParams) -> None:
    pairs = parse_qsl(params.query(), keep_blank_values=True)
    query = {k: v for k, v in pairs if k != "keyterm"}
    keyterms = [v for k, v in pairs if k == "keyterm"]
    assert sp.parse_stt_params(query, keyterms) == params


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "language", "encoding", "sample_rate", "min_volume",
                                        "max_silence_duration_secs", "x"]), json_text, max_size=7),
       st.lists(json_text, max_size=3), st.booleans())
def test_stt_params_parser_survives_any_query(query: dict[str, str], keyterms: list[str], turns: bool) -> None:
    try:
        sp.parse_stt_params(query, keyterms, turns=turns)
    except sp.SttProtocolError as exc:
        assert exc.field in {"model", "language", "encoding", "sample_rate", "min_volume",
                             "max_silence_duration_secs", "keyterm"}


@FUZZ
@given(st.text(max_size=60))
def test_stt_client_text_is_a_command_or_an_error(text: str) -> None:
    try:
        assert sp.parse_stt_client_text(text) in (sp.FINALIZE, sp.CLOSE)
    except sp.SttProtocolError as exc:
        assert exc.field == "command"


@pytest.mark.parametrize("command", [sp.FINALIZE, sp.CLOSE])
def test_stt_client_commands_parse_back(command: str) -> None:
    assert sp.parse_stt_client_text(command) == command
