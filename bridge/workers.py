"""``media-bridge serve --workers N``: a supervisor and N worker processes on one port.

One bridge process runs one event loop on one core. Above that, the answer is more processes:
the supervisor starts N workers (``media-bridge serve --worker-index i``), each a complete
bridge (its own Cartesia pool, agent links, embedded emulator if any) listening on the same
host and port with ``SO_REUSEPORT``, so the kernel spreads new connections over them.

What the supervisor does, and nothing else (it serves no request):

* **Limits are shared out**: ``MAX_CALLS``, ``CARTESIA_MAX_CONCURRENCY``,
  ``CARTESIA_STT_MAX_CONCURRENCY`` (and ``MEDIA_MAX_UNSTARTED`` when set) are process-group
  totals; worker i gets ``total // N``, plus one for the first ``total % N`` workers, so the
  shares add up to the setting. A total smaller than N still gives each worker 1 (the sum then
  exceeds the setting; ``workers_starting`` says so with a warning).
* **A directory for the group**, fresh under the temporary directory and removed at exit (and
  at start, those left by a supervisor that was killed):
  ``metrics/`` is ``PROMETHEUS_MULTIPROC_DIR`` (any scrape of ``/metrics`` shows the whole
  group, see ``metrics/http.py``), ``calls/`` holds webhook data and handoffs that the worker
  answering the next request of the call may need (``bridge/shared_registry.py``).
* **Signals**: SIGTERM and SIGINT are forwarded to every worker, each drains as a single
  process does (``DRAIN_GRACE_S``); the supervisor exits 0 when every worker has exited
  cleanly, 1 otherwise.
* **Port**: each worker binds its own ``SO_REUSEPORT`` socket before its start-up (a port held by
  another program fails at once, ``worker_bind_failed``) and listens only once started (pool warm).
* **Restarts**: a worker that exits while the group is not stopping is restarted with the same
  index and share, at most ``MAX_RESTARTS_PER_WINDOW`` times per ``RESTART_WINDOW_S``; past
  that the supervisor logs ``workers_restart_limit``, stops the other workers (they drain)
  and exits 1. A dead worker's calls are lost (their sockets were in it); its counters stay
  in the totals, its gauges leave them.

Caveat of ``SO_REUSEPORT`` (Linux): connections already queued on a worker's listening
socket when it dies are reset (that webhook or stream fails).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from bridge.config import Config
from bridge.logs import log_event

log = logging.getLogger("bridge.workers")

#: Restart budget: more unexpected worker exits than this within the window stop the group.
MAX_RESTARTS_PER_WINDOW: Final = 5
RESTART_WINDOW_S: Final = 60.0
#: How often the supervisor looks at its workers (seconds); signals wake it at once.
POLL_INTERVAL_S: Final = 0.1
#: Environment variable naming the group's shared directory, set for each worker.
SHARED_DIR_ENV: Final = "MEDIA_BRIDGE_SHARED_DIR"
#: prometheus-client's multiprocess directory variable.
PROMETHEUS_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: The group's directory under the temporary directory, and the file in it naming its supervisor.
GROUP_DIR_PREFIX: Final = "media-bridge-workers-"
PID_FILE: Final = "supervisor.pid"
#: A group directory without a PID file older than this is a leftover (seconds).
STALE_UNCLAIMED_S: Final = 60.0

def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s share of ``total`` (see the module doc): at least 1."""
    base, extra = divmod(total, workers)
    return max(1, base + (1 if index < extra else 0))


def worker_limits(config: Config, env: dict[str, str], workers: int, index: int) -> dict[str, str]:
    """The environment values of the shared limits for worker ``index``."""
    totals = {"MAX_CALLS": config.max_calls, "CARTESIA_MAX_CONCURRENCY": config.cartesia_max_concurrency,
              "CARTESIA_STT_MAX_CONCURRENCY": config.cartesia_stt_max_concurrency}
    if env.get("MEDIA_MAX_UNSTARTED") is not None:  # otherwise it follows the worker's MAX_CALLS
        totals["MEDIA_MAX_UNSTARTED"] = config.media_max_unstarted
    return {name: str(share(total, workers, index)) for name, total in totals.items()}


def bind_shared_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not listening yet), for one worker.

    Binds the first address ``host`` resolves to (``0.0.0.0``, ``::`` or one interface), where a
    single process binds every address of a name such as ``localhost``.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the supervisor dies (Linux), so no worker is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts, watches, restarts and stops the workers (see the module doc)."""

    def __init__(self, config: Config, workers: int, host: str, port: int,
                 env: dict[str, str] | None = None) -> None:
        if workers < 2:
            raise ValueError("a supervisor needs at least 2 workers")
        self.config = config
        self.count = workers
        self.host = host
        self.port = port
        self.env = dict(os.environ if env is None else env)
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.failed = False
        self._restarts: deque[float] = deque()
        self.group_dir = Path(tempfile.mkdtemp(prefix=GROUP_DIR_PREFIX))
        self.metrics_dir = self.group_dir / "metrics"
        self.calls_dir = self.group_dir / "calls"

    # ------------------------------------------------------------ processes

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(self.env)
        env.update(worker_limits(self.config, self.env, self.count, index))
        env[PROMETHEUS_DIR_ENV] = str(self.metrics_dir)
        env[SHARED_DIR_ENV] = str(self.calls_dir)
        return env

    def _spawn(self, index: int) -> None:
        argv = [sys.executable, "-m", "bridge.cli", "serve", "--host", self.host, "--port", str(self.port),
                "--worker-index", str(index)]
        # Its own process group: a terminal's Ctrl-C reaches the workers once, through us.
        process = subprocess.Popen(argv, env=self._worker_env(index), process_group=0,
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads here
        self.workers[index] = _Worker(index, process)
        log_event(log, "worker_started", worker=index, worker_pid=process.pid)
        if self.stopping:  # a signal arrived while this worker was being (re)started
            process.send_signal(signal.SIGTERM)

    def _forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if not self.stopping:
            log_event(log, "workers_stopping", signal=signal.Signals(signum).name, workers=len(self.workers))
        self.stopping = True
        for worker in list(self.workers.values()):
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def _reap(self, worker: _Worker, code: int) -> None:
        from prometheus_client import multiprocess

        # Its live gauges (calls, contexts, sockets) leave the group's totals; counters stay.
        multiprocess.mark_process_dead(worker.process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        del self.workers[worker.index]
        clean = code == 0 or (self.stopping and code == -signal.SIGTERM)
        level = logging.INFO if clean else logging.ERROR
        log_event(log, "worker_exited", level, worker=worker.index, worker_pid=worker.process.pid, code=code,
                  expected=self.stopping, uptime_s=round(time.monotonic() - worker.started_at, 1))
        if not clean and self.stopping:
            self.failed = True
        if self.stopping:
            return
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS_PER_WINDOW:
            log_event(log, "workers_restart_limit", logging.ERROR, worker=worker.index,
                      restarts=len(self._restarts), window_s=RESTART_WINDOW_S,
                      detail=f"workers died more than {MAX_RESTARTS_PER_WINDOW} times in {RESTART_WINDOW_S:.0f} s: "
                             "stopping the group (see the workers' log lines above for why)")
            self.failed = True
            self._forward(signal.SIGTERM)
            return
        self._restarts.append(now)
        log_event(log, "worker_restarting", logging.WARNING, worker=worker.index, code=code,
                  restarts_in_window=len(self._restarts))
        self._spawn(worker.index)

    def remove_stale_groups(self) -> None:
        """Remove the directories of supervisors that died without cleaning up (SIGKILL, OOM).

        In a container the supervisor is often PID 1 again after a restart, and the emptyDir
        outlives the container: a directory naming our own PID is not ours, so it is stale too.
        A directory without a PID file is left alone for a minute (its supervisor may be starting).
        """
        for path in self.group_dir.parent.glob(GROUP_DIR_PREFIX + "*"):
            if path == self.group_dir or not path.is_dir():
                continue
            try:
                pid = int((path / PID_FILE).read_text())
            except (OSError, ValueError):
                pid = None
            if pid is None:
                stale = time.time() - path.stat().st_mtime > STALE_UNCLAIMED_S
            elif pid == os.getpid():
                stale = True
            else:
                try:
                    os.kill(pid, 0)
                    stale = False
                except ProcessLookupError:
                    stale = True
                except PermissionError:  # alive, another user's
                    stale = False
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                log_event(log, "stale_group_dir_removed", path=str(path), supervisor_pid=pid)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        """Run the group until it is stopped; the exit code for the process."""
        per_worker = [worker_limits(self.config, self.env, self.count, i) for i in range(self.count)]
        shares = {name: [limits[name] for limits in per_worker] for name in per_worker[0]}
        oversubscribed = [name for name, values in shares.items()
                          if sum(map(int, values)) > getattr(self.config, name.lower())]
        log_event(log, "workers_starting", logging.WARNING if oversubscribed else logging.INFO,
                  workers=self.count, host=self.host, port=self.port, supervisor_pid=os.getpid(),
                  shares=shares, group_dir=str(self.group_dir),
                  oversubscribed=oversubscribed or None,
                  detail=("a total smaller than the worker count still gives each worker 1: "
                          "the group may exceed these settings") if oversubscribed else None)
        self.metrics_dir.mkdir()
        self.calls_dir.mkdir()
        (self.group_dir / PID_FILE).write_text(str(os.getpid()))
        self.remove_stale_groups()
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._spawn(index)
            while self.workers:
                for worker in list(self.workers.values()):
                    code = worker.process.poll()
                    if code is not None:
                        self._reap(worker, code)
                time.sleep(POLL_INTERVAL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self.workers.values():  # only on an exception above
                worker.process.kill()
                worker.process.wait()
            shutil.rmtree(self.group_dir, ignore_errors=True)
        code = 1 if self.failed else 0
        log_event(log, "workers_stopped", code=code)
        return code
