"""ConversationRelay semantics in the call state machine, without sockets: greeting, prompts
from STT, STT barge-in, interrupt modes, preemption, bridge-made audio, info events."""

from __future__ import annotations

import itertools

from bridge.agent.relay_settings import RelaySettings
from bridge.call import (
    CallCore,
    CallSettings,
    CancelCartesia,
    FetchPlay,
    PlayDigits,
    SttFinalize,
    SttReconfigure,
)
from bridge.cartesia.protocol import Done
from bridge.cartesia.stt_protocol import SttFlushDone, SttTranscript
from metrics import BridgeMetrics
from telephony.media import Start
from telephony.simulator import SILENCE_FRAME, SPEECH_FRAME

from .test_call_core import agent, feed, twilio


def make_core(relay: RelaySettings | None = None, *, stt: bool = True) -> tuple[CallCore, list[object]]:
    settings = CallSettings(model_id="sonic-3", voice_id="v", language="en", relay=relay or RelaySettings(),
                            stt_enabled=stt, vad_enabled=True, vad_min_speech_ms=60)
    counter = itertools.count(1)
    core = CallCore(settings, BridgeMetrics(), new_id=lambda: f"u{next(counter)}")
    first = core.on_start(Start("MZ1", "CA1", "AC1", {"callReference": "r1", "agentUrl": "ws://x"}, ["inbound"],
                                "audio/x-mulaw", 8000, 1), 0.0)
    core.stt_connected = stt
    return core, first


def speak_audio(core: CallCore, text: str, ms: int, **kw: object) -> str:
    core.speak(text, last=True, now=0.0, **kw)  # type: ignore[arg-type]
    utt = list(core.utterances)[-1]
    feed(core, utt, ms * 8)
    return utt


def test_setup_and_welcome_greeting() -> None:
    core, first = make_core(RelaySettings(welcome_greeting="Hi there.", welcome_greeting_interruptible="none"))
    setup = agent(first)[0]
    assert setup["type"] == "setup" and setup["customParameters"] == {"callReference": "r1"}
    assert setup["sessionId"].startswith("VX") and setup["callStatus"] == "IN-PROGRESS"
    utt = next(iter(core.utterances.values()))
    assert utt.interruptible == "none" and utt.text_sent == "Hi there."


def test_silence_after_speech_finalizes_and_the_turn_becomes_a_prompt() -> None:
    core, _ = make_core(RelaySettings(speech_timeout_ms=200, tts_language="es-MX", transcription_language="es-MX"))
    out: list[object] = []
    now = 0.0
    for frame in [SPEECH_FRAME] * 10 + [SILENCE_FRAME] * 12:
        out += core.on_media(frame, 0, now)
        now += 0.02
    assert sum(isinstance(a, SttFinalize) for a in out) == 1
    core.on_stt(SttTranscript(True, " hola que tal"), now)
    prompt = agent(core.on_stt(SttFlushDone(), now + 0.1))
    assert prompt == [{"type": "prompt", "voicePrompt": "hola que tal", "lang": "es-MX", "last": True}]
    assert core.language == "es"


def test_stt_words_barge_in_but_energy_alone_does_not_while_stt_is_up() -> None:
    core, _ = make_core()
    speak_audio(core, "a long answer", 1000)
    noise = [a for i in range(10) for a in core.on_media(SPEECH_FRAME, 0, 0.1 + i * 0.02)]
    assert not any(isinstance(a, CancelCartesia) for a in noise), "a cough is not a word"
    cut = core.on_stt(SttTranscript(False, "wait"), 0.4)
    assert twilio(cut)[0]["event"] == "clear" and agent(cut)[-1]["type"] == "interrupt"
    # With STT down the energy VAD is the fallback.
    core2, _ = make_core()
    core2.stt_connected = False
    speak_audio(core2, "a long answer", 1000)
    fired = [a for i in range(10) for a in core2.on_media(SPEECH_FRAME, 0, 0.1 + i * 0.02)]
    assert any(isinstance(a, CancelCartesia) for a in fired)


def test_interrupt_modes_decide_what_may_cut() -> None:
    core, _ = make_core()
    speak_audio(core, "press a key", 1000, interruptible="dtmf")
    assert not any(isinstance(a, CancelCartesia) for a in core.on_stt(SttTranscript(False, "hello"), 0.2)), \
        "speech does not cut interruptible=dtmf"
    cut = core.on_dtmf("5", 0.3)
    assert twilio(cut)[0]["event"] == "clear" and agent(cut)[-1] == {"type": "dtmf", "digit": "5"}
    core2, _ = make_core()
    speak_audio(core2, "legal notice", 1000, interruptible="none")
    assert agent(core2.on_dtmf("1", 0.2)) == [], "input during speech it cannot cut is not reported by default"
    core3, _ = make_core(RelaySettings(report_input_during_agent_speech=True))
    speak_audio(core3, "legal notice", 1000, interruptible="none")
    assert agent(core3.on_dtmf("1", 0.2)) == [{"type": "dtmf", "digit": "1"}]
    core4, _ = make_core(RelaySettings(dtmf_detection=False))
    assert core4.on_dtmf("7", 0.0) == []


def test_preemptible_speech_is_cut_by_the_next_utterance_without_interrupt() -> None:
    core, _ = make_core()
    speak_audio(core, "hold music words", 1000, preemptible=True)
    out = core.speak("Your agent is here.", last=True, now=0.5)
    assert twilio(out)[0]["event"] == "clear"
    assert [a.context_id for a in out if isinstance(a, CancelCartesia)] == ["u1"]
    assert not any(m.get("type") == "interrupt" for m in agent(out))
    assert [u.text_sent for u in core.utterances.values()] == ["Your agent is here."]


def test_play_digits_language_and_hints_are_actions_for_the_io_layer() -> None:
    core, _ = make_core()
    play = core.on_agent_message({"type": "play", "source": "https://cdn.example.com/a.wav", "loop": 0}, 0.0)
    assert play == [FetchPlay("https://cdn.example.com/a.wav", 0, "any", False)]
    assert core.on_agent_message({"type": "sendDigits", "digits": "1w2"}, 0.0) == [PlayDigits("1w2")]
    assert core.on_agent_message({"type": "hints", "hints": "Cartesia"}, 0.0) == [SttReconfigure("en", ("Cartesia",))]
    assert core.on_agent_message({"type": "language", "transcriptionLanguage": "fr-CA"}, 0.0) == [
        SttReconfigure("fr", ("Cartesia",))]
    # Bridge-made audio plays as an utterance of its own, bounded by the playout buffer.
    out = core.play_audio(b"\x55" * 1600, 0.0, loop=0)
    assert twilio(out)[0]["event"] == "media"
    utt = next(iter(core.utterances.values()))
    assert utt.audio_only and utt.audio_bytes == core.settings.max_buffer_ms * 8


def _speak_and_hear_all(core: CallCore) -> list[dict[str, object]]:
    """Speak a short utterance, deliver its audio and done, echo every mark: what the agent got."""
    core.speak("one two", last=True, now=0.0)
    utt = list(core.utterances)[-1]
    messages = agent(feed(core, utt, 800))
    messages += agent(core.on_cartesia(utt, Done(utt), 0.0))
    for _ in range(20):
        names = list(core.playout._marks)  # noqa: SLF001 - echo what is outstanding: all played
        if not names:
            break
        for name in names:
            messages += agent(core.on_mark(name, 1.0))
    assert utt not in core.utterances, "the utterance finished playing"
    return messages


def test_info_events_only_when_asked_for() -> None:
    core, _ = make_core(RelaySettings(events=frozenset({"agentSpeaking", "tokensPlayed"})))
    infos = [(m["name"], m["value"]) for m in _speak_and_hear_all(core) if m["type"] == "info"]
    assert infos == [("agentSpeaking", "on"), ("tokensPlayed", "one two"), ("agentSpeaking", "off")]
    quiet, _ = make_core()
    assert not any(m["type"] == "info" for m in _speak_and_hear_all(quiet))
