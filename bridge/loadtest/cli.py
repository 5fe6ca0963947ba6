"""``media-bridge loadtest`` command line: flags -> ``Options``, run, summary, exit code."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from .options import DEFAULT_EMULATOR_ARGS, SCENARIOS, Options
from .processes import event_loop_factory
from .report import DEFINITIONS, summary_lines
from .runner import LoadTest
from .spoken_report import SPOKEN_DEFINITIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="media-bridge loadtest",
        description="Many simulated Twilio calls against the bridge; JSON + HTML report.",
        epilog=DEFINITIONS + "\n" + SPOKEN_DEFINITIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--calls", type=int, default=20, help="simulated calls (default 20)")
    p.add_argument("--ramp-s", type=float, default=5.0, help="calls start evenly over this many seconds")
    p.add_argument("--duration-s", type=float, default=10.0, help="each call lasts this long after its stream starts")
    p.add_argument("--scenario", choices=SCENARIOS, default="talk")
    p.add_argument("--target", default=None,
                   help="base URL of a running bridge (default: start emulator + bridge on 127.0.0.1)")
    p.add_argument("--public-url", default=None, help="with --target: the bridge's PUBLIC_URL, if it differs")
    p.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"),
                   help="sign webhooks and upgrades with it (default $TWILIO_AUTH_TOKEN; local: a random one)")
    p.add_argument("--emulator-args", default=DEFAULT_EMULATOR_ARGS,
                   help=f"flags for the local Cartesia emulator (default {DEFAULT_EMULATOR_ARGS!r})")
    p.add_argument("--agent-url", default=None, help="agent WebSocket URL (default: the built-in demo agent)")
    p.add_argument("--agent-server", action="store_true",
                   help="start our external agent (python -m bridge.loadtest.agent_server) as its own process, "
                        "pinned with --load-cpus, and point the local bridge's AGENT_URL at it")
    p.add_argument("--agent-server-args", default="", metavar="FLAGS",
                   help="flags for that agent server (e.g. '--tokens-per-s 50')")
    p.add_argument("--report", default="out/loadtest", help="directory for report.json, report.html, bridge.log")
    p.add_argument("--timeout-s", type=float, default=None, help="hard limit of the run (default ramp+duration+60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bridge-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the local bridge (repeatable)")
    p.add_argument("--caller-procs", type=int, default=1,
                   help="spread the simulated callers over this many worker processes (default 1: in-process)")
    p.add_argument("--bridge-cpus", default=None, metavar="LIST", help="pin the local bridge to these CPUs (e.g. 0)")
    p.add_argument("--load-cpus", default=None, metavar="LIST",
                   help="pin this process (emulator, callers, workers) to these CPUs (e.g. 1)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def options_from_args(ns: argparse.Namespace) -> Options:
    """ValueError names the first bad flag."""
    env = {}
    for item in ns.bridge_env:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--bridge-env wants NAME=VALUE, got {item!r}")
        env[k] = v
    if ns.target:
        host = urlsplit(ns.target).hostname
        if not host:
            raise ValueError(f"--target must be a URL like http://127.0.0.1:8080, got {ns.target!r}")
    return Options(calls=ns.calls, ramp_s=ns.ramp_s, duration_s=ns.duration_s, scenario=ns.scenario,
                   target=ns.target, auth_token=ns.auth_token, public_url=ns.public_url,
                   emulator_args=ns.emulator_args, agent_url=ns.agent_url, report=ns.report,
                   timeout_s=ns.timeout_s, seed=ns.seed, bridge_env=env, progress=not ns.quiet,
                   caller_procs=ns.caller_procs, bridge_cpus=ns.bridge_cpus, load_cpus=ns.load_cpus,
                   agent_server=ns.agent_server, agent_server_args=ns.agent_server_args)


def main(argv: list[str] | None = None) -> int:
    """0 when every call completed with no integrity mismatch and no timeout (``spoken``: and no turn lost,
    no prompt wrong); 1 otherwise; 2 when the run could not start (the bridge did not come up)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        opts = options_from_args(ns)
        lt = LoadTest(opts)
    except ValueError as exc:
        parser.error(str(exc))
    from bridge.logs import configure_logging

    configure_logging("WARNING")
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # no global policy change
            report = runner.run(lt.run())
    except RuntimeError as exc:
        print(f"media-bridge loadtest: {exc}", file=sys.stderr)
        return 2
    for line in summary_lines(report):
        print(line)
    print(f"report: {Path(opts.report) / 'report.json'} and {Path(opts.report) / 'report.html'}")
    ok = (report["calls"]["completed"] == opts.calls and report["integrity"]["mismatches"] == 0
          and not report["timed_out"])
    if report.get("spoken"):
        ok = ok and report["spoken"]["turns_lost"] == 0 and report["spoken"]["prompts"]["wrong"] == 0
    return 0 if ok else 1
