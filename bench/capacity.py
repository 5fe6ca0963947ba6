"""Capacity of one bridge process on one core (issues 8 and 18).

For each N in ``--calls`` it runs ``media-bridge loadtest`` with the bridge
pinned to ``--bridge-cpu`` (``taskset``) and the emulator + simulated callers
pinned to ``--load-cpus`` (callers in the emulator's process unless ``--caller-procs`` > 1),
``talk`` scenario (every call hears continuous speech and sends inbound audio
every 20 ms), then, unless ``--no-idle``, a short ``idle`` run (greeting
"Hi.", then silence) for the memory of an idle call.

The agent: ``--agent builtin`` (default) is the bridge's in-process demo agent;
``--agent external`` starts our ConversationRelay-style agent server
(``bridge.loadtest.agent_server``) as its own process on the load CPUs and
sets the bridge's ``AGENT_URL`` to it, as a user's deployment would; it
streams the same texts word by word at ``--agent-tokens-per-s``.
The Cartesia peer: ``--chunk-ms`` (audio per chunk), ``--rtf`` (0.5 = 2x real
time), ``--ttfb-ms``, and ``--words-per-s`` (word timestamp density, passed to
the emulator, which must support it). It prints one table:

* bridge CPU %: mean of the steady samples (>= 90 % of the calls active), % of one core;
* fwd p50/p99: ``bridge_forwarding_delay_seconds`` (sendable audio -> sent to Twilio), ms;
* underruns / mismatches: at the simulated callers (exact, against the emulator's audio);
* gaps tts/held: the bridge's own estimate of those underruns (``bridge_playout_gaps_total``):
  ``tts_late`` = the emulator had not delivered the audio in time, ``held`` = the bridge had it;
* lag p99: ``bridge_event_loop_lag_seconds`` (overshoot of a 100 ms sleep), ms;
* KB/call: bridge RSS growth (peak - before the first call) / calls, speaking and idle;
* CPU ms/call-s: bridge CPU time per second of call (peers.md (d): pipecat 44-46, bare aiohttp floor 1.2);
* TTFA p50: trigger -> first media at the caller, ms (emulator TTFB is ``--ttfb-ms``, no jitter), all
  triggers (greeting / passage); with the external agent the passage's includes the agent streaming its
  first sentence (11 words at ``--agent-tokens-per-s``), and the greeting's the agent's WebSocket connect;
* bridge add ms: mean(text -> first frame sent) - mean(text -> first Cartesia chunk), the bridge's own share;
* load CPU %: emulator + callers (to see that the load side was not the bottleneck);
* agent CPU %: the external agent process (also on the load CPUs), "-" with the built-in agent;
* core busy %: the bridge CPU's busy time from every process (median of 1 s samples over the talk
  run): far above bridge CPU % means other work shared the bridge's core (a noisy machine), and then
  lag, underruns and the CPU figures are not the bridge's capacity.

Every run is bounded (``--ramp-s + --duration-s + 60 s``). Reports land in
``--out/<N>/report.json``; the table also goes to ``--out/table.md``.

    python bench/capacity.py --calls 50,100,200,300,400
    python bench/capacity.py --agent external --chunk-ms 40 --rtf 0.5 --calls 100,200,300,400,500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bridge.loadtest.processes import parse_cpus
from bridge.stats import percentile

COLUMNS = ("calls", "bridge CPU %", "CPU ms/call-s", "fwd p50 ms", "fwd p99 ms", "underruns", "gaps tts/held",
           "mismatches",
           "lag p99 ms", "KB/call speaking", "KB/call idle", "TTFA p50 ms (greeting / passage)", "bridge add ms", "load CPU %",
           "agent CPU %", "core busy %", "completed")


class CoreBusy:
    """Busy % of ``cpus`` (all processes), sampled every second in a thread while a run lasts."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = sorted(cpus)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="core-busy", daemon=True)

    def _run(self) -> None:
        psutil.cpu_percent(percpu=True)
        while not self._stop.wait(1.0):
            per_cpu = psutil.cpu_percent(percpu=True)
            self.samples.append(sum(per_cpu[c] for c in self.cpus if c < len(per_cpu)) / len(self.cpus))

    def __enter__(self) -> CoreBusy:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def median(self) -> float | None:
        v = percentile(self.samples, 0.5)
        return None if v is None else round(v, 1)


def emulator_args(args: argparse.Namespace) -> str:
    """The emulator's flags for this bench's Cartesia settings."""
    flags = f"--ttfb-ms {args.ttfb_ms:g} --rtf {args.rtf:g} --chunk-ms {args.chunk_ms} --jitter-ms 0"
    if args.words_per_s is not None:
        flags += f" --words-per-s {args.words_per_s:g}"
    return flags


def emulator_lacks(flag: str, value: str) -> bool:
    """True when the emulator's command line does not know ``flag``."""
    from bridge.cartesia.emulator.cli import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return bool(parser.parse_known_args([flag, value])[1])


def run_loadtest(n: int, scenario: str, out: Path, args: argparse.Namespace, extra_env: list[str]) -> dict[str, Any]:
    procs = args.caller_procs or 1
    cmd = [
        sys.executable, "-m", "bridge.cli", "loadtest", "--calls", str(n), "--scenario", scenario,
        "--ramp-s", str(args.ramp_s), "--duration-s", str(args.duration_s if scenario == "talk" else args.idle_s),
        "--bridge-cpus", args.bridge_cpu, "--load-cpus", args.load_cpus, "--caller-procs", str(procs),
        "--emulator-args", emulator_args(args),
        "--report", str(out), "--quiet",
        "--timeout-s", str(args.ramp_s + (args.duration_s if scenario == "talk" else args.idle_s) + 60),
    ]
    if args.agent == "external":
        greeting = " --greeting Hi." if scenario == "idle" else ""
        cmd += ["--agent-server", "--agent-server-args", f"--tokens-per-s {args.agent_tokens_per_s:g}{greeting}"]
    for e in extra_env:
        cmd += ["--bridge-env", e]
    t = time.monotonic()
    with CoreBusy(parse_cpus(args.bridge_cpu)) as busy:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ramp_s + args.duration_s + 240)
    report_path = out / "report.json"
    if not report_path.exists():
        raise RuntimeError(f"loadtest N={n} {scenario} produced no report (rc {proc.returncode}): {proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(report_path.read_text())
    report["_wall_s"] = round(time.monotonic() - t, 1)
    report["_core_busy_percent"] = busy.median()
    return report


def row(n: int, talk: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, Any]:
    bm = talk["bridge_metrics"]
    cpu = talk["bridge"]["cpu_percent"]["mean_steady"]
    t2ff, ttfb = bm["text_to_first_frame_ms"]["mean"], bm["tts_ttfb_ms"]["mean"]
    return {
        "calls": n,
        "bridge CPU %": cpu,
        "CPU ms/call-s": round(cpu * 10 / n, 2) if cpu is not None else None,
        "fwd p50 ms": bm["forwarding_delay_ms"]["p50"],
        "fwd p99 ms": bm["forwarding_delay_ms"]["p99"],
        "underruns": talk["caller"]["underruns"]["count"],
        "gaps tts/held": "{tts_late}/{held}".format(**bm["playout_gaps"]) if bm.get("playout_gaps") else None,
        "mismatches": talk["integrity"]["mismatches"],
        "lag p99 ms": bm.get("event_loop_lag_ms", {}).get("p99"),
        "KB/call speaking": talk["bridge"]["per_call"]["rss_kb"],
        "KB/call idle": idle["bridge"]["per_call"]["rss_kb"] if idle else None,
        "TTFA p50 ms (greeting / passage)": ttfa_cell(talk["caller"]["ttfa_ms"]),
        # Bridge's own share of text -> first frame: mean(text->first frame) - mean(text->first chunk), exact
        # from the histograms' sums.
        "bridge add ms": round(t2ff - ttfb, 3) if t2ff is not None and ttfb is not None else None,
        "load CPU %": talk["loadtester"]["cpu_percent_mean"],
        "agent CPU %": (talk.get("agent") or {}).get("cpu_percent_mean"),
        "core busy %": talk.get("_core_busy_percent"),
        "completed": f"{talk['calls']['completed']}/{n}",
    }


def ttfa_cell(ttfa: dict[str, Any]) -> str | None:
    """``all (greeting / passage)`` p50s in ms, as in the README's table."""
    if ttfa["p50"] is None:
        return None
    by = ttfa.get("by_trigger", {})

    def p50(kind: str) -> str:
        v = by.get(kind, {}).get("p50")
        return "-" if v is None else f"{v:.1f}"

    return f"{ttfa['p50']:.1f} ({p50('greeting')} / {p50('dtmf')})"


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--calls", default="50,100,200,300,400", help="comma-separated call counts")
    p.add_argument("--ramp-s", type=float, default=10.0)
    p.add_argument("--duration-s", type=float, default=20.0, help="talk: each call lasts this long")
    p.add_argument("--idle-s", type=float, default=6.0, help="idle run: each call lasts this long")
    p.add_argument("--no-idle", action="store_true", help="skip the idle-memory runs")
    p.add_argument("--bridge-cpu", default="0")
    p.add_argument("--load-cpus", default="1")
    # One process (callers and emulator on one event loop) measured fewer load-side stalls than 2-4
    # processes competing for the load core: 300 calls, 2 runs each: 2 and 2 underruns vs 7 and 17.
    p.add_argument("--caller-procs", type=int, default=1,
                   help="caller processes (default 1: the callers share the emulator's process)")
    # As in ../shared/docs/peers.md (d): 50 ms TTFB, speech at 2x real time.
    p.add_argument("--ttfb-ms", type=float, default=50.0)
    p.add_argument("--rtf", type=float, default=0.5, help="emulator pacing: 0.5 = speech at 2x real time")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per emulator chunk, ms (e.g. 20, 40, 100)")
    p.add_argument("--words-per-s", type=float, default=None,
                   help="word timestamp density: words per second of audio (emulator --words-per-s; "
                        "default: the tone voice's own, about 2.5)")
    p.add_argument("--agent", choices=("builtin", "external"), default="builtin",
                   help="the bridge's in-process demo agent, or our agent server as its own process (AGENT_URL)")
    p.add_argument("--agent-tokens-per-s", type=float, default=50.0,
                   help="external agent: words streamed per second, like an LLM (0 = all at once)")
    p.add_argument("--bridge-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", default="out/capacity")
    args = p.parse_args(argv)
    ncpu = os.cpu_count() or 1
    needed = {int(c) for part in (args.bridge_cpu, args.load_cpus) for c in part.replace("-", ",").split(",") if c}
    if max(needed) >= ncpu:
        p.error(f"CPUs {sorted(needed)} requested, this machine has {ncpu}")
    if args.words_per_s is not None and emulator_lacks("--words-per-s", f"{args.words_per_s:g}"):
        p.error("this emulator has no --words-per-s option yet (word timestamp density); run without it")
    if not shutil.which("taskset"):
        print("note: taskset not found; pinning with sched_setaffinity", file=sys.stderr)
    out = Path(args.out)
    setting = (f"agent {args.agent}" + (f" ({args.agent_tokens_per_s:g} words/s)" if args.agent == "external" else "")
               + f"; emulator {emulator_args(args)}; {args.duration_s:g} s calls, ramp {args.ramp_s:g} s")
    print(f"# {setting}", file=sys.stderr, flush=True)
    rows = []
    for n in (int(x) for x in args.calls.split(",") if x.strip()):
        talk = run_loadtest(n, "talk", out / str(n), args, args.bridge_env)
        idle = None if args.no_idle else run_loadtest(n, "idle", out / f"{n}-idle", args,
                                                       ["GREETING=Hi.", *args.bridge_env])
        r = row(n, talk, idle)
        rows.append(r)
        print(f"N={n}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "calls")
              + f" (wall {talk['_wall_s']} s)", file=sys.stderr, flush=True)
    table = f"Setting: {setting}\n\n" + markdown(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
