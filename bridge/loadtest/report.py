"""The load test's JSON report (schema ``media-bridge-loadtest/1``) and its summary lines.

Definitions (all measured at the simulated caller):

* **text -> first audio (TTFA)**: from the trigger (``start`` sent, for the
  greeting; the ``dtmf`` message sent, for the other turns) to the arrival of
  the first ``media`` message of the utterance it caused. Only triggers sent
  while the line was quiet count (every trigger in these scenarios is).
* **utterance**: with the local emulator, the caller's received byte stream
  is split exactly into the emulator contexts' audio (each utterance starts on
  a 160-byte frame, its last frame padded with 0xFF; a ``clear`` ends one).
* **audio integrity**: every utterance not interrupted by a ``clear`` must
  equal, byte for byte and contiguously, the audio some emulator context
  produced, plus 0xFF padding to the frame; an interrupted one (or the last,
  cut by hang-up) must be a prefix of it. Anything else is a mismatch. With
  ``--target`` there is no emulator to compare with: only the frame shape is
  checked (whole 160-byte frames, no protocol errors) and the report says so.
* **underrun**: the caller's buffer ran dry *inside* an utterance (a later
  part of the same utterance arrived after the earlier audio had all played);
  total ms is the silence so caused. With ``--target``: a dry gap not
  bridged by a trigger of ours (heuristic, labelled as such).
* **jitter**: RFC 3550-style |(Δ arrival) - (Δ audio position)| between
  consecutive media messages of one utterance, ms.
* **barge-in latency**: caller speech onset -> ``clear`` received.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bridge.stats import percentile
from metrics.scrape import parse_samples, value

from .html_report import render_html
from .integrity import AudioIndex, explain_mismatch
from .options import Options
from .results import CallResult, analyze_call
from .spoken_report import spoken_section, spoken_summary_lines
from .stats import dist_ms, histogram_ms, round_or_none

SCHEMA: Final = "media-bridge-loadtest/1"
#: The definitions above, for ``media-bridge loadtest --help``.
DEFINITIONS: Final = "Definitions" + (__doc__ or "").split("Definitions", 1)[1]


@dataclass
class RunFacts:
    """Everything a finished run measured, as the runner hands it to ``build_report``.

    ``samples``: the time series (one dict per ``sample_interval_s``, the last marked ``final``);
    ``metrics_text``: the bridge's ``/metrics`` after the calls; ``index``: the emulator's audio
    (None with ``--target``); ``emulator``: its chunk and lateness figures (None with ``--target``).
    """

    opts: Options
    results: list[CallResult]
    samples: list[dict[str, Any]]
    metrics_text: str
    index: AudioIndex | None
    bridge_pid: int | None
    signed: bool
    started_wall: float
    wall_s: float
    timed_out: bool
    rss_before_mb: float | None
    emulator: dict[str, Any] | None
    #: The agent the bridge used (None: its built-in demo agent).
    agent_url: str | None = None
    #: Our agent server process, when the run started one: pid, url, args, ``cpu_percent`` (one value
    #: per sample) and its ``/stats`` counters.
    agent: dict[str, Any] | None = None
    #: ``spoken`` scenario with the local emulator: context id -> the text it was asked to say.
    transcripts: dict[str, str] | None = None


def integrity_summary(results: list[CallResult], index: AudioIndex | None) -> dict[str, Any]:
    """The report's ``integrity`` section: exact with the emulator's audio, frame shape only without."""
    frame_errors = sum(1 for r in results for e in r.protocol_errors if "whole frames" in e)
    if index is None:
        return {
            "method": "frame-shape only (--target: no emulator to compare with)",
            "checked": False,
            "mismatches": frame_errors,
            "frame_shape_errors": frame_errors,
        }
    c = Counter(s.status for r in results for s in r.spans)
    bad = [(r, s) for r in results for s in r.spans if s.status == "mismatch"]
    return {
        "method": "exact: caller's received bytes split into emulator contexts' audio (0xFF-padded to 160 B)",
        "checked": True,
        "utterances_ok": c["ok"],
        "utterances_interrupted": c["interrupted"],
        "utterances_cut_by_hangup": c["cut"],
        "mismatches": c["mismatch"] + frame_errors,
        "mismatched_bytes": sum(s.end - s.start for _r, s in bad),
        "mismatch_examples": [
            {"call": r.index, "start": s.start, "end": s.end,
             **(explain_mismatch(bytes(r.call.record.received_audio), s, index) if r.call is not None else {})}
            for r, s in bad[:10]
        ],
        "frame_shape_errors": frame_errors,
        "emulator_contexts": index.contexts,
        "emulator_contexts_cancelled": index.cancelled,
    }


def log_summary(path: Path) -> dict[str, Any]:
    """Lines of a JSON-lines log by level, and the 20 commonest warning/error events."""
    levels: Counter[str] = Counter()
    events: Counter[str] = Counter()
    other = 0
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            other += 1
            continue
        if not isinstance(obj, dict):
            other += 1
            continue
        level = str(obj.get("level", "?"))
        levels[level] += 1
        if level in ("warning", "error", "critical"):
            events[f"{level}:{obj.get('event')}"] += 1
    return {"lines_by_level": dict(levels), "warnings_and_errors": dict(events.most_common(20)),
            "non_json_lines": other, "path": str(path)}


def _calls_section(res: list[CallResult]) -> dict[str, Any]:
    reasons = Counter(r.reason or "?" for r in res if r.status == "failed")
    return {
        "attempted": sum(1 for r in res if r.t_placed is not None),
        "connected": sum(1 for r in res if r.t_started is not None),
        "completed": sum(1 for r in res if r.status == "completed"),
        "failed": sum(1 for r in res if r.status == "failed"),
        "failed_by_reason": dict(reasons),
        "not_started": sum(1 for r in res if r.t_placed is None),
        "triggers_without_response": sum(r.no_response for r in res),
        "protocol_errors": sum(len(r.protocol_errors) for r in res),
        "protocol_error_examples": sorted({e for r in res for e in r.protocol_errors})[:10],
    }


def _caller_section(res: list[CallResult], exact: bool) -> dict[str, Any]:
    ttfa = [v for r in res for _k, v in r.ttfa_s]
    by_kind: dict[str, list[float]] = {}
    for r in res:
        for k, v in r.ttfa_s:
            by_kind.setdefault(k, []).append(v)
    underruns = [u for r in res for u in r.underruns]
    jitter = [j for r in res for j in r.jitter_s]
    return {
        "ttfa_ms": {**dist_ms(ttfa), "by_trigger": {k: dist_ms(v) for k, v in sorted(by_kind.items())},
                    "definition": "trigger (start sent for the greeting, dtmf sent otherwise) -> arrival "
                                  "of the first media message of the utterance it caused"},
        "underruns": {
            "count": len(underruns),
            "total_ms": round(sum(underruns) * 1000, 1),
            "calls_affected": sum(1 for r in res if r.underruns),
            "max_ms": round(max(underruns) * 1000, 1) if underruns else 0.0,
            # Where in the utterance they happen tells a slow start (first second: TTFB of a
            # continuation, lead not yet built) from a stall in steady playout.
            "in_first_second": sum(1 for r in res for _u, a in r.underrun_at_s if a < 1.0),
            "at_ms": dist_ms([a for r in res for _u, a in r.underrun_at_s]),
            "method": "exact utterance spans (emulator)" if exact else
                      "heuristic: dry gaps not bridged by one of our triggers",
        },
        "jitter_ms": {**dist_ms(jitter), "definition": "|Δarrival − Δaudio| between consecutive media "
                                                       "messages of one utterance (RFC 3550 D)"},
        "barge_in_ms": dist_ms([b for r in res for b in r.barge_in_s]),
        "media_messages": sum(r.call.record.media_messages for r in res if r.call),
        "audio_received_s": round(sum(r.call.record.media_bytes for r in res if r.call) / 8000, 1),
        "clears": sum(r.call.record.clears for r in res if r.call),
    }


def _bridge_metrics_section(metrics_text: str) -> dict[str, Any]:
    samples = parse_samples(metrics_text) if metrics_text else {}

    def at_end(name: str) -> float | None:
        return value(samples, name) if samples else None

    return {
        "forwarding_delay_ms": histogram_ms(samples, "bridge_forwarding_delay_seconds"),
        "text_to_first_frame_ms": histogram_ms(samples, "bridge_text_to_first_frame_seconds"),
        "tts_ttfb_ms": histogram_ms(samples, "bridge_tts_ttfb_seconds"),
        "barge_in_latency_ms": histogram_ms(samples, "bridge_barge_in_latency_seconds"),
        "mark_round_trip_ms": histogram_ms(samples, "bridge_mark_round_trip_seconds"),
        "event_loop_lag_ms": histogram_ms(samples, "bridge_event_loop_lag_seconds"),
        "active_calls_at_end": at_end("bridge_active_calls"),
        "playout_buffered_bytes_at_end": at_end("bridge_playout_buffered_bytes"),
        "cartesia_active_contexts_at_end": at_end("bridge_cartesia_active_contexts"),
        "calls_by_outcome": {lab.get("outcome", ""): v for lab, v in samples.get("bridge_calls_total", [])},
        "late_chunks_dropped": at_end("bridge_late_chunks_dropped_total"),
        "playout_overflow_bytes": at_end("bridge_playout_overflow_bytes_total"),
        "cartesia_errors": at_end("bridge_cartesia_errors_total"),
        "utterances_failed": at_end("bridge_utterances_failed_total"),
        # The bridge's own estimate of the caller's underruns, by cause (tts_late: Cartesia had not
        # delivered; held: audio waited in the bridge): tells whose the underruns above were.
        "playout_gaps": {cause: int(value(samples, "bridge_playout_gaps_total", cause=cause))
                         for cause in ("tts_late", "held")} if samples else None,
    }


def _bridge_section(run: RunFacts) -> dict[str, Any]:
    samples = run.samples
    cpu = [s["bridge_cpu_percent"] for s in samples if s.get("bridge_cpu_percent") is not None]
    rss = [s["bridge_rss_mb"] for s in samples if s.get("bridge_rss_mb") is not None]
    peak_active = max((s["active_calls"] for s in samples), default=0)
    # Steady state: samples with every surviving call active (at least 90 % of the peak).
    steady_cpu = [s["bridge_cpu_percent"] for s in samples if peak_active and s["active_calls"] >= 0.9 * peak_active
                  and s.get("bridge_cpu_percent") is not None]
    rss_base = run.rss_before_mb if run.rss_before_mb is not None else (rss[0] if rss else None)
    rss_peak = max(rss) if rss else None
    # Speaking memory: RSS while every call is up. The run's maximum can come while calls hang up (memory
    # freed by ended calls that the allocator does not hand to the calls still growing), which is not
    # memory per speaking call; it stays in the report as ``rss_kb_peak``.
    rss_all_up = [s["bridge_rss_mb"] for s in samples
                  if peak_active and s["active_calls"] >= peak_active and s.get("bridge_rss_mb") is not None]
    rss_speaking = max(rss_all_up) if rss_all_up else rss_peak
    cpu_mean_steady = sum(steady_cpu) / len(steady_cpu) if steady_cpu else None
    return {
        "measured": run.bridge_pid is not None,
        "pid": run.bridge_pid,
        "cpu_percent": {"mean_steady": round_or_none(cpu_mean_steady), "p95": round_or_none(percentile(cpu, 0.95)),
                        "max": round_or_none(max(cpu) if cpu else None), "steady_samples": len(steady_cpu),
                        "note": "percent of one core (psutil), sampled every "
                                f"{run.opts.sample_interval_s:g} s; steady = samples with >= 90% of peak calls"},
        "rss_mb": {"start": rss_base, "peak": rss_peak, "end": rss[-1] if rss else None,
                   "before_calls": run.rss_before_mb},
        "per_call": {
            "peak_active_calls": peak_active,
            "cpu_percent": round_or_none(cpu_mean_steady / peak_active
                                         if cpu_mean_steady and peak_active else None, 4),
            "rss_kb": round_or_none((rss_speaking - rss_base) * 1024 / peak_active
                                    if rss_speaking is not None and rss_base is not None and peak_active else None),
            "rss_kb_peak": round_or_none((rss_peak - rss_base) * 1024 / peak_active
                                         if rss_peak is not None and rss_base is not None and peak_active else None),
        },
    }


def _agent_section(agent: dict[str, Any] | None) -> dict[str, Any] | None:
    """The external agent process (None with the built-in agent or ``--agent-url``): its CPU and counters."""
    if agent is None:
        return None
    cpu = [float(c) for c in agent.get("cpu_percent", [])]
    return {"process": agent.get("process"), "pid": agent.get("pid"), "url": agent.get("url"),
            "args": agent.get("args"),
            "cpu_percent_mean": round_or_none(sum(cpu) / len(cpu) if cpu else None),
            "cpu_percent_max": round_or_none(max(cpu) if cpu else None),
            "stats": agent.get("stats")}


def _per_call(r: CallResult) -> dict[str, Any]:
    return {"index": r.index, "call_sid": r.call_sid, "status": r.status, "reason": r.reason,
            "ttfa_ms": [round(v * 1000, 2) for _k, v in r.ttfa_s],
            "underruns": len(r.underruns), "underrun_ms": round(sum(r.underruns) * 1000, 1),
            "underrun_at": [{"utterance": u, "at_ms": round(a * 1000)} for u, a in r.underrun_at_s],
            "mismatches": sum(1 for s in r.spans if s.status == "mismatch"),
            "utterances": len(r.spans),
            "audio_s": round(r.call.record.media_bytes / 8000, 2) if r.call else 0.0,
            "clears": r.call.record.clears if r.call else 0,
            **({"reply_ms": [round(lat * 1000, 2) for t in r.turns if (lat := t.reply_latency_s) is not None]}
               if r.turns else {})}


def build_report(run: RunFacts) -> dict[str, Any]:
    """Analyse every call (``analyze_call``) and assemble the report (the bridge's exit code and
    log summary are added by the runner once the bridge has stopped)."""
    o, res = run.opts, run.results
    for r in res:
        analyze_call(r, run.index)
    tester = [s["loadtester_cpu_percent"] for s in run.samples if s.get("loadtester_cpu_percent") is not None]
    return {
        "schema": SCHEMA,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started_wall)),
        "config": {
            "calls": o.calls, "ramp_s": o.ramp_s, "duration_s": o.duration_s, "scenario": o.scenario,
            "target": o.target, "emulator_args": None if o.target else o.emulator_args,
            "agent_url": run.agent_url, "signed": run.signed, "seed": o.seed,
            "timeout_s": o.run_timeout_s,
            "cpu_count": os.cpu_count(),
            "caller_procs": o.caller_procs, "bridge_cpus": o.bridge_cpus, "load_cpus": o.load_cpus,
        },
        "wall_s": round(run.wall_s, 3),
        "timed_out": run.timed_out,
        "calls": _calls_section(res),
        "caller": _caller_section(res, run.index is not None),
        "integrity": integrity_summary(res, run.index),
        "bridge_metrics": _bridge_metrics_section(run.metrics_text),
        "bridge": _bridge_section(run),
        # The emulator's own view: how late its scheduler sent chunks (0 = on time). Late chunks
        # here explain caller underruns that the bridge counts as tts_late gaps.
        "emulator": run.emulator,
        "agent": _agent_section(run.agent),
        "spoken": spoken_section(res, run.index, run.transcripts, run.metrics_text, _speech_timeout_ms(o))
        if o.scenario == "spoken" else None,
        "loadtester": {"cpu_percent_mean": round_or_none(sum(tester) / len(tester) if tester else None),
                       "cpu_percent_max": round_or_none(max(tester) if tester else None),
                       "note": "the simulated callers + emulator share this process; near 100% means "
                               "caller-side timings are inflated by the tester itself"},
        "timeseries": run.samples,
        "per_call": [_per_call(r) for r in res],
    }


def _speech_timeout_ms(o: Options) -> int:
    """The bridge's ``speechTimeout`` for the run's calls (its env, else ConversationRelay's default)."""
    from bridge.agent.relay_settings import RelaySettings

    raw = o.bridge_env.get("RELAY_SPEECH_TIMEOUT") or os.environ.get("RELAY_SPEECH_TIMEOUT")
    try:
        return int(raw) if raw else RelaySettings().speech_timeout_ms
    except ValueError:
        return RelaySettings().speech_timeout_ms


def write_report(report: dict[str, Any], report_dir: Path) -> None:
    """``report.json`` and the self-contained ``report.html`` in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=1))
    (report_dir / "report.html").write_text(render_html(report))


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The run in six lines (nine with spoken turns), for the terminal."""
    c, cal, b, i = r["calls"], r["caller"], r["bridge"], r["integrity"]
    fwd = r["bridge_metrics"]["forwarding_delay_ms"]
    spoken = spoken_summary_lines(r["spoken"]) if r.get("spoken") else []
    return [
        f"calls: attempted {c['attempted']} connected {c['connected']} completed {c['completed']} "
        f"failed {c['failed']} {c['failed_by_reason'] or ''}",
        f"text->first audio at caller (ms): p50 {cal['ttfa_ms']['p50']} p95 {cal['ttfa_ms']['p95']} "
        f"p99 {cal['ttfa_ms']['p99']} (n={cal['ttfa_ms']['count']})",
        f"bridge forwarding delay (ms): p50 {fwd['p50']} p99 {fwd['p99']} (n={fwd['count']})",
        f"underruns: {cal['underruns']['count']} ({cal['underruns']['total_ms']} ms total); "
        f"jitter p99 {cal['jitter_ms']['p99']} ms; barge-in p50 {cal['barge_in_ms']['p50']} ms",
        f"integrity mismatches: {i['mismatches']} ({i['method']})",
        f"bridge cpu: mean {b['cpu_percent']['mean_steady']}% (steady) max {b['cpu_percent']['max']}%; "
        f"rss {b['rss_mb']['start']} -> peak {b['rss_mb']['peak']} MB; per call {b['per_call']['cpu_percent']}% "
        f"cpu, {b['per_call']['rss_kb']} KB; loadtester cpu mean {r['loadtester']['cpu_percent_mean']}%",
    ] + spoken
