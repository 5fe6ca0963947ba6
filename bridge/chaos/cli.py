"""``media-bridge chaos``: faults, hostile peers and a SIGTERM drain in one bounded run."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bridge.logs import configure_logging

from .report import build_report, summary_lines, write_report
from .runner import Chaos, ChaosOptions

#: Bounds of one run.
MAX_CALLS = 1000
MAX_DURATION_S = 120.0


def main(argv: list[str] | None = None) -> int:
    d = ChaosOptions()
    parser = argparse.ArgumentParser(
        prog="media-bridge chaos", description=sys.modules["bridge.chaos"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=d.calls, help=f"calls placed (2-{MAX_CALLS})")
    parser.add_argument("--ramp-s", type=float, default=d.ramp_s, help="calls are placed evenly over this long, s")
    parser.add_argument("--duration-s", type=float, default=d.duration_s,
                        help=f"each call's length once its stream is up, s (at most {MAX_DURATION_S:g})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--hostile-cartesia-share", type=float, default=d.hostile_cartesia_share)
    parser.add_argument("--hostile-agent-share", type=float, default=d.hostile_agent_share)
    parser.add_argument("--hostile-caller-share", type=float, default=d.hostile_caller_share)
    parser.add_argument("--barge-in-share", type=float, default=d.barge_in_share)
    parser.add_argument("--drain-grace-s", type=float, default=d.drain_grace_s)
    parser.add_argument("--emulator-args", default=d.emulator_args)
    parser.add_argument("--fault", action="append", default=None, help="TTS fault (repeatable; replaces the defaults)")
    parser.add_argument("--stt-fault", action="append", default=None, help="STT fault (repeatable; replaces the defaults)")
    parser.add_argument("--report", default=d.report, help="directory for chaos.json and the bridges' logs")
    parser.add_argument("--timeout-s", type=float, default=None, help="hard limit of the run (default ramp + duration + 90)")
    a = parser.parse_args(argv)
    if not 2 <= a.calls <= MAX_CALLS or not 0 < a.duration_s <= MAX_DURATION_S or a.ramp_s <= 0:
        parser.error(f"need 2 <= --calls <= {MAX_CALLS}, 0 < --duration-s <= {MAX_DURATION_S:g}, --ramp-s > 0")
    opts = ChaosOptions(calls=a.calls, ramp_s=a.ramp_s, duration_s=a.duration_s, seed=a.seed,
                        hostile_cartesia_share=a.hostile_cartesia_share, hostile_agent_share=a.hostile_agent_share,
                        hostile_caller_share=a.hostile_caller_share, barge_in_share=a.barge_in_share,
                        drain_grace_s=a.drain_grace_s, emulator_args=a.emulator_args, report=a.report,
                        timeout_s=a.timeout_s)
    if a.fault is not None:
        opts.faults = a.fault
    if a.stt_fault is not None:
        opts.stt_faults = a.stt_fault
    configure_logging("WARNING")
    report = asyncio.run(asyncio.wait_for(_run(opts), opts.run_timeout_s + 30.0))
    for line in summary_lines(report):
        print(line)
    print(f"report: {write_report(report, Chaos(opts).report_dir)}")
    return 0 if not report["failures"] else 1


async def _run(opts: ChaosOptions) -> dict[str, Any]:
    run = await Chaos(opts).run()
    return build_report(run)
