"""Emulator behaviour by ``Cartesia-Version``: models, languages, voices, flush ids, error shapes, /voices."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from websockets.exceptions import InvalidStatus

from bridge.cartesia.emulator import DEFAULT_VOICE_ID, MODEL_IDS, VERSIONS, rules_for
from bridge.cartesia.emulator.models import SUNSET_MODEL_IDS
from tests import emulator_fixtures
from tests.emulator_fixtures import EmulatorFactory, audio_of, collect, connect, recv, request, send

emulator_factory = emulator_fixtures.emulator_factory  # the fixture, shared
pytestmark = pytest.mark.timeout(60)
EMBEDDING = {"mode": "embedding", "embedding": [0.5] * 192}


async def errors_of(emu: Any, version: str, msgs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Send each message on one socket of ``version``; return the reply (error or done) by context id."""
    ws = await connect(emu, f"cartesia_version={version}")
    for msg in msgs:
        await send(ws, msg)
    replies = await collect(ws, {m["context_id"] for m in msgs})
    await ws.close()
    return {m["context_id"]: m for m in replies if m["type"] in ("error", "done")}


def test_version_rules_table() -> None:
    assert [r.version for r in VERSIONS] == sorted(r.version for r in VERSIONS)
    assert rules_for("2025-06-01").version == "2025-04-16"  # between two versions: the older one
    assert rules_for("2027-01-01").version == "2026-08-14"
    for bad in ("2024-01-01", "latest", "2026-3-1"):
        with pytest.raises(ValueError, match=bad):
            rules_for(bad)


async def test_bad_version_is_refused_before_the_upgrade(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    with pytest.raises(InvalidStatus) as info:
        await connect(emu, "cartesia_version=latest")
    assert info.value.response.status_code == 400
    assert b"Cartesia-Version 'latest'" in info.value.response.body


async def test_every_listed_model_speaks_and_unknown_or_sunset_ids_are_named(
    emulator_factory: EmulatorFactory,
) -> None:
    emu = await emulator_factory()
    good = sorted(MODEL_IDS) + ["sonic-3.6", "sonic-3.6-2026-11-01", "sonic-3.10"]
    bad = {"sonic-4": "model_not_found", "sonic-3.5-preview": "model_not_found", "Sonic-3": "model_not_found",
           **{m: "model_sunsetted" for m in SUNSET_MODEL_IDS}}
    msgs = [request(f"ok-{m}", "Hi.", model_id=m) for m in good] + [request(f"bad-{m}", "Hi.", model_id=m) for m in bad]
    replies = await errors_of(emu, "2026-03-01", msgs)
    assert {m for m in good if replies[f"ok-{m}"]["type"] != "done"} == set()
    for model, code in bad.items():
        err = replies[f"bad-{model}"]
        assert err["type"] == "error" and err["error_code"] == code and repr(model) in err["message"], err


async def test_regional_languages_and_locale_by_version(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    current = await errors_of(emu, "2026-08-14", [
        request("es-mx", "Hola.", language="es-MX"),
        request("pt-br", "Olá.", language="pt-BR"),
        request("locale", "Hello.", locale="en-GB"),
        request("both", "Hello.", language="en", locale="en-GB"),
        request("bad-lang", "Hello.", language="xx-YY"),
        request("bad-locale", "Hello.", locale="klingon"),
    ])
    assert [current[c]["type"] for c in ("es-mx", "pt-br", "locale")] == ["done"] * 3
    for cid, field, needle in (("both", "locale", "set one of them"), ("bad-lang", "language", "'xx-YY'"),
                               ("bad-locale", "locale", "'klingon'")):
        err = current[cid]
        assert err["type"] == "error" and err["message"].startswith(field) and needle in err["message"], err
    older = await errors_of(emu, "2026-03-01", [request("locale", "Hello.", locale="en-GB"),
                                                request("es-mx", "Hola.", language="es-MX")])
    assert older["locale"]["type"] == "error" and "locale" in older["locale"]["message"]
    assert "2026-08-14" in older["locale"]["message"] and older["es-mx"]["type"] == "done"


async def test_voice_forms_by_version(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    forms = {"bare": DEFAULT_VOICE_ID, "object": {"id": DEFAULT_VOICE_ID}, "embedding": EMBEDDING}
    expected = {  # version: which forms speak
        "2024-11-13": {"embedding"},
        "2025-04-16": {"embedding"},
        "2026-03-01": set(),
        "2026-08-14": {"bare", "object"},
    }
    for version, accepted in expected.items():
        replies = await errors_of(emu, version, [request(f, "Voice.", voice=v) for f, v in forms.items()])
        assert {f for f in forms if replies[f]["type"] == "done"} == accepted, version
        for form in set(forms) - accepted:
            err = replies[form]
            text = err.get("message") or err.get("error")
            assert "voice" in text and version in text, err


async def test_an_embedding_voice_is_deterministic_and_its_own(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    ws = await connect(emu, "cartesia_version=2024-11-13")
    other = {"mode": "embedding", "embedding": [-0.25] * 192}
    for cid, voice in (("a", EMBEDDING), ("a2", EMBEDDING), ("b", other), ("id", {"mode": "id", "id": DEFAULT_VOICE_ID})):
        await send(ws, request(cid, "Same words.", voice=voice))
    msgs = await collect(ws, {"a", "a2", "b", "id"})
    audio = {cid: audio_of(msgs, cid) for cid in ("a", "a2", "b", "id")}
    assert audio["a"] == audio["a2"] and len({audio["a"], audio["b"], audio["id"]}) == 3
    assert emu.context_record("a").voice_id == emu.context_record("a2").voice_id != emu.context_record("b").voice_id
    await send(ws, request("short", "x", voice={"mode": "embedding", "embedding": [1.0] * 3}))
    err = await recv(ws)
    assert err["type"] == "error" and "voice.embedding" in err["error"] and "192" in err["error"]
    await ws.close()


@pytest.mark.parametrize(("version", "first"), [("2024-11-13", 0), ("2025-04-16", 1), ("2026-08-14", 1)])
async def test_flush_ids_count_from_the_versions_first_id(
    emulator_factory: EmulatorFactory, version: str, first: int
) -> None:
    emu = await emulator_factory()
    ws = await connect(emu, f"cartesia_version={version}")
    await send(ws, request("f", "Before the flush.", cont=True, add_timestamps=True, max_buffer_delay_ms=3000))
    await send(ws, request("f", "", cont=True, flush=True))
    await send(ws, request("f", "After it.", cont=False, add_timestamps=True))
    msgs = await collect(ws, {"f"})
    chunk_ids = [m["flush_id"] for m in msgs if m["type"] in ("chunk", "timestamps")]
    flush_done = [m for m in msgs if m["type"] == "flush_done"]
    assert [m["flush_id"] for m in flush_done] == [first]
    cut = msgs.index(flush_done[0])
    assert {m["flush_id"] for m in msgs[:cut] if m["type"] == "chunk"} == {first}
    assert {m["flush_id"] for m in msgs[cut:] if m["type"] == "chunk"} == {first + 1}
    assert chunk_ids and msgs[-1]["type"] == "done"
    await ws.close()


async def test_error_shapes_by_version_never_repeat_the_title(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory(max_concurrency=1)
    bad = [
        request("model", "x", model_id="sonic-nope"),
        request("voice", "x", voice={"mode": "id", "id": "no-such-voice"}),
        request("format", "x", output_format={"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 7}),
        request("lang", "x", language="zz"),
        request("sunset", "x", model_id="sonic-english"),
    ]
    for version in ("2024-11-13", "2025-04-16", "2025-11-04", "2026-03-01", "2026-08-14"):
        replies = await errors_of(emu, version, bad)
        for cid, err in replies.items():
            assert err["type"] == "error" and err["done"] is True and err["context_id"] == cid
            if version < "2025-11-04":
                assert set(err) == {"type", "done", "error", "status_code", "context_id"}, err
                title, _, message = err["error"].partition(": ")
                assert title and message and not message.startswith(title), err
            else:
                assert "error" not in err and err["request_id"] and err["error_code"], err
                assert not err["message"].startswith(err["title"]), err


async def test_http_endpoints_follow_the_same_version_rules(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    body = {"model_id": "sonic-3.5", "transcript": "Bytes.", "voice": DEFAULT_VOICE_ID,
            "output_format": {"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}, "locale": "en-US"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{emu.http_url}/tts/bytes", json=body, headers={"Cartesia-Version": "2026-08-14"}) as r:
            assert r.status == 200 and len(await r.read()) > 0
        async with s.post(f"{emu.http_url}/tts/bytes", json=body, headers={"Cartesia-Version": "2026-03-01"}) as r:
            err = await r.json()
            assert r.status == 400 and "voice" in err["message"] and "2026-08-14" in err["message"]
        async with s.post(f"{emu.http_url}/tts/bytes?cartesia_version=2024-11-13",
                          json={**body, "voice": EMBEDDING, "locale": None, "model_id": "sonic-2"}) as r:
            assert r.status == 200 and len(await r.read()) > 0


async def test_voices_list_filters_paging_and_expand(emulator_factory: EmulatorFactory) -> None:
    emu = await emulator_factory()
    url = f"{emu.http_url}/voices"
    all_ids = list(emu.voices)
    async with aiohttp.ClientSession() as s:

        async def get(query: str) -> tuple[int, Any]:
            async with s.get(f"{url}?{query}") as r:
                return r.status, await r.json()

        _, page = await get("q=TONE")
        assert [v["name"] for v in page["data"]] == ["Tone Alto", "Tone Bass", "Tone Soprano"]
        _, page = await get("q=katie")
        assert [v["name"] for v in page["data"]] == ["Katie (emulated)"]
        _, page = await get("gender=masculine")
        assert page["data"] and {v["gender"] for v in page["data"]} == {"masculine"}
        # Paging: 2 at a time, following next_page, yields every voice once, in order.
        seen: list[str] = []
        query = "limit=2"
        while True:
            _, page = await get(query)
            seen += [v["id"] for v in page["data"]]
            assert len(page["data"]) <= 2
            if not page["has_more"]:
                break
            query = f"limit=2&starting_after={page['next_page']}"
        assert seen == all_ids
        _, back = await get(f"limit=2&ending_before={all_ids[3]}")
        assert [v["id"] for v in back["data"]] == all_ids[1:3]
        _, plain = await get("limit=1")
        assert "preview_file_url" not in plain["data"][0]
        _, expanded = await get("limit=1&expand[]=preview_file_url")
        preview = expanded["data"][0]["preview_file_url"]
        async with s.get(preview) as r:
            wav = await r.read()
            assert r.status == 200 and wav[:4] == b"RIFF" and len(wav) > 44
        _, none = await get("is_owner=true")
        assert none["data"] == []
        for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("gender=robot", "gender"),
                             ("expand[]=secrets", "expand"), ("is_owner=maybe", "is_owner")):
            status, err = await get(query)
            assert status == 400 and err["message"].startswith(param), (query, err)


async def test_sdk4_default_version_bare_voice_and_default_close(emulator_factory: EmulatorFactory) -> None:
    """SDK 4.x sends 2026-08-14 and a bare voice id string."""
    from cartesia import AsyncCartesia

    emu = await emulator_factory()
    client = AsyncCartesia(api_key="k", websocket_base_url=emu.url, base_url=emu.http_url)
    async with client.tts.websocket_connect() as conn:
        ctx = conn.context(model_id="sonic-3.5", voice=DEFAULT_VOICE_ID, add_timestamps=True, max_buffer_delay_ms=0,
                           output_format={"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000})
        await ctx.push("Bare voice id.")
        await ctx.no_more_inputs()
        chunks, words = b"", []
        async for ev in ctx.receive():
            if ev.type == "chunk":
                chunks += ev.audio
            elif ev.type == "timestamps":
                words += ev.word_timestamps.words
            assert ev.type != "error", ev
    await client.close()
    assert chunks and words == ["Bare", "voice", "id."]
    sent = [obj for _, obj in emu.received]
    assert sent[0]["voice"] == DEFAULT_VOICE_ID
    assert emu.context_record(sent[0]["context_id"]).done
