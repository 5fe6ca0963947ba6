"""The load test's processes: the bridge and the agent server as children, CPU pinning, psutil sampling,
GC and loop set-up.

The bridge runs as its own process (``media-bridge serve``) so its CPU and RSS
are its own; capacity runs pin it and the load side to separate CPU sets
(``taskset``, or ``sched_setaffinity`` when that is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil


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


class ChildProcess:
    """A Python module run as a child process (own session), optionally pinned to ``cpus``;
    stdout and stderr go to ``log_path``."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path, cpus: set[int] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- closed by stop()
        cmd = [sys.executable, "-m", *args]
        preexec: Callable[[], None] | None = None
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

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {self.proc.returncode}; see {self.log_path}")

    async def wait_http_ok(self, http: aiohttp.ClientSession, url: str, what: str, limit_s: float) -> None:
        """Until ``url`` answers 200; RuntimeError when the process exits or ``limit_s`` passes."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            self.check_alive(what)
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {limit_s:.0f} s; see {self.log_path}")

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit code."""
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


class BridgeProcess(ChildProcess):
    """``media-bridge serve`` on 127.0.0.1:``port`` as a child process."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path, cpus: set[int] | None = None) -> None:
        self.port = port
        super().__init__(["bridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], env, log_path, cpus)

    async def wait_ready(self, http: aiohttp.ClientSession, limit_s: float = 20.0) -> None:
        """Until ``/readyz`` answers 200; RuntimeError when the bridge exits or ``limit_s`` passes."""
        await self.wait_http_ok(http, f"http://127.0.0.1:{self.port}/readyz", "bridge", limit_s)


class AgentServerProcess(ChildProcess):
    """The load tester's external agent (``bridge.loadtest.agent_server``) on 127.0.0.1:``port``."""

    def __init__(self, port: int, args: Sequence[str], env: dict[str, str], log_path: Path,
                 cpus: set[int] | None = None) -> None:
        self.port = port
        super().__init__(["bridge.loadtest.agent_server", "--host", "127.0.0.1", "--port", str(port), *args],
                         env, log_path, cpus)

    @property
    def url(self) -> str:
        """What the bridge's ``AGENT_URL`` is set to."""
        return f"ws://127.0.0.1:{self.port}/agent"

    async def wait_ready(self, http: aiohttp.ClientSession, limit_s: float = 20.0) -> None:
        await self.wait_http_ok(http, f"http://127.0.0.1:{self.port}/healthz", "agent server", limit_s)

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The server's counters (``GET /stats``); None when it does not answer."""
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
            async with http.get(f"http://127.0.0.1:{self.port}/stats", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    body = await r.json()
                    return body if isinstance(body, dict) else None
        return None


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (2 decimals); None when it is gone."""
    with contextlib.suppress(psutil.Error):
        return round(float(psutil.Process(pid).memory_info().rss) / 2**20, 2)
    return None


class CpuSampler:
    """CPU % (of one core) of a set of processes between successive ``sample()`` calls."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._procs: list[psutil.Process] = []
        for pid in pids:
            with contextlib.suppress(psutil.Error, ValueError):
                proc = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the interval
                self._procs.append(proc)

    def sample(self) -> float | None:
        """Sum over the processes still alive since the last call; None when none is."""
        total, seen = 0.0, False
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                total += float(proc.cpu_percent(None))
                seen = True
        return round(total, 1) if seen else None


@contextlib.contextmanager
def no_full_gc() -> Iterator[None]:
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


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when it is importable (for ``asyncio.Runner``), else None (asyncio's)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
