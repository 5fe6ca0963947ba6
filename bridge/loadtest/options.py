"""What one load-test run does: its options, the scenarios and the local defaults."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from bridge.defaults import EMULATOR_DEFAULT_VOICE_ID

SCENARIOS: Final = ("talk", "conversation", "barge-in", "idle", "spoken")
DEFAULT_EMULATOR_ARGS: Final = "--ttfb-ms 90 --rtf 0.25 --jitter-ms 10"
#: The local bridge speaks with the emulator's deterministic "Tone Alto" voice.
VOICE_ID: Final = EMULATOR_DEFAULT_VOICE_ID
#: One sentence: "Hello! You are ..." made the greeting's first generation one word (67 ms of audio at
#: 15 words/s), shorter than Cartesia's time to the next generation's first chunk, so every call
#: heard a gap inside its greeting (an underrun the scenario made, not the load; issue 18).
GREETING: Final = "Hello, you are connected to the media bridge load test."


@dataclass
class Options:
    """One run: ``calls`` placed evenly over ``ramp_s`` s, each ``duration_s`` s after its stream starts.

    Without ``target`` the emulator runs in this process and the bridge as a child process; the
    whole run is cut after ``timeout_s`` (default ramp + duration + 60 s).
    """

    calls: int = 20
    ramp_s: float = 5.0
    duration_s: float = 10.0
    scenario: str = "talk"
    target: str | None = None
    auth_token: str | None = None
    public_url: str | None = None
    emulator_args: str = DEFAULT_EMULATOR_ARGS
    agent_url: str | None = None
    report: str = "out/loadtest"
    timeout_s: float | None = None
    seed: int = 1
    bridge_env: dict[str, str] = field(default_factory=dict)
    sample_interval_s: float = 1.0
    progress: bool = True
    #: Simulated callers spread over this many worker processes (1: in this process).
    caller_procs: int = 1
    #: CPU sets ("0", "0,1", "2-3") for the bridge process and for this process (+ workers).
    bridge_cpus: str | None = None
    load_cpus: str | None = None
    #: Start ``bridge.loadtest.agent_server`` as its own process (pinned with ``load_cpus``) and point the
    #: bridge's ``AGENT_URL`` at it, instead of the bridge's built-in demo agent.
    agent_server: bool = False
    #: Flags for that server (e.g. ``"--tokens-per-s 50"``).
    agent_server_args: str = ""
    #: ``spoken`` scenario: sentence -> the caller's μ-law 8 kHz audio, fetched once from the emulator
    #: by the runner (``spoken.prefetch_speech``) and shared by every call (and caller worker).
    speech: dict[str, bytes] | None = None
    #: Test hook: awaited with the LoadTest once all calls have started their ramp.
    during: Callable[[Any], Coroutine[Any, Any, None]] | None = None

    @property
    def run_timeout_s(self) -> float:
        """Hard limit of the run, s."""
        return self.timeout_s or (self.ramp_s + self.duration_s + 60.0)
