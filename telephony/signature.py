"""``X-Twilio-Signature`` checks with ``twilio.request_validator``.

Both checks use the *configured public URL*, never the URL the server sees
behind a proxy (twilio-node#924): the webhook is signed over its public
``https://`` URL plus the POST form; the Media Streams upgrade is signed over
the ``wss://`` URL exactly as written in the TwiML, with empty params
(twilio-aspnet#162).
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator


class SignatureChecker:
    """Validates Twilio signatures; a ``None`` token disables enforcement."""

    def __init__(self, auth_token: str | None) -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None

    @property
    def enforced(self) -> bool:
        return self._validator is not None

    def webhook_ok(self, public_url: str, form: Mapping[str, str], signature: str | None) -> bool:
        if self._validator is None:
            return True
        if not signature:
            return False
        return bool(self._validator.validate(public_url, dict(form), signature))

    def websocket_ok(self, public_ws_url: str, signature: str | None) -> bool:
        if self._validator is None:
            return True
        if not signature:
            return False
        return bool(self._validator.validate(public_ws_url, {}, signature))


def sign(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Simulator side: the signature Twilio would send for ``url`` + ``params``."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params or {})))
