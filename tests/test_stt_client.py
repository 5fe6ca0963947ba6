"""Cartesia STT client (bridge/cartesia/stt_client.py) against a real STT peer on 127.0.0.1.

The peer is a small ``websockets`` server written here with the STT codec: it answers each
``finalize`` with a final transcript naming the byte count since the previous one plus
``flush_done``, ``close`` with ``done``; it can kill its first connection after N bytes,
refuse handshakes with an HTTP status, send garbage first, ignore ``close`` or stop reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.cartesia.stt_client import SttAdmission, SttStream, SttUnavailable
from bridge.cartesia.stt_protocol import (
    CLOSE,
    FINALIZE,
    SttDone,
    SttError,
    SttFlushDone,
    SttParams,
    SttServerMessage,
    SttTranscript,
    encode_stt_server_message,
    parse_stt_client_text,
)
from bridge.logs import JsonFormatter
from metrics.speech import SpeechMetrics

API_KEY = "sk_car_TEST_SECRET_0123456789"
FRAME = 160  # 20 ms of 8 kHz mu-law
#: The peer's own websockets logs (it sees our Authorization header: it is the server).
PEER_LOG = logging.getLogger("tests.stt_peer")


def frame(i: int) -> bytes:
    """A 20 ms frame whose bytes say which frame it is (order and wholeness checkable)."""
    return bytes((i * 31 + j) % 256 for j in range(FRAME))


# --------------------------------------------------------------------------- the peer


@dataclass
class PeerConnection:
    headers: Headers
    path: str
    received: bytearray = field(default_factory=bytearray)
    commands: list[tuple[int, str]] = field(default_factory=list)  # (bytes received before it, command)
    message_sizes: list[int] = field(default_factory=list)
    finalized_at: int = 0


class SttPeer:
    def __init__(self, *, kill_first_after: int | None = None, ack_finalize_on_first: bool = True,
                 garbage: tuple[str, ...] = (), answer_close: bool = True, stall: bool = False) -> None:
        self.kill_first_after = kill_first_after
        self.ack_finalize_on_first = ack_finalize_on_first
        self.garbage = garbage
        self.answer_close = answer_close
        self.stall = stall
        self.reject_status: int | None = None
        self.rejected_headers: list[Headers] = []
        self.connections: list[PeerConnection] = []
        self.server: Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await serve(self._handle, "127.0.0.1", 0, process_request=self._process_request,
                                  max_queue=1 if self.stall else 16, compression=None, close_timeout=0.5,
                                  logger=PEER_LOG)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.reject_status is not None:
            self.rejected_headers.append(request.headers)
            return conn.respond(HTTPStatus(self.reject_status), "refused\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        conn = PeerConnection(headers=ws.request.headers, path=ws.request.path)
        first = not self.connections
        self.connections.append(conn)
        for text in self.garbage:
            await ws.send(text)
        if self.stall:  # never read: the client's writes back up
            await ws.wait_closed()
            return
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    conn.received += message
                    conn.message_sizes.append(len(message))
                    if first and self.kill_first_after is not None and len(conn.received) >= self.kill_first_after:
                        ws.transport.abort()
                        return
                    continue
                command = parse_stt_client_text(message)
                conn.commands.append((len(conn.received), command))
                if command == FINALIZE and (self.ack_finalize_on_first or not first):
                    count = len(conn.received) - conn.finalized_at
                    conn.finalized_at = len(conn.received)
                    await ws.send(encode_stt_server_message(
                        SttTranscript(is_final=True, text=f"{count} bytes", duration=count / 8000)))
                    await ws.send(encode_stt_server_message(SttFlushDone()))
                elif command == CLOSE and self.answer_close:
                    await ws.send(encode_stt_server_message(SttDone()))
                    await ws.close()
                    return
        except ConnectionClosed:
            pass


# --------------------------------------------------------------------------- the listener


class Recorder:
    """An SttListener that records everything in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.messages: list[SttServerMessage] = []
        self.flushes = 0
        self._changed = asyncio.Event()

    def on_stt_message(self, msg: SttServerMessage, received_at: float) -> None:
        assert received_at <= time.monotonic()
        self.messages.append(msg)
        self.events.append(("message", msg))
        if isinstance(msg, SttFlushDone):
            self.flushes += 1
        self._changed.set()

    def on_stt_lost(self, reason: str, *, turn_lost: bool) -> None:
        self.events.append(("lost", (reason, turn_lost)))
        self._changed.set()

    def on_stt_restored(self) -> None:
        self.events.append(("restored", None))
        self._changed.set()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events if k != "message"]

    def finals(self) -> list[str]:
        return [m.text for m in self.messages if isinstance(m, SttTranscript) and m.is_final]

    async def wait_for(self, predicate: Any, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"condition not met in {timeout_s} s; events: {self.kinds()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def metrics() -> SpeechMetrics:
    return SpeechMetrics(CollectorRegistry(auto_describe=True))


def sample(metrics: SpeechMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def make_stream(peer: SttPeer, listener: Recorder, metrics: SpeechMetrics, admission: SttAdmission | None = None,
                **kwargs: Any) -> SttStream:
    kwargs.setdefault("backoff_base_s", 0.02)
    return SttStream(
        base_url=peer.url, api_key=API_KEY, version="2025-04-16", params=SttParams(), listener=listener,
        metrics=metrics, admission=admission or SttAdmission(4, metrics),
        log_fields={"call_sid": "CA123", "stream_sid": "MZ456"}, **kwargs,
    )


def stt_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("stt-") and not t.done()]


async def assert_clean_after_close(stream: SttStream, admission: SttAdmission, metrics: SpeechMetrics) -> None:
    await stream.close()
    assert not stream.connected
    assert admission.in_use == 0
    assert sample(metrics, "bridge_stt_sockets") == 0
    assert stt_tasks() == []


@pytest.fixture
async def peer() -> AsyncIterator[SttPeer]:
    p = SttPeer()
    await p.start()
    yield p
    await p.stop()


async def until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Poll a condition on the peer's side (it has no events of its own), bounded."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def start_peer(**kwargs: Any) -> SttPeer:
    p = SttPeer(**kwargs)
    await p.start()
    return p


# --------------------------------------------------------------------------- tests


async def test_audio_arrives_whole_in_order_and_finalize_is_answered(peer: SttPeer, metrics: SpeechMetrics) -> None:
    listener = Recorder()
    admission = SttAdmission(2, metrics)
    stream = make_stream(peer, listener, metrics, admission)
    stream.send_audio(frame(0))  # before start: kept and sent first
    await stream.start()
    assert stream.connected and admission.in_use == 1 and sample(metrics, "bridge_stt_sockets") == 1
    frames = [frame(i) for i in range(100)]
    for i, f in enumerate(frames[1:], start=1):
        stream.send_audio(f)
        if i % 10 == 0:
            await asyncio.sleep(0)
    stream.finalize()
    await listener.wait_for(lambda: listener.flushes == 1)
    assert listener.finals() == [f"{100 * FRAME} bytes"]
    # the final transcript precedes its flush_done; the replay buffer is released by it
    kinds = [type(m).__name__ for m in listener.messages]
    assert kinds == ["SttTranscript", "SttFlushDone"]
    assert stream.replay_bytes == 0

    conn = peer.connections[0]
    assert bytes(conn.received) == b"".join(frames)
    assert conn.commands == [(100 * FRAME, FINALIZE)]
    assert conn.headers["Authorization"] == f"Bearer {API_KEY}"
    assert conn.headers["Cartesia-Version"] == "2025-04-16"
    split = urlsplit(conn.path)
    assert split.path == "/stt/websocket"
    query = parse_qs(split.query)
    assert query["encoding"] == ["pcm_mulaw"] and query["sample_rate"] == ["8000"]

    # a second turn after the first was acknowledged: counted from the finalize on
    for i in range(100, 110):
        stream.send_audio(frame(i))
    assert stream.replay_bytes == 10 * FRAME
    stream.finalize()
    await listener.wait_for(lambda: listener.flushes == 2)
    assert listener.finals()[-1] == f"{10 * FRAME} bytes"
    await assert_clean_after_close(stream, admission, metrics)
    assert conn.commands[-1] == (110 * FRAME, CLOSE)
    assert listener.kinds() == []  # no loss reported
    stream.send_audio(frame(0))  # after close: ignored, never raises
    stream.finalize()


@pytest.mark.parametrize("coalesce_bytes", [0, 5 * FRAME])
async def test_socket_killed_mid_turn_reconnects_and_replays_the_turn_once(
    metrics: SpeechMetrics, coalesce_bytes: int
) -> None:
    peer = await start_peer(kill_first_after=20 * FRAME)
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission, coalesce_bytes=coalesce_bytes)
        await stream.start()
        frames = [frame(i) for i in range(60)]
        for f in frames[:40]:
            stream.send_audio(f)
            await asyncio.sleep(0.002)
        await listener.wait_for(lambda: "restored" in listener.kinds())
        for f in frames[40:]:
            stream.send_audio(f)
        stream.finalize()
        await listener.wait_for(lambda: listener.flushes == 1)

        assert len(peer.connections) == 2
        assert len(peer.connections[0].received) >= 20 * FRAME
        # every byte of the turn exactly once, in order, on the new socket
        assert bytes(peer.connections[1].received) == b"".join(frames)
        assert listener.finals() == [f"{60 * FRAME} bytes"]
        lost = [payload for kind, payload in listener.events if kind == "lost"]
        assert len(lost) == 1 and lost[0][1] is False and lost[0][0] == "connection_lost"
        assert listener.kinds() == ["lost", "restored"]
        assert sample(metrics, "bridge_stt_reconnects_total") == 1
        assert sample(metrics, "bridge_stt_errors_total", kind="lost") == 1
        assert sample(metrics, "bridge_stt_turns_lost_total") == 0
        assert sample(metrics, "bridge_stt_sockets") == 1
        assert admission.in_use == 1  # the slot was held across the reconnect
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_pending_finalize_is_replayed_where_it_was(metrics: SpeechMetrics) -> None:
    # The first socket never answers finalize and dies after turn A and turn B's audio.
    peer = await start_peer(kill_first_after=20 * FRAME, ack_finalize_on_first=False)
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission)
        await stream.start()
        turn_a = [frame(i) for i in range(10)]
        turn_b = [frame(i) for i in range(10, 20)]
        for f in turn_a:
            stream.send_audio(f)
        stream.finalize()
        for f in turn_b:
            stream.send_audio(f)
        await listener.wait_for(lambda: listener.flushes == 1)  # turn A, answered on the new socket
        assert listener.kinds() == ["lost", "restored"]
        assert stream.replay_bytes == 10 * FRAME  # turn B still held
        stream.finalize()
        await listener.wait_for(lambda: listener.flushes == 2)
        assert stream.replay_bytes == 0
        second = peer.connections[1]
        assert bytes(second.received) == b"".join(turn_a + turn_b)
        assert second.commands == [(10 * FRAME, FINALIZE), (20 * FRAME, FINALIZE)]
        assert listener.finals() == [f"{10 * FRAME} bytes", f"{10 * FRAME} bytes"]
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_overflowed_replay_reports_the_turn_lost(metrics: SpeechMetrics) -> None:
    peer = await start_peer(kill_first_after=20 * FRAME)
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission, replay_limit_bytes=10 * FRAME)
        await stream.start()
        frames = [frame(i) for i in range(30)]
        for f in frames:
            stream.send_audio(f)
            await asyncio.sleep(0.002)
        await listener.wait_for(lambda: "restored" in listener.kinds())
        stream.finalize()
        await listener.wait_for(lambda: listener.flushes == 1)
        lost = [payload for kind, payload in listener.events if kind == "lost"]
        assert listener.kinds() == ["lost", "restored"] and lost[0][1] is True
        assert sample(metrics, "bridge_stt_turns_lost_total") == 1
        # the new socket got only the newest audio: a tail of the turn, in order
        got = bytes(peer.connections[1].received)
        whole = b"".join(frames)
        assert 0 < len(got) < len(whole) and whole.endswith(got)
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_gives_up_after_the_window_then_recovers_later(metrics: SpeechMetrics) -> None:
    peer = await start_peer(kill_first_after=5 * FRAME)
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission, reconnect_window_s=0.3, slow_retry_s=0.2)
        await stream.start()
        peer.reject_status = 503  # every reconnect refused
        for i in range(6):
            stream.send_audio(frame(i))
        await listener.wait_for(lambda: "lost" in listener.kinds())
        reason, turn_lost = next(p for k, p in listener.events if k == "lost")
        assert turn_lost is True and "http_503" in reason and "0.3 s" in reason
        assert not stream.connected and stream.replay_bytes == 0
        assert sample(metrics, "bridge_stt_errors_total", kind="connect") >= 1
        stream.send_audio(frame(99))  # said while STT was down: kept for the next socket
        peer.reject_status = None
        await listener.wait_for(lambda: "restored" in listener.kinds())
        assert listener.kinds() == ["lost", "restored"]  # one loss report per episode
        stream.finalize()
        await listener.wait_for(lambda: listener.flushes == 1)
        assert bytes(peer.connections[1].received) == frame(99)
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_admission_limit_is_respected_and_released_on_close(metrics: SpeechMetrics) -> None:
    peer = await start_peer()
    admission = SttAdmission(1, metrics)
    first = make_stream(peer, Recorder(), metrics, admission)
    await first.start()
    second = make_stream(peer, Recorder(), metrics, admission)
    with pytest.raises(SttUnavailable) as refused:
        await second.start()
    assert refused.value.reason == "admission"
    assert sample(metrics, "bridge_stt_admission_refused_total") == 1
    assert admission.in_use == 1 and len(peer.connections) == 1
    await second.close()  # a refused stream closes cleanly and gives back nothing it did not take
    assert admission.in_use == 1
    await first.close()
    await first.close()
    assert admission.in_use == 0 and sample(metrics, "bridge_stt_sockets") == 0
    third = make_stream(peer, Recorder(), metrics, admission)
    await third.start()
    assert admission.in_use == 1
    await assert_clean_after_close(third, admission, metrics)
    # once the peer has stopped too, no task at all is left running
    await peer.stop()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert others == []


@pytest.mark.parametrize(("status", "kind"), [(401, "handshake_401"), (403, "handshake_401"), (429, "handshake_429")])
async def test_handshake_refusal_at_start_is_unavailable_and_logs_no_key(
    peer: SttPeer, metrics: SpeechMetrics, caplog: pytest.LogCaptureFixture, status: int, kind: str
) -> None:
    peer.reject_status = status
    admission = SttAdmission(1, metrics)
    stream = make_stream(peer, Recorder(), metrics, admission)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(SttUnavailable) as unavailable:
            await stream.start()
    assert unavailable.value.reason == f"http_{status}"
    assert peer.rejected_headers[0]["Authorization"] == f"Bearer {API_KEY}"
    assert sample(metrics, "bridge_stt_errors_total", kind=kind) == 1
    assert admission.in_use == 0 and sample(metrics, "bridge_stt_sockets") == 0
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if not r.name.startswith(PEER_LOG.name)]
    assert lines and not any(API_KEY in line for line in lines)
    assert API_KEY not in str(unavailable.value)
    if status in (401, 403):
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage() == "stt_auth_failed"]
        assert len(errors) == 1
        line = formatter.format(errors[0])
        assert "CARTESIA_API_KEY" in line and "CA123" in line
    else:
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["stt_concurrency_limited"]
    await stream.close()
    assert stt_tasks() == []


async def test_connect_refused_at_start_is_unavailable(metrics: SpeechMetrics) -> None:
    peer = await start_peer()
    url = peer.url
    await peer.stop()  # nothing listens there any more
    peer.url = url
    admission = SttAdmission(1, metrics)
    stream = make_stream(peer, Recorder(), metrics, admission)
    with pytest.raises(SttUnavailable) as unavailable:
        await stream.start()
    assert unavailable.value.reason.startswith("connect_failed")
    assert sample(metrics, "bridge_stt_errors_total", kind="connect") == 1
    assert admission.in_use == 0


async def test_malformed_server_messages_are_skipped_and_counted(
    metrics: SpeechMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    server_error = encode_stt_server_message(SttError(message="bad audio", status_code=400))
    peer = await start_peer(garbage=("not json", '{"type": "bogus"}', '{"type": "transcript", "is_final": "yes"}',
                                     server_error))
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission)
        with caplog.at_level(logging.WARNING, logger="bridge.cartesia.stt"):
            await stream.start()
            await listener.wait_for(lambda: any(isinstance(m, SttError) for m in listener.messages))
            for i in range(5):
                stream.send_audio(frame(i))
            stream.finalize()
            await listener.wait_for(lambda: listener.flushes == 1)
        assert listener.finals() == [f"{5 * FRAME} bytes"]
        assert sample(metrics, "bridge_stt_errors_total", kind="malformed") == 3
        assert sample(metrics, "bridge_stt_errors_total", kind="server_error") == 1
        bad = [r for r in caplog.records if r.getMessage() == "stt_bad_message"]
        assert len(bad) == 3 and all(r.levelno == logging.WARNING and getattr(r, "call_sid", None) == "CA123"
                                     for r in bad)
        # the error reached the listener, and the stream went on
        assert [type(m).__name__ for m in listener.messages] == ["SttError", "SttTranscript", "SttFlushDone"]
        assert stream.connected and listener.kinds() == []
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_close_is_idempotent_and_bounded_without_done(metrics: SpeechMetrics) -> None:
    peer = await start_peer(answer_close=False)
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission, close_timeout_s=0.3)
        await stream.start()
        stream.send_audio(frame(1))
        started = time.monotonic()
        await asyncio.gather(stream.close(), stream.close())  # concurrent calls: both return once closed
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 2.5, elapsed  # waited for done, but not longer than the bounds
        started = time.monotonic()
        await stream.close()
        assert time.monotonic() - started < 0.05
        assert peer.connections[0].commands == [(FRAME, CLOSE)]
        assert listener.kinds() == []  # our own close is not a loss
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_full_send_queue_drops_oldest_audio_with_one_warning(
    metrics: SpeechMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    peer = await start_peer(stall=True)  # never reads: TCP buffers, then the transport, then the outbox fill
    try:
        admission = SttAdmission(1, metrics)
        limit = 64_000
        stream = make_stream(peer, Recorder(), metrics, admission, outbox_limit_bytes=limit, close_timeout_s=0.2)
        await stream.start()
        chunk = bytes(16_000)  # 2 s of audio per call keeps the loop short
        with caplog.at_level(logging.WARNING, logger="bridge.cartesia.stt"):
            for i in range(4000):  # bounded: at most 64 MB before the kernel buffers are surely full
                stream.send_audio(chunk)
                assert stream.outbox_bytes <= limit
                if sample(metrics, "bridge_stt_audio_dropped_bytes_total") >= 10 * len(chunk):
                    break
                if i % 64 == 0:
                    await asyncio.sleep(0)
        dropped = sample(metrics, "bridge_stt_audio_dropped_bytes_total")
        assert dropped >= 10 * len(chunk), "the socket never backed up"
        assert dropped % len(chunk) == 0  # whole chunks, oldest first
        warnings = [r for r in caplog.records if r.getMessage() == "stt_audio_dropped"]
        assert len(warnings) == 1  # one line per episode, not per frame
        started = time.monotonic()
        await assert_clean_after_close(stream, admission, metrics)
        assert time.monotonic() - started < 2.5
    finally:
        await peer.stop()


async def test_forget_replay_means_a_later_loss_loses_no_turn(metrics: SpeechMetrics) -> None:
    peer = await start_peer(kill_first_after=30 * FRAME)
    try:
        listener = Recorder()
        admission = SttAdmission(1, metrics)
        stream = make_stream(peer, listener, metrics, admission, replay_limit_bytes=10 * FRAME)
        await stream.start()
        for i in range(20):  # a long silence: the replay buffer overflows
            stream.send_audio(frame(i))
        assert stream.replay_bytes == 10 * FRAME
        stream.forget_replay()  # the owner knows no turn is in progress
        assert stream.replay_bytes == 0
        speech = [frame(i) for i in range(20, 30)]
        for f in speech:
            stream.send_audio(f)
        await listener.wait_for(lambda: "restored" in listener.kinds())
        assert [p for k, p in listener.events if k == "lost"] == [("connection_lost", False)]
        await until(lambda: len(peer.connections[1].received) >= len(speech) * FRAME)
        assert bytes(peer.connections[1].received) == b"".join(speech)
        await assert_clean_after_close(stream, admission, metrics)
    finally:
        await peer.stop()


async def test_a_failing_listener_does_not_stop_the_stream(
    peer: SttPeer, metrics: SpeechMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Recorder):
        def on_stt_message(self, msg: SttServerMessage, received_at: float) -> None:
            super().on_stt_message(msg, received_at)
            if isinstance(msg, SttTranscript):
                raise RuntimeError("bug in the call")

    listener = Broken()
    admission = SttAdmission(1, metrics)
    stream = make_stream(peer, listener, metrics, admission)
    await stream.start()
    with caplog.at_level(logging.ERROR, logger="bridge.cartesia.stt"):
        for turn in range(2):
            stream.send_audio(frame(turn))
            stream.finalize()
            await listener.wait_for(lambda turn=turn: listener.flushes == turn + 1)
    failures = [r for r in caplog.records if r.getMessage() == "stt_listener_failed"]
    assert len(failures) == 2 and "bug in the call" in str(getattr(failures[0], "exc", ""))
    assert stream.connected and stream.replay_bytes == 0
    await assert_clean_after_close(stream, admission, metrics)


def test_speech_metrics_are_exposed_with_prometheus_names() -> None:
    from prometheus_client import generate_latest

    metrics = SpeechMetrics(CollectorRegistry(auto_describe=True))
    metrics.stt_latency.observe(0.012)
    metrics.turn_ttfa.observe(0.4)
    text = generate_latest(metrics.registry).decode()
    for name in ("bridge_stt_sockets ", "bridge_stt_admission_refused_total ", "bridge_stt_reconnects_total ",
                 "bridge_stt_audio_dropped_bytes_total ", "bridge_stt_turns_lost_total ",
                 'bridge_stt_errors_total{kind="handshake_401"} 0.0', 'bridge_stt_errors_total{kind="lost"} 0.0',
                 'bridge_stt_turns_total{outcome="prompt"} 0.0', 'bridge_stt_turns_total{outcome="lost"} 0.0',
                 'bridge_stt_latency_seconds_bucket{le="0.02"} 1.0', 'bridge_stt_latency_seconds_bucket{le="0.01"} 0.0',
                 'bridge_turn_ttfa_seconds_bucket{le="0.4"} 1.0', 'bridge_turn_ttfa_seconds_bucket{le="5.0"} 1.0'):
        assert name in text, name


async def test_coalesced_audio_is_whole_and_finalize_flushes_it(peer: SttPeer, metrics: SpeechMetrics) -> None:
    listener = Recorder()
    admission = SttAdmission(1, metrics)
    stream = make_stream(peer, listener, metrics, admission, coalesce_bytes=5 * FRAME)
    await stream.start()
    frames = [frame(i) for i in range(12)]
    for f in frames:
        stream.send_audio(f)
    stream.finalize()  # the 2 frames still held go out before the finalize
    await listener.wait_for(lambda: listener.flushes == 1)
    conn = peer.connections[0]
    assert bytes(conn.received) == b"".join(frames)
    assert conn.message_sizes == [5 * FRAME, 5 * FRAME, 2 * FRAME]
    assert conn.commands == [(12 * FRAME, FINALIZE)]
    stream.send_audio(frame(12))
    await assert_clean_after_close(stream, admission, metrics)
    assert bytes(conn.received).endswith(frame(12)) and conn.commands[-1] == (13 * FRAME, CLOSE)
