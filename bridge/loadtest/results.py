"""One simulated call's result, and what it measured: utterances, underruns, jitter, TTFA.

Definitions (all at the simulated caller) are in ``bridge.loadtest.report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from telephony.simulator import CallRecord, SimulatedCall

from .integrity import AudioIndex, Span, split_utterances
from .turns import SpokenTurn


@dataclass
class RecordedCall:
    """A finished call's record, as a caller worker process sends it back."""

    record: CallRecord


@dataclass
class CallResult:
    """Timings of one call (``time.monotonic`` seconds) and, after ``analyze_call``, its figures."""

    index: int
    call_sid: str = ""
    status: str = "pending"  # pending | active | completed | failed
    reason: str | None = None
    t_placed: float | None = None
    t_started: float | None = None
    t_ended: float | None = None
    triggers: list[tuple[float, str]] = field(default_factory=list)
    barge_in_s: list[float] = field(default_factory=list)
    no_response: int = 0
    live_ttfa: list[float] = field(default_factory=list)  # rough, for the progress line
    call: SimulatedCall | RecordedCall | None = None
    #: ``spoken`` scenario: the caller's turns, in order.
    turns: list[SpokenTurn] = field(default_factory=list)
    # filled by analysis
    ttfa_s: list[tuple[str, float]] = field(default_factory=list)
    underruns: list[float] = field(default_factory=list)
    #: (utterance number from 0, audio position in it in s) where each underrun began, parallel to ``underruns``
    underrun_at_s: list[tuple[int, float]] = field(default_factory=list)
    jitter_s: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)

    def fail(self, reason: str, now: float) -> None:
        """Mark the call failed with ``reason`` (ended at ``now`` unless it already ended)."""
        self.status = "failed"
        self.reason = reason
        if self.t_ended is None:
            self.t_ended = now


def analyze_call(res: CallResult, index: AudioIndex | None) -> None:
    """Utterances, integrity, underruns, jitter and TTFA of one finished call.

    ``index`` is the emulator's audio (exact utterance spans); ``None`` with
    ``--target``, where a dry gap bridged by one of our triggers is taken for
    a turn boundary (heuristic).
    """
    call = res.call
    if call is None:
        return
    rec = call.record
    res.protocol_errors = list(rec.protocol_errors)
    stream = bytes(rec.received_audio)
    arrivals = rec.arrivals
    if index is not None:
        res.spans = split_utterances(stream, rec.clear_offsets, index)
        starts = {s.start for s in res.spans}
    else:
        starts = set(rec.clear_offsets) | {0}
    trigger_times = sorted(t for t, _k in res.triggers)

    def triggered_between(a: float, b: float) -> bool:
        return any(a - 0.001 <= t <= b for t in trigger_times)

    # Underruns: buffer dry before a message that continues an utterance.
    prev_arrival: float | None = None
    utt_start, utt_no = 0, -1
    for i, (t, off, _n, dry) in enumerate(arrivals):
        if i == 0 or off in starts:
            prev_arrival = None
            utt_start, utt_no = off, utt_no + 1
        new_utt = prev_arrival is None
        if index is None and dry > 0.001 and triggered_between(t - dry, t):
            new_utt = True  # heuristic: a gap we bridged with a trigger is a turn boundary
        if not new_utt and dry > 0.001:
            res.underruns.append(dry)
            res.underrun_at_s.append((utt_no, (off - utt_start) / 8000.0))
        if not new_utt and prev_arrival is not None:
            p_t, p_n = prev_arrival, arrivals[i - 1][2]
            res.jitter_s.append(abs((t - p_t) - p_n / 8000.0))
        prev_arrival = t
    # TTFA: trigger -> first message of the next utterance that arrives after it.
    for t, kind in res.triggers:
        for a_t, off, _n, _dry in arrivals:
            if a_t >= t:
                if off in starts or index is None:
                    res.ttfa_s.append((kind, a_t - t))
                break
