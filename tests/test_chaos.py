"""The chaos run (``media-bridge chaos``): its audio check, the bugs it found, and a short run.

The short run is the CI version of the full one (README, "Chaos run"): 30 calls, three bridge
processes, the emulator's TTS and STT faults, hostile callers, agent and Cartesia peer, a SIGTERM
drain halfway. It fails on any lost or repeated audio, leak, unexpected exception or secret seen.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, serve

from bridge.chaos.integrity import ChainIndex, check_call
from bridge.chaos.report import build_report, summary_lines
from bridge.chaos.runner import Chaos, ChaosOptions
from metrics.scrape import value
from metrics.speech import SpeechMetrics
from telephony.media import FRAME_BYTES

from .conftest import BridgeFactory
from .relay_agent import RelayAgent
from .test_call_e2e import wait_for
from .test_stt_client import FRAME, Recorder, SttPeer, frame, make_stream

# ------------------------------------------------------------------ the audio check (no I/O)


class _Rec:
    def __init__(self, audio: bytes, starts: list[float], ends: list[float], transcript: str) -> None:
        self.audio, self.starts, self.ends, self.transcript = audio, starts, ends, transcript


def _word(n: int, byte: int) -> bytes:
    # Distinct ramps so no 32-byte key of one word matches another's.
    return bytes((byte + i) % 250 for i in range(n))


def _pad(b: bytes) -> bytes:
    return b + b"\xff" * (-len(b) % FRAME_BYTES)


N = 810  # bytes a word: word boundaries fall inside frames, as they do in speech
W1, W2, W3 = _word(N, 1), _word(N, 60), _word(N, 120)
S = N / 8000  # seconds a word
WHOLE = _Rec(W1 + W2 + W3, [0.0, S, 2 * S], [S, 2 * S, 3 * S], "one two three")
RESUMED = _Rec(W2 + W3, [0.0, S], [S, 2 * S], "two three")  # the sentence from its second word, on a new context
DIED = _Rec(W1 + W2[:300], [0.0, S], [S], "one two three")  # a context whose socket died in the second word
OTHER = _Rec(_word(1000, 200), [0.0], [0.125], "other")


def test_integrity_accepts_whole_resumed_and_interrupted_utterances() -> None:
    index = ChainIndex([DIED, RESUMED, OTHER])
    stream = _pad(OTHER.audio) + _pad(W1 + RESUMED.audio) + _pad(OTHER.audio)
    c = check_call(stream, [], index)
    assert (c.utterances, c.resumed, c.mismatch_bytes, c.cut_short) == (3, 1, 0, 0)
    index = ChainIndex([WHOLE, RESUMED, OTHER])
    clear_at = len(_pad(OTHER.audio)) + 480  # whole frames, as the bridge sends them
    c = check_call(_pad(OTHER.audio) + WHOLE.audio[:480] + _pad(OTHER.audio), [clear_at], index)
    assert (c.utterances, c.interrupted, c.mismatch_bytes) == (3, 1, 0)


def test_integrity_counts_repeated_and_truncated_audio() -> None:
    index = ChainIndex([WHOLE, RESUMED, OTHER])
    repeated = _pad(W1 + W2 + RESUMED.audio)  # the second word heard twice
    assert check_call(repeated, [], index).mismatch_bytes > 0
    cut = check_call(_pad(WHOLE.audio[:1000]) + _pad(OTHER.audio), [], index)  # given up mid-sentence
    assert (cut.cut_short, cut.cut_short_bytes, cut.mismatch_bytes) == (1, len(WHOLE.audio) - 1000, 0)


# ------------------------------------------------------------------ bugs the chaos run found


async def test_drain_returns_after_the_calls_it_ended_have_let_go(make_bridge: BridgeFactory) -> None:
    """Found by the chaos run: ``drain`` returned while the calls it had ended were still releasing
    their agent and STT sockets, so the process closed the shared pool under them and exited with
    ``bridge_active_calls`` 4, ``bridge_agent_connections`` 4, ``bridge_stt_sockets`` 5."""
    agent = RelayAgent()
    await agent.start()
    try:
        bridge = await make_bridge({"AGENT_URL": agent.url, "RELAY_WELCOME_GREETING": "Welcome to the test line."})
        agent.auth_token = bridge.token
        calls = [bridge.call() for _ in range(3)]
        for call in calls:
            await call.place()
            await call.connect()
        assert await wait_for(lambda: all(c.got_media.is_set() for c in calls), 10)
        assert await bridge.server.drain(0.05) == 3
        samples = await bridge.metrics()
        for gauge in ("bridge_active_calls", "bridge_agent_connections", "bridge_stt_sockets",
                      "bridge_cartesia_active_contexts"):
            assert value(samples, gauge) == 0, gauge
        for call in calls:
            await call.close()
    finally:
        await agent.stop()


async def test_stt_socket_killed_on_every_replay_gives_the_turn_up_instead_of_reconnecting_forever() -> None:
    """Found by the chaos run (emulator ``--stt-fault close-after-chunks=6``): a server that kills
    every socket while the turn is replayed made each loss a new episode, so the stream reconnected
    every ~75 ms for the whole call (112 losses in 5 calls of 5 s) and the turn was neither heard
    nor reported lost. Now the episode runs on until progress: back-off grows, the window expires,
    the turn is reported lost once, and retries slow down."""
    connections = 0

    async def kill_after_five_frames(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        got = 0
        async for message in ws:
            got += len(message) if isinstance(message, bytes) else 0
            if got >= 5 * FRAME:
                ws.transport.abort()
                return

    server = await serve(kill_after_five_frames, "127.0.0.1", 0, compression=None)
    try:
        peer = SttPeer()
        peer.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        metrics = SpeechMetrics(CollectorRegistry(auto_describe=True))
        listener = Recorder()
        stream = make_stream(peer, listener, metrics, reconnect_window_s=0.5, slow_retry_s=1.0)
        await stream.start()
        for i in range(20):  # a turn in progress, longer than any socket survives
            stream.send_audio(frame(i))
        await listener.wait_for(lambda: any(k == "lost" and p[1] for k, p in listener.events), 5.0)
        await asyncio.sleep(0.5)
        # 0.5 s window of growing back-off (20, 40, 80, 160 ms...), then one try per ~1 s: a handful.
        assert connections <= 10, f"{connections} connections in about a second"
        assert metrics.registry.get_sample_value("bridge_stt_turns_lost_total") == 1
        await stream.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_an_agent_message_over_the_socket_cap_is_logged_with_its_cause(
        make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the chaos run: a 300 KB agent message closed the agent socket (1009) and the
    bridge logged ``agent_disconnected`` with ``reason="agent socket error: None"``."""
    agent = RelayAgent()
    await agent.start()
    try:
        bridge = await make_bridge({"AGENT_URL": agent.url, "RELAY_WELCOME_GREETING": "Welcome."})
        agent.auth_token = bridge.token
        call = bridge.call()
        await call.place()
        await call.connect()
        await agent.next("setup")
        with caplog.at_level(logging.WARNING, logger="bridge"):
            await agent.send({"type": "text", "token": "y" * 300_000, "last": True})
            assert await wait_for(lambda: any(r.getMessage() == "agent_disconnected" for r in caplog.records), 10)
        reason = next(r for r in caplog.records if r.getMessage() == "agent_disconnected").__dict__["reason"]
        assert "None" not in reason and ("1009" in reason or "too big" in reason.lower()), reason
        await call.close()
    finally:
        await agent.stop()


# ------------------------------------------------------------------ the short run


async def test_short_chaos_run_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    opts = ChaosOptions(calls=30, ramp_s=8.0, duration_s=5.0, report=str(tmp_path), refuse_window_s=1.0,
                        timeout_s=90.0)
    run = await asyncio.wait_for(Chaos(opts).run(), 120)
    report = build_report(run)
    text = "\n".join(summary_lines(report))
    assert report["failures"] == [], text
    calls = report["calls"]
    # The run did what it says: refusals while draining, speech both ways, faults survived.
    assert calls["refused_politely"] >= 1, text
    assert calls["completed"] + calls["ended_by_bridge"] + calls["refused_politely"] == opts.calls, text
    assert report["integrity"]["calls_checked"] >= 10 and report["integrity"]["heard_bytes"] > 0, text
    assert run.agent.received["prompt"] >= 3, text
    assert sum(report["hostile_cartesia"]["tricks"].values()) >= 1, text
    assert report["bridges"]["old"]["readyz_while_draining"] == 503, text
