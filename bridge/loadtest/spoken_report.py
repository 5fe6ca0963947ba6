"""The ``spoken`` section of the load-test report: turns, prompts right or wrong, speech latencies.

Definitions:

* **end of speech -> reply** (at the caller): the sentence's last 20 ms frame written to
  the bridge's socket -> the first ``media`` message of the reply received. It includes
  the bridge's ``speechTimeout`` (quiet that ends the turn), the STT's final transcript,
  the agent and Cartesia's TTFB. Barge-in turns count from their own end of speech, and
  their reply is the first audio after the bridge's ``clear``.
* **prompt right / wrong**: the reply's text is what the emulator was asked to say for the
  context whose audio the caller heard at the reply's start; right when it is exactly
  ``expected_reply(sentence)`` ("You said <sentence>."), which is what the agent says for a
  prompt equal to the sentence. ``unverified``: no emulator (``--target``) or the reply's
  audio matched no context (an integrity mismatch) or matched several texts.
* **turns lost**: no reply within ``REPLY_TIMEOUT_S`` of the end of speech; ``cut``: the
  call ended first; ``not_cleared``: a barge-in the bridge did not cut the reply for.
* The bridge's own figures come from ``/metrics``: ``bridge_stt_latency_seconds`` (end of
  speech -> final transcript, including ``speechTimeout``), ``bridge_turn_ttfa_seconds``
  (end of speech -> first reply frame sent to Twilio), ``bridge_stt_turns_total{outcome}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from metrics.scrape import parse_samples, value
from telephony.media import FRAME_BYTES

from .integrity import AudioIndex
from .results import CallResult
from .spoken import expected_reply
from .stats import dist_ms, histogram_ms

#: Examples of wrong prompts kept in the report.
MAX_EXAMPLES = 10


def reply_text(stream: bytes, offset: int, end: int, index: AudioIndex, transcripts: Mapping[str, str]) -> str | None:
    """The text of the utterance ``stream[offset:end]`` of a call's received audio: the transcript
    of the emulator context whose audio it is (whole, or a prefix when it was cut); None when no
    context matches or the matching ones were asked to say different texts."""
    texts: set[str] = set()
    for blob in index.by_head.get(stream[offset:offset + FRAME_BYTES], []):
        n = min(len(blob.audio), end - offset)
        if n > 0 and stream[offset:offset + n] == blob.audio[:n]:
            texts.update(transcripts[c] for c in blob.contexts if c in transcripts)
    return texts.pop() if len(texts) == 1 else None


def spoken_section(results: list[CallResult], index: AudioIndex | None, transcripts: Mapping[str, str] | None,
                   metrics_text: str, speech_timeout_ms: int) -> dict[str, Any]:
    """The report's ``spoken`` section (see the module docstring)."""
    samples = parse_samples(metrics_text) if metrics_text else {}
    outcomes: Counter[str] = Counter()
    right = wrong = unverified = 0
    examples: list[dict[str, Any]] = []
    latency: dict[str, list[float]] = {"all": [], "turn": [], "barge_in": []}
    for r in results:
        stream = bytes(r.call.record.received_audio) if r.call is not None else b""
        for t in r.turns:
            outcomes[t.outcome] += 1
            if t.outcome != "replied" or t.reply_offset is None:
                continue
            lat = t.reply_latency_s
            if lat is not None:
                latency["all"].append(lat)
                latency["barge_in" if t.barge_in else "turn"].append(lat)
            text = None
            if index is not None and transcripts is not None:
                end = next((s.end for s in r.spans if s.start == t.reply_offset), len(stream))
                text = reply_text(stream, t.reply_offset, end, index, transcripts)
            if text is None:
                unverified += 1
            elif text == expected_reply(t.sentence):
                right += 1
            else:
                wrong += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"call": r.index, "said": t.sentence, "reply": text})
    turns = sum(outcomes.values())
    barge = [t for r in results for t in r.turns if t.barge_in]
    return {
        "speech_timeout_ms": speech_timeout_ms,
        "turns": turns,
        "turns_by_outcome": dict(outcomes),
        "turns_lost": outcomes["lost"],
        "barge_in_turns": len(barge),
        "barge_in_cleared": sum(1 for t in barge if t.t_clear is not None),
        "prompts": {"right": right, "wrong": wrong, "unverified": unverified, "wrong_examples": examples},
        "end_of_speech_to_reply_ms": {
            **dist_ms(latency["all"]),
            "by_turn": {"turn": dist_ms(latency["turn"]), "barge_in": dist_ms(latency["barge_in"])},
            "definition": "caller's last speech frame written -> first frame of the reply received",
        },
        "bridge": {
            "stt_latency_ms": histogram_ms(samples, "bridge_stt_latency_seconds"),
            "turn_ttfa_ms": histogram_ms(samples, "bridge_turn_ttfa_seconds"),
            "stt_turns_by_outcome": {lab.get("outcome", ""): v for lab, v in samples.get("bridge_stt_turns_total", [])},
            "stt_errors_by_kind": {lab.get("kind", ""): v for lab, v in samples.get("bridge_stt_errors_total", [])},
            "stt_admission_refused": value(samples, "bridge_stt_admission_refused_total") if samples else None,
            "stt_turns_lost": value(samples, "bridge_stt_turns_lost_total") if samples else None,
            "stt_sockets_at_end": value(samples, "bridge_stt_sockets") if samples else None,
        },
    }


def spoken_summary_lines(s: dict[str, Any]) -> list[str]:
    """The spoken section in three lines, for the terminal."""
    e, b, p = s["end_of_speech_to_reply_ms"], s["bridge"], s["prompts"]
    return [
        f"spoken turns: {s['turns']} {s['turns_by_outcome']}; prompts right {p['right']} wrong {p['wrong']} "
        f"unverified {p['unverified']}; barge-in {s['barge_in_cleared']}/{s['barge_in_turns']} cleared",
        f"end of speech -> first reply audio at caller (ms): p50 {e['p50']} p95 {e['p95']} p99 {e['p99']} "
        f"(n={e['count']}, speechTimeout {s['speech_timeout_ms']} ms)",
        f"bridge STT latency (ms): p50 {b['stt_latency_ms']['p50']} p99 {b['stt_latency_ms']['p99']} "
        f"(n={b['stt_latency_ms']['count']}); turn TTFA p50 {b['turn_ttfa_ms']['p50']} "
        f"p99 {b['turn_ttfa_ms']['p99']} (n={b['turn_ttfa_ms']['count']})",
    ]


def spoken_html_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the HTML summary table."""
    e, b, p = s["end_of_speech_to_reply_ms"], s["bridge"], s["prompts"]

    def q(d: dict[str, Any]) -> str:
        return f"{d['p50']} / {d['p95']} / {d['p99']} ms (n={d['count']})"

    return [
        ("Spoken turns (by outcome)", f"{s['turns']} ({', '.join(f'{k}: {v}' for k, v in s['turns_by_outcome'].items())})"),
        ("Prompts right / wrong / unverified", f"{p['right']} / {p['wrong']} / {p['unverified']}"),
        ("Spoken turns lost", str(s["turns_lost"])),
        ("Barge-in turns cleared", f"{s['barge_in_cleared']} / {s['barge_in_turns']}"),
        (f"End of speech → first reply audio at caller p50 / p95 / p99 (speechTimeout {s['speech_timeout_ms']} ms)",
         q(e)),
        ("Bridge STT latency p50 / p95 / p99 (/metrics)", q(b["stt_latency_ms"])),
        ("Bridge turn TTFA p50 / p95 / p99 (/metrics)", q(b["turn_ttfa_ms"])),
    ]


#: The definitions above, for ``media-bridge loadtest --help``.
SPOKEN_DEFINITIONS = "Spoken scenario: " + (__doc__ or "").split("Definitions:", 1)[1].lstrip()
