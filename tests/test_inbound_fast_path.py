"""The inbound fast path (``telephony.media.InboundFastPath``) agrees with ``parse_inbound``.

Whatever the text, the fast path either declines it (``None``) or returns
exactly what ``parse_inbound`` makes of it; and Twilio's own messages are the
ones it does not decline (or it would save nothing).
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telephony import media as tm
from tests.fuzz_strategies import FUZZ, text_edits

SID = "MZ0123456789abcdef0123456789abcdef"
FRAME = bytes(range(160))


def twilio_media(payload: bytes = FRAME, *, seq: str = "7", chunk: str = "5", timestamp: str = "100",
                 sid: str = SID, track: str = "inbound") -> str:
    b64 = base64.b64encode(payload).decode()
    return ('{"event":"media","sequenceNumber":"' + seq + '","media":{"track":"' + track + '","chunk":"' + chunk
            + '","timestamp":"' + timestamp + '","payload":"' + b64 + '"},"streamSid":"' + sid + '"}')


def twilio_mark(name: str = "m12", *, seq: str = "9", sid: str = SID) -> str:
    return '{"event":"mark","sequenceNumber":"' + seq + '","streamSid":"' + sid + '","mark":{"name":"' + name + '"}}'


def agrees(fast: tm.InboundFastPath, text: str) -> str:
    """Assert the fast path and ``parse_inbound`` agree on ``text``; say which way it went."""
    try:
        general: tm.InboundEvent | tm.MediaError = tm.parse_inbound(text)
    except tm.MediaError as exc:
        general = exc
    media = fast.media(text)
    mark = fast.mark(text)
    assert media is None or mark is None
    if media is not None:
        assert isinstance(general, tm.Media), (text, general)
        assert (general.stream_sid, general.track, general.payload, general.timestamp_ms) == (
            fast.stream_sid, "inbound", media[0], media[1])
        return "media"
    if mark is not None:
        assert general == tm.MarkEcho(fast.stream_sid, mark), (text, general)
        return "mark"
    return "declined"


def test_twilio_messages_take_the_fast_path() -> None:
    fast = tm.InboundFastPath(SID)
    factory = tm.TwilioMessageFactory(SID, "CA1", "AC1")
    factory.start()
    for k in range(3):
        text = factory.media(FRAME, 20 * (k + 1))
        assert fast.media(text) == (FRAME, 20 * (k + 1))
        assert agrees(fast, text) == "media"
    assert fast.mark(factory.mark("m42")) == "m42"
    assert agrees(fast, twilio_mark("m42")) == "mark"
    assert agrees(fast, twilio_media(b"")) == "media"  # an empty payload is valid for both


#: Valid messages the fast path leaves to the parser, and broken ones either must refuse alike.
CORPUS = [
    twilio_media(sid="MZother"),  # another stream: the session reports it, via the parser
    twilio_media(track="outbound"),
    twilio_media(seq=""), twilio_media(chunk=""), twilio_media(timestamp=""),
    twilio_media(chunk="x"), twilio_media(timestamp="1.5"), twilio_media(timestamp="-1"),
    twilio_media(timestamp=" 1"), twilio_media(timestamp="1_0"), twilio_media(timestamp="²"),
    twilio_media(timestamp="٣"), twilio_media(chunk="9" * 5000), twilio_media(timestamp="9" * 19),
    twilio_media(seq='1","x":"2'),
    twilio_media().replace(base64.b64encode(FRAME).decode(), "AAA"),  # bad padding
    twilio_media().replace(base64.b64encode(FRAME).decode(), "AA==AA=="),
    twilio_media().replace(base64.b64encode(FRAME).decode(), "AA\\u0041A"),  # an escape in the payload
    twilio_media().replace(base64.b64encode(FRAME).decode(), 'AAAA","x":"1'),
    twilio_media().replace('"payload":"' + base64.b64encode(FRAME).decode() + '"', '"payload":'),
    twilio_media().replace('"payload":"' + base64.b64encode(FRAME).decode() + '"', '"payload":"'),
    twilio_media()[:-1], twilio_media() + " ", " " + twilio_media(), twilio_media() + "}",
    twilio_media().replace('"media":{', '"media": {'),
    twilio_media().replace("},", ',"track":"outbound"},'),  # a duplicate key: the last one counts
    twilio_media().replace(SID, SID.replace("MZ", "M\\u005a")),
    twilio_media(b"\xff" * 70_000),  # oversized
    twilio_mark(""), twilio_mark("a b"), twilio_mark("m1\\u0031"), twilio_mark('m1","x":"2'),
    twilio_mark("é"), twilio_mark("m1", seq=""), twilio_mark("m1", seq="x"), twilio_mark("m1", sid="MZother"),
    twilio_mark()[:-1], twilio_mark() + "}", twilio_mark().replace('"}}', '"} }'),
    '{"event":"mark","sequenceNumber":"9","streamSid":"' + SID + '","mark":{"name":"}}',
    '{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"1","payload":"},'
    '"streamSid":"' + SID + '"}',
    "", "{}", "[]", "null", '{"event":"media"}', '{"event":"mark"}',
]


@pytest.mark.parametrize("text", CORPUS)
def test_fast_path_and_parser_agree_on_the_corpus(text: str) -> None:
    agrees(tm.InboundFastPath(SID), text)


def test_fast_path_declines_what_it_cannot_vouch_for() -> None:
    fast = tm.InboundFastPath(SID)
    outcomes = [agrees(fast, text) for text in CORPUS]
    assert outcomes.count("declined") == len(CORPUS)


def edited() -> st.SearchStrategy[str]:
    """A Twilio media or mark message with a few characters replaced, inserted or deleted."""
    return text_edits([twilio_media(), twilio_media(b""), twilio_media(FRAME[:3]), twilio_mark()],
                      list('"\\{}:,0123456789AZaz+/= \x00é²-.') + ["\\u0041", "MZ", '","'])


@settings(FUZZ, max_examples=400)
@given(edited())
def test_fast_path_and_parser_agree_on_edited_messages(text: str) -> None:
    agrees(tm.InboundFastPath(SID), text)


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 10**18 - 1), st.integers(0, 10**18 - 1),
       st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=30))
def test_fast_path_reads_every_valid_media_and_mark(payload: bytes, timestamp: int, seq: int, name: str) -> None:
    fast = tm.InboundFastPath(SID)
    text = twilio_media(payload, seq=str(seq), timestamp=str(timestamp))
    assert fast.media(text) == (payload, timestamp)
    assert agrees(fast, text) == "media"
    assert agrees(fast, twilio_mark(name, seq=str(seq))) == ("mark" if name.isalnum() else "declined")
