"""One chaos run: start the peers and three bridge processes, place the calls, drain, collect.

Processes and roles (everything on 127.0.0.1):

* this process: the Cartesia emulator (TTS and STT faults on), the hostile agent, the hostile
  Cartesia peer and every simulated caller;
* bridge ``old`` (``media-bridge serve``): takes the first half of the calls; halfway it gets
  SIGTERM and drains (calls placed on it from then on must be refused politely);
* bridge ``new``: the replacement, as in a rolling deploy: takes the calls placed after the
  refusal window; SIGTERM once its calls are over;
* bridge ``hostile``: pointed at the hostile Cartesia peer (TTS and STT), takes a share of the
  calls all along; SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import secrets
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

from bridge.cartesia.emulator import Emulator
from bridge.loadtest.options import VOICE_ID
from bridge.loadtest.processes import BridgeProcess, no_full_gc, rss_mb
from bridge.netutil import free_port
from telephony.simulator import CallerClock, fetch_speech

from .hostile_agent import AGENT_MODES, HostileAgent
from .hostile_callers import LISTENING_KINDS, RAW_KINDS, CallerOutcome, listening_call, raw_call
from .hostile_cartesia import HostileCartesia

#: What callers say (common words the emulator's recogniser knows), in a second tone voice.
SENTENCES: Final = (
    "what time does the store open",
    "i want to change my order",
    "can you help me find the right place",
    "please read that number again",
    "where is my new home",
)
CALLER_VOICE_ID: Final = "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a02"
GREETING: Final = "Hello, this is the chaos line."
HOSTILE_AGENT_MODES: Final = tuple(m for m in AGENT_MODES if m != "echo")


@dataclass
class ChaosOptions:
    """One run: ``calls`` placed evenly over ``ramp_s`` s, each ``duration_s`` s long.

    Shares are fractions of the calls: ``hostile_cartesia_share`` go to the bridge on the hostile
    Cartesia peer, ``hostile_agent_share`` get a hostile agent mode, ``hostile_caller_share``
    misbehave on the media socket. The run is cut after ``run_timeout_s``.
    """

    calls: int = 200
    ramp_s: float = 20.0
    duration_s: float = 8.0
    seed: int = 7
    hostile_cartesia_share: float = 0.1
    hostile_agent_share: float = 0.3
    hostile_caller_share: float = 0.3
    barge_in_share: float = 0.3
    #: After SIGTERM, calls placed on the draining bridge for this long (they must be refused).
    refuse_window_s: float = 1.5
    drain_grace_s: float = 3.0
    emulator_args: str = "--ttfb-ms 60 --rtf 0.25 --jitter-ms 10 --cancel-stops-inflight"
    #: TTS faults (``close-after-chunks`` is added: 2 x calls, at least 100, so each Cartesia socket dies a
    #: few times in a run of any size).
    faults: list[str] = field(default_factory=lambda: ["reject-429=0.05", "no-done=0.05", "delay-ms=150:0.05"])
    #: STT faults. ``close-after-chunks`` counts transcripts, partial ones too: at 6 no turn ever
    #: completed (each replay of the turn was killed again); at 12 a socket dies in about every
    #: second turn and the replay of that turn (at most 9 transcripts) completes.
    stt_faults: list[str] = field(default_factory=lambda: ["close-after-chunks=12", "reject-429=0.1", "no-done=0.1",
                                                           "delay-ms=100:0.1"])
    report: str = "out/chaos"
    timeout_s: float | None = None

    @property
    def run_timeout_s(self) -> float:
        return self.timeout_s or (self.ramp_s + self.duration_s + 90.0)


@dataclass
class Secrets:
    """Recognisable secrets given to the bridges; none may appear in what they say."""

    twilio: str = field(default_factory=lambda: "chaos-twilio-token-" + secrets.token_hex(8))
    cartesia: str = field(default_factory=lambda: "sk_car_chaos_key_" + secrets.token_hex(8))
    agent: str = field(default_factory=lambda: "chaos-agent-token-" + secrets.token_hex(8))

    def all(self) -> dict[str, str]:
        return {"TWILIO_AUTH_TOKEN": self.twilio, "CARTESIA_API_KEY": self.cartesia, "AGENT_TOKEN": self.agent}


class LoadSideErrors(logging.Handler):
    """Counts ERROR records of this process (the emulator, the hostile peers, the callers) by message.

    They are not the bridge's, so they do not fail the run, but they are printed: e.g. aiohttp's
    "Error handling request" when a bridge gives up on an STT handshake the emulator is answering.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name}: {record.getMessage()[:80]}"
        self.counts[key] = self.counts.get(key, 0) + 1


@dataclass
class BridgeRun:
    """One bridge process of the run and what was measured of it."""

    name: str
    process: BridgeProcess
    base_url: str
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    metrics_text: str = ""
    final_metrics_text: str = ""
    exit_code: int | None = None
    sigterm_at: float | None = None
    ready_during_drain: int | None = None


@dataclass
class ChaosRun:
    """Everything a finished run measured; ``bridge.chaos.report`` turns it into figures."""

    opts: ChaosOptions
    secrets: Secrets
    outcomes: list[CallerOutcome]
    bridges: dict[str, BridgeRun]
    emulator: Emulator
    agent: HostileAgent
    cartesia: HostileCartesia
    bodies: list[str]
    wall_s: float
    timed_out: bool
    load_side_errors: dict[str, int] = field(default_factory=dict)


def _plan(opts: ChaosOptions, t_sigterm: float) -> list[tuple[float, CallerOutcome]]:
    rng = random.Random(opts.seed)
    plan = []
    for i in range(opts.calls):
        t = i * opts.ramp_s / opts.calls
        bridge = ("hostile" if rng.random() < opts.hostile_cartesia_share
                  else "old" if t < t_sigterm + opts.refuse_window_s else "new")
        kind = "good"
        if rng.random() < opts.hostile_caller_share:
            kind = rng.choice(LISTENING_KINDS[1:] + RAW_KINDS)
        mode = rng.choice(HOSTILE_AGENT_MODES) if rng.random() < opts.hostile_agent_share else "echo"
        plan.append((t, CallerOutcome(i, bridge, kind, mode)))
    return plan


class Chaos:
    """``await Chaos(opts).run()`` -> ``ChaosRun`` (see the module doc)."""

    def __init__(self, opts: ChaosOptions) -> None:
        if opts.calls < 2 or opts.ramp_s <= 0 or opts.duration_s <= 0:
            raise ValueError("need --calls >= 2, --ramp-s > 0, --duration-s > 0")
        self.opts = opts
        self.secrets = Secrets()
        self.report_dir = Path(opts.report)
        self.bodies: list[str] = []
        self._ports: set[int] = set()

    def _emulator(self) -> Emulator:
        from bridge.cartesia.emulator.cli import add_arguments, settings_from_args

        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        close_after = max(100, 2 * self.opts.calls)
        args = [*shlex.split(self.opts.emulator_args), "--seed", str(self.opts.seed),
                "--api-key", self.secrets.cartesia, "--fault", f"close-after-chunks={close_after}"]
        for f in self.opts.faults:
            args += ["--fault", f]
        for f in self.opts.stt_faults:
            args += ["--stt-fault", f]
        ns = parser.parse_args(args)
        ns.record_contexts = max(2000, self.opts.calls * 100)
        settings = settings_from_args(ns)
        settings.received_cap = 1000
        return Emulator(settings)

    def _bridge(self, name: str, cartesia_url: str, agent_url: str) -> BridgeRun:
        # free_port() may hand out the same port twice in a row: two bridges would then race for it,
        # the loser would exit, and its /readyz would be answered by the winner (its calls with it).
        port = free_port()
        while port in self._ports:
            port = free_port()
        self._ports.add(port)
        base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CARTESIA_", "AGENT_", "TWILIO_", "RELAY_"))}
        env.update(self.secrets.all())
        env.update({
            "PUBLIC_URL": base, "CARTESIA_URL": cartesia_url, "CARTESIA_VOICE_ID": VOICE_ID,
            "CARTESIA_MAX_CONCURRENCY": "100000", "CARTESIA_CONTEXT_TIMEOUT_S": "2",
            "CARTESIA_STT_MAX_CONCURRENCY": str(self.opts.calls + 10), "MAX_CALLS": str(self.opts.calls + 10),
            "AGENT_URL": agent_url, "RELAY_WELCOME_GREETING": GREETING, "RELAY_SPEECH_TIMEOUT": "400",
            "LOG_LEVEL": "INFO", "DRAIN_GRACE_S": str(self.opts.drain_grace_s),
        })
        self.report_dir.mkdir(parents=True, exist_ok=True)
        proc = BridgeProcess(port, env, self.report_dir / f"bridge-{name}.log")
        return BridgeRun(name, proc, base)

    async def _probe_error_bodies(self, http: aiohttp.ClientSession, b: BridgeRun) -> None:
        """Requests the bridge must refuse; their bodies go to the secrets scan."""
        probes = [
            http.post(b.base_url + "/twilio/voice", data={"CallSid": "CAx"}),
            http.post(b.base_url + "/twilio/voice", data={"CallSid": "CAx"}, headers={"X-Twilio-Signature": "bad"}),
            http.get(b.base_url + "/twilio/media", headers={"X-Twilio-Signature": "bad", "Upgrade": "websocket",
                                                             "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}),
            http.post(b.base_url + "/twilio/connect-action", data={"CallSid": "CAx"}),
            http.get(b.base_url + "/nope"),
        ]
        for probe in probes:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with probe as resp:
                    self.bodies.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

    async def _scrape(self, http: aiohttp.ClientSession, b: BridgeRun) -> str:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with http.get(b.base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return await resp.text()
        return ""

    async def _sampler(self, http: aiohttp.ClientSession, bridges: dict[str, BridgeRun]) -> None:
        """Every second, each running bridge's ``/metrics`` and RSS (the last ones kept)."""
        while True:
            for b in bridges.values():
                if b.process.proc.poll() is None:
                    text = await self._scrape(http, b)
                    if text:
                        b.metrics_text = text
                    b.rss_after_mb = rss_mb(b.process.pid) or b.rss_after_mb
            await asyncio.sleep(1.0)

    async def _sigterm(self, http: aiohttp.ClientSession, b: BridgeRun) -> None:
        b.metrics_text = await self._scrape(http, b) or b.metrics_text
        b.rss_after_mb = rss_mb(b.process.pid) or b.rss_after_mb
        b.sigterm_at = time.monotonic()
        b.process.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with http.get(b.base_url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                b.ready_during_drain = resp.status
                self.bodies.append(f"{resp.status} {await resp.text()}")

    async def _wait_exit(self, b: BridgeRun, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while b.process.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 -- a child process
            await asyncio.sleep(0.1)
        b.exit_code = await b.process.stop(grace_s=1.0)  # already exited: just its code (else SIGKILL)

    async def _one(self, http: aiohttp.ClientSession, clock: CallerClock, bridges: dict[str, BridgeRun],
                   t0: float, t: float, out: CallerOutcome, speech: list[bytes]) -> None:
        await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
        b = bridges[out.bridge]
        rng = random.Random(self.opts.seed * 7919 + out.index)
        try:
            if out.kind in RAW_KINDS:
                await raw_call(b.base_url, http, self.secrets.twilio, out, self.opts.duration_s, rng)
            else:
                await listening_call(b.base_url, http, self.secrets.twilio, clock, out, self.opts.duration_s, rng,
                                     speech, self.opts.barge_in_share)
        except asyncio.CancelledError:
            out.status = "failed:timeout"
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
            out.status = f"failed:{type(exc).__name__}"

    async def run(self) -> ChaosRun:
        o = self.opts
        started = time.monotonic()
        load_errors = LoadSideErrors()
        aiohttp_server_log = logging.getLogger("aiohttp.server")
        aiohttp_server_log.addHandler(load_errors)
        aiohttp_server_log.propagate = False  # counted and printed once, not a traceback per handshake
        emulator = self._emulator()
        agent = HostileAgent(expected_token=self.secrets.agent)
        cartesia = HostileCartesia()
        emu_url = str(await emulator.start("127.0.0.1", 0))
        await agent.start()
        await cartesia.start()
        bridges: dict[str, BridgeRun] = {}
        timed_out = False
        outcomes: list[CallerOutcome] = []
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                bridges = {"old": self._bridge("old", emu_url, agent.url), "new": self._bridge("new", emu_url, agent.url),
                           "hostile": self._bridge("hostile", cartesia.url, agent.url)}
                await asyncio.gather(*(b.process.wait_ready(http, 30.0) for b in bridges.values()))
                await asyncio.sleep(0.3)
                for b in bridges.values():  # each /readyz was answered by its own process
                    b.process.check_alive(f"bridge {b.name}")
                for b in bridges.values():
                    b.rss_before_mb = rss_mb(b.process.pid)
                    await self._probe_error_bodies(http, b)
                assert emulator.http_url is not None
                speech = [await fetch_speech(http, emulator.http_url, s, CALLER_VOICE_ID, api_key=self.secrets.cartesia)
                          for s in SENTENCES]
                t_sigterm = o.ramp_s / 2
                plan = _plan(o, t_sigterm)
                outcomes = [out for _t, out in plan]
                clock = CallerClock()
                sampler = asyncio.create_task(self._sampler(http, bridges))
                t0 = time.monotonic()
                tasks = [asyncio.create_task(self._one(http, clock, bridges, t0, t, out, speech)) for t, out in plan]
                await asyncio.sleep(max(0.0, t0 + t_sigterm - time.monotonic()))
                await self._sigterm(http, bridges["old"])
                with no_full_gc():
                    _done, pending = await asyncio.wait(tasks, timeout=max(1.0, started + o.run_timeout_s - 30.0
                                                                           - time.monotonic()))
                timed_out = bool(pending)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                await clock.close()
                await self._wait_exit(bridges["old"], o.drain_grace_s + 15.0)
                await asyncio.sleep(1.5)  # in-flight hang-ups reach the bridges
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                for name in ("new", "hostile"):
                    b = bridges[name]
                    b.final_metrics_text = await self._scrape(http, b)
                    await self._sigterm(http, b)
                await asyncio.gather(*(self._wait_exit(bridges[n], o.drain_grace_s + 15.0) for n in ("new", "hostile")))
        finally:
            for b in bridges.values():
                if b.exit_code is None:
                    b.exit_code = await b.process.stop(grace_s=5.0)
            await agent.stop()
            await cartesia.stop()
            await emulator.stop()
            aiohttp_server_log.removeHandler(load_errors)
            aiohttp_server_log.propagate = True
        return ChaosRun(o, self.secrets, outcomes, bridges, emulator, agent, cartesia, self.bodies,
                        time.monotonic() - started, timed_out, load_errors.counts)


def bridge_log_lines(b: BridgeRun) -> list[bytes]:
    try:
        return b.process.log_path.read_bytes().splitlines()
    except OSError:
        return []

