"""``media-bridge serve --workers N``: shares, the store shared by workers, and a real process group.

The end-to-end test runs ``serve --workers 2`` as a subprocess on 127.0.0.1 with the embedded
emulator and an external ConversationRelay agent (``tests/relay_agent.py``), places simulated
calls until both workers serve streams and one call's webhook and stream were on different
workers, and checks: the agent's ``setup`` carries the webhook's ``sessionId`` (not the
fallback derived from the CallSid), ``/metrics`` shows the whole group, the agent's
``handoffData`` reaches ``/twilio/connect-action`` whichever worker answers it, a killed worker
is restarted (counters survive it, its gauges leave), and SIGTERM drains a call in progress and
exits 0, removing the group's directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
import yaml

from bridge.config import Config
from bridge.netutil import free_port
from bridge.shared_registry import SharedCallRegistry
from bridge.workers import (
    GROUP_DIR_PREFIX,
    MAX_RESTARTS_PER_WINDOW,
    PID_FILE,
    Supervisor,
    share,
    worker_limits,
)
from metrics.scrape import parse_samples, value
from telephony.simulator import SimulatedCall
from tests.relay_agent import RelayAgent

TOKEN = "workers-token"
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ shares and the shared store


@pytest.mark.parametrize(("total", "workers"), [(500, 2), (500, 3), (5, 2), (64, 4), (7, 7)])
def test_shares_add_up_to_the_setting(total: int, workers: int) -> None:
    shares = [share(total, workers, i) for i in range(workers)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_a_total_below_the_worker_count_still_gives_each_worker_one() -> None:
    assert [share(3, 4, i) for i in range(4)] == [1, 1, 1, 1]


def test_worker_limits_share_the_group_totals_and_leave_the_rest_alone() -> None:
    env = {"MAX_CALLS": "301", "CARTESIA_MAX_CONCURRENCY": "5", "CARTESIA_STT_MAX_CONCURRENCY": "2"}
    config = Config.from_env(env)
    limits = [worker_limits(config, env, 3, i) for i in range(3)]
    assert [x["MAX_CALLS"] for x in limits] == ["101", "100", "100"]
    assert [x["CARTESIA_MAX_CONCURRENCY"] for x in limits] == ["2", "2", "1"]
    assert [x["CARTESIA_STT_MAX_CONCURRENCY"] for x in limits] == ["1", "1", "1"]
    assert "MEDIA_MAX_UNSTARTED" not in limits[0], "unset, it follows each worker's MAX_CALLS"
    with_unstarted = {**env, "MEDIA_MAX_UNSTARTED": "50"}
    assert worker_limits(Config.from_env(with_unstarted), with_unstarted, 2, 1)["MEDIA_MAX_UNSTARTED"] == "25"


class _Call:
    def flush_metrics(self) -> None:
        return None

    async def hang_up(self, reason: str) -> None:
        return None


def test_webhook_data_taken_by_a_sibling_leaves_the_webhook_workers_count(tmp_path: Path) -> None:
    webhook_worker: SharedCallRegistry[_Call] = SharedCallRegistry(tmp_path, max_entries=4)
    stream_worker: SharedCallRegistry[_Call] = SharedCallRegistry(tmp_path, max_entries=4)
    webhook_worker.expect("CA1", {"session_id": "VXabc", "caller_name": "Ada"})
    assert webhook_worker.occupancy == 1
    info, answered_at = stream_worker.take_call_info("CA1")
    assert info == {"session_id": "VXabc", "caller_name": "Ada"}
    assert answered_at is not None and 0 <= time.monotonic() - answered_at < 5
    assert stream_worker.take_call_info("CA1") == ({}, None), "taken once"
    webhook_worker.expire_pending()
    assert webhook_worker.occupancy == 0, "the stream started on a sibling: no ghost in the admission count"


def test_handoffs_cross_workers_once_and_are_bounded(tmp_path: Path) -> None:
    ending_worker: SharedCallRegistry[_Call] = SharedCallRegistry(tmp_path, max_entries=3)
    action_worker: SharedCallRegistry[_Call] = SharedCallRegistry(tmp_path, max_entries=3)
    ending_worker.store_handoff("CA1", {"reason": "billing", "n": 1})
    assert action_worker.has_handoff("CA1")
    assert action_worker.take_handoff("CA1") == (True, {"reason": "billing", "n": 1})
    assert action_worker.take_handoff("CA1") == (False, None)
    for i in range(5):
        ending_worker.store_handoff(f"CA{i + 10}", f"data {i}")
        os.utime(tmp_path / "handoffs" / next(iter(sorted(os.listdir(tmp_path / "handoffs")))), None)
    assert len(os.listdir(tmp_path / "handoffs")) == 3, "oldest evicted beyond max_entries"


def test_pending_entries_expire_and_file_names_carry_no_request_path(tmp_path: Path) -> None:
    registry: SharedCallRegistry[_Call] = SharedCallRegistry(tmp_path, max_entries=2, pending_ttl_s=0.05)
    registry.expect("../../escape", {"session_id": "VX1"})
    assert [p.parent for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / "pending"]
    time.sleep(0.1)
    registry.expire_pending()
    assert registry.occupancy == 0 and not os.listdir(tmp_path / "pending")
    for sid in ("CA1", "CA2", "CA3"):
        registry.expect(sid, {})
    assert registry.occupancy == 2 and len(os.listdir(tmp_path / "pending")) == 2, "oldest evicted"


def test_the_deployment_runs_as_many_workers_as_cores_it_requests() -> None:
    """deploy/ sets --workers explicitly; each worker is one event loop, so one requested CPU each."""
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    workers = int(args[args.index("--workers") + 1])
    assert workers >= 1
    assert float(container["resources"]["requests"]["cpu"]) >= workers
    helped = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--help"], capture_output=True, text=True,
                            timeout=30, check=True)
    assert "--workers" in helped.stdout and "--worker-index" not in helped.stdout


def test_worker_index_alone_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEDIA_BRIDGE_SHARED_DIR"}
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--worker-index", "0"], capture_output=True,
                          text=True, timeout=30, check=False, env=env)
    assert proc.returncode == 2 and "--workers N" in proc.stderr


def test_a_failed_write_costs_the_call_its_data_not_the_webhook(tmp_path: Path, caplog: Any) -> None:
    registry: SharedCallRegistry[_Call] = SharedCallRegistry(tmp_path, max_entries=2)
    for name in ("pending", "handoffs"):  # a file where the directory was: every write fails
        (tmp_path / name).rmdir()
        (tmp_path / name).write_text("")
    registry.expect("CA1", {"session_id": "VX1"})
    registry.store_handoff("CA1", "data")
    assert registry.occupancy == 0
    assert registry.take_call_info("CA1") == ({}, None)
    assert registry.take_handoff("CA1") == (False, None)
    assert [r.getMessage() for r in caplog.records].count("shared_store_failed") == 4, "2 writes, 2 takes"


def test_directories_of_killed_supervisors_are_removed_at_start(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    supervisor = Supervisor(Config.from_env({}), 2, "127.0.0.1", 0)
    (supervisor.group_dir / PID_FILE).write_text(str(os.getpid()))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=30)
    groups = {name: tmp_path / (GROUP_DIR_PREFIX + name) for name in ("dead", "alive", "mine", "new", "old")}
    for path in groups.values():
        (path / "metrics").mkdir(parents=True)
    (groups["dead"] / PID_FILE).write_text(dead.stdout.strip())
    (groups["alive"] / PID_FILE).write_text(str(os.getppid()))
    (groups["mine"] / PID_FILE).write_text(str(os.getpid()))  # a restarted container's PID 1
    os.utime(groups["old"], (time.time() - 3600, time.time() - 3600))
    supervisor.remove_stale_groups()
    assert {name for name, path in groups.items() if path.exists()} == {"alive", "new"}
    assert supervisor.group_dir.exists()
    shutil.rmtree(supervisor.group_dir)


@pytest.mark.timeout(60)
async def test_workers_that_keep_dying_stop_the_group_with_exit_1() -> None:
    """The port is held by a socket without SO_REUSEPORT: every worker fails to listen."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = dict(os.environ, PUBLIC_URL=f"http://127.0.0.1:{port}", LOG_LEVEL="INFO", DRAIN_GRACE_S="1")
        env.pop("CARTESIA_API_KEY", None)
        proc = subprocess.Popen(  # noqa: ASYNC220 - Popen only forks
            [sys.executable, "-m", "bridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        logs = _LogLines(proc.stderr)
        try:
            code = await asyncio.to_thread(proc.wait, 50)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 1
    await asyncio.to_thread(logs.join, 5)
    assert len(logs.events("worker_restarting")) == MAX_RESTARTS_PER_WINDOW
    assert len(logs.events("worker_bind_failed")) >= MAX_RESTARTS_PER_WINDOW + 1, "the starts failed at the bind"
    (limit,) = logs.events("workers_restart_limit")
    assert limit["level"] == "error" and "stopping the group" in limit["detail"]
    assert logs.events("workers_stopped", code=1)


# ------------------------------------------------------------------------------ a real group


class _LogLines:
    """The group's stderr (supervisor and workers), parsed as it arrives, in a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.raw.append(line)
            try:
                self.lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass

    def join(self, timeout_s: float) -> None:
        """Wait until the stream ended (the process group exited) and every line is parsed."""
        self._thread.join(timeout_s)

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [x for x in list(self.lines)
                if x.get("event") == event and all(x.get(k) == v for k, v in fields.items())]

    async def wait_for(self, event: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.events(event, **fields)
            if found:
                return found[-1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {event} {fields} within {timeout_s} s; log tail: {''.join(self.raw[-15:])}")


async def _group_metrics(base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    # A new connection per scrape: the kernel may hand it to either worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh, \
            fresh.get(base + "/metrics") as resp:
        assert resp.status == 200
        return parse_samples(await resp.text())


@pytest.mark.timeout(90)
async def test_two_workers_share_a_port_calls_metrics_handoffs_restart_and_drain() -> None:
    agent = RelayAgent(auth_token=TOKEN)
    await agent.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PUBLIC_URL=base, TWILIO_AUTH_TOKEN=TOKEN, AGENT_URL=agent.url, STT_ENABLED="false",
               HANDOFF_URL="https://handoff.example/next", DRAIN_GRACE_S="2", MAX_CALLS="40", LOG_LEVEL="INFO")
    env.pop("CARTESIA_API_KEY", None)
    env.pop("TWILIO_ACCOUNT_SID", None)
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen only forks; the loop is not blocked
        [sys.executable, "-m", "bridge.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logs = _LogLines(proc.stderr)
    calls: list[SimulatedCall] = []
    try:
        await logs.wait_for("listening", 30, worker=0)
        await logs.wait_for("listening", 30, worker=1)
        starting = logs.events("workers_starting")[0]
        assert starting["shares"]["MAX_CALLS"] == ["20", "20"]
        group_dir = Path(starting["group_dir"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            # Calls until both workers serve streams and a webhook and its stream met different
            # workers (each connection is hashed to a worker: bounded, ~2^-15 to fail by chance).
            stream_worker: dict[str, int] = {}
            crossed = 0
            for _ in range(16):
                call, started, answered = await _start_call(base, http, agent, logs)
                calls.append(call)
                stream_worker[call.record.call_sid] = started
                crossed += answered != started
                if set(stream_worker.values()) == {0, 1} and crossed:
                    break
            assert set(stream_worker.values()) == {0, 1}, f"streams all on one worker: {stream_worker}"
            assert crossed, "no call had its webhook and stream on different workers"
            live = len(calls)

            # One scrape, whichever worker answers, shows every call of the group.
            for _ in range(4):
                samples = await _group_metrics(base)
                assert value(samples, "bridge_active_calls") == live
                assert value(samples, "bridge_agent_connections") == live
                assert value(samples, "bridge_ready") == 1
                assert value(samples, "bridge_webhooks_total", result="connected") == live

            # The agent ends each call with handoff data; <Connect action> may reach either worker.
            # More calls (bounded) until one action was answered by a sibling of the stream's worker.
            handoffs_crossed = 0
            for index, call in enumerate(calls):
                handoffs_crossed += await _end_with_handoff(call, index, agent, logs, stream_worker)
            while not handoffs_crossed and len(calls) < 32:
                call, started, _ = await _start_call(base, http, agent, logs)
                calls.append(call)
                stream_worker[call.record.call_sid] = started
                handoffs_crossed += await _end_with_handoff(call, len(calls) - 1, agent, logs, stream_worker)
            assert handoffs_crossed, "no <Connect action> reached a worker other than the stream's"
            live = len(calls)
            samples = await _group_metrics(base)
            assert value(samples, "bridge_active_calls") == 0
            assert value(samples, "bridge_calls_total", outcome="agent_end") == live

            # A worker killed outright is restarted; its counters stay in the group's totals.
            victim = logs.events("worker_started", worker=0)[-1]["worker_pid"]
            os.kill(victim, signal.SIGKILL)
            await logs.wait_for("worker_restarting", 10, worker=0)
            listening = await logs.wait_for("listening", 30, worker=0)
            deadline = time.monotonic() + 10
            while listening["worker_pid"] == victim and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                listening = logs.events("listening", worker=0)[-1]
            assert listening["worker_pid"] != victim
            samples = await _group_metrics(base)
            assert value(samples, "bridge_calls_total", outcome="agent_end") == live
            assert value(samples, "bridge_cartesia_sockets") == 4, "the dead worker's sockets left the gauge"

            # SIGTERM: every worker drains (the call in progress is ended after DRAIN_GRACE_S), exit 0.
            last = SimulatedCall(base, http, auth_token=TOKEN, send_inbound_audio=False)
            assert await last.place() is not None
            await last.connect()
            calls.append(last)
            await logs.wait_for("call_started", 10, call_sid=last.record.call_sid)
            proc.send_signal(signal.SIGTERM)
            assert await last.wait_until(lambda: last.closed.is_set(), 10)
        code = await asyncio.to_thread(proc.wait, 20)
        await asyncio.to_thread(logs.join, 5)
        assert code == 0, "".join(logs.raw[-20:])
        assert logs.events("workers_stopped", code=0)
        assert sum(x["ended_calls"] for x in logs.events("drain_finished")) == 1
        assert not group_dir.exists(), "the group's directory is removed at exit"
        assert logs.events("worker_exited", worker=0, code=-signal.SIGKILL, expected=False)
        assert TOKEN not in "".join(logs.raw)
    finally:
        for call in calls:
            await call.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await agent.stop()



async def _start_call(base: str, http: aiohttp.ClientSession, agent: RelayAgent,
                      logs: _LogLines) -> tuple[SimulatedCall, int, int]:
    """Place and connect one call; (the call, its stream's worker, its webhook's worker)."""
    call = SimulatedCall(base, http, auth_token=TOKEN, send_inbound_audio=False)
    setups_before = len(agent.of_type("setup"))
    assert await call.place() is not None
    await call.connect()
    sid = call.record.call_sid
    started = await logs.wait_for("call_started", 10, call_sid=sid)
    answered = logs.events("webhook_answered", call_sid=sid)[0]
    deadline = time.monotonic() + 10
    while len(agent.of_type("setup")) == setups_before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    setup = agent.of_type("setup")[-1]
    assert setup["callSid"] == sid
    # Without the webhook's data the stream's worker would derive it from the CallSid.
    assert setup["sessionId"] != "VX" + uuid.uuid5(uuid.NAMESPACE_URL, sid).hex, \
        "the webhook's sessionId reached the stream's worker"
    return call, int(started["worker"]), int(answered["worker"])


async def _end_with_handoff(call: SimulatedCall, index: int, agent: RelayAgent, logs: _LogLines,
                            stream_worker: dict[str, int]) -> bool:
    """The agent (socket ``index``) ends the call with handoff data; Twilio's action request
    gets the redirect carrying it. True when the action was answered by another worker."""
    handoff = orjson.dumps({"call": index}).decode()
    await agent.send({"type": "end", "handoffData": handoff}, index)
    assert await call.wait_until(lambda: call.closed.is_set(), 10)
    twiml = await call.follow_action()
    assert twiml is not None and urlencode({"HandoffData": handoff}) + "</Redirect>" in twiml, twiml
    sid = call.record.call_sid
    action = await logs.wait_for("connect_action", 5, call_sid=sid, handoff=True)
    return bool(action["worker"] != stream_worker[sid])
