"""One spoken caller turn of the ``spoken`` scenario, as a call records it (no I/O, picklable).

Kept apart from ``spoken`` so that ``results.CallResult`` can hold turns without an
import cycle (``spoken`` needs ``CallResult``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SpokenTurn:
    """A sentence the simulated caller said and what came back (times: ``time.monotonic`` s).

    ``outcome``: ``replied`` (reply audio arrived), ``lost`` (no reply within the response
    timeout), ``cut`` (the call ended first). ``reply_offset`` is where the reply's first
    byte sits in the call's ``received_audio`` (the start of its utterance), from which the
    report finds the reply's text.
    """

    sentence: str
    barge_in: bool
    t_say: float
    #: First and last frame of the sentence written to the bridge's socket.
    t_speech_start: float | None = None
    t_speech_end: float | None = None
    #: Barge-in turns: when the bridge's ``clear`` arrived (None: it never cleared).
    t_clear: float | None = None
    t_reply: float | None = None
    reply_offset: int | None = None
    outcome: str = "pending"

    @property
    def reply_latency_s(self) -> float | None:
        """End of the caller's speech (last frame sent) -> first reply frame arrived, s."""
        if self.t_reply is None or self.t_speech_end is None:
            return None
        return self.t_reply - self.t_speech_end
