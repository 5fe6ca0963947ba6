"""``media-bridge loadtest``: many simulated Twilio calls, a JSON and an HTML report.

Without ``--target`` it runs a Cartesia emulator on its own event loop and
starts the bridge as a separate process (``media-bridge serve``) pointed at
it, so the bridge's CPU and RSS (sampled with psutil) are its own. With
``--target URL`` it drives a bridge already running elsewhere.

Each call is a ``telephony.simulator.SimulatedCall`` (signed webhook, TwiML,
signed upgrade, inbound media every 20 ms, an ear that plays at 8000 B/s,
echoes marks, honours ``clear``), placed at ``i * ramp_s / calls`` and hung up
(``stop``) ``duration_s`` after its stream started. Scenarios, driven by the
built-in demo agent (or ``--agent-url``):

* ``talk``: greeting, then DTMF 9 (a long passage) each time the line has
  been quiet for 1 s: the agent speaks nearly all the time;
* ``conversation``: greeting, then a DTMF digit (read back) after a pause of
  0.3-1.0 s each time the line goes quiet;
* ``barge-in``: greeting, DTMF 9, and 1-2 s after its audio starts the caller
  talks for 0.6 s (loud inbound frames) so the bridge's VAD clears;
* ``idle``: greeting only, then the call stays connected (inbound audio every
  20 ms, nothing to say): for the memory of an idle call.

Capacity runs: ``--bridge-cpus`` / ``--load-cpus`` pin the bridge and this
process (emulator + callers) to CPU sets (``taskset``; ``sched_setaffinity``
when it is missing); ``--caller-procs K`` spreads the simulated callers over K
worker processes (the emulator, sampler and analysis stay here; workers send
back each call's record when done).

Definitions used in the report (all measured at the simulated caller):

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

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from metrics.scrape import parse_samples, summarize, value
from telephony.media import FRAME_BYTES, MULAW_SILENCE
from telephony.simulator import CallerClock, CallRecord, SimulatedCall

SCENARIOS: Final = ("talk", "conversation", "barge-in", "idle")
DEFAULT_EMULATOR_ARGS: Final = "--ttfb-ms 90 --rtf 0.25 --jitter-ms 10"
VOICE_ID: Final = "5b0f2a52-7e3c-4c1a-9d5e-0c7a1e5f7a01"
GREETING: Final = "Hello! You are connected to the media bridge load test."
PAD: Final = bytes([MULAW_SILENCE])
#: Quiet this long (buffer played out, nothing new) = the agent has finished its turn.
QUIET_S: Final = 0.12
#: ``talk`` waits longer: a stall mid-passage (an underrun) taken for the end of the turn would
#: queue another long passage behind the first and feed an overload with more load.
TALK_QUIET_S: Final = 1.0
#: A trigger not answered with audio within this long counts as "no_response".
RESPONSE_TIMEOUT_S: Final = 8.0
SCHEMA: Final = "media-bridge-loadtest/1"


# ---------------------------------------------------------------- statistics


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def dist_ms(values_s: list[float]) -> dict[str, Any]:
    """count, p50/p95/p99/max and mean in ms of a list of seconds."""
    ms = [v * 1000.0 for v in values_s]
    out: dict[str, Any] = {"count": len(ms)}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        v = pct(ms, q)
        out[name] = None if v is None else round(v, 3)
    out["max"] = round(max(ms), 3) if ms else None
    out["mean"] = round(sum(ms) / len(ms), 3) if ms else None
    return out


# ------------------------------------------------------------ audio integrity


@dataclass(slots=True)
class Blob:
    """Distinct audio produced by one or more emulator contexts."""

    audio: bytes
    contexts: list[str] = field(default_factory=list)


class AudioIndex:
    """Emulator contexts' audio, looked up by their first (0xFF-padded) frame."""

    def __init__(self) -> None:
        self.by_head: dict[bytes, list[Blob]] = {}
        self._by_hash: dict[bytes, Blob] = {}
        self.contexts = 0
        self.cancelled = 0

    @staticmethod
    def head(audio: bytes) -> bytes:
        first = audio[:FRAME_BYTES]
        return first + PAD * (FRAME_BYTES - len(first))

    def add(self, context_id: str, audio: bytes, *, cancelled: bool = False) -> None:
        self.contexts += 1
        self.cancelled += int(cancelled)
        if not audio:
            return
        digest = hashlib.sha1(audio).digest()
        blob = self._by_hash.get(digest)
        if blob is None:
            blob = self._by_hash[digest] = Blob(audio)
            cands = self.by_head.setdefault(self.head(audio), [])
            cands.append(blob)
            cands.sort(key=lambda b: -len(b.audio))
        blob.contexts.append(context_id)


@dataclass(slots=True)
class Span:
    """One utterance in a call's received stream: bytes ``[start, end)``."""

    start: int
    end: int
    status: str  # "ok" | "interrupted" (clear) | "cut" (stream ended) | "mismatch"
    audio_bytes: int = 0  # without padding


def _full_match(stream: bytes, p: int, end: int, blob: Blob) -> int | None:
    n = len(blob.audio)
    padded = n + (-n % FRAME_BYTES)
    if p + padded > end or stream[p:p + n] != blob.audio:
        return None
    if padded != n and stream[p + n:p + padded] != PAD * (padded - n):
        return None
    return padded


def split_utterances(stream: bytes, clear_offsets: list[int], index: AudioIndex) -> list[Span]:
    """Split a call's received audio into utterances matched against ``index``.

    A ``clear`` always ends an utterance. Within a stretch between clears,
    utterances follow each other back to back; each must be a context's
    audio plus 0xFF padding to the frame, except the stretch's last one,
    which may be a prefix (interrupted by the clear, or cut by the hang-up).
    Bytes matching nothing form a ``mismatch`` span up to the next frame
    where a full match starts again.
    """
    spans: list[Span] = []
    bounds = sorted({o for o in clear_offsets if 0 < o < len(stream)}) + [len(stream)]
    start = 0
    for end in bounds:
        cut_status = "interrupted" if end != len(stream) else "cut"
        p = start
        while p < end:
            cands = index.by_head.get(stream[p:p + FRAME_BYTES], [])
            done = False
            for blob in cands:
                n = _full_match(stream, p, end, blob)
                if n is not None:
                    spans.append(Span(p, p + n, "ok", len(blob.audio)))
                    p += n
                    done = True
                    break
            if done:
                continue
            rest = end - p
            for blob in cands:
                if rest < len(blob.audio) and stream[p:end] == blob.audio[:rest]:
                    spans.append(Span(p, end, cut_status, rest))
                    p = end
                    done = True
                    break
            if done:
                continue
            q = p + FRAME_BYTES
            while q < end and not any(
                _full_match(stream, q, end, b) is not None for b in index.by_head.get(stream[q:q + FRAME_BYTES], [])
            ):
                q += FRAME_BYTES
            spans.append(Span(p, min(q, end), "mismatch"))
            p = q
        start = end
    return spans


def explain_mismatch(stream: bytes, span: Span, index: AudioIndex) -> dict[str, Any]:
    """What a mismatching span looks like next to the closest emulator audio: the context whose
    audio shares the longest prefix with it, and where (frame-aligned) they part. For a report
    reader chasing a mismatch; costs a scan of every distinct context audio, so only for examples."""
    got = stream[span.start:span.end]
    best: tuple[int, Blob] | None = None
    for blob in index._by_hash.values():  # noqa: SLF001 - same module
        n = 0
        limit = min(len(got), len(blob.audio))
        while n < limit and got[n:n + FRAME_BYTES] == blob.audio[n:n + FRAME_BYTES]:
            n += FRAME_BYTES
        if best is None or n > best[0]:
            best = (n, blob)
    out: dict[str, Any] = {"bytes": len(got), "first_frame_known": stream[span.start:span.start + FRAME_BYTES]
                           in index.by_head}
    if best is not None and best[0]:
        n, blob = best
        out.update({"closest_contexts": blob.contexts[:3], "closest_audio_bytes": len(blob.audio),
                    "same_for_bytes": min(n, len(got))})
    return out


# -------------------------------------------------------------- per-call data


@dataclass
class RecordedCall:
    """A finished call's record, as a caller worker process sends it back."""

    record: CallRecord



@dataclass
class CallResult:
    index: int
    call_sid: str = ""
    status: str = "pending"  # pending | active | completed | failed
    reason: str | None = None
    t_placed: float | None = None
    t_started: float | None = None
    t_ended: float | None = None
    triggers: list[tuple[float, str]] = field(default_factory=list)
    barge_in_s: list[float] = field(default_factory=list)
    no_response: int = 0
    live_ttfa: list[float] = field(default_factory=list)  # rough, for the progress line
    call: SimulatedCall | RecordedCall | None = None
    # filled by analysis
    ttfa_s: list[tuple[str, float]] = field(default_factory=list)
    underruns: list[float] = field(default_factory=list)
    #: (utterance number from 0, audio position in it in s) where each underrun began, parallel to ``underruns``
    underrun_at_s: list[tuple[int, float]] = field(default_factory=list)
    jitter_s: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)


def analyze_call(res: CallResult, index: AudioIndex | None) -> None:
    """Utterances, integrity, underruns, jitter and TTFA of one finished call."""
    call = res.call
    if call is None:
        return
    rec = call.record
    res.protocol_errors = list(rec.protocol_errors)
    stream = bytes(rec.received_audio)
    arrivals = rec.arrivals
    if index is not None:
        res.spans = split_utterances(stream, rec.clear_offsets, index)
        starts = {s.start for s in res.spans}
    else:
        starts = set(rec.clear_offsets) | {0}
    trigger_times = sorted(t for t, _k in res.triggers)

    def triggered_between(a: float, b: float) -> bool:
        return any(a - 0.001 <= t <= b for t in trigger_times)

    # Underruns: buffer dry before a message that continues an utterance.
    prev_arrival: float | None = None
    utt_start, utt_no = 0, -1
    for i, (t, off, _n, dry) in enumerate(arrivals):
        if i == 0 or off in starts:
            prev_arrival = None
            utt_start, utt_no = off, utt_no + 1
        new_utt = prev_arrival is None
        if index is None and dry > 0.001 and triggered_between(t - dry, t):
            new_utt = True  # heuristic: a gap we bridged with a trigger is a turn boundary
        if not new_utt and dry > 0.001:
            res.underruns.append(dry)
            res.underrun_at_s.append((utt_no, (off - utt_start) / 8000.0))
        if not new_utt and prev_arrival is not None:
            p_t, p_n = prev_arrival, arrivals[i - 1][2]
            res.jitter_s.append(abs((t - p_t) - p_n / 8000.0))
        prev_arrival = t
    # TTFA: trigger -> first message of the next utterance that arrives after it.
    for t, kind in res.triggers:
        for a_t, off, _n, _dry in arrivals:
            if a_t >= t:
                if off in starts or index is None:
                    res.ttfa_s.append((kind, a_t - t))
                break


def integrity_summary(results: list[CallResult], index: AudioIndex | None) -> dict[str, Any]:
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


# --------------------------------------------------------------- scenarios


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def _wait(pred: Any, until: float, interval: float = 0.02) -> bool:
    while time.monotonic() < until:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


async def _wait_quiet(call: SimulatedCall, until: float, quiet_s: float = QUIET_S) -> bool:
    """Until the line has been quiet for ``quiet_s`` or is closed; sleeps to the
    moment it could next be quiet instead of polling."""
    arr = call.record.arrivals
    while True:
        if call.closed.is_set():
            return True
        now = time.monotonic()
        quiet_at = max(call.ear.buffer_end, arr[-1][0] if arr else 0.0) + quiet_s
        if now > quiet_at:
            return True
        if now >= until:
            return False
        await asyncio.sleep(min(quiet_at, until) - now + 0.001)


def _quiet(call: SimulatedCall) -> bool:
    now = time.monotonic()
    arr = call.record.arrivals
    last = arr[-1][0] if arr else 0.0
    return now > call.ear.buffer_end + QUIET_S and now > last + QUIET_S


async def _trigger(call: SimulatedCall, res: CallResult, digit: str, end_at: float) -> float | None:
    """Send ``digit`` and wait for audio; return when the answer's first media arrived."""
    n0 = len(call.record.arrivals)
    t = time.monotonic()
    await call.send_dtmf(digit)
    res.triggers.append((t, "dtmf"))
    ok = await _wait(lambda: len(call.record.arrivals) > n0 or call.closed.is_set(),
                     min(end_at, t + RESPONSE_TIMEOUT_S), 0.005)
    if not ok and time.monotonic() < end_at:
        res.no_response += 1
    if len(call.record.arrivals) > n0:
        first = call.record.arrivals[n0][0]
        res.live_ttfa.append(first - t)
        return first
    return None


async def run_scenario(name: str, call: SimulatedCall, res: CallResult, end_at: float, rng: random.Random) -> None:
    closed = call.closed.is_set
    if not await _wait(lambda: call.got_media.is_set() or closed(), min(end_at, time.monotonic() + RESPONSE_TIMEOUT_S)):
        if time.monotonic() < end_at:
            res.no_response += 1
    elif call.record.arrivals and res.t_started is not None:
        res.live_ttfa.append(call.record.arrivals[0][0] - res.t_started)
    if name == "idle":
        await _wait(closed, end_at, 0.25)
        return
    while time.monotonic() < end_at and not closed():
        if not await _wait_quiet(call, end_at, TALK_QUIET_S if name == "talk" else QUIET_S):
            return
        if closed():
            return
        if name == "talk":
            await _trigger(call, res, "9", end_at)
        elif name == "conversation":
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            if time.monotonic() >= end_at:
                return
            await _trigger(call, res, rng.choice("12345678"), end_at)
        else:  # barge-in
            first = await _trigger(call, res, "9", end_at)
            if first is None:
                continue
            await _sleep_until(first + rng.uniform(1.0, 2.0))
            if time.monotonic() >= end_at or closed():
                return
            clears0 = call.record.clears
            call.speak(0.6)
            t_speak = time.monotonic()
            if await _wait(lambda c0=clears0: call.record.clears > c0 or closed(), min(end_at, t_speak + 3.0), 0.005):
                for t, kind, _d in reversed(call.record.timeline):
                    if kind == "clear":
                        if t >= t_speak:
                            res.barge_in_s.append(t - t_speak)
                        break
            await _sleep_until(t_speak + 0.6 + 0.3)  # caller stops talking; VAD hangover passes


# ------------------------------------------------------------------- runner


@dataclass
class Options:
    calls: int = 20
    ramp_s: float = 5.0
    duration_s: float = 10.0
    scenario: str = "talk"
    target: str | None = None
    auth_token: str | None = None
    public_url: str | None = None
    emulator_args: str = DEFAULT_EMULATOR_ARGS
    agent_url: str | None = None
    report: str = "out/loadtest"
    timeout_s: float | None = None
    seed: int = 1
    bridge_env: dict[str, str] = field(default_factory=dict)
    sample_interval_s: float = 1.0
    progress: bool = True
    #: Simulated callers spread over this many worker processes (1: in this process).
    caller_procs: int = 1
    #: CPU sets ("0", "0,1", "2-3") for the bridge process and for this process (+ workers).
    bridge_cpus: str | None = None
    load_cpus: str | None = None
    #: Test hook: awaited with the LoadTest once all calls have started their ramp.
    during: Any = None


class BridgeProcess:
    """``media-bridge serve`` as a child process, logs to ``log_path``."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path, cpus: set[int] | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "bridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        preexec: Any = None
        if cpus:
            taskset = shutil.which("taskset")
            if taskset:
                cmd = [taskset, "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]  # execs: same pid
            else:
                def preexec() -> None:
                    os.sched_setaffinity(0, cpus)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self, http: aiohttp.ClientSession, limit_s: float = 20.0) -> None:
        deadline = time.monotonic() + limit_s
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"bridge not ready after {limit_s:.0f} s; see {self.log_path}")

    async def stop(self, grace_s: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
                self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 -- a child process
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _log_summary(path: Path) -> dict[str, Any]:
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


def parse_cpus(spec: str) -> set[int]:
    """``"0"``, ``"0,2"``, ``"1-3"`` -> a CPU set; ValueError when empty or malformed."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {spec!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU list {spec!r}")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {spec!r}")
    return cpus


@contextlib.contextmanager
def no_full_gc() -> Any:
    """No full (generation 2) garbage collection while calls run in this process.

    The load tester is the measuring instrument, and its heap grows with every
    call's record: a full collection paused its event loop (emulator and callers)
    for 22-69 ms in a 300-call run, and a late emulator chunk shows up as a caller
    underrun that is not the bridge's. What exists at the start is frozen, young
    generations are still collected as usual, and the thresholds are restored
    afterwards (runs are bounded, so the garbage this defers is bounded too).
    """
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(old[0], old[1], 1_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _caller_worker(opts: Options, base_url: str, public_url: str, auth_token: str | None, t0: float,
                   indices: list[int], timeout: float, out_path: str) -> None:
    """Worker process: run the calls ``indices`` on the shared timeline ``t0``
    (``time.monotonic`` is system-wide), pickle their results to ``out_path``."""
    from bridge.logs import configure_logging

    configure_logging("WARNING")
    lt = LoadTest(opts)
    lt.base_url, lt.public_url, lt.auth_token, lt.t0 = base_url, public_url, auth_token, t0
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner, no_full_gc():
        timed_out = runner.run(lt._run_calls(indices, timeout))
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


def free_port() -> int:
    from bridge.demo import free_port as _fp

    return _fp()


class LoadTest:
    """One load-test run (see module docstring)."""

    def __init__(self, opts: Options) -> None:
        if opts.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}")
        if opts.calls < 1 or opts.duration_s <= 0 or opts.ramp_s < 0:
            raise ValueError("need --calls >= 1, --duration-s > 0, --ramp-s >= 0")
        if opts.caller_procs < 1:
            raise ValueError("need --caller-procs >= 1")
        self.bridge_cpus = parse_cpus(opts.bridge_cpus) if opts.bridge_cpus else None
        self.load_cpus = parse_cpus(opts.load_cpus) if opts.load_cpus else None
        self.opts = opts
        self.report_dir = Path(opts.report)
        self.results = [CallResult(i) for i in range(opts.calls)]
        self.emulator: Any = None
        self.bridge: BridgeProcess | None = None
        self.base_url = ""
        self.public_url = ""
        self.auth_token = opts.auth_token
        self.samples: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.timed_out = False
        self.metrics_text = ""
        self.metrics_before = ""
        self._fwd_p99_live: float | None = None
        self._workers: list[Any] = []  # multiprocessing.Process of the caller workers
        self.rss_before_mb: float | None = None
        #: Inbound audio and mark echoes of this process's calls (one task, not two per call).
        self.clock: CallerClock | None = None

    # -------------------------------------------------------------- set-up

    async def _start_emulator(self) -> str:
        from bridge.cartesia.emulator import Emulator
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
        if self.opts.agent_url:
            env["AGENT_URL"] = self.opts.agent_url
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
        import psutil

        proc = psutil.Process(self.bridge.pid) if self.bridge else None
        me = psutil.Process()
        if proc:
            proc.cpu_percent(None)
        me.cpu_percent(None)
        workers: list[Any] = []
        for w in self._workers:
            with contextlib.suppress(psutil.Error, ValueError):
                wp = psutil.Process(w.pid)
                wp.cpu_percent(None)
                workers.append(wp)

        def tester_cpu() -> float:
            total = float(me.cpu_percent(None))
            for wp in workers:
                with contextlib.suppress(psutil.Error):
                    total += float(wp.cpu_percent(None))
            return round(total, 1)

        while True:
            await asyncio.sleep(self.opts.sample_interval_s)
            now = time.monotonic()
            text = await self._scrape(http)
            sample: dict[str, Any] = {
                "t": round(now - self.t0, 3),
                "active_calls": sum(1 for r in self.results if r.status == "active"),
                "completed": sum(1 for r in self.results if r.status == "completed"),
                "failed": sum(1 for r in self.results if r.status == "failed"),
                "loadtester_cpu_percent": tester_cpu(),
                "bridge_cpu_percent": None,
                "bridge_rss_mb": None,
                "bridge_active_calls": None,
                "forwarding_delay_p99_ms": None,
            }
            if proc:
                with contextlib.suppress(psutil.Error):
                    sample["bridge_cpu_percent"] = round(proc.cpu_percent(None), 1)
                    sample["bridge_rss_mb"] = round(proc.memory_info().rss / 2**20, 2)
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
        ttfa = pct([v for r in self.results for v in r.live_ttfa], 0.99)
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

    # --------------------------------------------------------------- calls

    async def _one_call(self, http: aiohttp.ClientSession, res: CallResult) -> None:
        o = self.opts
        await _sleep_until(self.t0 + (res.index * o.ramp_s / o.calls if o.calls > 1 else 0.0))
        query = {"agentUrl": o.agent_url} if (o.agent_url and o.target) else None
        call = SimulatedCall(self.base_url, http, auth_token=self.auth_token, public_url=self.public_url,
                             webhook_query=query, clock=self.clock)
        res.call = call
        res.call_sid = call.record.call_sid
        res.t_placed = time.monotonic()
        try:
            try:
                stream = await asyncio.wait_for(call.place(), 15)
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
                return self._fail(res, "webhook_error", exc)
            if stream is None:
                return self._fail(res, "refused")
            try:
                await asyncio.wait_for(call.connect(), 15)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return self._fail(res, "connect_error", exc)
            res.t_started = time.monotonic()
            res.triggers.append((res.t_started, "greeting"))
            res.status = "active"
            end_at = res.t_started + o.duration_s
            await run_scenario(o.scenario, call, res, end_at, random.Random(o.seed * 100003 + res.index))
            closed_early = call.closed.is_set()
            await call.hangup()
            res.t_ended = time.monotonic()
            if closed_early:
                return self._fail(res, "closed_by_bridge")
            if call.record.protocol_errors:
                return self._fail(res, "protocol_error")
            if call.record.media_bytes == 0:
                return self._fail(res, "no_audio")
            if res.no_response:
                return self._fail(res, "no_response")
            res.status = "completed"
        except asyncio.CancelledError:
            res.status, res.reason = "failed", "timeout"
            with contextlib.suppress(Exception):
                await asyncio.shield(call.close())
            raise
        except Exception as exc:  # noqa: BLE001 -- a call's failure must not stop the run
            self._fail(res, f"error:{type(exc).__name__}", exc)
            with contextlib.suppress(Exception):
                await call.close()

    @staticmethod
    def _fail(res: CallResult, reason: str, exc: BaseException | None = None) -> None:
        res.status = "failed"
        res.reason = reason
        if res.t_ended is None:
            res.t_ended = time.monotonic()

    # ----------------------------------------------------------------- run

    async def _run_calls(self, indices: list[int], timeout: float) -> bool:
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
        wopts = Options(**{**o.__dict__, "during": None, "caller_procs": 1, "progress": False})
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
            p.indices = indices  # type: ignore[attr-defined]
            p.path = path  # type: ignore[attr-defined]
            self._workers.append(p)

    async def _wait_workers(self, timeout: float) -> bool:
        deadline = self.t0 + timeout + 30.0  # + result pickling
        while any(p.is_alive() for p in self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        timed_out = False
        for p in self._workers:
            if p.is_alive():
                p.kill()
            p.join(5)
            try:
                w_timed_out, results = pickle.loads(p.path.read_bytes())  # noqa: S301 -- our own worker's file
                p.path.unlink(missing_ok=True)
            except (OSError, pickle.UnpicklingError, EOFError):
                for i in p.indices:
                    self._fail(self.results[i], "worker_error")
                timed_out = True
                continue
            timed_out = timed_out or w_timed_out
            for r in results:
                self.results[r.index] = r
        return timed_out

    async def run(self) -> dict[str, Any]:
        o = self.opts
        self.report_dir.mkdir(parents=True, exist_ok=True)
        timeout = o.timeout_s or (o.ramp_s + o.duration_s + 60.0)
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
                    await self._start_bridge(http, emu_url)
                self.metrics_before = await self._scrape(http)
                if self.bridge is not None:
                    import psutil

                    with contextlib.suppress(psutil.Error):
                        self.rss_before_mb = round(psutil.Process(self.bridge.pid).memory_info().rss / 2**20, 2)
                # Workers need a moment to start (imports): the shared timeline begins after it.
                self.t0 = time.monotonic() + (2.0 if o.caller_procs > 1 else 0.0)
                if o.caller_procs > 1:
                    self._start_workers(timeout)
                sampler = asyncio.create_task(self._sampler(http))
                during = None
                if o.during is not None:
                    during = asyncio.create_task(o.during(self))
                with no_full_gc():
                    if o.caller_procs > 1:
                        self.timed_out = await self._wait_workers(timeout)
                    else:
                        self.timed_out = await self._run_calls(list(range(o.calls)), timeout)
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
                # Final sample, after the calls ended (idle RSS, gauges back to 0).
                await self._final_sample(http)
                report = self._build_report(started_wall)
            finally:
                bridge_rc = None
                if self.bridge is not None:
                    bridge_rc = await self.bridge.stop()
                if self.emulator is not None:
                    await self.emulator.stop()
        report["bridge"]["exit_code"] = bridge_rc
        if self.bridge is not None:
            report["bridge"]["log"] = _log_summary(self.bridge.log_path)
        self._write(report)
        return report

    async def _final_sample(self, http: aiohttp.ClientSession) -> None:
        import psutil

        s: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 3), "active_calls": 0,
                             "completed": sum(1 for r in self.results if r.status == "completed"),
                             "failed": sum(1 for r in self.results if r.status == "failed"),
                             "loadtester_cpu_percent": None, "bridge_cpu_percent": None, "bridge_rss_mb": None,
                             "bridge_active_calls": None, "forwarding_delay_p99_ms": None, "final": True}
        if self.bridge:
            with contextlib.suppress(psutil.Error):
                s["bridge_rss_mb"] = round(psutil.Process(self.bridge.pid).memory_info().rss / 2**20, 2)
        if self.metrics_text:
            s["bridge_active_calls"] = value(parse_samples(self.metrics_text), "bridge_active_calls")
        self.samples.append(s)

    # -------------------------------------------------------------- report

    def _index(self) -> AudioIndex | None:
        if self.emulator is None:
            return None
        index = AudioIndex()
        for rec in self.emulator.records:
            index.add(rec.context_id, bytes(rec.audio), cancelled=bool(rec.cancelled))
        return index

    def _build_report(self, started_wall: float) -> dict[str, Any]:
        o = self.opts
        index = self._index()
        for r in self.results:
            analyze_call(r, index)
        res = self.results
        reasons = Counter(r.reason or "?" for r in res if r.status == "failed")
        ttfa = [v for r in res for _k, v in r.ttfa_s]
        by_kind: dict[str, list[float]] = {}
        for r in res:
            for k, v in r.ttfa_s:
                by_kind.setdefault(k, []).append(v)
        underruns = [u for r in res for u in r.underruns]
        samples = parse_samples(self.metrics_text) if self.metrics_text else {}

        def hist(name: str) -> dict[str, Any]:
            h = summarize(samples, name)
            def ms(v: float | None) -> float | None:
                return None if v is None else round(v * 1000, 3)

            return {"count": h.count, "p50": ms(h.p50), "p95": ms(h.p95), "p99": ms(h.p99),
                    "mean": ms(h.sum / h.count) if h.count else None,
                    "buckets": _bucket_counts(samples, name)}

        cpu = [s["bridge_cpu_percent"] for s in self.samples if s.get("bridge_cpu_percent") is not None]
        rss = [s["bridge_rss_mb"] for s in self.samples if s.get("bridge_rss_mb") is not None]
        tester = [s["loadtester_cpu_percent"] for s in self.samples if s.get("loadtester_cpu_percent") is not None]
        peak_active = max((s["active_calls"] for s in self.samples), default=0)
        # Steady state: samples with every surviving call active (at least 90 % of the peak).
        steady = [s for s in self.samples if peak_active and s["active_calls"] >= 0.9 * peak_active
                  and s.get("bridge_cpu_percent") is not None]
        steady_cpu = [s["bridge_cpu_percent"] for s in steady]
        rss_base = self.rss_before_mb if self.rss_before_mb is not None else (rss[0] if rss else None)
        rss_peak = max(rss) if rss else None
        cpu_mean_steady = sum(steady_cpu) / len(steady_cpu) if steady_cpu else None
        jitter = [j for r in res for j in r.jitter_s]
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
            "config": {
                "calls": o.calls, "ramp_s": o.ramp_s, "duration_s": o.duration_s, "scenario": o.scenario,
                "target": o.target, "emulator_args": None if o.target else o.emulator_args,
                "agent_url": o.agent_url, "signed": bool(self.auth_token), "seed": o.seed,
                "timeout_s": o.timeout_s or (o.ramp_s + o.duration_s + 60.0),
                "cpu_count": os.cpu_count(),
                "caller_procs": o.caller_procs, "bridge_cpus": o.bridge_cpus, "load_cpus": o.load_cpus,
            },
            "wall_s": round(time.monotonic() - self.t0, 3),
            "timed_out": self.timed_out,
            "calls": {
                "attempted": sum(1 for r in res if r.t_placed is not None),
                "connected": sum(1 for r in res if r.t_started is not None),
                "completed": sum(1 for r in res if r.status == "completed"),
                "failed": sum(1 for r in res if r.status == "failed"),
                "failed_by_reason": dict(reasons),
                "not_started": sum(1 for r in res if r.t_placed is None),
                "triggers_without_response": sum(r.no_response for r in res),
                "protocol_errors": sum(len(r.protocol_errors) for r in res),
                "protocol_error_examples": sorted({e for r in res for e in r.protocol_errors})[:10],
            },
            "caller": {
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
                    "method": "exact utterance spans (emulator)" if index else
                              "heuristic: dry gaps not bridged by one of our triggers",
                },
                "jitter_ms": {**dist_ms(jitter), "definition": "|Δarrival − Δaudio| between consecutive media "
                                                               "messages of one utterance (RFC 3550 D)"},
                "barge_in_ms": dist_ms([b for r in res for b in r.barge_in_s]),
                "media_messages": sum(r.call.record.media_messages for r in res if r.call),
                "audio_received_s": round(sum(r.call.record.media_bytes for r in res if r.call) / 8000, 1),
                "clears": sum(r.call.record.clears for r in res if r.call),
            },
            "integrity": integrity_summary(res, index),
            "bridge_metrics": {
                "forwarding_delay_ms": hist("bridge_forwarding_delay_seconds"),
                "text_to_first_frame_ms": hist("bridge_text_to_first_frame_seconds"),
                "tts_ttfb_ms": hist("bridge_tts_ttfb_seconds"),
                "barge_in_latency_ms": hist("bridge_barge_in_latency_seconds"),
                "mark_round_trip_ms": hist("bridge_mark_round_trip_seconds"),
                "event_loop_lag_ms": hist("bridge_event_loop_lag_seconds"),
                "active_calls_at_end": value(samples, "bridge_active_calls") if samples else None,
                "playout_buffered_bytes_at_end": value(samples, "bridge_playout_buffered_bytes") if samples else None,
                "cartesia_active_contexts_at_end":
                    value(samples, "bridge_cartesia_active_contexts") if samples else None,
                "calls_by_outcome": {lab.get("outcome", ""): v for lab, v in samples.get("bridge_calls_total", [])},
                "late_chunks_dropped": value(samples, "bridge_late_chunks_dropped_total") if samples else None,
                "playout_overflow_bytes": value(samples, "bridge_playout_overflow_bytes_total") if samples else None,
                "cartesia_errors": value(samples, "bridge_cartesia_errors_total") if samples else None,
                "utterances_failed": value(samples, "bridge_utterances_failed_total") if samples else None,
                # The bridge's own estimate of the caller's underruns, by cause (tts_late: Cartesia had not
                # delivered; held: audio waited in the bridge): tells whose the underruns above were.
                "playout_gaps": {cause: int(value(samples, "bridge_playout_gaps_total", cause=cause))
                                 for cause in ("tts_late", "held")} if samples else None,
            },
            "bridge": {
                "measured": self.bridge is not None,
                "pid": self.bridge.pid if self.bridge else None,
                "cpu_percent": {"mean_steady": _r(cpu_mean_steady), "p95": _r(pct(cpu, 0.95)),
                                "max": _r(max(cpu) if cpu else None), "steady_samples": len(steady_cpu),
                                "note": "percent of one core (psutil), sampled every "
                                        f"{o.sample_interval_s:g} s; steady = samples with >= 90% of peak calls"},
                "rss_mb": {"start": rss_base, "peak": rss_peak, "end": rss[-1] if rss else None,
                           "before_calls": self.rss_before_mb},
                "per_call": {
                    "peak_active_calls": peak_active,
                    "cpu_percent": _r(cpu_mean_steady / peak_active if cpu_mean_steady and peak_active else None, 4),
                    "rss_kb": _r((rss_peak - rss_base) * 1024 / peak_active
                                 if rss_peak is not None and rss_base is not None and peak_active else None),
                },
            },
            # The emulator's own view: how late its scheduler sent chunks (0 = on time). Late chunks
            # here explain caller underruns that the bridge counts as tts_late gaps.
            "emulator": ({"chunks": self.emulator.chunks_total,
                          "chunk_lateness_ms": self.emulator.lateness_ms(),
                          "first_chunk_lateness_ms": self.emulator.lateness_ms(first_chunks=True)}
                         if self.emulator is not None else None),
            "loadtester": {"cpu_percent_mean": _r(sum(tester) / len(tester) if tester else None),
                           "cpu_percent_max": _r(max(tester) if tester else None),
                           "note": "the simulated callers + emulator share this process; near 100% means "
                                   "caller-side timings are inflated by the tester itself"},
            "timeseries": self.samples,
            "per_call": [
                {"index": r.index, "call_sid": r.call_sid, "status": r.status, "reason": r.reason,
                 "ttfa_ms": [round(v * 1000, 2) for _k, v in r.ttfa_s],
                 "underruns": len(r.underruns), "underrun_ms": round(sum(r.underruns) * 1000, 1),
                 "underrun_at": [{"utterance": u, "at_ms": round(a * 1000)} for u, a in r.underrun_at_s],
                 "mismatches": sum(1 for s in r.spans if s.status == "mismatch"),
                 "utterances": len(r.spans),
                 "audio_s": round(r.call.record.media_bytes / 8000, 2) if r.call else 0.0,
                 "clears": r.call.record.clears if r.call else 0}
                for r in res
            ],
        }
        return report

    def _write(self, report: dict[str, Any]) -> None:
        from bridge.report_html import render_html

        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / "report.json").write_text(json.dumps(report, indent=1))
        (self.report_dir / "report.html").write_text(render_html(report))


def _r(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def _bucket_counts(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> list[list[float]]:
    """[[upper bound s, count in that bucket]] (non-cumulative), merged over label sets; +Inf as 1e9."""
    merged: dict[float, float] = {}
    for labels, v in samples.get(name + "_bucket", []):
        b = float(labels["le"])
        merged[b] = merged.get(b, 0.0) + v
    out, prev = [], 0.0
    for b, c in sorted(merged.items()):
        out.append([b if math.isfinite(b) else 1e9, c - prev])
        prev = c
    return out


# --------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="media-bridge loadtest",
        description="Many simulated Twilio calls against the bridge; JSON + HTML report.",
        epilog=__doc__.split("Definitions used in the report", 1)[1].join(("Definitions", "")),
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
                   caller_procs=ns.caller_procs, bridge_cpus=ns.bridge_cpus, load_cpus=ns.load_cpus)


def summary_lines(r: dict[str, Any]) -> list[str]:
    c, cal, b, i = r["calls"], r["caller"], r["bridge"], r["integrity"]
    fwd = r["bridge_metrics"]["forwarding_delay_ms"]
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
    ]


def main(argv: list[str] | None = None) -> int:
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
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:  # no global policy change
            report = runner.run(lt.run())
    except RuntimeError as exc:
        print(f"media-bridge loadtest: {exc}", file=sys.stderr)
        return 2
    for line in summary_lines(report):
        print(line)
    print(f"report: {Path(opts.report) / 'report.json'} and {Path(opts.report) / 'report.html'}")
    ok = (report["calls"]["completed"] == opts.calls and report["integrity"]["mismatches"] == 0
          and not report["timed_out"])
    return 0 if ok else 1
