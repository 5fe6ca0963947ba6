"""Other projects' Cartesia clients, used with their default model and options, get audio and timestamps.

* ``livekit-plugins-cartesia`` 1.8.9 (LiveKit Agents; aiohttp, API 2025-04-16, model
  ``sonic-3``, voice Katie, ``X-API-Key``, ``?cartesia_version=``), in the test venv;
* ``pipecat-ai`` 1.14.0 (``websockets``, API 2026-03-01, model ``sonic-3.6``), in the test venv;
* the official SDK 2.x (``cartesia==2.0.17``, API 2024-11-13, ``?api_key=``, aiohttp
  async client that files messages by ``flush_id``) and 3.x (``cartesia==3.5.1``, API
  2025-11-04, structured errors), each installed at test time into its own directory
  and run in a subprocess (they cannot share the venv with SDK 4.x).

The official SDK 4.x is driven in ``test_emulator_sdk.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, TONE_VOICES
from bridge.cartesia.emulator.voices import CARTESIA_VOICES, ToneSynth, Voice
from bridge.cartesia.protocol import OutputFormat
from tests import emulator_fixtures
from tests.client_envs import client_env, pip_target
from tests.emulator_fixtures import EmulatorFactory

emulator_factory = emulator_fixtures.emulator_factory  # the fixture, shared
pytestmark = pytest.mark.timeout(300)

SDK2_REQUIREMENTS = ["cartesia==2.0.17", "websockets==15.0.1"]
SDK3_REQUIREMENTS = ["cartesia[websockets]==3.5.1", "websockets==15.0.1"]
KATIE = next(v for v in CARTESIA_VOICES if v.name.startswith("Katie"))


def tone(text: str, fmt: OutputFormat, voice: Voice = TONE_VOICES[0]) -> bytes:
    return ToneSynth().render(text, fmt, voice).audio


async def test_livekit_plugin_with_its_defaults_streams_audio_and_word_timestamps(
    emulator_factory: EmulatorFactory,
) -> None:
    from livekit.plugins import cartesia as lk_cartesia

    emu = await emulator_factory(api_key="lk-key")
    text = "Hello from LiveKit. How are you today?"
    async with aiohttp.ClientSession() as session:
        # Only the key and where Cartesia is: model, voice, language, format, version are the plugin's.
        tts = lk_cartesia.TTS(api_key="lk-key", base_url=str(emu.http_url), http_session=session)
        stream = tts.stream()
        stream.push_text(text)
        stream.end_input()
        pcm = bytearray()
        words: list[str] = []
        async for ev in stream:
            pcm += ev.frame.data.tobytes()
            words += [str(t).strip() for t in (ev.frame.userdata or {}).get("lk.timed_transcripts", [])]
        await stream.aclose()
        await tts.aclose()
    first = emu.received[0][1]
    assert (first["model_id"], first["voice"]["id"], first["language"]) == ("sonic-3", KATIE.id, "en")
    rec = emu.records[-1]
    assert rec.done and rec.output_format == OutputFormat("pcm_s16le", 24000)
    assert bytes(pcm) == bytes(rec.audio) == tone(text + " ", rec.output_format, KATIE)
    assert [w for w in words if w] == text.split()


async def _pipecat_speak(url: str, text: str, **settings: Any) -> tuple[bytes, list[tuple[str, int]]]:
    """Run one pipecat pipeline (Cartesia TTS → a sink) that speaks ``text``; return audio and word times."""
    from pipecat.frames.frames import EndFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSTextFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.cartesia.tts import CartesiaTTSService

    frames: list[Frame] = []

    class Sink(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            frames.append(frame)
            await self.push_frame(frame, direction)

    # pipecat has no default voice; everything else is its default.
    tts = CartesiaTTSService(api_key="pc-key", url=url, settings=CartesiaTTSService.Settings(**settings))
    with pytest.warns(DeprecationWarning):  # PipelineTask/Runner still work in 1.x, renamed for 2.0
        task = PipelineTask(Pipeline([tts, Sink()]), params=PipelineParams(audio_out_sample_rate=8000))
        await task.queue_frames([TTSSpeakFrame(text), EndFrame()])
        await asyncio.wait_for(PipelineRunner(handle_sigint=False).run(task), 60)
    audio = b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))
    return audio, [(f.text, f.pts) for f in frames if isinstance(f, TTSTextFrame)]


async def test_pipecat_service_with_its_default_model_speaks_with_word_timestamps(
    emulator_factory: EmulatorFactory,
) -> None:
    emu = await emulator_factory(api_key="pc-key")
    text = "Hello from pipecat. How are you today?"
    audio, words = await _pipecat_speak(f"{emu.url}/tts/websocket", text, voice=KATIE.id)
    first = emu.received[0][1]
    assert first["model_id"] == "sonic-3.6"  # pipecat 1.14's default: a newer sonic-3.x
    rec = emu.records[-1]
    assert rec.done and audio == bytes(rec.audio) == tone(text, OutputFormat("pcm_s16le", 8000), KATIE)
    assert [w for w, _ in words] == text.split()
    starts = [pts for _, pts in words]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


async def test_pipecat_regional_language_code_is_accepted(emulator_factory: EmulatorFactory) -> None:
    from pipecat.transcriptions.language import Language

    emu = await emulator_factory()
    audio, words = await _pipecat_speak(f"{emu.url}/tts/websocket", "Hola desde México.",
                                         voice=KATIE.id, language=Language.ES_MX)
    assert emu.received[0][1]["language"] == "es-MX"
    assert audio and [w for w, _ in words] == ["Hola", "desde", "México."]


async def run_client(script: str, requirements: list[str], ws_url: str) -> dict[str, Any]:
    """Run ``tests/clients/<script>`` with ``requirements`` installed in its own directory; its JSON."""
    target = await asyncio.to_thread(pip_target, requirements)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-s", str(Path(__file__).parent / "clients" / script), ws_url, DEFAULT_VOICE_ID,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=client_env(target),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


async def test_official_sdk_2x_async_flushes_embeddings_errors_and_sync_send(
    emulator_factory: EmulatorFactory,
) -> None:
    emu = await emulator_factory(api_key="sdk2-key")
    result = await run_client("cartesia2_client.py", SDK2_REQUIREMENTS, str(emu.url))
    mulaw = OutputFormat("pcm_mulaw", 8000)

    def audio(value: str) -> bytes:
        return base64.b64decode(value)

    # The SDK sent its own version and authenticated with ?api_key=.
    assert all(rec.model_id == "sonic-2" for rec in emu.records)
    assert audio(result["plain"]["audio"]) == tone("Hello from the old SDK.", mulaw)
    assert result["plain"]["words"] == ["Hello", "from", "the", "old", "SDK."]
    # Each flush receiver got exactly the text sent before its flush: flush_id 0 then 1 (2024-11-13).
    assert [audio(p["audio"]) for p in result["flushed"]] == [tone("First part.", mulaw), tone("Second part.", mulaw)]
    assert emu.context_record("flushed") is not None and emu.context_record("flushed").flush_dones == [0, 1]
    # An embedding speaks with a voice derived from it: same embedding, same audio.
    assert result["emb_a"] == result["emb_a_again"] != result["emb_b"]
    assert audio(result["emb_a"]) and audio(result["emb_b"])
    # The legacy error string names the model id, and its title once.
    assert "sonic-nope" in result["error"] and result["error"].count("Invalid model") == 1
    assert audio(result["sync"]["audio"]) == tone("Sync and whole.", mulaw)
    # SDK 2.x's sync send() always sends use_original_timestamps (false here): normalized words.
    assert result["sync"]["words"] == ["sync", "and", "whole"]


async def test_official_sdk_3x_context_with_its_defaults_and_structured_error(
    emulator_factory: EmulatorFactory,
) -> None:
    emu = await emulator_factory(api_key="sdk3-key")
    result = await run_client("cartesia3_client.py", SDK3_REQUIREMENTS, str(emu.url))
    assert emu.records[0].model_id == "sonic-latest"  # the SDK's fallback model
    plain = result["plain"]
    assert base64.b64decode(plain["audio"]) == tone("Hello from SDK three.", OutputFormat("pcm_mulaw", 8000))
    assert plain["words"] == ["Hello", "from", "SDK", "three."] and plain["last"] == "done"
    assert result["error"]["code"] == "model_not_found" and result["error"]["title"] == "Invalid model"
    assert "'sonic-nope'" in result["error"]["message"] and "Invalid model" not in result["error"]["message"]
