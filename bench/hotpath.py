"""The bridge's per-call hot path without sockets, for profilers (issue 18).

One ``CallCore`` speaks ``--seconds`` of audio the way the capacity bench's
Cartesia peer sends it (``--chunk-ms`` chunks, a ``timestamps`` message after
each chunk in which words start, ``--words-per-s`` words per second), while
the simulated Twilio side sends a 20 ms inbound ``media`` frame per 20 ms of
audio and echoes every mark. Every message goes through the same code as in
the server: ``parse_server_text`` (the Cartesia read loop's decoder),
``CallCore.on_cartesia``, ``InboundFastPath`` / ``parse_inbound`` (the Twilio
socket's decoders), ``CallCore.on_media`` / ``on_mark``. With ``--glue`` the
Twilio texts enter where the socket's data callback hands them over
(``TwilioStream._on_text_inline``) and the Cartesia messages at
``CallSession.on_tts_message``, so the stream, the session's dispatch,
``flush`` and WebSocket framing are measured too (the socket is in memory). The Cartesia wire texts are built once
before timing, with the emulator's own encoder.

It prints CPU time (``time.process_time``, best of ``--repeat``) per call-second
of audio, and checks that the audio sent to Twilio is exactly the audio given
(any mismatch exits 1). For instruction counts that a noisy machine does not
change, run it under callgrind with ``--repeat 1 --no-check`` at two lengths, and
the same with ``--setup-only``; the hot path's instructions per call-second are
``((I40 - I10) - (S40 - S10)) / 30``::

    python bench/hotpath.py --seconds 60
    PYTHONHASHSEED=0 valgrind --tool=callgrind python bench/hotpath.py --repeat 1 --no-check --seconds 10   # I10

Per message: the same at one length with ``--frames-per-20ms 2`` (and its
``--setup-only``) gives the instructions per inbound media frame as the
difference over the extra frames; ``--mark-interval-ms 50`` against the
default 100 gives the fixed cost of one mark echo (its parse, ``on_mark``,
one more outbound ``media`` + ``mark`` pair and one more write), bytes excluded.
The counts of messages handled are printed with every run.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from bridge.call import CallCore, CallSettings, ToCartesia, ToTwilio
from bridge.cartesia.protocol import Chunk, Done, WordTimestamps, encode_server_message, parse_server_text
from bridge.wsframe import frame_text
from metrics import BridgeMetrics
from telephony.media import (
    BYTES_PER_MS,
    FRAME_BYTES,
    InboundFastPath,
    Start,
    TwilioMessageFactory,
    parse_inbound,
)


def cartesia_texts(ctx: str, audio: bytes, chunk_ms: int, words_per_s: float) -> list[bytes]:
    """The peer's wire messages: chunks, word timestamps as the emulator emits them, done."""
    chunk_bytes = chunk_ms * BYTES_PER_MS
    n_words = int(len(audio) / 8000 * words_per_s)
    starts = [k / words_per_s for k in range(n_words)]
    out: list[bytes] = []
    word = 0
    for pos in range(0, len(audio), chunk_bytes):
        data = audio[pos:pos + chunk_bytes]
        out.append(orjson.dumps(encode_server_message(Chunk(ctx, base64.b64encode(data).decode(), 0.0, 1))))
        end_s = (pos + len(data)) / 8000
        first = word
        while word < n_words and starts[word] < end_s:
            word += 1
        if word > first:
            msg = WordTimestamps(ctx, ["word"] * (word - first), starts[first:word],
                                 [s + 0.8 / words_per_s for s in starts[first:word]], 1)
            out.append(orjson.dumps(encode_server_message(msg)))
    out.append(orjson.dumps(encode_server_message(Done(ctx))))
    return out


class MemorySocket:
    """Stands in for the Twilio WebSocket in ``--glue`` runs: frames what the
    stream writes (as ``InlineWebSocketResponse.send_texts`` does) and keeps the texts."""

    closed = False
    write_buffer_size = 0

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.writes = 0
        self.bytes = 0

    def set_sink(self, sink: object) -> bool:
        return True

    def send_texts(self, texts: list[str]) -> None:
        self.writes += 1
        self.bytes += len(b"".join([frame_text(t.encode()) for t in texts]))
        self.texts += texts

    def take(self) -> list[str]:
        texts, self.texts = self.texts, []
        return texts


class NoCartesia:
    """The call's Cartesia contexts in ``--glue`` runs: requests are dropped (the peer's
    replies are replayed from prebuilt texts instead)."""

    def send(self, context_id: str, request: object) -> None:
        pass

    def cancel(self, context_id: str) -> None:
        pass

    def close(self) -> None:
        pass


def glue_session(clock: Callable[[], float], settings: CallSettings) -> tuple[Any, MemorySocket]:
    """A real ``CallSession`` + ``TwilioStream`` on an in-memory socket, started."""
    from bridge.agent.connector import AgentConnector
    from bridge.registry import CallRegistry
    from bridge.session import CallServices, CallSession

    metrics = BridgeMetrics()
    counter = itertools.count(1)
    agents = AgentConnector(agent_url=None, allowlist=(), token=None, connect_timeout_s=1.0, greeting="",
                            max_links=1, metrics=metrics)
    services = CallServices(settings=settings, metrics=metrics, registry=CallRegistry(10), agents=agents,
                            tts=lambda owner: NoCartesia(), fallback_line="")  # type: ignore[arg-type,return-value]
    sock = MemorySocket()
    session = CallSession(services, sock)  # type: ignore[arg-type]
    session.core._new_id = lambda: f"u{next(counter)}"
    session.twilio.clock = clock
    session.core.on_start(Start("MZ1", "CA1", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0)
    session.started = True
    session.twilio.bind("CA1", "MZ1")  # as CallSession._on_start does
    return session, sock


def run_once(seconds: float, chunk_ms: int, words_per_s: float, *, setup_only: bool = False,
             check: bool = True, glue: bool = False, frames_per_20ms: int = 1,
             mark_interval_ms: int = 100) -> tuple[float, bool, Counter[str]]:
    """One call of ``seconds`` audio; ``glue``: through ``TwilioStream`` and ``CallSession``
    (the socket's data callback, ``_execute``, ``flush`` and framing) instead of ``CallCore`` alone.
    Returns CPU seconds, whether the audio was exact, and counts of the messages handled."""
    settings = CallSettings(model_id="sonic-3", voice_id="v", language="en", mark_interval_ms=mark_interval_ms)
    counts: Counter[str] = Counter()
    clock_now = [0.0]

    def clock() -> float:
        return clock_now[0]

    twilio = TwilioMessageFactory("MZ1", "CA1", "AC1")
    inbound_frame = b"\xfe\xff" * (FRAME_BYTES // 2)  # near-silence: the VAD runs, hears no barge-in
    audio = bytes((i * 7 + i // 320) & 0x7F for i in range(int(seconds * 8000)))
    text = "Hello there. " * int(seconds * words_per_s / 2 + 1)
    if glue:
        session, sock = glue_session(clock, settings)
        core = session.core
        actions = core.speak(text, last=True, now=0.0)
        session._execute(actions)
        sock.take()
    else:
        counter = itertools.count(1)
        core = CallCore(settings, BridgeMetrics(), new_id=lambda: f"u{next(counter)}")
        core.on_start(Start("MZ1", "CA1", "AC1", {}, ["inbound"], "audio/x-mulaw", 8000, 1), 0.0)
        actions = core.speak(text, last=True, now=0.0)
    ctx = next(a.context_id for a in actions if isinstance(a, ToCartesia))
    texts = cartesia_texts(ctx, audio, chunk_ms, words_per_s)
    # Built before timing: inbound media as Twilio sends it; marks echo with Twilio's field order.
    media_texts = iter([twilio.media(inbound_frame, 20 * (k + 1))
                        for k in range((int(seconds * 50) + 100) * frames_per_20ms)])
    mark_prefix = '{"event":"mark","sequenceNumber":"1","streamSid":"MZ1","mark":{"name":"'

    if glue:
        on_text = session.twilio._on_text_inline
        on_tts = session.on_tts_message

        def from_cartesia(raw: bytes, now: float) -> list[str]:
            on_tts(ctx, parse_server_text(raw), now)
            return sock.take()

        def from_twilio(text: str, now: float) -> list[str]:
            if not on_text(text):
                raise SystemExit(f"the inline path declined {text[:60]!r}")
            return sock.take()
    else:
        def from_cartesia(raw: bytes, now: float) -> list[str]:
            return [a.text for a in core.on_cartesia(ctx, parse_server_text(raw), now) if isinstance(a, ToTwilio)]

        fast = InboundFastPath("MZ1")

        def from_twilio(text: str, now: float) -> list[str]:
            # As the Twilio socket reads: Twilio's layout takes the recognizer, anything else the parser.
            found = fast.media(text)
            if found is not None:
                out = core.on_media(found[0], found[1], now)
            else:
                name = fast.mark(text)
                if name is None:
                    event = parse_inbound(text)
                    name = event.name  # type: ignore[union-attr]
                out = core.on_mark(name, now)
            return [a.text for a in out if isinstance(a, ToTwilio)]

    sent: list[str] = []
    echoes: list[str] = []
    media_ms = 0
    t0 = time.process_time()
    now = 0.0
    step = chunk_ms / 1000.0 / 2  # chunks at 2x real time
    pending = iter(() if setup_only else texts)
    while True:
        raw = next(pending, None)
        if raw is None and not echoes:
            break
        now += step
        clock_now[0] = now
        out = [] if raw is None else from_cartesia(raw, now)
        # Twilio plays in real time: inbound frames as time passes, echoes of the marks sent.
        while media_ms < now * 1000:
            media_ms += 20
            for _ in range(frames_per_20ms):
                out += from_twilio(next(media_texts), now)
                counts["media in"] += 1
        names, echoes = echoes, []
        counts["cartesia in"] += raw is not None
        counts["marks in"] += len(names)
        for name in names:
            out += from_twilio(mark_prefix + name + '"}}', now)
        for sent_text in out:
            if sent_text[11] == "e":
                sent.append(sent_text)
            elif sent_text[11] == "a":
                echoes.append(sent_text[sent_text.rindex(':"') + 2:-3])
    cpu = time.process_time() - t0
    counts["media out"] = len(sent)
    if glue:
        counts["writes"] = sock.writes
    if setup_only or not check:
        return cpu, True, counts
    played = b"".join(base64.b64decode(orjson.loads(t)["media"]["payload"]) for t in sent)
    return cpu, played == audio + b"\xff" * (-len(audio) % FRAME_BYTES), counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="audio per run, s")
    p.add_argument("--chunk-ms", type=int, default=40)
    p.add_argument("--words-per-s", type=float, default=15.0)
    p.add_argument("--repeat", type=int, default=5, help="runs; the best CPU time is reported")
    p.add_argument("--no-check", action="store_true", help="skip the audio comparison (for instruction counts)")
    p.add_argument("--glue", action="store_true",
                   help="through the Twilio stream's data callback and the call session (in-memory socket)")
    p.add_argument("--frames-per-20ms", type=int, default=1,
                   help="inbound media frames per 20 ms (2 vs 1: the difference is the per-frame cost)")
    p.add_argument("--mark-interval-ms", type=int, default=100,
                   help="playout mark interval (50 vs 100: the difference is the per-mark-echo cost)")
    p.add_argument("--setup-only", action="store_true",
                   help="build the inputs, skip the hot path: the baseline to subtract from instruction counts")
    args = p.parse_args(argv)
    best = None
    exact = True
    counts: Counter[str] = Counter()
    for _ in range(args.repeat):
        cpu, ok, counts = run_once(args.seconds, args.chunk_ms, args.words_per_s, setup_only=args.setup_only,
                                   check=not args.no_check, glue=args.glue, frames_per_20ms=args.frames_per_20ms,
                                   mark_interval_ms=args.mark_interval_ms)
        exact = exact and ok
        best = cpu if best is None else min(best, cpu)
    assert best is not None
    print(f"hot path: {best * 1000 / args.seconds:.3f} ms CPU per call-second "
          f"({args.seconds:g} s of audio, {args.chunk_ms} ms chunks, {args.words_per_s:g} words/s, "
          f"best of {args.repeat}{', glue' if args.glue else ''}); audio exact: {exact}")
    print("messages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
