"""Every metric of the bridge, defined once.

``BridgeMetrics`` owns its own ``CollectorRegistry`` so several bridges can
run in one process (tests, the demo) without sharing counters. Names follow
Prometheus conventions: ``bridge_*_seconds`` histograms, ``bridge_*_total``
counters, gauges without suffix. Units are seconds and bytes.

No I/O and no aiohttp here (the state machines import this module); the
``/metrics`` route is ``metrics.http``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from metrics.speech import SpeechMetrics

#: Buckets for sub-millisecond to multi-second latencies, in seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125,
    0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)


class BridgeMetrics:
    """The bridge's metrics in a private registry (see module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        #: Speech in (Cartesia STT, turns): ``metrics/speech.py``.
        self.speech = SpeechMetrics(r)
        #: Called before every ``render``: hot paths count per call in plain ints
        #: and add them to the counters here (and when the call ends), so a
        #: scrape is exact without a locked ``inc`` per frame.
        self.before_render: list[Callable[[], Any]] = []

        # Gauges: must return to zero when calls end. multiprocess_mode says how the workers of
        # `serve --workers N` combine (metrics/http.py); one process ignores it.
        self.active_calls = Gauge("bridge_active_calls", "Calls with an open Twilio media stream",
                                  multiprocess_mode="livesum", registry=r)
        self.active_contexts = Gauge(
            "bridge_cartesia_active_contexts", "Cartesia contexts open (admitted, not yet done)",
            multiprocess_mode="livesum", registry=r
        )
        self.cartesia_sockets = Gauge("bridge_cartesia_sockets", "Open Cartesia WebSockets",
                                  multiprocess_mode="livesum", registry=r)
        self.playout_buffered_bytes = Gauge(
            "bridge_playout_buffered_bytes", "mu-law bytes received from Cartesia not yet sent to Twilio",
            multiprocess_mode="livesum", registry=r
        )
        self.ready = Gauge("bridge_ready", "1 when the process accepts new calls",
                           multiprocess_mode="livemin", registry=r)
        self.admission_queue = Gauge(
            "bridge_cartesia_admission_queue", "Utterances waiting for a Cartesia concurrency slot",
            multiprocess_mode="livesum", registry=r
        )
        self.agent_connections = Gauge("bridge_agent_connections", "Open agent WebSockets",
                                  multiprocess_mode="livesum", registry=r)
        self.twilio_fast_path = Gauge(
            "bridge_twilio_fast_path",
            "1 when Twilio media/mark messages are handled in the socket's data callback (start-up self-test "
            "passed), 0 when they take aiohttp's receive() (correct, more CPU per call)",
            multiprocess_mode="livemin", registry=r,
        )
        self.agent_fast_path = Gauge(
            "bridge_agent_fast_path",
            "1 when agent text messages are handled in the agent socket's data callback (start-up self-test "
            "passed), 0 when they take aiohttp's reader task (correct, more CPU per message)",
            multiprocess_mode="livemin", registry=r,
        )

        # Latency histograms.
        self.tts_ttfb = Histogram(
            "bridge_tts_ttfb_seconds", "Text sent to Cartesia -> first audio chunk received", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.text_to_first_frame = Histogram(
            "bridge_text_to_first_frame_seconds", "Text sent to Cartesia -> first frame sent to Twilio",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.forwarding_delay = Histogram(
            "bridge_forwarding_delay_seconds",
            "Cartesia chunk received -> its first frame sent to Twilio, when not held back by the lead limit, "
            "an unfinished frame or an earlier utterance",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.mark_round_trip = Histogram(
            "bridge_mark_round_trip_seconds", "Mark sent to Twilio -> its echo (includes playout of queued audio)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.webhook_to_start = Histogram(
            "bridge_webhook_to_stream_start_seconds", "Voice webhook answered -> media stream start",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.barge_in_latency = Histogram(
            "bridge_barge_in_latency_seconds", "Caller speech onset (or agent interrupt) -> Twilio clear sent",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.event_loop_lag = Histogram(
            "bridge_event_loop_lag_seconds",
            "Overshoot of a 100 ms sleep on the bridge's event loop (time other work held the loop)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.admission_wait = Histogram(
            "bridge_cartesia_admission_wait_seconds", "Time an utterance waited for a Cartesia slot",
            buckets=LATENCY_BUCKETS, registry=r,
        )

        # Counters.
        self.frames_in = Counter("bridge_twilio_frames_in", "Inbound media messages from Twilio", registry=r)
        self.bytes_in = Counter("bridge_twilio_bytes_in", "Inbound mu-law bytes from Twilio", registry=r)
        self.frames_out = Counter("bridge_twilio_frames_out", "20 ms frames sent to Twilio", registry=r)
        self.bytes_out = Counter("bridge_twilio_bytes_out", "mu-law bytes sent to Twilio", registry=r)
        self.twilio_messages_out = Counter(
            "bridge_twilio_messages_out", "Messages sent to Twilio by event", ["event"], registry=r
        )
        # status: the code of a Cartesia error message or of a refused handshake ("401", "429"), or
        # why a connect failed (connection_refused, dns, timeout, handshake, network): a small fixed set.
        self.cartesia_errors = Counter(
            "bridge_cartesia_errors",
            "Cartesia errors: error messages and refused handshakes by status code, failed connects by reason",
            ["status"], registry=r,
        )
        self.late_chunks_dropped = Counter(
            "bridge_late_chunks_dropped", "Cartesia messages for cancelled or unknown contexts, dropped", registry=r
        )
        self.signature_failures = Counter(
            "bridge_signature_failures", "Requests refused for a bad X-Twilio-Signature", ["endpoint"], registry=r
        )
        self.calls = Counter("bridge_calls", "Ended calls by outcome", ["outcome"], registry=r)
        self.internal_errors = Counter(
            "bridge_internal_errors", "Calls ended by an unexpected exception in the bridge (a bug)", registry=r
        )
        self.bad_input = Counter(
            "bridge_bad_input", "Rejected input by source and kind", ["source", "kind"], registry=r
        )
        self.playout_overflow_bytes = Counter(
            "bridge_playout_overflow_bytes", "Audio bytes dropped because a call's playout buffer was full", registry=r
        )
        self.interruptions = Counter("bridge_interruptions", "Barge-ins by source", ["source"], registry=r)
        self.webhooks = Counter("bridge_webhooks", "Voice webhooks answered by result", ["result"], registry=r)
        self.agent_failures = Counter(
            "bridge_agent_failures", "Agent connection failures by reason", ["reason"], registry=r
        )
        self.cartesia_reconnects = Counter(
            "bridge_cartesia_reconnects", "Cartesia sockets replaced after a failure or before idle close",
            ["reason"], registry=r,
        )
        self.cartesia_handshakes = Counter("bridge_cartesia_handshakes", "Cartesia WebSocket handshakes", registry=r)
        self.context_retries = Counter(
            "bridge_cartesia_context_retries", "Utterances re-sent on a new context", ["reason"], registry=r
        )
        # Per sentence this is about 1 + words / (hold in s x words per s): agent tokens are joined.
        self.cartesia_text_inputs = Counter(
            "bridge_cartesia_text_inputs", "Generation inputs (text, flush, close) written to Cartesia", registry=r
        )
        self.context_timeouts = Counter(
            "bridge_cartesia_context_timeouts", "Contexts ended by deadline without done", registry=r
        )
        self.utterances_failed = Counter(
            "bridge_utterances_failed", "Utterances given up (agent told)", ["reason"], registry=r
        )
        self.calls_refused = Counter("bridge_calls_refused", "Webhooks answered with a refusal", ["reason"], registry=r)
        # Media WebSockets refused at the upgrade (unstarted_limit) or closed for never sending start.
        self.media_streams_refused = Counter(
            "bridge_media_streams_refused", "Media streams refused or closed before start", ["reason"], registry=r
        )
        # Estimated from send times (bridge/playout.py "Gaps"): tts_late = Cartesia had not delivered,
        # held = the audio was here but the lead window waited for a mark echo.
        self.playout_gaps = Counter(
            "bridge_playout_gaps", "Estimated silences inside an utterance at the caller, by cause", ["cause"],
            registry=r,
        )
        self.playout_gap_seconds = Counter(
            "bridge_playout_gap_seconds", "Estimated silence inside utterances at the caller, by cause", ["cause"],
            registry=r,
        )
        for cause in ("tts_late", "held"):
            self.playout_gaps.labels(cause=cause)
            self.playout_gap_seconds.labels(cause=cause)

    def render(self) -> bytes:
        for hook in self.before_render:
            hook()
        return generate_latest(self.registry)
