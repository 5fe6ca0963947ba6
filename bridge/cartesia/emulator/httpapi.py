"""HTTP plumbing every emulator route shares: API version, auth, error bodies, JSON.

Auth: ``Authorization: Bearer``, ``X-API-Key``, ``?api_key=``, ``?access_token=``.
Without an API key configured anything (even nothing) is accepted; with one,
anything else is answered 401. Keys and tokens are never logged.
Version: ``?cartesia_version=`` first, then the ``Cartesia-Version`` header
(the query wins, as documented), else ``DEFAULT_VERSION``.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import Any, Final

import orjson
from aiohttp import web

from ...logs import log_event
from ..protocol import DEFAULT_VERSION, ErrorMessage, uses_structured_errors
from .versions import VersionRules, rules_for

logger = logging.getLogger("bridge.cartesia.emulator")

#: Access tokens remembered at once; beyond it expired ones are purged.
TOKEN_CAP: Final = 10000
#: ``POST /access-token`` ``expires_in`` bounds, seconds.
TOKEN_TTL_RANGE_S: Final = (1.0, 3600.0)


def version_of(request: web.Request) -> str:
    """The request's Cartesia API version (query first, then header)."""
    return request.query.get("cartesia_version") or request.headers.get("Cartesia-Version") or DEFAULT_VERSION


def rules_of(request: web.Request) -> VersionRules | web.Response:
    """The request's version rules, or the 400 naming the bad version."""
    version = version_of(request)
    try:
        return rules_for(version)
    except ValueError as exc:
        return http_error(400, str(exc), "invalid_request", "Invalid version", DEFAULT_VERSION)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def http_error(status: int, message: str, code: str | None, title: str | None, version: str) -> web.Response:
    """JSON error body: structured (≥2026-03-01) or legacy ``{"error": …}``, by version."""
    body: dict[str, Any]
    if uses_structured_errors(version):
        body = {"error_code": code, "title": title or "Error", "message": message,
                "request_id": str(uuid.uuid4()), "status_code": status}
    else:
        body = {"error": ErrorMessage(None, status, message, code, title).description, "status_code": status}
    return json_response(body, status)


class Authenticator:
    """Checks API keys and mints short-lived access tokens (at most ``TOKEN_CAP`` live)."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.tokens: dict[str, float] = {}

    def admit(self, request: web.Request) -> VersionRules | web.Response:
        """A request with a valid ``Cartesia-Version`` and an accepted key: its version's rules;
        otherwise the 400 or 401 to answer."""
        rules = rules_of(request)
        if isinstance(rules, web.Response):
            return rules
        denied = self.check(request, rules.version)
        return rules if denied is None else denied

    def admit_any_version(self, request: web.Request) -> str | web.Response:
        """For routes every version serves alike: the request's version, or the 401 to answer."""
        version = version_of(request)
        denied = self.check(request, version)
        return version if denied is None else denied

    def check(self, request: web.Request, version: str) -> web.Response | None:
        """``None`` when the request may proceed, else the 401 to answer."""
        expected = self.api_key
        if expected is None:
            return None
        presented: list[str] = []
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            presented.append(auth[7:].strip())
        for value in (request.headers.get("X-API-Key"), request.query.get("api_key"),
                      request.query.get("access_token")):
            if value:
                presented.append(value)
        now = time.monotonic()
        for key in presented:
            if secrets.compare_digest(key.encode(), expected.encode()):
                return None
            expires = self.tokens.get(key)
            if expires is not None and expires > now:
                return None
        log_event(logger, "emulator_auth_rejected", path=request.path, presented=len(presented))
        return http_error(401, "Invalid or missing API key.", "unauthorized", "Unauthorized", version)

    def mint_token(self, expires_in_s: float) -> str:
        low, high = TOKEN_TTL_RANGE_S
        token = "emu_tok_" + secrets.token_urlsafe(18)
        self.tokens[token] = time.monotonic() + max(low, min(expires_in_s, high))
        if len(self.tokens) > TOKEN_CAP:
            now = time.monotonic()
            self.tokens = {k: v for k, v in self.tokens.items() if v > now}
        return token
