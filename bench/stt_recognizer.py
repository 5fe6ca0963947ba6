"""Accuracy and cost of the emulator's tone-voice recogniser (``bridge.cartesia.emulator.recognizer``).

Renders random sentences with every tone voice at several speeds (the emulator's own
``ToneSynth``), feeds them in 20 ms frames whose boundaries fall anywhere in the bursts,
after a random lead of silence, and counts words and sentences heard exactly. Two
vocabularies: ``rendered`` (the sentence's words were rendered in this process, as when the
caller's audio comes from the same emulator) and ``builtin`` (never rendered: only the
built-in common words). It also runs noise through it (words heard in noise: false alarms).
Prints a table and the CPU cost per second of audio (recognition only).

    python bench/stt_recognizer.py --sentences 200 --seed 1
"""

from __future__ import annotations

import argparse
import array
import random
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from bridge.cartesia.emulator.recognizer import StreamingRecognizer
from bridge.cartesia.emulator.vocabulary import Vocabulary
from bridge.cartesia.emulator.voices import TONE_VOICES, ToneSynth, normalize_word
from bridge.cartesia.protocol import OutputFormat

SPEEDS = (0.6, 0.8, 1.0, 1.25, 1.5, 2.0)
ENCODINGS = (("pcm_mulaw", 8000, 160), ("pcm_s16le", 16000, 640))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=200, help="sentences per vocabulary mode")
    parser.add_argument("--words", type=int, default=8, help="words per sentence")
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    rnd = random.Random(ns.seed)
    synth = ToneSynth()
    print(f"{'mode':8} {'encoding':10} {'sentences ok':>14} {'words ok':>14} {'audio s':>8} {'cpu ms/audio s':>15}")
    for mode in ("rendered", "builtin"):
        for encoding, rate, frame in ENCODINGS:
            vocabulary = Vocabulary()
            ok_sentences = ok_words = total_words = 0
            audio_s = cpu_s = 0.0
            for _ in range(ns.sentences):
                words = rnd.sample(vocabulary.builtin, ns.words)
                if mode == "rendered":
                    words = [w.capitalize() + "," if rnd.random() < 0.2 else w for w in words]
                    vocabulary.add_rendered(" ".join(words))
                voice, speed = rnd.choice(TONE_VOICES), rnd.choice(SPEEDS)
                fmt = OutputFormat(encoding, rate)
                audio = synth.render(" ".join(words), fmt, voice, speed=speed).audio
                lead = bytes(fmt.bytes_per_sample * rnd.randint(0, rate // 10))
                if encoding == "pcm_mulaw":
                    lead = b"\xff" * len(lead)
                audio = lead + audio
                t0 = time.process_time()
                rec = StreamingRecognizer(vocabulary, rate, encoding)
                for pos in range(0, len(audio), frame):
                    rec.feed(audio[pos : pos + frame])
                rec.flush()
                heard = [w.word for w in rec.commit()]
                cpu_s += time.process_time() - t0
                audio_s += len(audio) / (rate * fmt.bytes_per_sample)
                expected = [normalize_word(w) for w in words]
                ok_sentences += heard == expected
                total_words += len(expected)
                ok_words += sum(a == b for a, b in zip(heard, expected, strict=False)) if len(heard) == len(expected) else 0
            print(f"{mode:8} {encoding:10} {ok_sentences:>6}/{ns.sentences:<7} {ok_words:>6}/{total_words:<7} "
                  f"{audio_s:8.1f} {1000 * cpu_s / audio_s:15.2f}")
    vocabulary = Vocabulary()
    noise = array.array("h", [int(rnd.gauss(0, 4000)) for _ in range(8000 * 60)]).tobytes()
    rec = StreamingRecognizer(vocabulary, 8000, "pcm_mulaw")
    rec.feed(audioop.lin2ulaw(noise, 2))
    rec.flush()
    print(f"noise: 60 s of gaussian noise (σ 4000) → {len(rec.commit())} words heard, "
          f"{rec.bursts_total} bursts segmented, {rec.skipped_total} skipped as not a tone word")


if __name__ == "__main__":
    main()
