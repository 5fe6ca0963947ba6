"""ConversationRelay agent protocol, settings and turn tracking (sans-I/O)."""

from __future__ import annotations

import audioop
import math

import pytest

from bridge.agent import protocol as p
from bridge.agent.relay_settings import RelaySettings, RelaySettingsError
from bridge.cartesia.stt_protocol import SttTranscript
from bridge.hearing import FinalizeDue, PartialText, SpeechStarted, TurnComplete, TurnTracker


def test_text_accepts_every_conversationrelay_field() -> None:
    msg = p.parse_agent_message('{"type":"text","token":"Hola","last":true,"interruptible":"dtmf",'
                                '"preemptible":true,"lang":"es-MX"}')
    assert msg == p.Text("Hola", True, "dtmf", p.VoiceOverrides(language="es"), True)
    assert p.parse_agent_message({"type": "text", "token": "x", "interruptible": False}).interruptible == "none"  # type: ignore[union-attr]
    assert p.parse_agent_message({"type": "text", "token": "x", "interruptible": True}).interruptible == "any"  # type: ignore[union-attr]


@pytest.mark.parametrize(("message", "needle"), [
    ({"type": "text", "token": 5}, "token"),
    ({"type": "text", "token": "x", "interruptible": "sometimes"}, "interruptible"),
    ({"type": "text", "token": "x", "lang": "xx-YY"}, "xx-YY"),
    ({"type": "play", "source": "ftp://x"}, "source"),
    ({"type": "play", "source": "https://a/b.wav", "loop": -1}, "loop"),
    ({"type": "sendDigits", "digits": "12x"}, "digits"),
    ({"type": "language"}, "ttsLanguage"),
    ({"type": "language", "ttsLanguage": "klingon"}, "klingon"),
    ({"type": "config", "interruptSensitivity": "extreme"}, "interruptSensitivity"),
    ({"type": "hints", "hints": 3}, "hints"),
    ({"type": "dance"}, "dance"),
])
def test_bad_fields_are_named(message: dict[str, object], needle: str) -> None:
    with pytest.raises(p.AgentMessageError, match=needle):
        p.parse_agent_message(message)


def test_play_send_digits_language_end() -> None:
    assert p.parse_agent_message({"type": "play", "source": "https://cdn.example.com/a.wav", "loop": 2,
                                  "interruptible": "none", "preemptible": True}) == p.Play(
        "https://cdn.example.com/a.wav", 2, "none", True)
    assert p.parse_agent_message({"type": "sendDigits", "digits": "12w#"}) == p.SendDigits("12w#")
    assert p.parse_agent_message({"type": "language", "ttsLanguage": "es-MX", "transcriptionLanguage": "fr-FR"}) == (
        p.Language("es", "fr", "es-MX", "fr-FR"))
    assert p.parse_agent_message({"type": "end", "handoffData": '{"to":"sales"}'}) == p.End('{"to":"sales"}')
    hints = p.parse_agent_message({"type": "hints", "hints": "Cartesia, Twilio"})
    assert isinstance(hints, p.ConfigUpdate) and hints.hints == ("Cartesia", "Twilio")


def test_bridge_messages_have_conversationrelay_shapes() -> None:
    setup = p.setup_message(session_id="VX1", call_sid="CA1", stream_sid="MZ1", account_sid="AC1", from_="+1",
                            to="+2", direction="inbound", custom_parameters={"a": "b"})
    for name in ("sessionId", "accountSid", "parentCallSid", "callSid", "from", "to", "forwardedFrom", "callType",
                 "callerName", "direction", "callStatus", "customParameters"):
        assert name in setup
    assert p.prompt_message("hi there", "en-US", last=False) == {
        "type": "prompt", "voicePrompt": "hi there", "lang": "en-US", "last": False}
    assert p.info_message("agentSpeaking", "on", 5) == {"type": "info", "name": "agentSpeaking", "value": "on", "ts": 5}


def test_relay_settings_from_strings() -> None:
    s = RelaySettings().merged({"welcomeGreeting": "Hi!", "welcomeGreetingInterruptible": "false",
                                "interruptible": "speech", "interruptSensitivity": "low", "dtmfDetection": "false",
                                "partialPrompts": "true", "language": "es-MX", "events": "agentSpeaking,tokensPlayed",
                                "speechTimeout": "800", "hints": "a,b", "unrelated": "x"})
    assert (s.welcome_greeting, s.welcome_greeting_interruptible, s.interruptible) == ("Hi!", "none", "speech")
    assert s.cartesia_tts_language == "es" and s.transcription_language == "es-MX"
    assert not s.dtmf_detection and s.partial_prompts and s.speech_timeout_ms == 800
    assert s.events == frozenset({"agentSpeaking", "tokensPlayed"}) and s.hints == ("a", "b")
    for bad in ({"interruptible": "maybe"}, {"speechTimeout": "5"}, {"events": "everything"},
                {"dtmfDetection": "perhaps"}, {"ttsLanguage": "zz"}):
        with pytest.raises(RelaySettingsError, match=next(iter(bad))):
            RelaySettings().merged(bad)


def _tone(ms: int, amplitude: int = 8000) -> bytes:
    pcm = b"".join(int(amplitude * math.sin(2 * math.pi * 440 * i / 8000)).to_bytes(2, "little", signed=True)
                   for i in range(ms * 8))
    return audioop.lin2ulaw(pcm, 2)


def _frames(audio: bytes) -> list[bytes]:
    return [audio[i:i + 160] for i in range(0, len(audio), 160)]


def test_turn_tracker_endpoints_on_silence_and_commits_on_flush_done() -> None:
    t = TurnTracker(speech_timeout_ms=400, threshold_rms=1200, min_speech_ms=100)
    now, events = 0.0, []
    for frame in _frames(_tone(300)) + _frames(b"\xff" * 8 * 500):
        events += t.on_audio(frame, now)
        now += 0.02
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStarted, FinalizeDue]
    assert isinstance(events[1], FinalizeDue) and abs(events[1].end_of_speech - 0.3) < 0.021
    assert t.on_transcript(SttTranscript(False, "hel"), now, partials=True) == [PartialText("hel")]
    t.on_transcript(SttTranscript(True, " hello"), now, partials=False)
    t.on_transcript(SttTranscript(True, " world"), now, partials=False)
    assert t.on_flush_done(now) == [TurnComplete("hello world", events[1].end_of_speech)]
    assert t.on_flush_done(now) == []  # nothing outstanding


def test_turn_tracker_ignores_blips_and_hears_quiet_callers_through_stt() -> None:
    t = TurnTracker(speech_timeout_ms=400, threshold_rms=1200, min_speech_ms=100)
    now, events = 0.0, []
    for frame in _frames(_tone(60)) + _frames(b"\xff" * 8 * 1000):
        events += t.on_audio(frame, now)
        now += 0.02
    assert events == []
    out = t.on_transcript(SttTranscript(True, "yes"), now, partials=False)
    assert [type(e) for e in out] == [SpeechStarted, FinalizeDue]
    done = t.on_flush_done(now)
    assert len(done) == 1 and isinstance(done[0], TurnComplete) and done[0].text == "yes"
