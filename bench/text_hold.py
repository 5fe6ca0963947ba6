"""Cartesia inputs per sentence and time to first audio for each ``CARTESIA_TEXT_HOLD_MS`` (issue 18).

``--utterances`` contexts (``CallContexts`` on a real ``CartesiaPool`` and the
emulator on 127.0.0.1, started ``--stagger-ms`` apart) each get the built-in
agent's long passage a word per loop turn at ``--words-per-s``, as
``bridge/loadtest/agent_server.py`` streams it and ``CallCore`` cuts it (a
word with its trailing space; the last with ``continue: false``), with
``max_buffer_delay_ms`` ``--buffer-delay-ms`` as the bridge sends it. For each
hold in ``--holds`` it prints:

* inputs/sentence: ``bridge_cartesia_text_inputs_total`` / sentences written;
* first word -> audio p50/p90: the first word sent -> the first chunk back (TTFA, ms);
* sentence end -> audio p50/p90: the token that ends the first sentence -> the first chunk (ms);
* held p50/max: how long each word waited in the bridge (given -> written to the socket, ms), and the
  first word's and each sentence end's wait (max over utterances): what the hold adds, free of the
  machine's noise in the audio timings.

The emulator answers ``--ttfb-ms`` after it starts a generation: at a
sentence end, at 250 buffered characters, or ``max_buffer_delay_ms`` after
text arrived. Latencies are wall clock on a shared machine (p50 over the
utterances is robust to a few late wake-ups; say the load when you quote them)::

    python bench/text_hold.py --holds 0,40,80,120

For the bridge's own instructions per word, run the emulator apart (``media-bridge emulator --port 8765
--ttfb-ms 50 --rtf 0.5 --chunk-ms 40``) and compare callgrind totals of one hold at a time::

    valgrind --tool=callgrind python bench/text_hold.py --emulator-url ws://127.0.0.1:8765 --holds 80 --utterances 4
"""

from __future__ import annotations

import argparse
import asyncio
import re

from bridge.agent.builtin import LONG_PASSAGE
from bridge.cartesia.client import CartesiaPool, ContextLease
from bridge.cartesia.contexts import CallContexts
from bridge.cartesia.emulator import DEFAULT_VOICE_ID, Emulator, EmulatorSettings
from bridge.cartesia.protocol import Chunk, GenerationRequest, ServerMessage
from bridge.stats import percentile
from metrics import BridgeMetrics


class Owner:
    """Records when each context's first chunk arrived (loop time, s)."""

    closed = False

    def __init__(self) -> None:
        self.first_chunk: dict[str, float] = {}

    def on_tts_message(self, context_id: str, msg: ServerMessage, received_at: float) -> None:
        if isinstance(msg, Chunk) and context_id not in self.first_chunk:
            self.first_chunk[context_id] = asyncio.get_running_loop().time()

    def on_tts_failed(self, context_id: str, reason: str, *, retry: bool, cause: str) -> None:
        raise SystemExit(f"{context_id} failed: {reason}")


class Clock:
    """When each word was given to ``CallContexts`` and when each input reached the lease (loop s)."""

    def __init__(self) -> None:
        self.given: dict[str, list[tuple[float, str]]] = {}
        self.written: dict[str, list[tuple[float, str]]] = {}

    def waits(self) -> tuple[list[float], list[float], list[float]]:
        """(every word's wait, each first word's wait, each sentence end's wait), ms."""
        every: list[float] = []
        first: list[float] = []
        ends: list[float] = []
        for ctx, given in self.given.items():
            # The k-th character of the transcript was written with the input that covers it.
            written_at: list[float] = []
            for t, text in self.written.get(ctx, []):
                written_at.extend([t] * len(text))
            pos = 0
            for i, (t, text) in enumerate(given):
                pos += len(text)
                if pos > len(written_at):
                    break
                wait = (written_at[pos - 1] - t) * 1000
                every.append(wait)
                if i == 0:
                    first.append(wait)
                if re.search(r"[.!?]\s*$", text):
                    ends.append(wait)
        return every, first, ends


async def speak(contexts: CallContexts, ctx: str, words: list[str], words_per_s: float, buffer_delay_ms: int,
                marks: dict[str, tuple[float, float]], clock: Clock) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    first_word = sentence_end = 0.0
    for i, text in enumerate(words):
        await asyncio.sleep(max(0.0, start + i / words_per_s - loop.time()))
        last = i == len(words) - 1
        now = loop.time()
        clock.given.setdefault(ctx, []).append((now, text))
        contexts.send(ctx, GenerationRequest(ctx, text, "sonic-3", DEFAULT_VOICE_ID, continue_=not last,
                                             language="en", add_timestamps=True,
                                             max_buffer_delay_ms=buffer_delay_ms))
        if i == 0:
            first_word = now
        if not sentence_end and re.search(r"[.!?]\s*$", text):
            sentence_end = now
    marks[ctx] = (first_word, sentence_end)


def pct(values: list[float], q: float) -> float:
    return percentile(values, q) or 0.0


async def run(hold_ms: int, args: argparse.Namespace) -> str:
    emulator = None if args.emulator_url else Emulator(EmulatorSettings(ttfb_ms=args.ttfb_ms, rtf=0.5, chunk_ms=40))
    if emulator is not None:
        await emulator.start()
    metrics = BridgeMetrics()
    pool = CartesiaPool(url=args.emulator_url or str(emulator.url if emulator else ""), api_key=None, version="2026-03-01", metrics=metrics, size=2,
                        max_concurrency=args.utterances + 1)
    owner = Owner()
    contexts = CallContexts(pool, owner, metrics, admission_timeout_s=5, context_timeout_s=30, text_hold_ms=hold_ms)
    words = [w + " " for w in LONG_PASSAGE.split(" ")]
    words[-1] = words[-1].strip()
    sentences = len(re.findall(r"[.!?](\s|$)", LONG_PASSAGE))
    marks: dict[str, tuple[float, float]] = {}
    clock = Clock()
    lease_send = ContextLease.send

    def timed_send(lease: ContextLease, request: GenerationRequest) -> None:
        clock.written.setdefault(request.context_id, []).append(
            (asyncio.get_running_loop().time(), request.transcript))
        lease_send(lease, request)

    ContextLease.send = timed_send  # type: ignore[method-assign, assignment]
    try:
        assert await pool.prewarm(5)
        tasks = []
        for u in range(args.utterances):
            tasks.append(asyncio.create_task(speak(contexts, f"u{u}", words, args.words_per_s,
                                                   args.buffer_delay_ms, marks, clock)))
            await asyncio.sleep(args.stagger_ms / 1000)
        await asyncio.gather(*tasks)
        for _ in range(500):
            if len(owner.first_chunk) == args.utterances:
                break
            await asyncio.sleep(0.01)
        inputs = metrics.cartesia_text_inputs._value.get()
        ttfa = [(owner.first_chunk[c] - m[0]) * 1000 for c, m in marks.items()]
        after_end = [(owner.first_chunk[c] - m[1]) * 1000 for c, m in marks.items()]
        every, first, ends = clock.waits()
        return (f"{hold_ms:7}  {inputs / (sentences * args.utterances):15.2f}  "
                f"{pct(ttfa, 0.5):15.0f} {pct(ttfa, 0.9):4.0f}  {pct(after_end, 0.5):13.0f} {pct(after_end, 0.9):4.0f}"
                f"  {pct(every, 0.5):8.1f} {max(every):5.1f}  {max(first):10.1f}  {max(ends):8.1f}")
    finally:
        ContextLease.send = lease_send  # type: ignore[method-assign]
        contexts.close()
        await pool.close()
        if emulator is not None:
            await emulator.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--holds", default="0,40,80,120", help="comma-separated CARTESIA_TEXT_HOLD_MS values")
    p.add_argument("--utterances", type=int, default=20)
    p.add_argument("--stagger-ms", type=float, default=7.0)
    p.add_argument("--words-per-s", type=float, default=50.0)
    p.add_argument("--buffer-delay-ms", type=int, default=300)
    p.add_argument("--ttfb-ms", type=float, default=50.0)
    p.add_argument("--emulator-url", default="",
                   help="an emulator in another process (ws://127.0.0.1:PORT), e.g. to count only this "
                        "process's instructions under callgrind")
    args = p.parse_args()
    words = len(LONG_PASSAGE.split(" "))
    print(f"{args.utterances} utterances x {words} words at {args.words_per_s:g}/s, "
          f"max_buffer_delay_ms {args.buffer_delay_ms}, emulator TTFB {args.ttfb_ms:g} ms")
    print("hold ms  inputs/sentence  word->audio p50  p90  end->audio p50  p90  held p50   max  first word  sent.end"
          "  (ms)")
    for hold in args.holds.split(","):
        print(asyncio.run(run(int(hold), args)))


if __name__ == "__main__":
    main()
