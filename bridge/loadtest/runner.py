"""One load-test run: start the emulator and the bridge, place the calls, sample, report.

Calls run in this process (one ``CallerClock`` task for all of them) or,
with ``caller_procs`` > 1, in spawned worker processes on the same
``time.monotonic`` timeline; each worker pickles its calls' records back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import pickle
import random
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp

from bridge.cartesia.emulator import Emulator
from bridge.netutil import free_port
from bridge.stats import percentile
from metrics.scrape import parse_samples, summarize, value
from telephony.simulator import CallerClock, SimulatedCall

from .integrity import AudioIndex
from .options import GREETING, SCENARIOS, VOICE_ID, Options
from .processes import (
    AgentServerProcess,
    BridgeProcess,
    CpuSampler,
    event_loop_factory,
    no_full_gc,
    parse_cpus,
    rss_mb,
)
from .report import RunFacts, build_report, log_summary, write_report
from .results import CallResult, RecordedCall
from .scenarios import run_scenario, sleep_until
from .spoken import SpokenCall, prefetch_speech

#: Each call's webhook and its stream upgrade must answer within this long, s.
CONNECT_TIMEOUT_S = 15.0


@dataclass
class _Worker:
    """A caller worker process, the calls it runs and the file it leaves its results in."""

    process: BaseProcess
    indices: list[int]
    path: Path


class LoadTest:
    """One load-test run (see ``bridge.loadtest``): ``await LoadTest(opts).run()`` returns the report."""

    def __init__(self, opts: Options) -> None:
        if opts.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}")
        if opts.calls < 1 or opts.duration_s <= 0 or opts.ramp_s < 0:
            raise ValueError("need --calls >= 1, --duration-s > 0, --ramp-s >= 0")
        if opts.caller_procs < 1:
            raise ValueError("need --caller-procs >= 1")
        if opts.agent_server and (opts.target or opts.agent_url):
            raise ValueError("--agent-server starts a local agent for the local bridge: not with --target or --agent-url")
        if opts.scenario == "spoken" and opts.target and not opts.speech:
            raise ValueError("--scenario spoken needs the local emulator (its STT hears the callers' tone voice): "
                             "not with --target")
        self.bridge_cpus = parse_cpus(opts.bridge_cpus) if opts.bridge_cpus else None
        self.load_cpus = parse_cpus(opts.load_cpus) if opts.load_cpus else None
        self.opts = opts
        self.report_dir = Path(opts.report)
        self.results = [CallResult(i) for i in range(opts.calls)]
        self.emulator: Emulator | None = None
        self.bridge: BridgeProcess | None = None
        self.agent_server: AgentServerProcess | None = None
        #: CPU % of the agent server process, one value per sample.
        self.agent_cpu: list[float] = []
        self.base_url = ""
        self.public_url = ""
        self.auth_token = opts.auth_token
        self.samples: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.timed_out = False
        self.metrics_text = ""
        self._fwd_p99_live: float | None = None
        self._workers: list[_Worker] = []
        self.rss_before_mb: float | None = None
        #: Inbound audio and mark echoes of this process's calls (one task, not two per call).
        self.clock: CallerClock | None = None

    # -------------------------------------------------------------- set-up

    async def _start_emulator(self) -> str:
        from bridge.cartesia.emulator.cli import add_arguments, settings_from_args

        parser = argparse.ArgumentParser(prog="--emulator-args", add_help=False)
        add_arguments(parser)
        args = shlex.split(self.opts.emulator_args)
        ns = parser.parse_args(args)
        if not any(a.startswith("--record-contexts") for a in args):
            # Every utterance of the run must stay inspectable for the integrity check.
            ns.record_contexts = max(1000, self.opts.calls * 200)
        settings = settings_from_args(ns)
        settings.received_cap = 1000
        self.emulator = Emulator(settings)
        return str(await self.emulator.start("127.0.0.1", 0))

    async def _start_agent_server(self, http: aiohttp.ClientSession) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CARTESIA_", "AGENT_", "TWILIO_"))}
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.agent_server = AgentServerProcess(free_port(), shlex.split(self.opts.agent_server_args), env,
                                               self.report_dir / "agent.log", self.load_cpus)
        await self.agent_server.wait_ready(http)

    @property
    def agent_url(self) -> str | None:
        """The agent the bridge uses: our agent server's, ``--agent-url``, or None (built-in)."""
        return self.agent_server.url if self.agent_server else self.opts.agent_url

    async def _start_bridge(self, http: aiohttp.ClientSession, cartesia_url: str) -> None:
        port = free_port()
        self.base_url = self.public_url = f"http://127.0.0.1:{port}"
        self.auth_token = self.auth_token or secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CARTESIA_", "AGENT_", "TWILIO_"))}
        env.update({
            "PUBLIC_URL": self.public_url,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "CARTESIA_URL": cartesia_url,
            "CARTESIA_API_KEY": "loadtest",
            "CARTESIA_VOICE_ID": VOICE_ID,
            "CARTESIA_MAX_CONCURRENCY": "100000",
            "MAX_CALLS": str(self.opts.calls + 10),
            "GREETING": GREETING,
            "LOG_LEVEL": "INFO",
            "DRAIN_GRACE_S": "5",
        })
        if self.agent_url:
            env["AGENT_URL"] = self.agent_url
        if self.opts.scenario == "spoken":
            # Every call listens (the built-in agent too), each with its own STT socket.
            env.update({"STT_ENABLED": "true", "CARTESIA_STT_MAX_CONCURRENCY": str(self.opts.calls + 10)})
        else:
            # The other scenarios measure speech out only (their callers' tone or DTMF is no speech):
            # no STT socket per call, also with an external agent (where the bridge's default is to listen).
            env["STT_ENABLED"] = "false"
        env.update(self.opts.bridge_env)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.bridge = BridgeProcess(port, env, self.report_dir / "bridge.log", self.bridge_cpus)
        await self.bridge.wait_ready(http)

    # ------------------------------------------------------------ sampling

    async def _scrape(self, http: aiohttp.ClientSession) -> str:
        try:
            async with http.get(self.base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return await resp.text() if resp.status == 200 else ""
        except (TimeoutError, aiohttp.ClientError, OSError):
            return ""

    async def _sampler(self, http: aiohttp.ClientSession) -> None:
        """Every ``sample_interval_s``: call states, CPU of the bridge and of the load side, the
        bridge's RSS, active calls and forwarding p99 from ``/metrics``."""
        bridge_cpu = CpuSampler([self.bridge.pid]) if self.bridge else None
        load_cpu = CpuSampler([os.getpid(), *(w.process.pid for w in self._workers if w.process.pid)])
        agent_cpu = CpuSampler([self.agent_server.pid]) if self.agent_server else None
        while True:
            await asyncio.sleep(self.opts.sample_interval_s)
            now = time.monotonic()
            text = await self._scrape(http)
            sample: dict[str, Any] = {
                "t": round(now - self.t0, 3),
                "active_calls": sum(1 for r in self.results if r.status == "active"),
                "completed": sum(1 for r in self.results if r.status == "completed"),
                "failed": sum(1 for r in self.results if r.status == "failed"),
                "loadtester_cpu_percent": load_cpu.sample(),
                "bridge_cpu_percent": None,
                "bridge_rss_mb": None,
                "bridge_active_calls": None,
                "forwarding_delay_p99_ms": None,
            }
            if agent_cpu and (cpu := agent_cpu.sample()) is not None:
                self.agent_cpu.append(cpu)
            if self.bridge and bridge_cpu:
                sample["bridge_cpu_percent"] = bridge_cpu.sample()
                sample["bridge_rss_mb"] = rss_mb(self.bridge.pid)
            if text:
                s = parse_samples(text)
                sample["bridge_active_calls"] = value(s, "bridge_active_calls")
                if self._workers and sample["bridge_active_calls"] is not None:
                    # Call states live in the workers until they finish: count the bridge's calls.
                    sample["active_calls"] = int(sample["bridge_active_calls"])
                fwd = summarize(s, "bridge_forwarding_delay_seconds")
                if fwd.p99 is not None:
                    self._fwd_p99_live = fwd.p99
                    sample["forwarding_delay_p99_ms"] = round(fwd.p99 * 1000, 3)
            self.samples.append(sample)
            if self.opts.progress:
                self._progress(sample)

    def _progress(self, s: dict[str, Any]) -> None:
        ttfa = percentile([v for r in self.results for v in r.live_ttfa], 0.99)
        ttfa_s = "  -  " if ttfa is None else f"{ttfa * 1000:5.0f}"
        fwd = "  -  " if self._fwd_p99_live is None else f"{self._fwd_p99_live * 1000:5.1f}"
        cpu = "-" if s["bridge_cpu_percent"] is None else f"{s['bridge_cpu_percent']:.0f}%"
        rss = "-" if s["bridge_rss_mb"] is None else f"{s['bridge_rss_mb']:.0f}MB"
        line = (f"[{s['t']:6.1f}s] active {s['active_calls']:4d}/{self.opts.calls} done {s['completed']:4d} "
                f"errors {s['failed']:3d} | ttfa p99 {ttfa_s} ms | fwd p99 {fwd} ms | bridge cpu {cpu} rss {rss}")
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    async def _final_sample(self) -> None:
        """After the calls ended: idle RSS, and the gauges back to 0."""
        self.samples.append({
            "t": round(time.monotonic() - self.t0, 3), "active_calls": 0,
            "completed": sum(1 for r in self.results if r.status == "completed"),
            "failed": sum(1 for r in self.results if r.status == "failed"),
            "loadtester_cpu_percent": None, "bridge_cpu_percent": None,
            "bridge_rss_mb": rss_mb(self.bridge.pid) if self.bridge else None,
            "bridge_active_calls": value(parse_samples(self.metrics_text), "bridge_active_calls")
            if self.metrics_text else None,
            "forwarding_delay_p99_ms": None, "final": True})

    # --------------------------------------------------------------- calls

    async def _one_call(self, http: aiohttp.ClientSession, res: CallResult) -> None:
        o = self.opts
        await sleep_until(self.t0 + (res.index * o.ramp_s / o.calls if o.calls > 1 else 0.0))
        query = {"agentUrl": o.agent_url} if (o.agent_url and o.target) else None
        if o.scenario == "spoken":
            call: SimulatedCall = SpokenCall(self.base_url, http, auth_token=self.auth_token, public_url=self.public_url,
                                             webhook_query=query, clock=self.clock, speech=o.speech or {})
        else:
            call = SimulatedCall(self.base_url, http, auth_token=self.auth_token, public_url=self.public_url,
                                 webhook_query=query, clock=self.clock)
        res.call = call
        res.call_sid = call.record.call_sid
        res.t_placed = time.monotonic()
        try:
            try:
                stream = await asyncio.wait_for(call.place(), CONNECT_TIMEOUT_S)
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
                return res.fail("webhook_error", time.monotonic())
            if stream is None:
                return res.fail("refused", time.monotonic())
            try:
                await asyncio.wait_for(call.connect(), CONNECT_TIMEOUT_S)
            except (TimeoutError, aiohttp.ClientError, OSError):
                return res.fail("connect_error", time.monotonic())
            res.t_started = time.monotonic()
            res.triggers.append((res.t_started, "greeting"))
            res.status = "active"
            end_at = res.t_started + o.duration_s
            await run_scenario(o.scenario, call, res, end_at, random.Random(o.seed * 100003 + res.index))
            closed_early = call.closed.is_set()
            await call.hangup()
            res.t_ended = time.monotonic()
            failure = ("closed_by_bridge" if closed_early else "protocol_error" if call.record.protocol_errors
                       else "no_audio" if call.record.media_bytes == 0 else "no_response" if res.no_response
                       else None)
            if failure is not None:
                return res.fail(failure, time.monotonic())
            res.status = "completed"
        except asyncio.CancelledError:
            res.status, res.reason = "failed", "timeout"
            with contextlib.suppress(Exception):
                await asyncio.shield(call.close())
            raise
        except Exception as exc:  # noqa: BLE001 -- a call's failure must not stop the run
            res.fail(f"error:{type(exc).__name__}", time.monotonic())
            with contextlib.suppress(Exception):
                await call.close()

    async def run_calls(self, indices: list[int], timeout: float) -> bool:
        """Run the calls ``indices`` in this process; True when the timeout cut them."""
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        self.clock = CallerClock()
        try:
            async with aiohttp.ClientSession(connector=conn) as http:
                tasks = [asyncio.create_task(self._one_call(http, self.results[i])) for i in indices]
                _done, pending = await asyncio.wait(tasks, timeout=max(0.0, self.t0 + timeout - time.monotonic()))
                if pending:
                    for t in pending:
                        t.cancel()
                    await asyncio.wait(pending, timeout=10)
                return bool(pending)
        finally:
            await self.clock.close()

    def _start_workers(self, timeout: float) -> None:
        o = self.opts
        ctx = multiprocessing.get_context("spawn")
        wopts = replace(o, during=None, caller_procs=1, progress=False)
        for w in range(o.caller_procs):
            indices = list(range(w, o.calls, o.caller_procs))
            if not indices:
                continue
            path = self.report_dir / f".callers-{w}.pickle"
            path.unlink(missing_ok=True)
            p = ctx.Process(target=_caller_worker, name=f"loadtest-callers-{w}", daemon=True,
                            args=(wopts, self.base_url, self.public_url, self.auth_token, self.t0, indices, timeout,
                                  str(path)))
            p.start()
            self._workers.append(_Worker(p, indices, path))

    async def _wait_workers(self, timeout: float) -> bool:
        deadline = self.t0 + timeout + 30.0  # + result pickling
        while any(w.process.is_alive() for w in self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        timed_out = False
        for w in self._workers:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(5)
            try:
                w_timed_out, results = pickle.loads(w.path.read_bytes())  # noqa: S301 -- our own worker's file
                w.path.unlink(missing_ok=True)
            except (OSError, pickle.UnpicklingError, EOFError):
                for i in w.indices:
                    self.results[i].fail("worker_error", time.monotonic())
                timed_out = True
                continue
            timed_out = timed_out or w_timed_out
            for r in results:
                self.results[r.index] = r
        return timed_out

    # ----------------------------------------------------------------- run

    async def run(self) -> dict[str, Any]:
        o = self.opts
        self.report_dir.mkdir(parents=True, exist_ok=True)
        timeout = o.run_timeout_s
        if self.load_cpus:
            os.sched_setaffinity(0, self.load_cpus)  # emulator, callers, and the workers (inherited)
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        started_wall = time.time()
        async with aiohttp.ClientSession(connector=conn) as http:
            try:
                if o.target:
                    self.base_url = o.target.rstrip("/")
                    self.public_url = (o.public_url or self.base_url).rstrip("/")
                else:
                    emu_url = await self._start_emulator()
                    if o.scenario == "spoken" and not o.speech:
                        assert self.emulator is not None and self.emulator.http_url is not None
                        o.speech = await prefetch_speech(http, self.emulator.http_url)
                    if o.agent_server:
                        await self._start_agent_server(http)
                    await self._start_bridge(http, emu_url)
                if self.bridge is not None:
                    self.rss_before_mb = rss_mb(self.bridge.pid)
                # Workers need a moment to start (imports): the shared timeline begins after it.
                self.t0 = time.monotonic() + (2.0 if o.caller_procs > 1 else 0.0)
                if o.caller_procs > 1:
                    self._start_workers(timeout)
                sampler = asyncio.create_task(self._sampler(http))
                during = asyncio.create_task(o.during(self)) if o.during is not None else None
                with no_full_gc():
                    if o.caller_procs > 1:
                        self.timed_out = await self._wait_workers(timeout)
                    else:
                        self.timed_out = await self.run_calls(list(range(o.calls)), timeout)
                if during is not None:
                    during.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await during
                await asyncio.sleep(0.3)
                self.metrics_text = await self._scrape(http)
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                if o.progress and sys.stderr.isatty():
                    sys.stderr.write("\n")
                await self._final_sample()
                agent_stats = await self.agent_server.stats(http) if self.agent_server else None
                report = build_report(self._facts(started_wall, agent_stats))
            finally:
                bridge_rc = agent_rc = None
                if self.bridge is not None:
                    bridge_rc = await self.bridge.stop()
                if self.agent_server is not None:
                    agent_rc = await self.agent_server.stop()
                if self.emulator is not None:
                    await self.emulator.stop()
        report["bridge"]["exit_code"] = bridge_rc
        if self.bridge is not None:
            report["bridge"]["log"] = log_summary(self.bridge.log_path)
        if report["agent"] is not None and self.agent_server is not None:
            report["agent"]["exit_code"] = agent_rc
            report["agent"]["log"] = log_summary(self.agent_server.log_path)
        write_report(report, self.report_dir)
        return report

    def audio_index(self) -> AudioIndex | None:
        """Every emulator context's audio (None with ``--target``)."""
        return None if self.emulator is None else AudioIndex.from_records(self.emulator.records)

    def _facts(self, started_wall: float, agent_stats: dict[str, Any] | None) -> RunFacts:
        emu, agent = self.emulator, self.agent_server
        return RunFacts(
            opts=self.opts, results=self.results, samples=self.samples, metrics_text=self.metrics_text,
            index=self.audio_index(), bridge_pid=self.bridge.pid if self.bridge else None,
            signed=bool(self.auth_token), started_wall=started_wall, wall_s=time.monotonic() - self.t0,
            timed_out=self.timed_out, rss_before_mb=self.rss_before_mb,
            emulator=None if emu is None else {
                "chunks": emu.chunks_total, "chunk_lateness_ms": emu.lateness_ms(),
                "first_chunk_lateness_ms": emu.lateness_ms(first_chunks=True)},
            agent_url=self.agent_url,
            transcripts=None if emu is None or self.opts.scenario != "spoken" else {
                rec.context_id: rec.transcript for rec in emu.records},
            agent=None if agent is None else {
                "process": "bridge.loadtest.agent_server", "pid": agent.pid, "url": agent.url,
                "args": self.opts.agent_server_args, "cpu_percent": self.agent_cpu, "stats": agent_stats},
        )


def _caller_worker(opts: Options, base_url: str, public_url: str, auth_token: str | None, t0: float,
                   indices: list[int], timeout: float, out_path: str) -> None:
    """Worker process: run the calls ``indices`` on the shared timeline ``t0``
    (``time.monotonic`` is system-wide), pickle their results to ``out_path``."""
    from bridge.logs import configure_logging

    configure_logging("WARNING")
    lt = LoadTest(opts)
    lt.base_url, lt.public_url, lt.auth_token, lt.t0 = base_url, public_url, auth_token, t0
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner, no_full_gc():
        timed_out = runner.run(lt.run_calls(indices, timeout))
    out = []
    for i in indices:
        r = lt.results[i]
        if r.call is not None:
            r.call = RecordedCall(r.call.record)
        out.append(r)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump((timed_out, out), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, out_path)
