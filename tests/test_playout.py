"""The playout state machine, without sockets: framing, padding, lead, marks, clear."""

from __future__ import annotations

import pytest

from bridge.playout import Playout, SendMark


def audio_of(items: list[object]) -> bytes:
    return b"".join(i for i in items if isinstance(i, bytes))


def marks_of(items: list[object]) -> list[str]:
    return [i.name for i in items if isinstance(i, SendMark)]


def test_frames_are_whole_and_last_frame_is_padded_with_mulaw_silence() -> None:
    p = Playout(lead_ms=10_000, mark_interval_ms=100)
    p.open("u1")
    data = bytes(range(256)) * 2  # 512 bytes: 3 whole frames + 32 bytes
    assert p.push("u1", data, 0.0)
    first = p.take(0.0)
    sent = audio_of(first)
    assert sent == data[:480], "the partial tail waits for more audio while the utterance is open"
    p.finish("u1")
    rest = audio_of(p.take(0.0))
    assert len(rest) == 160
    assert rest[:32] == data[480:]
    assert rest[32:] == b"\xff" * 128
    for item in first:
        if isinstance(item, bytes):
            assert len(item) % 160 == 0


def test_lead_limits_what_is_sent_until_marks_are_echoed() -> None:
    p = Playout(lead_ms=300, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x01" * 8000, 0.0)  # one second of audio
    items = p.take(0.0)
    assert len(audio_of(items)) == 2400  # exactly 300 ms
    assert p.sent - p.played == 2400
    assert p.take(0.0) == [], "nothing more until the caller has heard something"
    names = marks_of(items)
    assert len(names) == 3  # one mark per 100 ms
    result = p.on_mark(names[0], 0.1)
    assert result.status == "played"
    assert p.played == 800
    more = p.take(0.1)
    assert len(audio_of(more)) == 800  # the window moved by exactly what was heard
    assert p.sent - p.played <= p.lead_bytes


def test_media_messages_carry_at_most_max_message_ms() -> None:
    p = Playout(lead_ms=1000, mark_interval_ms=1000, max_message_ms=200)
    p.open("u1")
    p.push("u1", b"\x02" * 8000, 0.0)
    sizes = [len(i) for i in p.take(0.0) if isinstance(i, bytes)]
    assert sizes and max(sizes) <= 1600 and all(s % 160 == 0 for s in sizes)
    assert sum(sizes) == 8000


def test_echo_of_a_later_mark_confirms_earlier_ones() -> None:
    p = Playout(lead_ms=300, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x03" * 2400, 0.0)
    names = marks_of(p.take(0.0))
    assert p.on_mark(names[-1], 0.3).status == "played"
    assert p.played == p.sent
    assert p.outstanding_marks == 0


def test_utterance_end_mark_reports_completion_with_duration() -> None:
    p = Playout(lead_ms=1000, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x04" * 1000, 0.0)  # 125 ms -> 7 frames (1120 bytes) after padding
    p.finish("u1")
    names = marks_of(p.take(0.0))
    results = [p.on_mark(n, 1.0) for n in names]
    completed = [c for r in results for c in r.completed_utterances]
    assert completed == [("u1", 140)]
    assert p.is_idle


def test_utterances_play_in_order_even_when_audio_interleaves() -> None:
    p = Playout(lead_ms=10_000, mark_interval_ms=10_000)
    p.open("a")
    p.open("b")
    p.push("b", b"\xbb" * 320, 0.0)
    assert audio_of(p.take(0.0)) == b"", "b waits for a"
    p.push("a", b"\xaa" * 160, 0.0)
    assert audio_of(p.take(0.0)) == b"\xaa" * 160
    p.finish("a")
    assert audio_of(p.take(0.0)) == b"\xbb" * 320


def test_clear_cuts_everything_and_later_echoes_count_as_flushed() -> None:
    p = Playout(lead_ms=300, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x05" * 8000, 0.0)
    names = marks_of(p.take(0.0))
    p.on_mark(names[0], 0.1)  # 100 ms heard
    cleared = p.clear()
    assert cleared.cut_utterances == [("u1", 100)]
    assert cleared.dropped_bytes == 8000 - 2400
    assert p.sent == p.played
    assert [p.on_mark(n, 0.2).status for n in names[1:]] == ["flushed", "flushed"]
    assert p.played == 800, "a flushed echo never advances the played cursor"
    assert p.is_idle
    assert p.take(0.3) == []


def test_buffer_limit_refuses_audio_and_counts_it() -> None:
    p = Playout(lead_ms=300, mark_interval_ms=100, max_buffer_ms=1000)
    p.open("u1")
    assert p.push("u1", b"\x06" * 8000, 0.0)
    assert not p.push("u1", b"\x06" * 160, 0.0)
    assert p.overflow_bytes == 160


def test_unknown_mark_is_reported_not_fatal() -> None:
    p = Playout()
    assert p.on_mark("not-ours", 0.0).status == "unknown"
    assert p.unknown_marks == 1


def test_tail_mark_lets_played_cursor_reach_sent_when_audio_pauses() -> None:
    p = Playout(lead_ms=300, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x07" * 480, 0.0)  # 60 ms, less than a mark interval
    names = marks_of(p.take(0.0))
    assert names, "a tail mark follows audio when the buffer runs dry"
    p.on_mark(names[-1], 0.06)
    assert p.played == p.sent == 480


def test_discard_drops_an_utterance_that_never_started() -> None:
    p = Playout(lead_ms=300)
    p.open("a")
    p.open("b")
    p.push("b", b"\x08" * 320, 0.0)
    assert p.discard("b") == 320
    assert p.buffered_bytes == 0


@pytest.mark.parametrize("lead", [0, 10])
def test_lead_below_one_frame_is_rejected(lead: int) -> None:
    with pytest.raises(ValueError):
        Playout(lead_ms=lead)


def test_no_gap_when_audio_keeps_ahead_of_real_time_playout() -> None:
    p = Playout(lead_ms=10_000, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x01" * 800, 0.0)  # 100 ms
    p.take(0.0)
    p.push("u1", b"\x01" * 800, 0.099)  # arrives 1 ms before the first 100 ms run out
    p.take(0.099)
    assert p.take_gaps() == []


def test_late_tts_audio_inside_an_utterance_is_a_tts_late_gap_at_its_position() -> None:
    p = Playout(lead_ms=10_000, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x01" * 800, 0.0)
    p.take(0.0)
    p.push("u1", b"\x01" * 800, 0.130)  # 30 ms after the estimated end of playout
    p.take(0.130)
    (gap,) = p.take_gaps()
    assert gap.utterance_id == "u1" and gap.cause == "tts_late"
    assert gap.seconds == pytest.approx(0.030)
    assert gap.at_ms == 100
    assert p.take_gaps() == [], "gaps are handed out once"


def test_audio_held_back_by_the_lead_window_is_a_held_gap() -> None:
    p = Playout(lead_ms=100, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x01" * 1600, 0.0)  # 200 ms, only 100 ms may go out before an echo
    marks = marks_of(p.take(0.0))
    assert len(audio_of(p.take(0.0))) == 0
    # The echo comes 50 ms after the caller ran out (a slow echo path): the rest was here all along.
    p.on_mark(marks[-1], 0.150)
    assert len(audio_of(p.take(0.150))) == 800
    (gap,) = p.take_gaps()
    assert gap.cause == "held" and gap.seconds == pytest.approx(0.050)


def test_silence_between_utterances_and_after_clear_is_not_a_gap() -> None:
    p = Playout(lead_ms=10_000, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x01" * 800, 0.0)
    p.finish("u1")
    p.take(0.0)
    p.open("u2")
    p.push("u2", b"\x01" * 800, 1.0)  # a new utterance a second later: a pause, not a gap
    p.take(1.0)
    p.clear()
    p.open("u3")
    p.push("u3", b"\x01" * 800, 2.0)
    p.take(2.0)
    p.push("u3", b"\x01" * 800, 2.05)
    p.take(2.05)
    assert p.take_gaps() == []


def test_a_sub_frame_tail_completed_late_counts_as_tts_late() -> None:
    p = Playout(lead_ms=10_000, mark_interval_ms=100)
    p.open("u1")
    p.push("u1", b"\x01" * 900, 0.0)  # 100 ms + 100 bytes that are not a whole frame yet
    p.take(0.0)
    p.push("u1", b"\x01" * 60, 0.2)  # the frame completes 100 ms after playout ran dry
    p.take(0.2)
    (gap,) = p.take_gaps()
    assert gap.cause == "tts_late" and gap.seconds == pytest.approx(0.1)


def test_heard_position_moves_in_real_time_from_the_last_echo_up_to_the_next_mark() -> None:
    p = Playout(lead_ms=400, mark_interval_ms=200)
    p.open("u1")
    p.push("u1", b"\x01" * 8000, 0.0)
    first = marks_of(p.take(0.0))  # 400 ms sent, marks at 200 and 400 ms
    assert p.sent == 3200 and len(first) == 2
    assert p.heard_position(0.15) == 0, "before the first echo nothing counts as heard"
    p.on_mark(first[0], 0.2)
    assert p.played == 1600
    assert p.heard_position(0.2) == 1600
    assert p.heard_position(0.25) == 2000, "50 ms after the echo of 200 ms: 250 ms heard"
    assert p.heard_position(0.9) == 3200, "never past the next mark not yet echoed"
    assert p.heard_position(0.1) == 1600, "a clock reading before the echo changes nothing"


def test_clear_reports_the_interpolated_heard_duration_and_forgets_the_echo() -> None:
    p = Playout(lead_ms=400, mark_interval_ms=200)
    p.open("u1")
    p.push("u1", b"\x01" * 8000, 0.0)
    names = marks_of(p.take(0.0))
    p.on_mark(names[0], 0.2)
    assert p.clear(0.33).cut_utterances == [("u1", 330)]
    assert p.heard_position(0.5) == p.played == 1600, "after a clear Twilio's buffer is empty: no estimate"
    # Without a clock reading only echoes count (the old, conservative figure).
    q = Playout(lead_ms=400, mark_interval_ms=200)
    q.open("u1")
    q.push("u1", b"\x01" * 8000, 0.0)
    q.on_mark(marks_of(q.take(0.0))[0], 0.2)
    assert q.clear().cut_utterances == [("u1", 200)]


def test_heard_position_stops_where_sent_audio_ran_out() -> None:
    p = Playout(lead_ms=400, mark_interval_ms=200)
    p.open("u1")
    p.push("u1", b"\x01" * 2400, 0.0)  # 300 ms, then Cartesia is late
    names = marks_of(p.take(0.0))  # marks at 200 ms and at 300 ms (buffer dry)
    assert len(names) == 2
    p.on_mark(names[0], 0.2)
    assert p.heard_position(1.0) == 2400, "a second later the caller has heard all 300 ms, no more"
