"""Instructions per Cartesia ``chunk`` and per ``timestamps`` message through the whole chain (issue 18).

One call speaks ``--seconds`` of audio as ``bench/hotpath.py --glue`` drives it
(the capacity bench's Cartesia peer: ``--chunk-ms`` chunks at 2x real time, a
``timestamps`` message after each chunk in which words start, ``--words-per-s``),
but each Cartesia text enters where the socket's data callback hands it over:
``_Socket._on_raw`` (parse, route by context) -> ``CallContexts.on_cartesia_message``
-> ``CallSession.on_tts_message`` -> ``CallCore.on_cartesia`` -> the session's
``_execute`` and the Twilio stream's write (an in-memory socket). Twilio plays in
real time: inbound frames and mark echoes go through the stream's data callback.

The messages of the kind named by ``--measure`` are handed over through
``operator.call``, a C function nothing else in the process calls, so callgrind
counts exactly their instructions (everything they cause, the Twilio write
included) and nothing else::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --toggle-collect=_operator_call \\
        --callgrind-out-file=/tmp/cg.chunk python bench/cartesia_messages.py --measure chunk
    PYTHONHASHSEED=0 valgrind --tool=callgrind --toggle-collect=_operator_call \\
        --callgrind-out-file=/tmp/cg.ts python bench/cartesia_messages.py --measure timestamps

Instructions per message = the ``Collected`` total callgrind prints / the count
this script prints for that kind. It also checks that the audio sent to Twilio
is exactly the audio given (a mismatch exits 1).

Measured (2026-12-03, CPython 3.11.7, defaults: 20 s, 40 ms chunks, 15 words/s):
65 485 -> 62 729 instructions per chunk and 129 548 -> 108 220 per timestamps
message, before -> after branch ``cartesiafast``. What is left, per chunk /
per timestamps message: JSON decode 13 k / 21 k, routing to the call 3 k / 3 k,
``on_cartesia`` itself 14 k (11 k of it the base64 decode) / 6 k, ``_release``
4.5 k / 10 k, ``_pump`` (playout take, Twilio encode) 18 k / 43 k, the session's
``_execute`` and the Twilio stream's write 10 k / 24 k.
"""

from __future__ import annotations

import argparse
import base64
import operator
import sys
from collections import Counter

import orjson

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from hotpath import cartesia_texts, glue_session  # noqa: E402  (a sibling bench script)

from bridge.call import CallSettings, ToCartesia  # noqa: E402
from bridge.cartesia.client import CartesiaPool  # noqa: E402
from bridge.cartesia.contexts import CallContexts  # noqa: E402
from metrics import BridgeMetrics  # noqa: E402
from telephony.media import FRAME_BYTES, TwilioMessageFactory  # noqa: E402

KINDS = ("chunk", "timestamps")


def kind_of(raw: bytes) -> str:
    """``chunk``, ``timestamps`` or ``other`` (the emulator's layout starts with the type)."""
    for kind in KINDS:
        if raw.startswith(b'{"type":"' + kind.encode() + b'"'):
            return kind
    return "other"


def run(seconds: float, chunk_ms: int, words_per_s: float, measure: str | None) -> tuple[Counter[str], bool]:
    settings = CallSettings(model_id="sonic-3", voice_id="v", language="en")
    clock_now = [0.0]
    session, sock = glue_session(lambda: clock_now[0], settings)
    core = session.core
    actions = core.speak("Hello there. " * int(seconds * words_per_s / 2 + 1), last=True, now=0.0)
    session._execute(actions)
    sock.take()
    ctx = next(a.context_id for a in actions if isinstance(a, ToCartesia))
    # The pool is never started: only its first socket's routing table is used.
    metrics = BridgeMetrics()
    pool = CartesiaPool(url="ws://127.0.0.1:9", api_key=None, version="2026-03-01", metrics=metrics, size=1)
    socket = pool._sockets[0]
    contexts = CallContexts(pool, session, metrics, admission_timeout_s=1.0, context_timeout_s=10.0)
    socket.contexts[ctx] = contexts

    audio = bytes((i * 7 + i // 320) & 0x7F for i in range(int(seconds * 8000)))
    texts = cartesia_texts(ctx, audio, chunk_ms, words_per_s)
    twilio = TwilioMessageFactory("MZ1", "CA1", "AC1")
    inbound_frame = b"\xfe\xff" * (FRAME_BYTES // 2)
    media_texts = iter([twilio.media(inbound_frame, 20 * (k + 1)) for k in range(int(seconds * 50) + 100)])
    mark_prefix = '{"event":"mark","sequenceNumber":"1","streamSid":"MZ1","mark":{"name":"'
    on_text = session.twilio._on_text_inline
    on_raw = socket._on_raw
    call = operator.call

    counts: Counter[str] = Counter()
    sent: list[str] = []
    echoes: list[str] = []
    media_ms = 0
    now = 0.0
    step = chunk_ms / 1000.0 / 2  # chunks at 2x real time
    pending = iter(texts)
    while True:
        raw = next(pending, None)
        if raw is None and not echoes:
            break
        now += step
        clock_now[0] = now
        if raw is not None:
            kind = kind_of(raw)
            counts[kind] += 1
            if kind == measure:
                call(on_raw, raw)
            else:
                on_raw(raw)
        out = sock.take()
        while media_ms < now * 1000:
            media_ms += 20
            on_text(next(media_texts))
        names, echoes = echoes, []
        for name in names:
            on_text(mark_prefix + name + '"}}')
        out += sock.take()
        for sent_text in out:
            if sent_text[11] == "e":
                sent.append(sent_text)
            elif sent_text[11] == "a":
                echoes.append(sent_text[sent_text.rindex(':"') + 2:-3])
    played = b"".join(base64.b64decode(orjson.loads(t)["media"]["payload"]) for t in sent)
    return counts, played == audio + b"\xff" * (-len(audio) % FRAME_BYTES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="audio, s")
    p.add_argument("--chunk-ms", type=int, default=40)
    p.add_argument("--words-per-s", type=float, default=15.0)
    p.add_argument("--measure", choices=KINDS, help="hand this kind over through operator.call (for callgrind)")
    args = p.parse_args(argv)
    counts, exact = run(args.seconds, args.chunk_ms, args.words_per_s, args.measure)
    print("messages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; audio exact: {exact}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
