"""The load tester's external agent (``bridge.loadtest.agent_server``): its protocol over a real socket,
and the capacity bench's external-agent preset end to end (bridge, emulator and agent as processes)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.agent.builtin import LONG_PASSAGE
from bridge.loadtest import main as loadtest_main
from bridge.loadtest.agent_server import MAX_PENDING_TURNS, AgentServer, tokens
from bridge.netutil import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
async def agent() -> AsyncIterator[tuple[AgentServer, str]]:
    server = AgentServer(greeting="Default greeting here.", tokens_per_s=200.0)
    runner = web.AppRunner(server.app(), shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield server, f"ws://127.0.0.1:{port}/agent"
    finally:
        await runner.cleanup()


async def _turn(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Messages up to and including the one with ``last: true`` (and an ``end`` right after it)."""
    out: list[dict[str, Any]] = []
    while True:
        msg = orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)
        out.append(msg)
        if msg.get("last") is True:
            return out


def _text(msgs: list[dict[str, Any]]) -> str:
    assert all(m["type"] == "text" for m in msgs), msgs
    assert [m["last"] for m in msgs] == [False] * (len(msgs) - 1) + [True], "only the final token is last"
    return "".join(m["token"] for m in msgs)


def test_tokens_are_words_with_their_spaces() -> None:
    assert tokens("Hello there, you.") == ["Hello ", "there, ", "you."]
    assert "".join(tokens(LONG_PASSAGE)) == LONG_PASSAGE


async def test_agent_greets_streams_the_passage_and_says_goodbye(agent: tuple[AgentServer, str]) -> None:
    server, url = agent
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "setup", "callSid": "CA1", "customParameters": {}}))
        assert await _turn(ws) == [{"type": "text", "token": "Default greeting here.", "last": True}]
        await ws.send_str(json.dumps({"type": "dtmf", "digit": "9"}))
        passage = await _turn(ws)
        assert _text(passage) == LONG_PASSAGE and len(passage) == len(LONG_PASSAGE.split(" "))
        await ws.send_str(json.dumps({"type": "dtmf", "digit": "4"}))
        assert _text(await _turn(ws)) == "You pressed 4."
        await ws.send_str(json.dumps({"type": "dtmf", "digit": "0"}))
        assert _text(await _turn(ws)) == "Goodbye."
        assert orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data) == {"type": "end"}
    await asyncio.sleep(0.05)
    s = server.stats
    assert (s.connections_total, s.connections_active, s.turns, s.ends_sent, s.bad_messages) == (1, 0, 4, 1, 0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "agent-speaker"], "speaker task left behind"


async def test_interrupt_stops_the_turn_and_closes_it(agent: tuple[AgentServer, str]) -> None:
    server, url = agent
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "setup", "customParameters": {"greeting": "Hi."}}))
        assert _text(await _turn(ws)) == "Hi."
        await ws.send_str(json.dumps({"type": "dtmf", "digit": "9"}))
        first = [orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data) for _ in range(3)]
        await ws.send_str(json.dumps({"type": "interrupt", "utteranceUntilInterrupt": "Here is"}))
        rest = await _turn(ws)
        assert rest[-1] == {"type": "text", "token": "", "last": True}, rest[-3:]
        heard = _text(first + rest)
        assert LONG_PASSAGE.startswith(heard) and len(heard) < len(LONG_PASSAGE) // 2, heard
    assert server.stats.turns_interrupted == 1


async def test_bad_message_is_counted_and_turns_beyond_the_limit_are_dropped() -> None:
    server = AgentServer(tokens_per_s=20.0)  # slow: the turns pile up behind the first
    runner = web.AppRunner(server.app(), shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}/x") as ws:
            await ws.send_str("{not json")
            await ws.send_str("[1, 2]")
            for _ in range(MAX_PENDING_TURNS + 4):
                await ws.send_str(json.dumps({"type": "dtmf", "digit": "1"}))
            assert _text(await _turn(ws)) == "You pressed 1.", "the connection survived the bad messages"
        await asyncio.sleep(0.05)
        s = server.stats
        assert s.bad_messages == 2
        # One turn speaking and at most MAX_PENDING_TURNS waiting: at least 3 of 12 dropped.
        assert s.turns_dropped >= 3 and s.turns + s.turns_dropped <= MAX_PENDING_TURNS + 4, s
        assert s.connections_active == 0
    finally:
        await runner.cleanup()


def test_agent_server_flag_needs_the_local_bridge(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        loadtest_main(["--agent-server", "--target", "http://127.0.0.1:9", "--report", str(tmp_path)])


@pytest.mark.timeout(60)
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the bench pins the bridge and the load side to CPUs 0 and 1")
def test_capacity_bench_external_agent_preset_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cap"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "capacity.py"), "--agent", "external", "--calls", "3",
         "--ramp-s", "0.5", "--duration-s", "5", "--no-idle", "--chunk-ms", "40", "--rtf", "0.5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=55, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "3" / "report.json").read_text())
    assert report["calls"]["completed"] == 3, report["calls"]
    assert report["integrity"]["checked"] and report["integrity"]["mismatches"] == 0, report["integrity"]
    assert "--chunk-ms 40" in report["config"]["emulator_args"] and "--rtf 0.5" in report["config"]["emulator_args"]
    agent = report["agent"]
    assert report["config"]["agent_url"] == agent["url"] and agent["url"].startswith("ws://127.0.0.1:")
    stats = agent["stats"]
    assert stats["connections_total"] == 3 and stats["connections_active"] == 0, stats
    # A greeting (one message) and a passage per call, every passage word its own message (a passage
    # may be cut by the hang-up).
    assert stats["turns"] >= 6 and stats["tokens_sent"] >= 3 * (1 + 10), stats
    assert agent["exit_code"] == 0
    ttfa = report["caller"]["ttfa_ms"]["by_trigger"]
    assert ttfa["greeting"]["count"] == 3 and ttfa["dtmf"]["count"] >= 3, ttfa
    assert report["bridge"]["log"]["warnings_and_errors"].get("warning:agent_unreachable") is None
    table = (out / "table.md").read_text()
    assert "agent external" in table and "| 3 |" in table and "3/3" in table, table
