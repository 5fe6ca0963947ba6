"""Configuration from the environment: defaults, derivation, validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.config import Config, ConfigError


def test_defaults_and_public_ws_base() -> None:
    config = Config.from_env({"PUBLIC_URL": "https://bridge.example.com/"})
    assert config.public_ws_base == "wss://bridge.example.com"
    assert config.public("/twilio/voice") == "https://bridge.example.com/twilio/voice"
    assert Config.from_env({"PUBLIC_URL": "http://10.0.0.1:8080"}).public_ws_base == "ws://10.0.0.1:8080"
    assert config.use_emulator and config.playout_lead_ms == 400 and config.playout_mark_interval_ms == 200


def test_every_problem_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"PUBLIC_URL": "ftp://x", "PLAYOUT_LEAD_MS": "abc", "CARTESIA_LANGUAGE": "zz",
                         "VAD_ENABLED": "maybe", "AGENT_URL": "http://agent"})
    text = str(info.value)
    for name in ("PUBLIC_URL", "PLAYOUT_LEAD_MS", "CARTESIA_LANGUAGE", "VAD_ENABLED", "AGENT_URL"):
        assert name in text


def test_real_cartesia_needs_a_real_voice() -> None:
    with pytest.raises(ConfigError, match="CARTESIA_VOICE_ID"):
        Config.from_env({"CARTESIA_API_KEY": "sk_car_x"})


def test_summary_never_contains_secrets() -> None:
    config = Config.from_env({"TWILIO_AUTH_TOKEN": "tok-secret", "CARTESIA_API_KEY": "sk_car_secret",
                              "CARTESIA_VOICE_ID": "v", "AGENT_TOKEN": "agent-secret"})
    text = repr(config.summary())
    assert "secret" not in text


def test_serve_rejects_bad_config_at_start_and_help_lists_variables() -> None:
    bad = subprocess.run([sys.executable, "-m", "bridge.cli", "serve"], env={"PUBLIC_URL": "nope", "PATH": ""},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PUBLIC_URL" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0
    for name in ("PUBLIC_URL", "TWILIO_AUTH_TOKEN", "CARTESIA_API_KEY", "CARTESIA_URL", "CARTESIA_VERSION",
                 "CARTESIA_MODEL", "CARTESIA_VOICE_ID", "CARTESIA_LANGUAGE"):
        assert name in helped.stdout


def test_one_default_voice_for_the_config_and_the_emulator() -> None:
    from bridge.cartesia.emulator import DEFAULT_VOICE_ID
    from bridge.defaults import EMULATOR_DEFAULT_VOICE_ID

    assert Config().cartesia_voice_id == EMULATOR_DEFAULT_VOICE_ID == DEFAULT_VOICE_ID
