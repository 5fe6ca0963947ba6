"""Voice webhook answers, built with ``twilio.twiml.voice_response``.

``connect_stream`` answers a call with ``<Connect><Stream>`` (bidirectional)
whose ``<Parameter>`` children carry the call metadata the bridge needs once
the media stream starts (Twilio puts them in ``start.customParameters``).
Twilio limits each parameter's name+value to under 500 characters; longer
values are refused here rather than silently cut by Twilio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from xml.etree import ElementTree

from twilio.twiml.voice_response import VoiceResponse

MAX_PARAMETER_CHARS: Final = 499


def connect_stream(
    *,
    stream_url: str,
    status_callback: str | None,
    parameters: Mapping[str, str],
    action: str | None = None,
    name: str = "media-bridge",
) -> str:
    """``<Response><Connect [action]><Stream url statusCallback><Parameter…/>``."""
    if "?" in stream_url:
        raise ValueError("a <Stream> url must not carry a query string; use <Parameter>")
    response = VoiceResponse()
    connect = response.connect(action=action, method="POST" if action else None)
    stream = connect.stream(
        url=stream_url,
        name=name,
        status_callback=status_callback,
        status_callback_method="POST" if status_callback else None,
    )
    for key, value in parameters.items():
        if len(key) + len(value) > MAX_PARAMETER_CHARS:
            raise ValueError(f"<Parameter> {key!r} is too long for Twilio (name+value < 500 chars)")
        stream.parameter(name=key, value=value)
    return str(response)


def say_and_hangup(text: str, redirect_url: str | None = None) -> str:
    """A polite refusal: ``<Say>`` then hang up, or a configured ``<Redirect>``."""
    response = VoiceResponse()
    if redirect_url:
        response.redirect(redirect_url, method="POST")
    else:
        response.say(text)
        response.hangup()
    return str(response)


@dataclass(frozen=True)
class ParsedStream:
    url: str
    status_callback: str | None
    parameters: dict[str, str]
    action: str | None


def parse_connect_stream(twiml: str) -> ParsedStream | None:
    """Simulator side: read ``<Connect><Stream>`` from a TwiML document.

    Returns ``None`` when the document has no ``<Connect><Stream>`` (e.g. a
    ``<Say>`` refusal).
    """
    root = ElementTree.fromstring(twiml)
    if root.tag != "Response":
        raise ValueError("TwiML root must be <Response>")
    connect = root.find("Connect")
    stream = connect.find("Stream") if connect is not None else None
    if connect is None or stream is None:
        return None
    url = stream.get("url")
    if not url:
        raise ValueError("<Stream> has no url")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return ParsedStream(url, stream.get("statusCallback"), params, connect.get("action"))
