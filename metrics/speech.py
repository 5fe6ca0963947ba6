"""Speech-in (Cartesia STT) metrics, defined once.

``SpeechMetrics`` registers into a given ``CollectorRegistry`` (the bridge's own, from
``BridgeMetrics.registry``) so the speech metrics are scraped with the rest of the bridge.
No aiohttp here: the STT client and its tests import this without a web stack.

Who counts what:

* ``SttStream`` / ``SttAdmission`` (``bridge/cartesia/stt_client.py``): ``bridge_stt_sockets``,
  ``bridge_stt_admission_refused_total``, ``bridge_stt_errors_total{kind}``,
  ``bridge_stt_reconnects_total``, ``bridge_stt_audio_dropped_bytes_total``,
  ``bridge_stt_turns_lost_total``.
* The call (turn detection and the agent reply): ``bridge_stt_turns_total{outcome}``,
  ``bridge_stt_latency_seconds``, ``bridge_turn_ttfa_seconds``.

Units are seconds and bytes.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets (seconds) for 10 ms to 5 s, the span from a fast final transcript to a
#: slow agent reply; two wider buckets above so a stall still shows where it landed.
SPEECH_LATENCY_BUCKETS: Final = (
    # 25 ms steps where turns end (speechTimeout 400-1000 ms + finalize + first audio), coarser outside.
    0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.425, 0.45, 0.475, 0.5, 0.525,
    0.55, 0.575, 0.6, 0.625, 0.65, 0.675, 0.7, 0.725, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3, 1.5,
    1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
)

#: ``bridge_stt_errors_total`` kinds, pre-created so a dashboard shows zeros, not gaps.
STT_ERROR_KINDS: Final = ("handshake_401", "handshake_429", "connect", "server_error", "malformed", "lost")
#: ``bridge_stt_turns_total`` outcomes: a prompt went to the agent, the turn had no words,
#: or its audio could not be transcribed (STT socket lost).
STT_TURN_OUTCOMES: Final = ("prompt", "empty", "ignored", "lost")


class SpeechMetrics:
    """Every speech-in metric of the bridge, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # Gauge: returns to zero when every call has ended.
        self.stt_sockets = Gauge("bridge_stt_sockets", "Open Cartesia STT WebSockets (one per listening call)",
                                 multiprocess_mode="livesum", registry=r)
        self.stt_admission_refused = Counter(
            "bridge_stt_admission_refused_total", "STT sockets refused by the process-wide STT concurrency limit",
            registry=r,
        )
        self.stt_errors = Counter(
            "bridge_stt_errors_total",
            "STT failures by kind: handshake_401 (401/403, bad CARTESIA_API_KEY), handshake_429 (plan concurrency), "
            "connect (other connect failures), server_error (error messages), malformed (unparsable messages), "
            "lost (socket died mid-call)",
            ["kind"], registry=r,
        )
        for kind in STT_ERROR_KINDS:
            self.stt_errors.labels(kind=kind)
        self.stt_reconnects = Counter(
            "bridge_stt_reconnects_total", "STT sockets re-opened after a loss (the turn's audio replayed)", registry=r
        )
        self.stt_audio_dropped_bytes = Counter(
            "bridge_stt_audio_dropped_bytes_total",
            "Caller audio bytes Cartesia STT will never receive: send queue full, or replay buffer full while "
            "reconnecting",
            registry=r,
        )
        self.stt_turns = Counter("bridge_stt_turns_total", "Caller turns by outcome", ["outcome"], registry=r)
        for outcome in STT_TURN_OUTCOMES:
            self.stt_turns.labels(outcome=outcome)
        self.stt_turns_lost = Counter(
            "bridge_stt_turns_lost_total",
            "STT socket losses where audio of the turn in progress could not be replayed", registry=r,
        )
        self.stt_latency = Histogram(
            "bridge_stt_latency_seconds", "End of caller speech -> final transcript received",
            buckets=SPEECH_LATENCY_BUCKETS, registry=r,
        )
        self.turn_ttfa = Histogram(
            "bridge_turn_ttfa_seconds",
            "End of caller speech -> first audio frame of the reply sent to Twilio (the wait callers feel)",
            buckets=SPEECH_LATENCY_BUCKETS, registry=r,
        )
