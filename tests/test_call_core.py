"""The call state machine without sockets: text streaming, barge-in, words heard."""

from __future__ import annotations

import base64
import itertools

import orjson

from bridge.call import (
    START_RELEASE_BYTES,
    CallCore,
    CallSettings,
    CancelCartesia,
    ToAgent,
    ToCartesia,
    ToTwilio,
    heard_words,
)
from bridge.cartesia.protocol import Chunk, Done, WordTimestamps
from metrics import BridgeMetrics
from telephony.media import Start
from telephony.simulator import SILENCE_FRAME, SPEECH_FRAME


def make_core(**overrides: object) -> CallCore:
    settings = CallSettings(model_id="sonic-3", voice_id="v", language="en", **overrides)  # type: ignore[arg-type]
    counter = itertools.count(1)
    core = CallCore(settings, BridgeMetrics(), new_id=lambda: f"u{next(counter)}")
    core.on_start(Start("MZ1", "CA1", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0)
    return core


def feed(core: CallCore, ctx: str, n_bytes: int, now: float = 0.0) -> list[object]:
    """Cartesia audio with a word timestamp covering it (audio is sent only once timestamped)."""
    out: list[object] = core.on_cartesia(ctx, WordTimestamps(ctx, ["w"], [0.0], [n_bytes / 8000]), now)
    return out + core.on_cartesia(ctx, Chunk(ctx, base64.b64encode(b"\x11" * n_bytes).decode()), now)


def cartesia_texts(actions: list[object]) -> list[tuple[str, bool]]:
    return [(a.request.transcript, a.request.continue_) for a in actions if isinstance(a, ToCartesia)]


def twilio(actions: list[object]) -> list[dict[str, object]]:
    return [orjson.loads(a.text) for a in actions if isinstance(a, ToTwilio)]


def agent(actions: list[object]) -> list[dict[str, object]]:
    return [a.message for a in actions if isinstance(a, ToAgent)]


def test_tokens_stream_into_one_context_at_word_boundaries() -> None:
    core = make_core()
    sent: list[tuple[str, bool]] = []
    for token in ["Hel", "lo wor", "ld, how ", "are", " you"]:
        sent += cartesia_texts(core.speak(token, last=False, now=0.0))
    sent += cartesia_texts(core.speak("?", last=True, now=0.0))
    assert sent == [("Hello ", True), ("world, how ", True), ("are ", True), ("you?", True), ("", False)]
    assert "".join(t for t, _ in sent) == "Hello world, how are you?"
    assert len(core.utterances) == 1


def speak_and_play(core: CallCore, words: list[tuple[str, float, float]], audio_ms: int) -> str:
    actions = core.speak(" ".join(w for w, _, _ in words), last=True, now=0.0)
    utt = next(a.context_id for a in actions if isinstance(a, ToCartesia))
    core.on_cartesia(utt, WordTimestamps(utt, [w for w, _, _ in words], [s for _, s, _ in words],
                                         [e for _, _, e in words]), 0.0)
    chunk = base64.b64encode(b"\x11" * (audio_ms * 8)).decode()
    core.on_cartesia(utt, Chunk(utt, chunk), 0.0)
    return utt


def test_barge_in_reports_exactly_the_words_played() -> None:
    core = make_core(lead_ms=300, mark_interval_ms=100)
    words = [("one", 0.0, 0.18), ("two", 0.2, 0.30), ("three", 0.32, 0.5)]
    utt = speak_and_play(core, words, 1000)
    # The first 300 ms went out with marks at 100/200/300 ms; the echo of the 200 ms mark
    # came at 0.2 s, so at 0.25 s the caller has heard 250 ms (Twilio plays in real time).
    assert core.playout.sent == 2400
    names = [n for n in core.playout._marks]  # noqa: SLF001
    core.on_mark(names[1], 0.2)
    actions = core.interrupt("agent", 0.25)
    kinds = [type(a).__name__ for a in actions]
    assert kinds[0] == "ToTwilio" and twilio(actions)[0]["event"] == "clear"
    assert kinds.index("CancelCartesia") > 0 and kinds[-1] == "ToAgent"
    assert agent(actions)[-1] == {"type": "interrupt", "utteranceUntilInterrupt": "one", "durationUntilInterruptMs": 250,
                                  "utteranceId": utt}
    # Late audio for the cancelled context is dropped and counted, never sent.
    late = core.on_cartesia(utt, Chunk(utt, base64.b64encode(b"\x22" * 160).decode()), 0.3)
    assert late == [] and core.late_chunks == 1


def test_heard_words_uses_end_times() -> None:
    words = [("a", 0.0, 0.1), ("b", 0.1, 0.25), ("c", 0.25, 0.4)]
    assert heard_words(words, 0) == ""
    assert heard_words(words, 250) == "a b"
    assert heard_words(words, 399) == "a b"
    assert heard_words(words, 400) == "a b c"


def test_vad_barges_in_only_on_interruptible_speech() -> None:
    core = make_core(vad_enabled=True, vad_min_speech_ms=60, vad_hangover_ms=100)
    core.speak("hold please", last=True, now=0.0, interruptible=False)
    utt = next(iter(core.utterances))
    feed(core, utt, 1600)
    for i in range(10):
        assert not any(isinstance(a, ToTwilio) for a in core.on_media(SPEECH_FRAME, i * 20, i * 0.02))
    core2 = make_core(vad_enabled=True, vad_min_speech_ms=60, vad_hangover_ms=100)
    core2.speak("talk to me", last=True, now=0.0)
    utt2 = next(iter(core2.utterances))
    feed(core2, utt2, 1600)
    assert core2.on_media(SILENCE_FRAME, 0, 0.0) == []
    fired = []
    for i in range(5):
        fired += core2.on_media(SPEECH_FRAME, i * 20, 1.0 + i * 0.02)
    assert twilio(fired)[0]["event"] == "clear"
    assert any(isinstance(a, CancelCartesia) for a in fired)
    h = core2.metrics.barge_in_latency.collect()[0]
    count = next(s.value for s in h.samples if s.name.endswith("_count"))
    assert count == 1


def test_tokens_of_an_interrupted_turn_are_dropped_until_last() -> None:
    core = make_core()
    core.speak("first part ", last=False, now=0.0)
    utt = next(iter(core.utterances))
    feed(core, utt, 800)
    core.interrupt("agent", 0.1)
    assert core.speak("more of the old turn ", last=False, now=0.2) == []
    assert core.speak("end.", last=True, now=0.2) == []
    fresh = cartesia_texts(core.speak("New turn.", last=True, now=0.3))
    assert fresh == [("New turn.", True), ("", False)]


def test_spoken_is_sent_when_the_end_mark_is_echoed() -> None:
    core = make_core()
    core.speak("all of it", last=True, now=0.0)
    utt = next(iter(core.utterances))
    feed(core, utt, 800)
    core.on_cartesia(utt, Done(utt), 0.0)
    names = list(core.playout._marks)  # noqa: SLF001
    out = []
    for n in names:
        out += core.on_mark(n, 0.2)
    assert agent(out) == [{"type": "spoken", "text": "all of it", "durationMs": 100, "utteranceId": utt,
                           "complete": True}]
    assert core.utterances == {}


def test_audio_waits_for_its_word_timestamps_unless_none_come() -> None:
    core = make_core()
    core.speak("hi", last=False, now=0.0)
    ctx = next(iter(core.utterances))
    chunk = base64.b64encode(b"\x11" * 800).decode()
    first = [m for m in twilio(core.on_cartesia(ctx, Chunk(ctx, chunk), 0.0)) if m["event"] == "media"]
    # Only the start cushion goes before Cartesia says which word the audio is; the rest waits.
    assert sum(len(base64.b64decode(m["media"]["payload"])) for m in first) == START_RELEASE_BYTES
    out = core.on_cartesia(ctx, WordTimestamps(ctx, ["hi"], [0.0], [0.1]), 0.0)
    rest = [m for m in twilio(out) if m["event"] == "media"]
    assert sum(len(base64.b64decode(m["media"]["payload"])) for m in rest) == 800 - START_RELEASE_BYTES
    # A context that sends no timestamps at all is not held for more than 500 ms of audio.
    core2 = make_core()
    core2.speak("hi", last=False, now=0.0)
    ctx2 = next(iter(core2.utterances))
    sent = []
    for _ in range(6):
        sent += twilio(core2.on_cartesia(ctx2, Chunk(ctx2, chunk), 0.0))
    assert any(m["event"] == "media" for m in sent)


def test_resume_after_socket_loss_sends_only_unheard_words() -> None:
    core = make_core(lead_ms=300, mark_interval_ms=100)
    first = cartesia_texts(core.speak("alpha beta gamma delta", last=True, now=0.0))
    assert first[0] == ("alpha beta gamma delta", True)
    ctx = next(iter(core.contexts))
    words = WordTimestamps(ctx, ["alpha", "beta", "gamma"], [0.0, 0.1, 0.2], [0.09, 0.19, 0.29])
    core.on_cartesia(ctx, words, 0.0)
    core.on_cartesia(ctx, Chunk(ctx, base64.b64encode(b"\x11" * 2000).decode()), 0.0)  # 250 ms: gamma half done
    out = core.on_context_lost(ctx, "socket closed", 0.1, retry=True)
    resent = cartesia_texts(out)
    assert resent == [("gamma delta", True), ("", False)], "gamma is re-made from its start, alpha/beta are not"
    new_ctx = next(iter(core.contexts))
    assert new_ctx != ctx
    utt = core.contexts[new_ctx]
    assert utt.word_offset_s == 0.2
    # 1920 bytes (12 whole frames) went to Twilio; 1600 is where gamma starts.
    assert utt.skip_bytes == 1920 - 1600, "the part of gamma already sent is not played twice"


def test_bad_agent_messages_get_an_error_back() -> None:
    core = make_core()
    for raw in ["{bad", '{"type":"dance"}', '{"type":"text","token":5}', '{"type":"config","speed":9}',
                '{"type":"text","token":"hi","language":["en"]}', '{"type":"config","language":{}}']:
        out = core.on_agent_message(raw, 0.0)
        assert agent(out)[0]["type"] == "error" and agent(out)[0]["description"]


def test_spoken_after_a_cartesia_error_reports_only_what_was_heard() -> None:
    from bridge.cartesia.protocol import ErrorMessage

    core = make_core()
    core.speak("one two three four", last=True, now=0.0)
    ctx = next(iter(core.contexts))
    core.on_cartesia(ctx, WordTimestamps(ctx, ["one", "two"], [0.0, 0.06], [0.05, 0.1]), 0.0)
    core.on_cartesia(ctx, Chunk(ctx, base64.b64encode(b"\x11" * 800).decode()), 0.0)
    core.on_cartesia(ctx, ErrorMessage(ctx, 500, "synthesis failed"), 0.0)
    out = []
    for name in list(core.playout._marks):  # noqa: SLF001
        out += core.on_mark(name, 0.5)
    spoken = [m for m in agent(out) if m["type"] == "spoken"]
    assert spoken and spoken[0]["text"] == "one two" and spoken[0]["complete"] is False


def test_vad_never_cuts_non_interruptible_speech_even_before_it_plays() -> None:
    core = make_core(vad_enabled=True, vad_min_speech_ms=60, vad_hangover_ms=100)
    core.speak("please hold", last=True, now=0.0, interruptible=False)
    fired = []
    for i in range(10):  # caller still talking while the agent's line is being generated
        fired += core.on_media(SPEECH_FRAME, i * 20, i * 0.02)
    assert not any(isinstance(a, ToTwilio) for a in fired)
    assert not any(isinstance(a, CancelCartesia) for a in fired)


def test_end_without_last_closes_the_open_utterance() -> None:
    core = make_core()
    core.speak("goodbye and ", last=False, now=0.0)
    out = core.on_agent_message('{"type":"end"}', 0.0)
    assert ("", False) in cartesia_texts(out), "the open context is closed so its audio can finish"


def test_congested_socket_resumes_after_a_backoff_with_the_text_that_came_meanwhile() -> None:
    from bridge.call import ResumeLater

    core = make_core()
    core.speak("alpha beta ", last=False, now=0.0)
    ctx = next(iter(core.contexts))
    core.on_cartesia(ctx, WordTimestamps(ctx, ["alpha"], [0.0], [0.1]), 0.0)
    core.on_cartesia(ctx, Chunk(ctx, base64.b64encode(b"\x11" * 800).decode()), 0.0)
    out = core.on_context_lost(ctx, "Cartesia send queue full", 0.1, retry=True, cause="congested")
    assert cartesia_texts(out) == [], "a congested socket gets no immediate retry"
    later = [a for a in out if isinstance(a, ResumeLater)]
    assert len(later) == 1 and later[0].delay_s > 0
    # Text streamed while the resume waits is held, not sent to the lost context.
    assert cartesia_texts(core.speak("gamma", last=True, now=0.15)) == []
    resent = cartesia_texts(core.resume(later[0].utterance_id, 0.4))
    assert resent == [("beta gamma", True), ("", False)], "only the words not yet received, once"
    assert ctx not in core.contexts and len(core.contexts) == 1
