"""Settings from environment variables, validated once at start.

``Config.from_env()`` raises ``ConfigError`` with every problem listed, so a
misconfigured pod fails at start with one clear message, not mid-call.
``ENV_VARS`` documents each variable (shown by ``media-bridge serve --help``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import urlsplit

from bridge.agent.relay_settings import RELAY_ATTRIBUTES, RelaySettings, RelaySettingsError
from bridge.cartesia.protocol import DEFAULT_VERSION, LANGUAGES
from bridge.cartesia.stt_protocol import STT_MODELS
from bridge.defaults import EMULATOR_DEFAULT_VOICE_ID, PLAYOUT_LEAD_MS, PLAYOUT_MARK_INTERVAL_MS
from bridge.logs import loggable_url


def relay_env_name(attribute: str) -> str:
    """``welcomeGreeting`` → ``RELAY_WELCOME_GREETING``."""
    return "RELAY_" + "".join("_" + c if c.isupper() else c.upper() for c in attribute)


#: name -> (default, description). Defaults of ``None`` mean unset.
ENV_VARS: Final[dict[str, tuple[str | None, str]]] = {
    "PUBLIC_URL": ("http://127.0.0.1:8080", "externally visible base URL; TwiML stream URLs and signatures use it"),
    "TWILIO_AUTH_TOKEN": (None, "secret; when set, X-Twilio-Signature is enforced on webhook and WebSocket"),
    "TWILIO_ACCOUNT_SID": (None, "for REST hang-up/redirect (with TWILIO_AUTH_TOKEN)"),
    "CARTESIA_API_KEY": (None, "secret; when unset the embedded Cartesia emulator is started in-process"),
    "EMULATOR_ARGS": ("", "flags for the embedded emulator, as for `media-bridge emulator` (e.g. --ttfb-ms 90)"),
    "CARTESIA_URL": ("wss://api.cartesia.ai", "Cartesia WebSocket base URL (/tts/websocket is appended)"),
    "CARTESIA_VERSION": (DEFAULT_VERSION, "Cartesia-Version sent on the handshake"),
    "CARTESIA_MODEL": ("sonic-3", "model_id for every utterance"),
    "CARTESIA_VOICE_ID": (EMULATOR_DEFAULT_VOICE_ID, "default voice UUID"),
    "CARTESIA_LANGUAGE": ("en", "default language code"),
    "CARTESIA_POOL_SIZE": ("2", "Cartesia WebSockets shared by all calls of the process"),
    "CARTESIA_MAX_CONCURRENCY": ("64", "active contexts per process (plan limit / replicas)"),
    "CARTESIA_ADMISSION_TIMEOUT_S": ("5", "longest an utterance waits for a concurrency slot"),
    "CARTESIA_CONTEXT_TIMEOUT_S": ("30", "a context with no done after this many seconds is ended"),
    # Cartesia's guidance for streamed tokens is managed buffering (delay > 0); 0 is for whole phrases.
    # A turn's last token (continue:false) or a flush still makes it generate at once.
    "CARTESIA_MAX_BUFFER_DELAY_MS": ("300", "max_buffer_delay_ms sent with streamed text (0 = generate at once)"),
    # Agents stream a word per message; joining them saves a Cartesia message per word. Keep it well
    # below CARTESIA_MAX_BUFFER_DELAY_MS: Cartesia waits for more text anyway, the bridge must not add to it.
    "CARTESIA_TEXT_HOLD_MS": ("80", "streamed text waits up to this long to be joined into one Cartesia input "
                              "(sentence ends, a turn's last token and flushes go at once; 0 = no hold)"),
    "CARTESIA_SOCKET_MAX_AGE_S": ("240", "replace a Cartesia socket idle this long (Cartesia closes at 300 s)"),
    "CARTESIA_DOWN_GRACE_S": ("5", "with no Cartesia socket connected this long, /readyz fails and calls are refused"),
    "CARTESIA_RECONNECT_BACKOFF_MAX_S": ("5", "longest back-off between Cartesia connect attempts (doubling from 0.1 s)"),
    "MAX_CALLS": ("500", "concurrent calls per process; more get a polite refusal"),
    "MEDIA_MAX_UNSTARTED": (None, "media WebSockets upgraded but not yet sent `start` (default MAX_CALLS: a burst of "
                            "real calls never trips it); beyond it the oldest is closed"),
    "MEDIA_START_TIMEOUT_S": ("10", "a media WebSocket that sends no `start` within this is closed"),
    "HTTP_IDLE_TIMEOUT_S": ("75", "an HTTP connection with no complete request for this long is closed"),
    "PLAYOUT_LEAD_MS": (str(PLAYOUT_LEAD_MS), "audio sent ahead of what the caller has heard, at most"),
    "PLAYOUT_MARK_INTERVAL_MS": (str(PLAYOUT_MARK_INTERVAL_MS), "a Twilio mark every this many ms of audio"),
    "PLAYOUT_MAX_BUFFER_MS": ("60000", "per-call buffer of audio not yet sent; beyond it the utterance is cut"),
    "GREETING": ("Hello! You are connected to the media bridge.", "what the built-in agent says first"),
    "AGENT_URL": (None, "ws(s):// URL of the customer's agent; unset = built-in demo agent"),
    "AGENT_URL_ALLOWLIST": (None, "comma-separated URL prefixes a call may choose as its agent via <Parameter>"),
    "AGENT_TOKEN": (None, "secret; bearer token sent to the agent"),
    "HANDOFF_URL": (None, "where <Connect action> redirects after an agent `end` with handoffData (gets HandoffData)"),
    "AGENT_CONNECT_TIMEOUT_S": ("5", "agent WebSocket connect timeout"),
    "FALLBACK_LINE": ("Sorry, we cannot take your call right now. Goodbye.", "spoken when the agent is unreachable"),
    "BUSY_LINE": ("All our lines are busy. Please call again later.", "spoken when the bridge refuses a call"),
    "VAD_ENABLED": ("true", "barge-in from caller speech energy"),
    "VAD_THRESHOLD_RMS": ("1200", "16-bit RMS above which a frame is speech"),
    "VAD_MIN_SPEECH_MS": ("120", "speech this long before it counts as barge-in"),
    "VAD_HANGOVER_MS": ("200", "silence this long ends a speech run"),
    "STT_ENABLED": ("auto", "caller audio to Cartesia STT, prompts to the agent: auto (external agents), true, false"),
    "CARTESIA_STT_MODEL": ("ink-whisper", "Cartesia STT model (manual finalize: ink-whisper, ink-2)"),
    "CARTESIA_STT_MAX_CONCURRENCY": ("20", "STT sockets per process (Cartesia counts STT per plan, apart from TTS)"),
    "STT_SEND_INTERVAL_MS": ("60", "caller audio is sent to STT in messages of this many ms (20 = every frame; "
                             "larger costs less CPU, delays interim words; finalize never waits)"),
    "STT_REPLAY_LIMIT_MS": ("15000", "caller audio kept to replay a turn after an STT socket loss"),
    "PLAY_URL_ALLOWLIST": (None, "comma-separated http(s) URL prefixes an agent `play` may fetch audio from"),
    **{relay_env_name(attr): (None, f"default ConversationRelay {attr} (per call: webhook query or <Parameter>)")
       for attr in RELAY_ATTRIBUTES if attr != "transcription"},
    "TWILIO_FAST_PATH": ("true", "handle Twilio media/mark messages in the socket's data callback when the "
                         "installed aiohttp passes the start-up check; false = aiohttp's receive() for all"),
    "DRAIN_GRACE_S": ("120", "on SIGTERM, how long calls in progress may finish"),
    "LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING or ERROR"),
}


#: Hosts for which an http:// PUBLIC_URL is expected (local runs, tests, the demo).
LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem."""


@dataclass(frozen=True)
class Config:
    public_url: str = "http://127.0.0.1:8080"
    twilio_auth_token: str | None = None
    twilio_account_sid: str | None = None
    cartesia_api_key: str | None = None
    emulator_args: str = ""
    cartesia_url: str = "wss://api.cartesia.ai"
    cartesia_version: str = DEFAULT_VERSION
    cartesia_model: str = "sonic-3"
    cartesia_voice_id: str = EMULATOR_DEFAULT_VOICE_ID
    cartesia_language: str = "en"
    cartesia_pool_size: int = 2
    cartesia_max_concurrency: int = 64
    cartesia_admission_timeout_s: float = 5.0
    cartesia_context_timeout_s: float = 30.0
    cartesia_max_buffer_delay_ms: int = 300
    cartesia_text_hold_ms: int = 80
    cartesia_socket_max_age_s: float = 240.0
    cartesia_down_grace_s: float = 5.0
    cartesia_reconnect_backoff_max_s: float = 5.0
    max_calls: int = 500
    media_max_unstarted: int = 500
    media_start_timeout_s: float = 10.0
    http_idle_timeout_s: float = 75.0
    playout_lead_ms: int = PLAYOUT_LEAD_MS
    playout_mark_interval_ms: int = PLAYOUT_MARK_INTERVAL_MS
    playout_max_buffer_ms: int = 60_000
    greeting: str = "Hello! You are connected to the media bridge."
    agent_url: str | None = None
    agent_url_allowlist: tuple[str, ...] = ()
    agent_token: str | None = None
    agent_connect_timeout_s: float = 5.0
    handoff_url: str | None = None
    fallback_line: str = "Sorry, we cannot take your call right now. Goodbye."
    busy_line: str = "All our lines are busy. Please call again later."
    vad_enabled: bool = True
    vad_threshold_rms: int = 1200
    vad_min_speech_ms: int = 120
    vad_hangover_ms: int = 200
    twilio_fast_path: bool = True
    drain_grace_s: float = 120.0
    log_level: str = "INFO"
    stt_enabled: str = "auto"  # auto | true | false
    cartesia_stt_model: str = "ink-whisper"
    cartesia_stt_max_concurrency: int = 20
    stt_replay_limit_ms: int = 15_000
    stt_send_interval_ms: int = 60
    play_url_allowlist: tuple[str, ...] = ()
    relay: RelaySettings = field(default_factory=RelaySettings)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def use_emulator(self) -> bool:
        return not self.cartesia_api_key

    @property
    def public_ws_base(self) -> str:
        """``PUBLIC_URL`` with ``http``→``ws`` and ``https``→``wss``."""
        parts = urlsplit(self.public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"

    def public(self, path: str) -> str:
        return self.public_url.rstrip("/") + path

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        problems: list[str] = []

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value == "":
                return ENV_VARS[name][0]
            return value

        def as_int(name: str, low: int, high: int) -> int:
            raw = get(name)
            try:
                value = int(str(raw))
            except ValueError:
                problems.append(f"{name}={raw!r} is not an integer")
                return low
            if not low <= value <= high:
                problems.append(f"{name}={value} must be in [{low}, {high}]")
            return value

        def as_float(name: str, low: float, high: float) -> float:
            raw = get(name)
            try:
                value = float(str(raw))
            except ValueError:
                problems.append(f"{name}={raw!r} is not a number")
                return low
            if not low <= value <= high:
                problems.append(f"{name}={value} must be in [{low}, {high}]")
            return value

        def as_bool(name: str) -> bool:
            raw = str(get(name)).lower()
            if raw in ("1", "true", "yes", "on"):
                return True
            if raw in ("0", "false", "no", "off"):
                return False
            problems.append(f"{name}={raw!r} must be true or false")
            return False

        public_url = str(get("PUBLIC_URL"))
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            problems.append(f"PUBLIC_URL={public_url!r} must be an http(s) URL without a query")
        cartesia_url = str(get("CARTESIA_URL"))
        if urlsplit(cartesia_url).scheme not in ("ws", "wss"):
            problems.append(f"CARTESIA_URL={cartesia_url!r} must be a ws:// or wss:// URL")
        language = str(get("CARTESIA_LANGUAGE"))
        if language not in LANGUAGES:
            problems.append(f"CARTESIA_LANGUAGE={language!r} is not a Cartesia language code")
        agent_url = get("AGENT_URL")
        if agent_url and urlsplit(agent_url).scheme not in ("ws", "wss"):
            problems.append(f"AGENT_URL={agent_url!r} must be a ws:// or wss:// URL")
        allow = tuple(p.strip() for p in str(get("AGENT_URL_ALLOWLIST") or "").split(",") if p.strip())
        for prefix in allow:
            if urlsplit(prefix).scheme not in ("ws", "wss") or not urlsplit(prefix).netloc:
                problems.append(f"AGENT_URL_ALLOWLIST entry {prefix!r} must be a ws(s)://host... prefix")
        real_cartesia = urlsplit(cartesia_url).hostname == "api.cartesia.ai"
        if get("CARTESIA_API_KEY") and real_cartesia and str(get("CARTESIA_VOICE_ID")) == EMULATOR_DEFAULT_VOICE_ID:
            problems.append("CARTESIA_VOICE_ID must be set to one of your Cartesia voices when CARTESIA_API_KEY is set")
        handoff = get("HANDOFF_URL")
        if handoff and urlsplit(handoff).scheme not in ("http", "https"):
            problems.append(f"HANDOFF_URL={handoff!r} must be an http(s) URL")
        log_level = str(get("LOG_LEVEL")).upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"LOG_LEVEL={log_level!r} must be DEBUG, INFO, WARNING or ERROR")
        lead = as_int("PLAYOUT_LEAD_MS", 40, 10_000)
        interval = as_int("PLAYOUT_MARK_INTERVAL_MS", 20, 10_000)
        if interval > lead:
            problems.append("PLAYOUT_MARK_INTERVAL_MS must not exceed PLAYOUT_LEAD_MS (echoes would stall playout)")
        hold_ms, buffer_delay_ms = as_int("CARTESIA_TEXT_HOLD_MS", 0, 1000), as_int("CARTESIA_MAX_BUFFER_DELAY_MS", 0, 5000)
        if 0 < buffer_delay_ms <= hold_ms:
            # Cartesia would start generating before the bridge let the text go: the hold would add latency.
            problems.append("CARTESIA_TEXT_HOLD_MS must be below CARTESIA_MAX_BUFFER_DELAY_MS (or 0)")
        stt_enabled = str(get("STT_ENABLED")).lower()
        if stt_enabled not in ("auto", "true", "false"):
            problems.append(f"STT_ENABLED={stt_enabled!r} must be auto, true or false")
        stt_model = str(get("CARTESIA_STT_MODEL"))
        if stt_model not in STT_MODELS:
            problems.append(f"CARTESIA_STT_MODEL={stt_model!r} must be one of {', '.join(sorted(STT_MODELS))}")
        play_allow = tuple(p.strip() for p in str(get("PLAY_URL_ALLOWLIST") or "").split(",") if p.strip())
        for prefix in play_allow:
            if urlsplit(prefix).scheme not in ("http", "https") or not urlsplit(prefix).netloc:
                problems.append(f"PLAY_URL_ALLOWLIST entry {prefix!r} must be an http(s)://host... prefix")
        relay = RelaySettings(tts_language=language, transcription_language=language)
        try:
            relay = relay.merged({attr: str(get(relay_env_name(attr))) for attr in RELAY_ATTRIBUTES
                                  if attr != "transcription" and get(relay_env_name(attr)) is not None})
        except RelaySettingsError as exc:
            problems.append(f"RELAY_*: {exc}")
        config = cls(
            public_url=public_url.rstrip("/"),
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            twilio_account_sid=get("TWILIO_ACCOUNT_SID"),
            cartesia_api_key=get("CARTESIA_API_KEY"),
            cartesia_url=cartesia_url.rstrip("/"),
            emulator_args=str(get("EMULATOR_ARGS") or ""),
            cartesia_version=str(get("CARTESIA_VERSION")),
            cartesia_model=str(get("CARTESIA_MODEL")),
            cartesia_voice_id=str(get("CARTESIA_VOICE_ID")),
            cartesia_language=language,
            cartesia_pool_size=as_int("CARTESIA_POOL_SIZE", 1, 64),
            cartesia_max_concurrency=as_int("CARTESIA_MAX_CONCURRENCY", 1, 100_000),
            cartesia_admission_timeout_s=as_float("CARTESIA_ADMISSION_TIMEOUT_S", 0.0, 600.0),
            cartesia_context_timeout_s=as_float("CARTESIA_CONTEXT_TIMEOUT_S", 1.0, 3600.0),
            cartesia_max_buffer_delay_ms=buffer_delay_ms,
            cartesia_text_hold_ms=hold_ms,
            cartesia_socket_max_age_s=as_float("CARTESIA_SOCKET_MAX_AGE_S", 1.0, 3600.0),
            cartesia_down_grace_s=as_float("CARTESIA_DOWN_GRACE_S", 0.0, 600.0),
            cartesia_reconnect_backoff_max_s=as_float("CARTESIA_RECONNECT_BACKOFF_MAX_S", 0.1, 300.0),
            max_calls=as_int("MAX_CALLS", 1, 100_000),
            media_max_unstarted=(as_int("MEDIA_MAX_UNSTARTED", 1, 100_000) if get("MEDIA_MAX_UNSTARTED") is not None
                                 else as_int("MAX_CALLS", 1, 100_000)),
            media_start_timeout_s=as_float("MEDIA_START_TIMEOUT_S", 0.1, 600.0),
            http_idle_timeout_s=as_float("HTTP_IDLE_TIMEOUT_S", 0.1, 3600.0),
            playout_lead_ms=lead,
            playout_mark_interval_ms=interval,
            playout_max_buffer_ms=as_int("PLAYOUT_MAX_BUFFER_MS", 1000, 600_000),
            greeting=str(get("GREETING")),
            agent_url=agent_url,
            agent_url_allowlist=allow,
            agent_token=get("AGENT_TOKEN"),
            handoff_url=get("HANDOFF_URL"),
            agent_connect_timeout_s=as_float("AGENT_CONNECT_TIMEOUT_S", 0.1, 120.0),
            fallback_line=str(get("FALLBACK_LINE")),
            busy_line=str(get("BUSY_LINE")),
            vad_enabled=as_bool("VAD_ENABLED"),
            vad_threshold_rms=as_int("VAD_THRESHOLD_RMS", 1, 32767),
            vad_min_speech_ms=as_int("VAD_MIN_SPEECH_MS", 20, 10_000),
            vad_hangover_ms=as_int("VAD_HANGOVER_MS", 20, 10_000),
            twilio_fast_path=as_bool("TWILIO_FAST_PATH"),
            drain_grace_s=as_float("DRAIN_GRACE_S", 0.0, 86_400.0),
            log_level=log_level,
            stt_enabled=stt_enabled,
            cartesia_stt_model=stt_model,
            cartesia_stt_max_concurrency=as_int("CARTESIA_STT_MAX_CONCURRENCY", 1, 100_000),
            stt_replay_limit_ms=as_int("STT_REPLAY_LIMIT_MS", 1000, 120_000),
            stt_send_interval_ms=as_int("STT_SEND_INTERVAL_MS", 20, 500),
            play_url_allowlist=play_allow,
            relay=relay,
        )
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        return config

    def warnings(self) -> list[tuple[str, str]]:
        """Settings that start but are probably wrong for a real deployment:
        ``(event, detail)`` pairs, logged as WARNINGs at start."""
        found: list[tuple[str, str]] = []
        parts = urlsplit(self.public_url)
        if parts.scheme == "http" and (parts.hostname or "") not in LOCAL_HOSTS:
            found.append(("public_url_not_https",
                          f"PUBLIC_URL={loggable_url(self.public_url)} is http://: Twilio opens media streams only "
                          "over wss://, so calls will not connect; use the https:// URL Twilio reaches"))
        return found

    def summary(self) -> dict[str, Any]:
        """Loggable view: secrets reduced to whether they are set."""
        return {
            "public_url": self.public_url,
            "twilio_auth_token": "set" if self.twilio_auth_token else "unset",
            "cartesia_api_key": "set" if self.cartesia_api_key else "unset (embedded emulator)",
            "cartesia_url": loggable_url(self.cartesia_url),
            "cartesia_version": self.cartesia_version,
            "cartesia_model": self.cartesia_model,
            "cartesia_pool_size": self.cartesia_pool_size,
            "cartesia_max_concurrency": self.cartesia_max_concurrency,
            "max_calls": self.max_calls,
            "playout_lead_ms": self.playout_lead_ms,
            "agent": loggable_url(self.agent_url) if self.agent_url else "built-in demo agent",
            "agent_token": "set" if self.agent_token else "unset",
            "stt": self.stt_enabled,
            "cartesia_stt_model": self.cartesia_stt_model,
        }


def env_help() -> str:
    lines = ["environment variables:"]
    for name, (default, text) in ENV_VARS.items():
        shown = "unset" if default is None else repr(default)
        lines.append(f"  {name:<30} {text} (default {shown})")
    return "\n".join(lines)
