"""``media-bridge loadtest``: many simulated Twilio calls, a JSON and an HTML report.

Without ``--target`` it runs a Cartesia emulator on its own event loop and
starts the bridge as a separate process (``media-bridge serve``) pointed at
it, so the bridge's CPU and RSS (sampled with psutil) are its own. With
``--target URL`` it drives a bridge already running elsewhere.

Each call is a ``telephony.simulator.SimulatedCall`` (signed webhook, TwiML,
signed upgrade, inbound media every 20 ms, an ear that plays at 8000 B/s,
echoes marks, honours ``clear``), placed at ``i * ramp_s / calls`` and hung up
(``stop``) ``duration_s`` after its stream started. Scenarios, driven by the
built-in demo agent (or ``--agent-url``, or ``--agent-server``: our external
agent process, ``agent_server``, with the same texts streamed word by word):

* ``talk``: greeting, then DTMF 9 (a long passage) each time the line has
  been quiet for 1 s: the agent speaks nearly all the time;
* ``conversation``: greeting, then a DTMF digit (read back) after a pause of
  0.3-1.0 s each time the line goes quiet;
* ``barge-in``: greeting, DTMF 9, and 1-2 s after its audio starts the caller
  talks for 0.6 s (loud inbound frames) so the bridge's VAD clears;
* ``idle``: greeting only, then the call stays connected (inbound audio every
  20 ms, nothing to say): for the memory of an idle call;
* ``spoken``: greeting, then sentences said in the emulator's tone voice, heard by
  the bridge's STT (``STT_ENABLED=true``), answered "You said ..." by the agent; some
  said over the previous reply (barge-in). See ``spoken`` and ``spoken_report``.

Capacity runs: ``--bridge-cpus`` / ``--load-cpus`` pin the bridge and this
process (emulator + callers) to CPU sets (``taskset``; ``sched_setaffinity``
when it is missing); ``--caller-procs K`` spreads the simulated callers over K
worker processes (the emulator, sampler and analysis stay here; workers send
back each call's record when done).

Modules: ``options`` (what a run does), ``scenarios`` (what a caller does),
``runner`` (one run), ``processes`` (the bridge child process, CPU pinning,
psutil), ``results`` (per-call figures), ``integrity`` (caller audio vs the
emulator's), ``stats`` (distributions), ``report`` (JSON, and the definitions
of every figure), ``html_report`` (the HTML page), ``cli``, ``agent_server`` (the
external agent), ``spoken`` / ``turns`` / ``spoken_report`` (the spoken scenario and its figures).
"""

from .cli import main
from .integrity import AudioIndex, Span, explain_mismatch, split_utterances
from .options import Options
from .report import SCHEMA, build_report, integrity_summary
from .results import CallResult, analyze_call
from .runner import LoadTest

__all__ = [
    "SCHEMA",
    "AudioIndex",
    "CallResult",
    "LoadTest",
    "Options",
    "Span",
    "analyze_call",
    "build_report",
    "explain_mismatch",
    "integrity_summary",
    "main",
    "split_utterances",
]
