"""The chaos run's figures, the must-be-zero checks, and the printed summary.

Must be zero (``failures`` lists every one that is not):

* calls that failed (no answer, an error; a polite refusal is not a failure) and calls
  accepted by the draining bridge after its SIGTERM had landed;
* audio: bytes heard that no chain of emulator contexts explains (``mismatch``: repeated,
  foreign, corrupted) and utterances cut short without the bridge telling the agent
  (``lost``), on every listening call of the emulator-backed bridges (``bridge.chaos.integrity``);
* leaks, per bridge: tasks alive at exit, call gauges at exit (``stopped`` log line) and, for the
  bridges still up after their calls, in ``/metrics``;
* exit codes (0), ``/readyz`` 503 while draining;
* log lines at ERROR or with a traceback, outside ``EXPECTED_ERROR_EVENTS``, and non-JSON lines;
* occurrences of the run's secrets in the bridges' logs, ``/metrics``, error bodies, every
  TwiML answer and the ``error`` texts the agent received.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Final

from metrics.scrape import parse_samples, summarize, value

from .integrity import ChainIndex, check_call
from .runner import ChaosRun, bridge_log_lines

#: ERROR events that are the documented answer to a hostile peer, not a bug.
#: ``twilio_outbox_full``: a caller that stops reading is ended as stuck (README, Limits).
EXPECTED_ERROR_EVENTS: Final = frozenset({"twilio_outbox_full"})
CALL_GAUGES: Final = ("bridge_active_calls", "bridge_cartesia_active_contexts", "bridge_cartesia_admission_queue",
                      "bridge_agent_connections", "bridge_stt_sockets", "bridge_playout_buffered_bytes")
#: A call placed on the draining bridge this long after SIGTERM must be refused.
SIGTERM_LANDED_S: Final = 0.5


def _max_lag_ms(text: str) -> float | None:
    """Upper bound of the highest non-empty ``bridge_event_loop_lag_seconds`` bucket, ms."""
    if not text:
        return None
    buckets = sorted(((float(lab["le"]), v) for lab, v in parse_samples(text).get(
        "bridge_event_loop_lag_seconds_bucket", [])), key=lambda x: x[0])
    if not buckets:
        return None
    total = buckets[-1][1]
    for le, cum in buckets:
        if cum >= total:
            return le * 1000 if le != float("inf") else float("inf")
    return None


def _log_facts(lines: list[bytes]) -> dict[str, Any]:
    unexpected: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    stopped: dict[str, Any] | None = None
    examples: list[str] = []
    for raw in lines:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            unexpected["<non-JSON line>"] += 1
            if len(examples) < 5:
                examples.append(raw[:300].decode("utf-8", "replace"))
            continue
        event = str(obj.get("event"))
        if event == "stopped":
            stopped = obj
        if obj.get("level") in ("error", "critical") or "exc" in obj:
            if event in EXPECTED_ERROR_EVENTS:
                expected[event] += 1
            else:
                unexpected[event] += 1
                if len(examples) < 5:
                    examples.append(raw[:600].decode("utf-8", "replace"))
    return {"unexpected": dict(unexpected), "expected": dict(expected), "stopped": stopped, "examples": examples}


def _bridge_section(run: ChaosRun, name: str) -> dict[str, Any]:
    b = run.bridges[name]
    facts = _log_facts(bridge_log_lines(b))
    stopped = facts["stopped"] or {}
    final = parse_samples(b.final_metrics_text) if b.final_metrics_text else None
    last = parse_samples(b.metrics_text) if b.metrics_text else {}
    lag = summarize(last, "bridge_event_loop_lag_seconds") if last else None
    counters = {
        "cartesia_reconnects": value(last, "bridge_cartesia_reconnects_total"),
        "cartesia_errors": value(last, "bridge_cartesia_errors_total"),
        "context_retries": {lab.get("reason", "?"): v for lab, v in last.get("bridge_cartesia_context_retries_total", [])},
        "context_timeouts": value(last, "bridge_cartesia_context_timeouts_total"),
        "utterances_failed": value(last, "bridge_utterances_failed_total"),
        "late_chunks_dropped": value(last, "bridge_late_chunks_dropped_total"),
        "bad_input": {f"{lab.get('source')}:{lab.get('kind')}": v for lab, v in last.get("bridge_bad_input_total", [])},
        "stt_reconnects": value(last, "bridge_stt_reconnects_total"),
        "stt_turns": {lab.get("outcome", "?"): v for lab, v in last.get("bridge_stt_turns_total", [])},
        "interruptions": value(last, "bridge_interruptions_total"),
        "calls_refused": value(last, "bridge_calls_refused_total"),
    }
    return {
        "exit_code": b.exit_code,
        "readyz_while_draining": b.ready_during_drain,
        "rss_before_mb": b.rss_before_mb,
        "rss_after_mb": b.rss_after_mb,
        "tasks_left_at_exit": stopped.get("tasks_left"),
        "task_names_left": stopped.get("task_names"),
        "gauges_at_exit": stopped.get("gauges"),
        "gauges_after_calls": None if final is None else {g: value(final, g) for g in CALL_GAUGES},
        "ended_by_drain": stopped.get("ended_calls"),
        "event_loop_lag_max_ms_le": _max_lag_ms(b.metrics_text),
        "event_loop_lag_p99_ms": None if lag is None or lag.p99 is None else round(lag.p99 * 1000, 2),
        "errors_unexpected": facts["unexpected"],
        "errors_expected": facts["expected"],
        "error_examples": facts["examples"],
        "counters": counters,
        "log": str(b.process.log_path),
    }


def _integrity(run: ChaosRun) -> dict[str, Any]:
    index = ChainIndex(run.emulator.records)
    out: dict[str, Any] = {"calls_checked": 0, "heard_bytes": 0, "utterances": 0, "resumed": 0, "interrupted": 0,
                           "cut_short_told": 0, "mismatch_bytes": 0, "lost_bytes": 0, "lost_utterances": 0,
                           "bad_calls": []}
    for o in run.outcomes:
        if o.bridge == "hostile" or o.call is None or not o.call.record.received_audio:
            continue
        rec = o.call.record
        c = check_call(bytes(rec.received_audio), rec.clear_offsets, index)
        told = run.agent.speech_errors.get(rec.call_sid, 0)
        unexplained = max(0, c.cut_short - told)
        out["calls_checked"] += 1
        out["heard_bytes"] += c.heard_bytes
        out["utterances"] += c.utterances
        out["resumed"] += c.resumed
        out["interrupted"] += c.interrupted
        out["cut_short_told"] += c.cut_short - unexplained
        out["mismatch_bytes"] += c.mismatch_bytes
        if unexplained:
            out["lost_utterances"] += unexplained
            out["lost_bytes"] += c.cut_short_bytes
        if (c.mismatch_bytes or unexplained) and len(out["bad_calls"]) < 10:
            out["bad_calls"].append({"index": o.index, "call_sid": rec.call_sid, "kind": o.kind,
                                     "agent": o.agent_mode, "mismatch_bytes": c.mismatch_bytes,
                                     "mismatch_offsets": c.mismatch_offsets, "cut_short": c.cut_short,
                                     "agent_told": told})
    return out


def _calls(run: ChaosRun) -> dict[str, Any]:
    by_status: Counter[str] = Counter(o.status for o in run.outcomes)
    by_bridge: dict[str, Counter[str]] = {}
    for o in run.outcomes:
        by_bridge.setdefault(o.bridge, Counter())[o.status] += 1
    t_sigterm = run.opts.ramp_s / 2
    step = run.opts.ramp_s / run.opts.calls
    accepted_draining = [o.index for o in run.outcomes if o.bridge == "old"
                         and o.index * step >= t_sigterm + SIGTERM_LANDED_S and o.status != "refused"]
    return {
        "placed": len(run.outcomes),
        "completed": by_status["completed"],
        "ended_by_bridge": by_status["ended_by_bridge"],
        "refused_politely": by_status["refused"],
        "failed": {k: v for k, v in by_status.items() if k.startswith("failed") or k == "pending"},
        "by_bridge": {k: dict(v) for k, v in by_bridge.items()},
        "by_caller_kind": dict(Counter(o.kind for o in run.outcomes)),
        "by_agent_mode": dict(Counter(o.agent_mode for o in run.outcomes)),
        "accepted_while_draining": accepted_draining,
        "caller_turns": sum(o.turns for o in run.outcomes),
        "barge_ins": sum(o.barge_ins for o in run.outcomes),
    }


def _secrets(run: ChaosRun) -> dict[str, int]:
    texts: list[bytes] = []
    for b in run.bridges.values():
        texts.extend(bridge_log_lines(b))
        texts.append(b.metrics_text.encode())
        texts.append(b.final_metrics_text.encode())
    texts.extend(t.encode() for t in run.bodies)
    texts.extend(o.call.twiml.encode() for o in run.outcomes if o.call is not None and o.call.twiml)
    texts.extend(t.encode() for t in run.agent.error_texts)
    return {name: sum(t.count(secret.encode()) for t in texts) for name, secret in run.secrets.all().items()}


def build_report(run: ChaosRun) -> dict[str, Any]:
    calls = _calls(run)
    integrity = _integrity(run)
    bridges = {name: _bridge_section(run, name) for name in run.bridges}
    leaked = _secrets(run)
    failures: list[str] = []
    if calls["failed"]:
        failures.append(f"calls failed: {calls['failed']}")
    if calls["accepted_while_draining"]:
        failures.append(f"calls accepted while draining: {calls['accepted_while_draining']}")
    if integrity["mismatch_bytes"]:
        failures.append(f"audio heard that no context explains: {integrity['mismatch_bytes']} bytes")
    if integrity["lost_utterances"]:
        failures.append(f"utterances cut short silently: {integrity['lost_utterances']} ({integrity['lost_bytes']} bytes)")
    for name, b in bridges.items():
        if b["exit_code"] != 0:
            failures.append(f"bridge {name} exit code {b['exit_code']}")
        if b["tasks_left_at_exit"] != 0:
            failures.append(f"bridge {name} tasks left at exit: {b['tasks_left_at_exit']} {b['task_names_left']}")
        for label in ("gauges_at_exit", "gauges_after_calls"):
            gauges = b[label]
            if label == "gauges_at_exit" and gauges is None:
                failures.append(f"bridge {name}: no 'stopped' line with gauges in its log")
            elif gauges and any(v for v in gauges.values()):
                failures.append(f"bridge {name} {label}: {gauges}")
        if name == "old" and b["readyz_while_draining"] != 503:
            failures.append(f"bridge {name} /readyz while draining answered {b['readyz_while_draining']}")
        if b["errors_unexpected"]:
            failures.append(f"bridge {name} unexpected errors: {b['errors_unexpected']}")
    if any(leaked.values()):
        failures.append(f"secrets seen: {leaked}")
    if run.timed_out:
        failures.append("the run hit its time limit")
    return {
        "schema": "media-bridge-chaos/1",
        "options": {k: v for k, v in vars(run.opts).items()},
        "wall_s": round(run.wall_s, 1),
        "calls": calls,
        "integrity": integrity,
        "bridges": bridges,
        "secrets_seen": leaked,
        "agent": run.agent.stats() | {"speech_errors_total": sum(run.agent.speech_errors.values())},
        "hostile_cartesia": run.cartesia.stats(),
        "emulator": {"chunks": run.emulator.chunks_total, "contexts_recorded": len(list(run.emulator.records))},
        "load_side_errors": run.load_side_errors,
        "failures": failures,
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def summary_lines(report: dict[str, Any]) -> list[str]:
    c, i = report["calls"], report["integrity"]
    o = report["options"]
    lines = [
        f"chaos: {o['calls']} calls over {o['ramp_s']:g} s, {o['duration_s']:g} s each; wall {report['wall_s']} s",
        f"calls: completed {c['completed']}  ended by the bridge {c['ended_by_bridge']}  refused politely "
        f"{c['refused_politely']}  failed {sum(c['failed'].values())}  accepted while draining "
        f"{len(c['accepted_while_draining'])}",
        f"  by bridge: {c['by_bridge']}",
        f"  caller kinds: {c['by_caller_kind']}",
        f"  agent modes: {c['by_agent_mode']}",
        f"  caller turns said: {c['caller_turns']}  barge-ins: {c['barge_ins']}",
        f"audio: {i['calls_checked']} calls checked, {i['heard_bytes']} bytes heard, {i['utterances']} utterances "
        f"({i['resumed']} resumed on a new context, {i['interrupted']} cut by a clear or the hang-up, "
        f"{i['cut_short_told']} given up with the agent told)",
        f"  un-cancelled audio lost: {i['lost_bytes']} bytes ({i['lost_utterances']} utterances); "
        f"repeated or foreign: {i['mismatch_bytes']} bytes",
    ]
    for name, b in report["bridges"].items():
        ctr = b["counters"]
        lines += [
            f"bridge {name}: exit {b['exit_code']}  /readyz draining {b['readyz_while_draining']}  RSS "
            f"{_fmt(b['rss_before_mb'])} -> {_fmt(b['rss_after_mb'])} MB  tasks left {b['tasks_left_at_exit']}  "
            f"ended by drain {b['ended_by_drain']}",
            f"  gauges at exit {b['gauges_at_exit']}",
            f"  gauges after its calls (/metrics) {b['gauges_after_calls']}",
            f"  event-loop lag max <= {_fmt(b['event_loop_lag_max_ms_le'])} ms (p99 {_fmt(b['event_loop_lag_p99_ms'])} ms)"
            f"  unexpected errors {sum(b['errors_unexpected'].values())} {b['errors_unexpected'] or ''}"
            f"  expected errors {b['errors_expected'] or 0}",
            f"  survived: cartesia reconnects {ctr['cartesia_reconnects']:g}, errors {ctr['cartesia_errors']:g}, "
            f"retries {ctr['context_retries']}, no-done timeouts {ctr['context_timeouts']:g}, "
            f"failed utterances {ctr['utterances_failed']:g}, late chunks dropped {ctr['late_chunks_dropped']:g}, "
            f"STT reconnects {ctr['stt_reconnects']:g}, STT turns {ctr['stt_turns']}, "
            f"barge-ins {ctr['interruptions']:g}",
            f"  bad input: {ctr['bad_input']}",
        ]
    lines += [
        f"hostile agent: {report['agent']}",
        f"hostile cartesia: {report['hostile_cartesia']}",
        f"secrets seen in logs, /metrics, error bodies, agent errors: {report['secrets_seen']}",
        f"load side (emulator, peers, callers; not the bridge's): errors {report['load_side_errors'] or 0}",
        "verdict: " + ("OK (every must-be-zero figure is 0)" if not report["failures"]
                       else "FAIL\n  " + "\n  ".join(report["failures"])),
    ]
    return lines


def write_report(report: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "chaos.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
