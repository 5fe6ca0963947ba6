"""The emulator's WebSocket over real sockets with a raw client (no SDK, no mocks)."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
import websockets

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, TONE_VOICES
from bridge.cartesia.emulator.voices import ToneSynth
from bridge.cartesia.protocol import OutputFormat
from tests import emulator_fixtures
from tests.emulator_fixtures import (
    EmulatorFactory,
    audio_of,
    collect,
    connect,
    drain_for,
    recv,
    request,
    send,
)

emulator_factory = emulator_fixtures.emulator_factory  # the fixture, shared
pytestmark = pytest.mark.timeout(30)

CHUNK_KEYS = {"type", "data", "done", "status_code", "step_time", "context_id", "flush_id"}


def tone(text: str, fmt: OutputFormat | None = None) -> bytes:
    return ToneSynth().render(text, fmt or OutputFormat("pcm_mulaw", 8000), TONE_VOICES[0]).audio


async def test_stream_shapes_timestamps_and_done(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    await send(ws, request("c1", "Hello world", add_timestamps=True, add_phoneme_timestamps=True))
    msgs = await collect(ws, {"c1"})
    assert all(m["context_id"] == "c1" for m in msgs)
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert chunks and all(set(m) == CHUNK_KEYS for m in chunks)
    assert all(m["status_code"] == 206 and m["done"] is False and m["flush_id"] == 1 for m in chunks)
    assert all(isinstance(m["step_time"], float) for m in chunks)
    words = [w for m in msgs if m["type"] == "timestamps" for w in m["word_timestamps"]["words"]]
    assert words == ["Hello", "world"]
    phonemes = [
        p for m in msgs if m["type"] == "phoneme_timestamps" for p in m["phoneme_timestamps"]["phonemes"]
    ]
    assert "".join(phonemes) == "helloworld"
    assert msgs[-1] == {"type": "done", "done": True, "status_code": 206, "context_id": "c1"}
    assert audio_of(msgs, "c1") == tone("Hello world") == emu.produced_audio("c1")
    rec = emu.context_record("c1")
    assert rec is not None and rec.done and rec.transcript == "Hello world"
    await ws.close()


async def test_every_field_nulls_unknowns_and_voice_forms(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu, "cartesia_version=2026-08-14")  # the version with bare and {id} voices
    full = request(
        "all",
        "Every field.",
        language="en",
        add_timestamps=True,
        add_phoneme_timestamps=False,
        use_normalized_timestamps=True,
        flush=False,
        max_buffer_delay_ms=0,
        generation_config={"speed": 1.0, "volume": 1.0, "emotion": "calm"},
        speed="normal",
        pronunciation_dict_id="pd_1",
        duration=None,
        stream=True,
        unknown_field={"x": 1},
    )
    await send(ws, full)
    await send(
        ws, request("bare", "Bare voice", voice=DEFAULT_VOICE_ID, language=None, generation_config=None)
    )
    await send(ws, request("idonly", "Id only", voice={"id": DEFAULT_VOICE_ID}))
    msgs = await collect(ws, {"all", "bare", "idonly"})
    assert not [m for m in msgs if m["type"] == "error"]
    words = [w for m in msgs if m["type"] == "timestamps" for w in m["word_timestamps"]["words"]]
    assert words == ["every", "field"]  # use_normalized_timestamps
    for cid, text in (("bare", "Bare voice"), ("idonly", "Id only")):
        assert audio_of(msgs, cid) == tone(text)
    await ws.close()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"model_id": "gpt-4"}, "model_id"),
        ({"voice": {"mode": "id", "id": "00000000-0000-0000-0000-000000000000"}}, "voice"),
        (
            {"output_format": {"container": "raw", "encoding": "pcm_u8", "sample_rate": 8000}},
            "output_format.encoding",
        ),
        (
            {"output_format": {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 11025}},
            "output_format.sample_rate",
        ),
        (
            {"output_format": {"container": "mp3", "sample_rate": 8000, "bit_rate": 64000}},
            "output_format.container",
        ),
        ({"language": "xx"}, "language"),
    ],
)
async def test_invalid_fields_answer_400_naming_the_field(
    emulator_factory: EmulatorFactory, override: dict[str, object], field: str
) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    await send(ws, request("bad", "Hello", **override))
    err = await recv(ws)
    assert err["type"] == "error" and err["status_code"] == 400 and err["done"] is True
    assert err["context_id"] == "bad"
    assert field in err["message"]
    assert set(err) >= {"error_code", "title", "message", "request_id"}
    # The socket stays usable.
    await send(ws, request("good", "Fine"))
    assert (await collect(ws, {"good"}))[-1]["type"] == "done"
    await ws.close()


async def test_valid_models(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    models = ["sonic-2", "sonic-turbo", "sonic-3", "sonic-3.5", "sonic-latest", "sonic-3-2026-01-12", "sonic-3.6"]
    for i, model in enumerate(models):
        await send(ws, request(f"m{i}", "ok", model_id=model))
    msgs = await collect(ws, {f"m{i}" for i in range(len(models))})
    assert not [m for m in msgs if m["type"] == "error"]
    await ws.close()


async def test_malformed_json_keeps_socket_open(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    await ws.send("{not json")
    err = await recv(ws)
    assert err["type"] == "error" and err["status_code"] == 400 and "context_id" in err
    await ws.send(b"\x00\x01")
    assert (await recv(ws))["type"] == "error"
    await ws.send("[1, 2]")
    assert (await recv(ws))["type"] == "error"
    await send(ws, request("after", "Still here"))
    assert (await collect(ws, {"after"}))[-1]["type"] == "done"
    await ws.close()


async def test_legacy_vs_structured_errors_by_version(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    cases = [
        ("", {"Cartesia-Version": "2024-11-13"}, "legacy"),
        ("cartesia_version=2026-03-01", {"Cartesia-Version": "2024-11-13"}, "structured"),
        ("cartesia_version=2025-04-16", {"Cartesia-Version": "2026-03-01"}, "legacy"),
        ("", {}, "structured"),
    ]
    for query, headers, shape in cases:
        ws = await connect(emu, query, headers)
        await send(ws, request("e", "x", model_id="nope"))
        err = await recv(ws)
        if shape == "legacy":
            assert set(err) == {"type", "done", "error", "status_code", "context_id"}
            assert "model_id" in err["error"]
        else:
            assert "error" not in err and err["error_code"] == "model_not_found"
        await ws.close()


async def test_auth_forms_and_401_before_upgrade(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(api_key="sk_car_test")
    ok = [
        ("", {"Authorization": "Bearer sk_car_test"}),
        ("", {"X-API-Key": "sk_car_test"}),
        ("api_key=sk_car_test", {}),
        ("access_token=sk_car_test", {}),
    ]
    for query, headers in ok:
        ws = await connect(emu, query, headers)
        await send(ws, request("a", "hi"))
        assert (await collect(ws, {"a"}))[-1]["type"] == "done"
        await ws.close()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{emu.http_url}/access-token",
            json={"grants": {"tts": True}, "expires_in": 60},
            headers={"Authorization": "Bearer sk_car_test"},
        ) as resp:
            token = (await resp.json())["token"]
    ws = await connect(emu, f"access_token={token}")
    await ws.close()
    for query, headers in [("", {}), ("api_key=wrong", {}), ("", {"Authorization": "Bearer wrong"})]:
        with pytest.raises(websockets.InvalidStatus) as info:
            await connect(emu, query, headers)
        assert info.value.response.status_code == 401
    assert emu.handshakes == 5


async def test_multiplexing_keeps_per_context_order(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(chunk_ms=20)
    ws = await connect(emu)
    parts = {"a": ["One two ", "three four ", "five"], "b": ["Six seven ", "eight ", "nine ten"]}
    for i in range(3):
        for cid, texts in parts.items():
            await send(ws, request(cid, texts[i], cont=i < 2, max_buffer_delay_ms=0, add_timestamps=True))
    msgs = await collect(ws, {"a", "b"})
    for cid, texts in parts.items():
        full = "".join(texts)
        assert emu.context_record(cid).transcript == full  # type: ignore[union-attr]
        # Verbatim concatenation: the words and audio are those of the whole text, in input order.
        words = [
            w
            for m in msgs
            if m["type"] == "timestamps" and m["context_id"] == cid
            for w in m["word_timestamps"]["words"]
        ]
        assert words == full.split()
        assert audio_of(msgs, cid) == b"".join(tone(t) for t in texts)
    await ws.close()


async def test_max_buffer_delay(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    loop = asyncio.get_running_loop()
    # Default delay honours max_buffer_delay_ms: nothing for ~300 ms, then audio.
    t0 = loop.time()
    await send(ws, request("d", "no sentence end yet", cont=True, max_buffer_delay_ms=300))
    assert await drain_for(ws, 0.15) == []
    first = await recv(ws, 2.0)
    assert first["type"] == "chunk" and loop.time() - t0 >= 0.28
    await drain_for(ws, 0.1)
    # 0 = generate at once.
    await send(ws, request("z", "at once", cont=True, max_buffer_delay_ms=0))
    assert (await recv(ws, 0.5))["type"] == "chunk"
    await drain_for(ws, 0.1)
    # A sentence end is "enough text": generated before the delay, the remainder waits.
    await send(ws, request("s", "A sentence. And a tail", cont=True, max_buffer_delay_ms=3000))
    got = await drain_for(ws, 0.3)
    assert audio_of(got, "s") == tone("A sentence. ")
    # flush triggers at once.
    await send(ws, request("s", "", cont=True, flush=True, max_buffer_delay_ms=3000))
    got = await drain_for(ws, 0.3)
    assert audio_of(got, "s") == tone("And a tail")
    assert got[-1]["type"] == "flush_done"
    await ws.close()


async def test_flush_ids_and_flush_done(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    await send(ws, request("f", "first part", cont=True, max_buffer_delay_ms=3000))
    await send(ws, request("f", "", cont=True, flush=True))
    await send(ws, request("f", "second part", cont=True))
    await send(ws, request("f", "", cont=True, flush=True))
    await send(ws, request("f", "third", cont=False))
    msgs = await collect(ws, {"f"})
    seq = [(m["type"], m.get("flush_id")) for m in msgs if m["type"] in ("chunk", "flush_done", "done")]
    compact = [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]
    assert compact == [
        ("chunk", 1),
        ("flush_done", 1),
        ("chunk", 2),
        ("flush_done", 2),
        ("chunk", 3),
        ("done", None),
    ]
    await ws.close()


async def test_empty_transcript_closes_and_expiry(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(context_expiry_s=0.3)
    ws = await connect(emu)
    await send(ws, request("x", "text ", cont=True, max_buffer_delay_ms=3000))
    await send(ws, request("x", "", cont=False))
    msgs = await collect(ws, {"x"})
    assert audio_of(msgs, "x") == tone("text ") and msgs[-1]["type"] == "done"
    await send(ws, request("x", "again"))
    err = await recv(ws)
    assert err["type"] == "error" and err["context_id"] == "x" and err["error_code"] == "context_closed"
    await asyncio.sleep(0.35)
    await send(ws, request("x", "again"))
    err = await recv(ws)
    assert err["type"] == "error" and err["error_code"] == "context_expired"
    await ws.close()


async def test_input_after_continue_false_is_an_error(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(rtf=1.0, chunk_ms=20)
    ws = await connect(emu)
    await send(ws, request("y", "a long sentence to say"))
    await send(ws, request("y", "more"))
    msgs = await collect(ws, {"y"})
    assert msgs[-1]["type"] == "error" and msgs[-1]["error_code"] == "context_closed"
    await ws.close()


async def _cancel_run(
    emulator_factory: EmulatorFactory, **kw: object
) -> tuple[list[dict[str, object]], bytes]:
    emu = await emulator_factory(rtf=1.0, chunk_ms=20, **kw)
    ws = await connect(emu)
    await send(ws, request("c", "first sentence here. ", cont=True, max_buffer_delay_ms=0))
    await send(ws, request("c", "queued second part never spoken", cont=True, max_buffer_delay_ms=0))
    first = await recv(ws)
    assert first["type"] == "chunk"
    await send(ws, {"context_id": "c", "cancel": True})
    msgs = [first] + await drain_for(ws, 1.6)
    await ws.close()
    assert emu.context_record("c").cancelled  # type: ignore[union-attr]
    return msgs, audio_of(msgs, "c")


async def test_cancel_lets_inflight_generation_finish_then_done(emulator_factory: EmulatorFactory) -> None:
    msgs, audio = await _cancel_run(emulator_factory)
    assert audio == tone("first sentence here. ")  # in-flight finished, queued input dropped
    assert [m["type"] for m in msgs].count("done") == 1 and msgs[-1]["type"] == "done"


async def test_cancel_stops_inflight_when_configured(emulator_factory: EmulatorFactory) -> None:
    msgs, audio = await _cancel_run(emulator_factory, cancel_emits_inflight=False)
    assert len(audio) <= 3 * 160  # at most what was already on its way
    assert msgs[-1]["type"] == "done"


async def test_cancel_without_done_when_configured(emulator_factory: EmulatorFactory) -> None:
    msgs, _ = await _cancel_run(emulator_factory, cancel_emits_inflight=False, send_done_on_cancel=False)
    assert "done" not in [m["type"] for m in msgs]


async def test_concurrency_limit_429(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(max_concurrency=1)
    ws = await connect(emu)
    await send(ws, request("one", "open ", cont=True, max_buffer_delay_ms=0))
    await send(ws, request("two", "rejected"))
    msgs = await collect(ws, {"two"})
    err = msgs[-1]
    assert (
        err["status_code"] == 429
        and err["error_code"] == "concurrency_limited"
        and err["context_id"] == "two"
    )
    assert emu.active_contexts == 1
    await send(ws, request("one", "", cont=False))
    await collect(ws, {"one"})
    await send(ws, request("three", "now fine"))
    assert (await collect(ws, {"three"}))[-1]["type"] == "done"
    await ws.close()


async def test_max_connections_429_on_upgrade(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(max_connections=1)
    ws = await connect(emu)
    with pytest.raises(websockets.InvalidStatus) as info:
        await connect(emu)
    assert info.value.response.status_code == 429
    await ws.close()
    await asyncio.sleep(0.05)
    ws2 = await connect(emu)
    await ws2.close()


async def test_idle_timeout_closes_1000(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(idle_timeout_s=0.3)
    ws = await connect(emu)
    await send(ws, request("i", "hi"))
    await collect(ws, {"i"})
    with pytest.raises(websockets.ConnectionClosedOK):
        await asyncio.wait_for(ws.recv(), 3)
    assert ws.close_code == 1000 and ws.close_reason == "connection idle timeout"


async def test_stats_and_context_endpoints(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    await send(ws, request("r", "record me", add_timestamps=True))
    await collect(ws, {"r"})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{emu.http_url}/emulator/stats") as resp:
            stats = await resp.json()
        async with session.get(f"{emu.http_url}/emulator/contexts/r") as resp:
            rec = await resp.json()
        async with session.get(f"{emu.http_url}/emulator/contexts/nope") as resp:
            assert resp.status == 404
    assert stats["handshakes"] == 1 and stats["contexts_total"] == 1 and stats["active_contexts"] == 0
    assert stats["chunks_total"] >= 1 and stats["first_chunk_lateness_ms"]["max"] is not None
    assert emu.lateness_ms(first_chunks=True)["n"] == 1, "one generation, one first chunk"
    assert rec["transcript"] == "record me" and rec["done"] and not rec["cancelled"]
    assert base64.b64decode(rec["audio_b64"]) == tone("record me") and rec["bytes"] == len(tone("record me"))
    assert rec["word_timestamps"]["words"] == ["record", "me"]
    assert [json.dumps(m) for _, m in emu.received][0].startswith("{")
    await ws.close()


def test_under_uvloop_chunks_still_go_out_in_batched_writes() -> None:
    """uvloop's transports are not asyncio.Transport subclasses; the emulator must
    still take its one-write-per-scheduler-turn path (it fell back to a frame-by-
    frame send for every chunk, the costliest part of a load run's emulator)."""
    uvloop = pytest.importorskip("uvloop")
    from bridge.cartesia.emulator import Emulator, EmulatorSettings

    async def scenario() -> None:
        emu = Emulator(EmulatorSettings(ttfb_ms=1, rtf=0))
        await emu.start("127.0.0.1", 0)
        try:
            ws = await connect(emu)
            await send(ws, request("u1", "Hello there"))
            msgs = await collect(ws, {"u1"})
            assert audio_of(msgs, "u1") == tone("Hello there")
            conns = emu.connections
            assert len(conns) == 1 and conns[0].transport is not None
            await ws.close()
        finally:
            await emu.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("slack_ms", [0.0, 8.0])
async def test_pacing_slack_never_makes_a_first_chunk_early_nor_a_paced_one_earlier_than_the_slack(
    emulator_factory: EmulatorFactory, slack_ms: float
) -> None:
    ttfb_s, interval_s = 0.040, 0.020  # chunk_ms 20 at rtf 1: one chunk every 20 ms
    emu = await emulator_factory(ttfb_ms=ttfb_s * 1000, rtf=1.0, chunk_ms=20, pacing_slack_ms=slack_ms)
    ws = await connect(emu)
    loop = asyncio.get_running_loop()
    # "b" starts 25 ms after "a", so its first chunk falls due 5 ms after one of a's scheduler
    # turns: inside the slack window, where only paced chunks may go early.
    sent_at = {"a": loop.time()}
    await send(ws, request("a", "pacing with some slack allowed"))
    await asyncio.sleep(0.025)
    sent_at["b"] = loop.time()
    await send(ws, request("b", "and a second voice on the same socket"))
    arrivals: dict[str, list[float]] = {"a": [], "b": []}
    done: set[str] = set()
    while done != {"a", "b"}:
        msg = await recv(ws)
        if msg["type"] == "chunk":
            arrivals[msg["context_id"]].append(loop.time())
        elif msg["type"] == "done":
            done.add(msg["context_id"])
    for cid, times in arrivals.items():
        assert len(times) >= 10
        # Arrival can only be later than due (this loop is busy too), never earlier than allowed.
        assert times[0] - sent_at[cid] >= ttfb_s, f"{cid}: the first chunk (TTFB) ignores the slack"
        for k, t in enumerate(times[1:], start=1):
            earliest = ttfb_s + k * interval_s - slack_ms / 1000 - 1e-4
            assert t - sent_at[cid] >= earliest, f"{cid}: chunk {k} earlier than the slack allows"
        # Anchored schedule: the last chunk is due (n-1) intervals after the TTFB, so it arrives then, within
        # the slack and loop noise. Measured from the due time of the first chunk, not its arrival: a first
        # chunk read late by this busy loop would shorten the span without the emulator drifting.
        span = times[-1] - (sent_at[cid] + ttfb_s)
        expected = (len(times) - 1) * interval_s
        assert expected - slack_ms / 1000 - 1e-4 <= span <= expected + slack_ms / 1000 + 0.015, (span, expected)
    await ws.close()
