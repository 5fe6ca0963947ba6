"""``media-bridge chaos``: production failures together, in one bounded run, with figures.

Calls talk both ways (the bridge speaks the agent's text with the emulator's TTS; callers say
sentences in the emulator's tone voice, which the bridge's STT hears and turns into ``prompt``s)
while the emulator kills Cartesia sockets, answers 429s, drops ``done``s and delays chunks
(TTS and STT); a share of callers misbehave on the media socket (``hostile_callers``); a share
of calls get a hostile agent (``hostile_agent``); one bridge process talks to a hostile
Cartesia peer (``hostile_cartesia``); halfway the main bridge gets SIGTERM and drains while its
replacement takes the new calls (``runner``). ``report`` prints the figures and fails the run
when a must-be-zero figure is not zero (``integrity``: audio checked against the emulator's).
"""
