"""``GET /voices``, ``GET /voices/{id}`` and ``GET /voices/{id}/preview``: the voice catalogue.

List filters as the official SDK 4.x sends them (``VoiceListParams``):

* ``q``: case-insensitive substring of the name, description or id.
* ``gender``: ``masculine`` | ``feminine`` | ``gender_neutral``.
* ``is_owner``: ``true`` lists nothing (the emulator owns no voice), ``false`` all.
* ``limit``: page size, 1-100 (default 10).
* ``starting_after`` / ``ending_before``: cursor paging by voice id; an id not in
  the (filtered) list gives an empty page.
* ``expand[]`` (or ``expand``): ``preview_file_url`` adds that field, a URL of
  this emulator serving a WAV of the voice saying its name.

Any other value of a known filter is a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from ..protocol import GenerationRequest, OutputFormat
from .http_tts import wav_header
from .httpapi import Authenticator, http_error, json_response
from .synth import Synthesizer
from .voices import Voice

GENDERS: Final = frozenset({"masculine", "feminine", "gender_neutral"})
EXPANDABLE: Final = frozenset({"preview_file_url"})
LIMIT_RANGE: Final = (1, 100)
DEFAULT_LIMIT: Final = 10
#: Preview audio: 16-bit PCM at 22.05 kHz in a WAV container.
PREVIEW_FORMAT: Final = OutputFormat("pcm_s16le", 22050, "wav")


class VoicesApi:
    """The voice catalogue routes of one emulator."""

    def __init__(self, synth: Synthesizer, auth: Authenticator) -> None:
        self.synth = synth
        self.auth = auth

    def _voice(self, request: web.Request, version: str) -> Voice | web.Response:
        """The voice the path names, or the 404 to answer."""
        voice = self.synth.voices.get(request.match_info["voice_id"])
        if voice is None:
            return http_error(404, "no voice with this id", "not_found", "Voice not found", version)
        return voice

    def to_api(self, voice: Voice, request: web.Request, expand: set[str]) -> dict[str, Any]:
        body = voice.to_api()
        if "preview_file_url" in expand:
            body["preview_file_url"] = str(request.url.with_path(f"/voices/{voice.id}/preview").with_query(None))
        return body

    async def list_voices(self, request: web.Request) -> web.Response:
        version = self.auth.admit_any_version(request)
        if isinstance(version, web.Response):
            return version
        query = request.query

        def bad(param: str, why: str) -> web.Response:
            return http_error(400, f"{param}: {why}", "invalid_request", "Invalid request", version)

        low, high = LIMIT_RANGE
        try:
            limit = int(query.get("limit", str(DEFAULT_LIMIT)))
        except ValueError:
            return bad("limit", f"must be an integer in [{low}, {high}]")
        if not low <= limit <= high:
            return bad("limit", f"must be an integer in [{low}, {high}]")
        gender = query.get("gender")
        if gender is not None and gender not in GENDERS:
            return bad("gender", f"{gender!r} is not one of {sorted(GENDERS)}")
        expand = set(query.getall("expand[]", [])) | set(query.getall("expand", []))
        if not expand <= EXPANDABLE:
            return bad("expand", f"{sorted(expand - EXPANDABLE)} cannot be expanded (only preview_file_url)")
        is_owner = query.get("is_owner")
        if is_owner not in (None, "true", "false"):
            return bad("is_owner", "must be true or false")
        needle = (query.get("q") or "").lower()
        voices = [
            v for v in self.synth.voices.values()
            if (gender is None or v.gender == gender)
            and (not needle or needle in v.name.lower() or needle in v.description.lower() or needle in v.id)
            and is_owner != "true"
        ]
        ids = [v.id for v in voices]
        after, before = query.get("starting_after"), query.get("ending_before")
        if after:
            start = ids.index(after) + 1 if after in ids else len(ids)
            page, has_more = voices[start : start + limit], start + limit < len(voices)
        elif before:
            end = ids.index(before) if before in ids else 0
            page, has_more = voices[max(0, end - limit) : end], end - limit > 0
        else:
            page, has_more = voices[:limit], limit < len(voices)
        data = [self.to_api(v, request, expand) for v in page]
        next_page = data[-1]["id"] if has_more and not before else None
        return json_response({"data": data, "has_more": has_more, "next_page": next_page})

    async def get_voice(self, request: web.Request) -> web.Response:
        version = self.auth.admit_any_version(request)
        if isinstance(version, web.Response):
            return version
        voice = self._voice(request, version)
        if isinstance(voice, web.Response):
            return voice
        expand = set(request.query.getall("expand[]", [])) | set(request.query.getall("expand", []))
        return json_response(self.to_api(voice, request, expand & EXPANDABLE))

    async def preview(self, request: web.Request) -> web.Response:
        """The voice saying its own name, as WAV (what ``preview_file_url`` points at)."""
        version = self.auth.admit_any_version(request)
        if isinstance(version, web.Response):
            return version
        voice = self._voice(request, version)
        if isinstance(voice, web.Response):
            return voice
        req = GenerationRequest("", voice.name, "sonic-3", voice.id, PREVIEW_FORMAT)
        rendered = await self.synth.render(voice.name, PREVIEW_FORMAT, voice, req)
        body = wav_header(PREVIEW_FORMAT, len(rendered.audio)) + rendered.audio
        return web.Response(body=body, content_type="audio/wav")
