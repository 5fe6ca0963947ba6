"""Audio determinism (tone), espeak timing, faults, CLI flags."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time

import pytest
import websockets

from bridge.cartesia.emulator import DEFAULT_ESPEAK_VOICE_ID, Emulator, EmulatorSettings, FaultSettings
from bridge.cartesia.emulator.cli import build_parser, settings_from_args
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
pytestmark = pytest.mark.timeout(40)

TEXT = "The quick brown fox, jumps over 13 lazy dogs!"

_SUBPROCESS = """
import hashlib, sys
from bridge.cartesia.emulator.voices import ToneSynth, TONE_VOICES
from bridge.cartesia.protocol import OutputFormat
r = ToneSynth().render(sys.argv[1], OutputFormat("pcm_mulaw", 8000), TONE_VOICES[0])
print(hashlib.sha256(r.audio).hexdigest(), len(r.audio))
"""


async def _ws_run(settings: EmulatorSettings) -> tuple[bytes, list[tuple[str, float, float]]]:
    emu = Emulator(settings)
    await emu.start()
    try:
        ws = await connect(emu)
        await send(ws, request("det", TEXT, add_timestamps=True))
        msgs = await collect(ws, {"det"})
        await ws.close()
    finally:
        await emu.stop()
    words = [
        (w, s, e)
        for m in msgs
        if m["type"] == "timestamps"
        for w, s, e in zip(
            m["word_timestamps"]["words"],
            m["word_timestamps"]["start"],
            m["word_timestamps"]["end"],
            strict=True,
        )
    ]
    return audio_of(msgs, "det"), words


async def test_tone_mulaw_8k_is_byte_identical_across_runs_and_matches_timestamps() -> None:
    a1, w1 = await _ws_run(EmulatorSettings(chunk_ms=20))
    a2, w2 = await _ws_run(EmulatorSettings(chunk_ms=160, seed=7))
    assert a1 == a2 and w1 == w2
    # A fresh interpreter (no shared caches) renders the same bytes.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SUBPROCESS, TEXT, stdout=subprocess.PIPE)
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    digest, length = stdout.decode().split()
    assert digest == hashlib.sha256(a1).hexdigest() and int(length) == len(a1)
    # Timestamps follow the sample counts exactly: 1 byte per sample at 8 kHz.
    assert [w for w, _, _ in w1] == TEXT.split()
    for word, start, end in w1:
        s, e = round(start * 8000), round(end * 8000)
        assert s == start * 8000 and e == end * 8000  # exact sample positions
        burst = a1[s:e]
        assert len(burst) == (60 + 45 * sum(c.isalnum() for c in word)) * 8
        assert burst.count(0xFF) < len(burst) // 4  # audible (0xFF is mu-law silence)
        gap = a1[e : e + 320]
        assert gap == b"\xff" * 320  # 40 ms of silence after each word
    assert len(a1) == round(w1[-1][2] * 8000) + 320


async def test_tone_formats_sizes(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu)
    sizes = {}
    for enc, rate in (("pcm_s16le", 16000), ("pcm_f32le", 24000), ("pcm_alaw", 8000), ("pcm_mulaw", 48000)):
        cid = f"{enc}-{rate}"
        await send(
            ws, request(cid, "abc", output_format={"container": "raw", "encoding": enc, "sample_rate": rate})
        )
        sizes[cid] = len(audio_of(await collect(ws, {cid}), cid))
    bps = {"pcm_s16le": 2, "pcm_f32le": 4, "pcm_alaw": 1, "pcm_mulaw": 1}
    for cid, size in sizes.items():
        enc, rate = cid.rsplit("-", 1)
        assert size == (195 + 40) * int(rate) // 1000 * bps[enc]
    await ws.close()


async def test_espeak_length_matches_timestamps(emulator_factory: EmulatorFactory) -> None:
    pytest.importorskip("espeakng_loader", reason="espeakng-loader (the 'speech' extra) is not installed")
    emu = await emulator_factory(voice_backend="espeak")
    ws = await connect(emu)
    voice = {"mode": "id", "id": DEFAULT_ESPEAK_VOICE_ID}
    text = "Hello from a real speech synthesizer. It has word timings."
    for enc, rate in (("pcm_mulaw", 8000), ("pcm_s16le", 24000)):
        cid = f"es-{enc}"
        fmt = {"container": "raw", "encoding": enc, "sample_rate": rate}
        await send(
            ws,
            request(
                cid, text, voice=voice, output_format=fmt, add_timestamps=True, add_phoneme_timestamps=True
            ),
        )
        msgs = await collect(ws, {cid})
        audio = audio_of(msgs, cid)
        seconds = len(audio) / (rate * (1 if enc == "pcm_mulaw" else 2))
        ts = [m["word_timestamps"] for m in msgs if m["type"] == "timestamps"]
        words = [w for t in ts for w in t["words"]]
        ends = [e for t in ts for e in t["end"]]
        starts = [s for t in ts for s in t["start"]]
        assert [w.strip(".,").lower() for w in words] == [w.strip(".,").lower() for w in text.split()]
        assert starts == sorted(starts)
        assert abs(ends[-1] - seconds) <= 0.020
        assert seconds > 2.0
        assert any(m["type"] == "phoneme_timestamps" for m in msgs)
    await ws.close()


async def test_fault_close_after_chunks(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(chunk_ms=20, faults=FaultSettings(close_after_chunks=3))
    ws = await connect(emu)
    await send(ws, request("c", "a long enough sentence for many chunks"))
    chunks = 0
    with pytest.raises(websockets.ConnectionClosedError):
        while True:
            msg = await recv(ws)
            chunks += msg["type"] == "chunk"
    assert chunks == 3 and ws.close_code == 1011


async def test_fault_reject_429_is_deterministic(emulator_factory: EmulatorFactory) -> None:
    rejected: list[set[str]] = []
    for _ in range(2):
        emu = await emulator_factory(seed=42, faults=FaultSettings(reject_429_fraction=0.5))
        ws = await connect(emu)
        ids = {f"ctx-{i}" for i in range(20)}
        for cid in sorted(ids):
            await send(ws, request(cid, "x"))
        msgs = await collect(ws, ids)
        rejected.append(
            {
                m["context_id"]
                for m in msgs
                if m["type"] == "error" and m["error_code"] == "concurrency_limited"
            }
        )
        await ws.close()
    assert rejected[0] == rejected[1] and 0 < len(rejected[0]) < 20


async def test_fault_no_done(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults=FaultSettings(no_done_fraction=1.0))
    ws = await connect(emu)
    await send(ws, request("n", "no done here"))
    msgs = await drain_for(ws, 0.4)
    assert any(m["type"] == "chunk" for m in msgs) and not any(m["type"] == "done" for m in msgs)
    assert emu.active_contexts == 0
    await ws.close()


async def test_fault_delay_chunks(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(faults=FaultSettings(delay_ms=150, delay_fraction=1.0))
    ws = await connect(emu)
    t0 = time.monotonic()
    await send(ws, request("d", "hi"))
    first = await recv(ws)
    assert first["type"] == "chunk" and time.monotonic() - t0 >= 0.14
    await ws.close()


async def test_latency_model_ttfb_and_rtf(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(ttfb_ms=100, rtf=0.5, chunk_ms=100)
    ws = await connect(emu)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await send(ws, request("l", "one two three"))  # 3 words ≈ 0.9 s of audio
    msgs = await collect(ws, {"l"})
    elapsed = loop.time() - t0
    audio_s = len(audio_of(msgs, "l")) / 8000
    assert 0.1 + audio_s * 0.5 * 0.8 <= elapsed <= 0.1 + audio_s * 0.5 + 0.3
    assert emu.stats()["chunk_lateness_ms"]["p99"] < 50


def test_cli_flags_and_faults() -> None:
    ns = build_parser().parse_args(
        [
            "--port",
            "0",
            "--ttfb-ms",
            "80",
            "--rtf",
            "0.1",
            "--chunk-ms",
            "40",
            "--jitter-ms",
            "5",
            "--seed",
            "3",
            "--max-concurrency",
            "10",
            "--max-connections",
            "4",
            "--idle-timeout-s",
            "60",
            "--cancel-stops-inflight",
            "--fault",
            "close-after-chunks=50",
            "--fault",
            "reject-429=0.1",
            "--fault",
            "no-done=0.05",
            "--fault",
            "delay-ms=200:0.1",
        ]
    )
    s = settings_from_args(ns)
    assert (s.ttfb_ms, s.rtf, s.chunk_ms, s.seed, s.max_concurrency, s.max_connections) == (
        80,
        0.1,
        40,
        3,
        10,
        4,
    )
    assert not s.cancel_emits_inflight and s.send_done_on_cancel
    assert s.faults == FaultSettings(50, 0.1, 0.05, 200.0, 0.1)
    with pytest.raises(ValueError):
        settings_from_args(build_parser().parse_args(["--fault", "explode=1"]))
    assert settings_from_args(build_parser().parse_args(["--pacing-slack-ms", "0"])).pacing_slack_ms == 0
    for bad in ("-1", "51"):
        with pytest.raises(ValueError, match="pacing_slack_ms must be in"):
            settings_from_args(build_parser().parse_args(["--pacing-slack-ms", bad]))


def test_cli_serves(tmp_path: object) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cartesia.emulator.cli", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on ws://127.0.0.1:" in line
        url = line.split()[4]

        async def talk() -> None:
            async with websockets.connect(f"{url}/tts/websocket") as ws:
                await send(ws, request("cli", "hi"))  # type: ignore[arg-type]
                msgs = await collect(ws, {"cli"})  # type: ignore[arg-type]
                assert msgs[-1]["type"] == "done"

        asyncio.run(talk())
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
