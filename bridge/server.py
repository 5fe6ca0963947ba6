"""The bridge's aiohttp application: routes, start-up, shutdown and drain.

Routes (one port):

* ``POST /twilio/voice``: voice webhook → ``<Connect><Stream>`` TwiML (or a
  polite ``<Say>`` refusal when full or draining).
* ``POST /twilio/stream-status``: stream status callbacks (logged, counted).
* ``POST /twilio/connect-action``: where Twilio goes when the stream ends;
  hands off (``<Redirect>`` to ``HANDOFF_URL`` with the agent's handoff data)
  or hangs up.
* ``GET /twilio/media``: the Media Streams WebSocket (signature checked on the
  upgrade, before any WebSocket is accepted).
* ``GET /metrics``, ``GET /healthz``, ``GET /readyz``.

Readiness (``/readyz``, ``bridge_ready``, and whether the webhook accepts a
call) is one decision, ``readiness()``: not ready while ``starting``, until a
Cartesia TTS socket has connected, when none has been connected for longer
than ``CARTESIA_DOWN_GRACE_S`` (``cartesia_unavailable``), and while
``draining`` or ``stopping``. ``bridge_ready`` is set at every change (pool
health callbacks, a timer at the end of the grace period, drain, stop) and a
``readiness_changed`` line logs each one with its reason.

Calls, webhook data waiting for its stream and handoff data live in the
``CallRegistry`` (at most ``2 × MAX_CALLS`` entries each, oldest evicted);
each call is a ``CallSession`` given the process's ``CallServices``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web

from bridge.agent.connector import AgentConnector
from bridge.agent.inline_client import self_test as agent_self_test
from bridge.agent.play_audio import PlayAudioFetcher
from bridge.agent.relay_settings import RelaySettingsError
from bridge.build import COMPILED_MODULES, interpreted_modules
from bridge.call import CallSettings
from bridge.cartesia.client import CartesiaPool
from bridge.cartesia.contexts import CallContexts
from bridge.cartesia.stt_client import SttAdmission, SttStream
from bridge.cartesia.stt_protocol import SttParams
from bridge.config import Config
from bridge.logs import log_event
from bridge.registry import CallRegistry
from bridge.session import CallHangUp, CallServices, CallSession
from metrics import BridgeMetrics
from metrics.http import metrics_handler
from telephony.inline_ws import FastPathStatus, InlineWebSocketResponse, self_test
from telephony.media import MAX_INBOUND_MESSAGE_BYTES
from telephony.signature import SignatureChecker
from telephony.twiml import connect_stream, say_and_hangup

log = logging.getLogger("bridge.server")

#: Longest a webhook's body may take to arrive (it is < 2 KB and sent at once by Twilio), s.
WEBHOOK_BODY_TIMEOUT_S: Final = 10.0
#: The event-loop lag monitor sleeps this long and records the overshoot.
LAG_PROBE_INTERVAL_S: Final = 0.1
#: aiohttp's own hard cap; messages between 64 KiB and this are rejected by
#: the codec with the call kept, beyond it aiohttp closes with 1009.
WS_HARD_MAX_MSG: Final = 1024 * 1024
#: Webhook parameters forwarded to the stream as <Parameter>s.
#: Concurrent HTTP connections for `play` downloads (the fetcher also bounds concurrent fetches).
PLAY_FETCH_CONNECTIONS: Final = 8
#: After a drain has ended its calls, how long it waits for them to release everything, s.
DRAIN_RELEASE_S: Final = 5.0
FORWARDED_PARAMS: Final = {"From": "from", "To": "to", "Direction": "direction"}
#: Webhook form fields kept for the agent's ``setup`` (ConversationRelay names them alike).
CALL_FACTS: Final = {"From": "from", "To": "to", "Direction": "direction", "CallerName": "caller_name",
                     "ForwardedFrom": "forwarded_from", "ParentCallSid": "parent_call_sid",
                     "CallStatus": "call_status"}


def emulator_settings_from(args: str) -> Any:
    """``EmulatorSettings`` from an ``EMULATOR_ARGS`` string (the emulator's own flags)."""
    import argparse
    import shlex

    from bridge.cartesia.emulator.cli import add_arguments, settings_from_args

    parser = argparse.ArgumentParser(prog="EMULATOR_ARGS", add_help=False, exit_on_error=False)
    add_arguments(parser)
    try:
        ns = parser.parse_args(shlex.split(args))
    except (argparse.ArgumentError, SystemExit) as exc:
        raise ValueError(f"EMULATOR_ARGS={args!r}: {exc}") from None
    return settings_from_args(ns)


class BridgeServer:
    """Holds the process-wide state: config, metrics, Cartesia pool, calls."""

    def __init__(
        self, config: Config, metrics: BridgeMetrics | None = None, *, emulator_settings: Any = None,
        registry: CallRegistry[CallSession] | None = None,
    ) -> None:
        self.config = config
        self._emulator_settings = emulator_settings
        self.metrics = metrics or BridgeMetrics()
        self.signatures = SignatureChecker(config.twilio_auth_token)
        # A worker of `serve --workers N` passes a SharedCallRegistry (bridge/shared_registry.py).
        self.registry: CallRegistry[CallSession] = registry if registry is not None else CallRegistry(
            max_entries=2 * config.max_calls)
        self.agents = AgentConnector(
            agent_url=config.agent_url,
            allowlist=config.agent_url_allowlist,
            token=config.agent_token,
            connect_timeout_s=config.agent_connect_timeout_s,
            greeting=config.greeting,
            max_links=config.max_calls,
            metrics=self.metrics,
            twilio_auth_token=config.twilio_auth_token,
        )
        self.streams: dict[CallSession, str | None] = {}  # every open media socket (-> peer), oldest first
        self.emulator: Any = None
        self.pool: CartesiaPool | None = None  # set in startup
        self.services: CallServices | None = None  # set in startup, once the pool exists
        self.fast_path = FastPathStatus(False, "not checked yet")  # set in startup
        self._lag_probe: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()  # prewarm tasks; owned so none is lost
        self.draining = False
        self.started = False
        self.stopping = False
        self._last_readiness: tuple[bool, str] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None  # re-checks readiness when the grace ends
        self.call_control: CallHangUp | None = None
        if config.twilio_account_sid and config.twilio_auth_token:
            from telephony.rest import CallControl

            self.call_control = CallControl(config.twilio_account_sid, config.twilio_auth_token)
        self.call_settings = CallSettings(
            model_id=config.cartesia_model,
            voice_id=config.cartesia_voice_id,
            language=config.cartesia_language,
            lead_ms=config.playout_lead_ms,
            mark_interval_ms=config.playout_mark_interval_ms,
            max_buffer_ms=config.playout_max_buffer_ms,
            max_buffer_delay_ms=config.cartesia_max_buffer_delay_ms,
            vad_enabled=config.vad_enabled,
            vad_threshold_rms=config.vad_threshold_rms,
            vad_min_speech_ms=config.vad_min_speech_ms,
            vad_hangover_ms=config.vad_hangover_ms,
            relay=config.relay,
        )
        self.play: PlayAudioFetcher | None = None
        self.play_http: aiohttp.ClientSession | None = None
        self.stt_admission = SttAdmission(config.cartesia_stt_max_concurrency, self.metrics.speech)

    # ------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/twilio/voice", self.voice_webhook)
        app.router.add_post("/twilio/stream-status", self.stream_status)
        app.router.add_post("/twilio/connect-action", self.connect_action)
        app.router.add_get("/twilio/media", self.media_stream)
        app.router.add_get("/metrics", metrics_handler(self.metrics))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def make_runner(self, **kwargs: Any) -> web.AppRunner:
        """The app's runner. ``keepalive_timeout`` also closes a connection that never completes a
        request (half-open headers): aiohttp's own default for a bare runner is an hour."""
        return web.AppRunner(self.app(), keepalive_timeout=self.config.http_idle_timeout_s, **kwargs)

    async def _on_startup(self, _app: web.Application) -> None:
        await self.startup()

    async def startup(self) -> None:
        config = self.config
        log_event(log, "bridge_starting", **config.summary())
        for event, detail in config.warnings():
            log_event(log, event, logging.WARNING, detail=detail)
        await self._check_fast_path()
        await self._check_agent_fast_path()
        if not self.signatures.enforced:
            log_event(log, "SIGNATURES_NOT_ENFORCED", logging.WARNING,
                      detail="TWILIO_AUTH_TOKEN is unset: anyone can call the webhook and open media streams. "
                             "Set it in production.")
        cartesia_url = config.cartesia_url
        if config.use_emulator:
            from bridge.cartesia.emulator import Emulator

            self.emulator = Emulator(self._emulator_settings or emulator_settings_from(config.emulator_args))
            cartesia_url = await self.emulator.start("127.0.0.1", 0)
            log_event(log, "embedded_emulator_started", logging.WARNING, url=cartesia_url,
                      detail="CARTESIA_API_KEY is unset: speech comes from the local Cartesia emulator")
        self.agents.start()
        self.pool = CartesiaPool(
            url=cartesia_url,
            api_key=config.cartesia_api_key,
            version=config.cartesia_version,
            metrics=self.metrics,
            size=config.cartesia_pool_size,
            max_concurrency=config.cartesia_max_concurrency,
            max_waiters=max(1, config.max_calls * 2),
            max_age_s=config.cartesia_socket_max_age_s,
            backoff_max_s=config.cartesia_reconnect_backoff_max_s,
        )
        self.pool.on_health_change.append(self.update_readiness)
        self.services = CallServices(
            settings=self.call_settings,
            metrics=self.metrics,
            registry=self.registry,
            agents=self.agents,
            tts=CallContexts.factory(self.pool, self.metrics,
                                     admission_timeout_s=config.cartesia_admission_timeout_s,
                                     context_timeout_s=config.cartesia_context_timeout_s,
                                     text_hold_ms=config.cartesia_text_hold_ms),
            fallback_line=config.fallback_line,
            call_control=self.call_control,
            stt=self._stt_factory(cartesia_url) if config.stt_enabled != "false" else None,
            stt_mode=config.stt_enabled,
            stt_model=config.cartesia_stt_model,
            play_fetch=self._play_fetcher(),
        )
        self.metrics.before_render.append(self.registry.flush_call_metrics)
        self.metrics.before_render.append(self.update_readiness)  # a scrape never shows a stale bridge_ready
        self.pool.start()
        self._lag_probe = asyncio.get_running_loop().create_task(self._probe_lag(), name="event-loop-lag")
        # Until every socket connected, or each has failed once (a refused key need not hold start-up).
        await self.pool.wait_attempted(5.0)
        if not self.pool.healthy:
            await self.pool.prewarm(0.5)  # another socket may be a moment from connecting
        self.started = True
        ready, reason = self.update_readiness()
        log_event(log, "bridge_started", logging.INFO if ready else logging.ERROR, ready=ready, reason=reason,
                  cartesia_sockets_open=self.pool.open_sockets, cartesia_pool_size=config.cartesia_pool_size,
                  compiled_modules=f"{len(COMPILED_MODULES) - len(interpreted_modules())}/{len(COMPILED_MODULES)}")

    def _play_fetcher(self) -> Callable[[str], Awaitable[bytes]] | None:
        """``play`` sources: allowlisted, fetched once, transcoded once, cached (bounded)."""
        if not self.config.play_url_allowlist:
            return None
        self.play_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PLAY_FETCH_CONNECTIONS))
        self.play = PlayAudioFetcher(self.play_http, self.config.play_url_allowlist, metrics=self.metrics)
        return self.play.fetch

    def _stt_factory(self, cartesia_url: str) -> Callable[[CallSession, SttParams], SttStream]:
        """Each listening call's STT socket, on the same Cartesia host as TTS."""
        config = self.config

        def open_stt(call: CallSession, params: SttParams) -> SttStream:
            return SttStream(base_url=cartesia_url, api_key=config.cartesia_api_key, version=config.cartesia_version,
                             params=params, listener=call, metrics=self.metrics.speech, admission=self.stt_admission,
                             log_fields={"call_sid": call.core.call_sid, "stream_sid": call.core.stream_sid},
                             replay_limit_bytes=config.stt_replay_limit_ms * 8,
                             coalesce_bytes=config.stt_send_interval_ms * 8 if config.stt_send_interval_ms > 20 else 0)
        return open_stt

    async def _check_fast_path(self) -> None:
        """Which path Twilio messages take here, checked on a loopback socket, logged and exported."""
        self.fast_path = await self_test(inline=self.config.twilio_fast_path)
        self.metrics.twilio_fast_path.set(1 if self.fast_path.active else 0)
        level = logging.INFO if self.fast_path.active or not self.config.twilio_fast_path else logging.WARNING
        log_event(log, "twilio_fast_path", level, active=self.fast_path.active, reason=self.fast_path.reason,
                  aiohttp=self.fast_path.aiohttp_version,
                  detail=None if self.fast_path.active else
                  "Twilio messages take aiohttp's receive() path: correct, but more CPU per call")

    async def _check_agent_fast_path(self) -> None:
        """Which path agent text takes here, checked on a loopback socket, logged and exported; agent
        sockets use the inline path only when the check saw it work."""
        status = await agent_self_test()
        self.agents.inline_receive = status.active
        self.metrics.agent_fast_path.set(1 if status.active else 0)
        log_event(log, "agent_fast_path", logging.INFO if status.active else logging.WARNING,
                  active=status.active, reason=status.reason, aiohttp=status.aiohttp_version,
                  detail=None if status.active else
                  "agent messages take aiohttp's reader task: correct, but more CPU per message")

    async def _probe_lag(self) -> None:
        """Event-loop lag: how late a 100 ms sleep wakes (one timer, ~10 wakeups/s)."""
        observe = self.metrics.event_loop_lag.observe
        interval = LAG_PROBE_INTERVAL_S
        clock = asyncio.get_running_loop().time
        while True:
            t = clock()
            await asyncio.sleep(interval)
            observe(max(0.0, clock() - t - interval))

    async def _on_shutdown(self, _app: web.Application) -> None:
        for call in list(self.calls):
            await call.hang_up("shutdown")

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        self.stopping = True
        self.update_readiness()
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.pool is not None:
            self.pool.on_health_change.clear()
        for task in list(self._background):
            task.cancel()
        if self._lag_probe is not None:
            self._lag_probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_probe
            self._lag_probe = None
        if self.pool is not None:
            await self.pool.close()
        await self.agents.close()
        if self.play is not None:
            await self.play.close()
            self.play = None
        if self.play_http is not None:
            await self.play_http.close()
            self.play_http = None
        if self.emulator is not None:
            await self.emulator.stop()
            self.emulator = None

    async def drain(self, grace_s: float) -> int:
        """Stop taking calls, let calls finish for ``grace_s``, end the rest.
        Returns how many calls had to be ended."""
        self.draining = True
        self.update_readiness()
        log_event(log, "drain_started", calls=len(self.calls), grace_s=grace_s)
        deadline = time.monotonic() + grace_s
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        remaining = list(self.calls)
        for call in remaining:
            await call.hang_up("drained")
        # Each ended call releases its contexts, agent and STT sockets in its own handler: wait for that
        # (bounded), so the process does not close the shared pool under calls still letting go of it.
        release_by = time.monotonic() + DRAIN_RELEASE_S
        while any(call in self.streams for call in remaining) and time.monotonic() < release_by:
            await asyncio.sleep(0.02)
        log_event(log, "drain_finished", ended_calls=len(remaining))
        return len(remaining)

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)``: may this process take a new call? Reasons:
        ``ready``, ``starting``, ``stopping``, ``draining``, ``cartesia_unavailable``
        (no TTS socket has ever connected, or none for ``CARTESIA_DOWN_GRACE_S``;
        a reconnect shorter than that does not count)."""
        pool = self.pool
        if self.stopping:
            return False, "stopping"
        if not self.started or pool is None:
            return False, "starting"
        if self.draining:
            return False, "draining"
        if pool.healthy:
            return True, "ready"
        if not pool.ever_connected or pool.down_for_s >= self.config.cartesia_down_grace_s:
            return False, "cartesia_unavailable"
        return True, "ready"

    @property
    def ready(self) -> bool:
        """Ready for new calls (see ``readiness``)."""
        return self.readiness()[0]

    def update_readiness(self) -> tuple[bool, str]:
        """Recompute readiness; on a change set ``bridge_ready`` and log it.
        While Cartesia is down inside its grace period, a timer re-checks at
        its end, so ``bridge_ready`` drops without waiting for a request."""
        state = self.readiness()
        ready, reason = state
        pool = self.pool
        if ready and pool is not None and not pool.healthy and self._grace_timer is None:
            left = max(0.0, self.config.cartesia_down_grace_s - pool.down_for_s)
            self._grace_timer = asyncio.get_running_loop().call_later(left + 0.01, self._grace_ended)
        if state == self._last_readiness:
            return state
        self._last_readiness = state
        self.metrics.ready.set(1 if ready else 0)
        if self.started and not self.stopping:
            level = logging.ERROR if reason == "cartesia_unavailable" else logging.INFO
            log_event(log, "readiness_changed", level, ready=ready, reason=reason,
                      cartesia_down_for_s=round(pool.down_for_s, 3) if pool is not None else None)
        return state

    def _grace_ended(self) -> None:
        self._grace_timer = None
        self.update_readiness()

    @property
    def calls(self) -> set[CallSession]:
        """The live calls (the registry's set)."""
        return self.registry.calls

    # --------------------------------------------------------------- routes

    async def _check_webhook_signature(self, request: web.Request, path: str, endpoint: str) -> dict[str, str]:
        try:
            # A body trickled in byte by byte would hold this handler forever: Twilio sends it at once.
            async with asyncio.timeout(WEBHOOK_BODY_TIMEOUT_S):
                body = await request.post()
        except TimeoutError:
            self.metrics.webhooks.labels(result="body_timeout").inc()
            log_event(log, "webhook_body_timeout", logging.WARNING, endpoint=endpoint, remote=request.remote,
                      timeout_s=WEBHOOK_BODY_TIMEOUT_S)
            raise web.HTTPRequestTimeout(text="request body too slow") from None
        form = {k: str(v) for k, v in body.items()}
        url = self.config.public(path)
        raw_query = request.rel_url.raw_query_string  # as Twilio signed it (still percent-encoded)
        if raw_query:
            url += "?" + raw_query
        if not self.signatures.webhook_ok(url, form, request.headers.get("X-Twilio-Signature")):
            self.metrics.signature_failures.labels(endpoint=endpoint).inc()
            log_event(log, "signature_rejected", logging.WARNING, endpoint=endpoint, call_sid=form.get("CallSid"),
                      remote=request.remote)
            raise web.HTTPForbidden(text="invalid X-Twilio-Signature")
        return form

    async def voice_webhook(self, request: web.Request) -> web.Response:
        form = await self._check_webhook_signature(request, "/twilio/voice", "voice")
        call_sid = form.get("CallSid", "")
        if not call_sid:
            self.metrics.webhooks.labels(result="bad_request").inc()
            raise web.HTTPBadRequest(text="CallSid is required")
        self.registry.expire_pending()
        ready, reason = self.update_readiness()
        if not ready or self.registry.occupancy >= self.config.max_calls:
            reason = reason if not ready else "max_calls"
            self.metrics.calls_refused.labels(reason=reason).inc()
            self.metrics.webhooks.labels(result="refused").inc()
            log_event(log, "call_refused", logging.WARNING, call_sid=call_sid, reason=reason)
            # A bridge that cannot speak says sorry (FALLBACK_LINE, via Twilio's <Say>); a full one says busy.
            line = self.config.fallback_line if reason == "cartesia_unavailable" else self.config.busy_line
            return web.Response(text=say_and_hangup(line), content_type="text/xml")
        # Warm the pool while the phone rings: the first utterance pays no handshake.
        assert self.pool is not None  # ready implies started
        task = asyncio.get_running_loop().create_task(self.pool.prewarm(2.0), name="prewarm")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        params = {ours: form[theirs] for theirs, ours in FORWARDED_PARAMS.items() if form.get(theirs)}
        try:
            # ConversationRelay attributes, agentUrl and the call's own parameters, all as <Parameter>s.
            self.config.relay.merged(request.query)
        except RelaySettingsError as exc:
            self.metrics.webhooks.labels(result="bad_request").inc()
            self.metrics.calls_refused.labels(reason="bad_request").inc()
            log_event(log, "call_refused", logging.WARNING, call_sid=call_sid, reason="bad_request", error=str(exc))
            return web.Response(text=say_and_hangup(self.config.busy_line), content_type="text/xml")
        params.update({k: v for k, v in request.query.items() if k and v and k not in params})
        try:
            twiml = connect_stream(
                stream_url=self.config.public_ws_base + "/twilio/media",
                status_callback=self.config.public("/twilio/stream-status"),
                parameters=params,
                action=self.config.public("/twilio/connect-action"),
            )
        except ValueError as exc:
            # e.g. a <Parameter> too long for Twilio: the caller still gets a polite answer.
            self.metrics.webhooks.labels(result="bad_request").inc()
            self.metrics.calls_refused.labels(reason="bad_request").inc()
            log_event(log, "call_refused", logging.WARNING, call_sid=call_sid, reason="bad_request", error=str(exc))
            return web.Response(text=say_and_hangup(self.config.busy_line), content_type="text/xml")
        # ConversationRelay's sessionId is its own (VX...), distinct from the CallSid.
        info = {"session_id": "VX" + uuid.uuid4().hex}
        info.update({ours: form[theirs] for theirs, ours in CALL_FACTS.items() if form.get(theirs)})
        self.registry.expect(call_sid, info)
        self.metrics.webhooks.labels(result="connected").inc()
        log_event(log, "webhook_answered", call_sid=call_sid)
        return web.Response(text=twiml, content_type="text/xml")

    async def stream_status(self, request: web.Request) -> web.Response:
        form = await self._check_webhook_signature(request, "/twilio/stream-status", "stream_status")
        event = form.get("StreamEvent", "")
        level = logging.WARNING if event == "stream-error" else logging.INFO
        log_event(log, "stream_status", level, call_sid=form.get("CallSid"), stream_sid=form.get("StreamSid"),
                  status=event, error=form.get("StreamError"))
        return web.Response(status=204)

    async def connect_action(self, request: web.Request) -> web.Response:
        form = await self._check_webhook_signature(request, "/twilio/connect-action", "connect_action")
        call_sid = form.get("CallSid", "")
        found, data = self.registry.take_handoff(call_sid)
        handoff_url = self.config.handoff_url
        if found and handoff_url:
            target = handoff_url + ("&" if "?" in handoff_url else "?") + urlencode(
                {"HandoffData": data if isinstance(data, str) else orjson.dumps(data).decode()}
            )
            twiml = say_and_hangup("", redirect_url=target)
        else:
            from twilio.twiml.voice_response import VoiceResponse

            twiml = str(VoiceResponse().hangup())
        log_event(log, "connect_action", call_sid=call_sid, handoff=found)
        return web.Response(text=twiml, content_type="text/xml")

    async def media_stream(self, request: web.Request) -> web.StreamResponse:
        signed_url = self.config.public_ws_base + "/twilio/media"
        if not self.signatures.websocket_ok(signed_url, request.headers.get("X-Twilio-Signature")):
            self.metrics.signature_failures.labels(endpoint="media").inc()
            log_event(log, "signature_rejected", logging.WARNING, endpoint="media", remote=request.remote)
            raise web.HTTPForbidden(text="invalid X-Twilio-Signature")
        # A socket costs memory until it sends start: a bounded number may wait, each for a bounded time.
        # When full, the oldest waiting socket is closed rather than the new one refused: Twilio sends
        # start within milliseconds of the upgrade, so a flood of idle sockets cannot lock real calls out.
        limit = self.config.media_max_unstarted
        waiting = [s for s in self.streams if not s.started and not s.closed]
        if len(waiting) >= limit:
            self._close_unstarted(waiting[0], "unstarted_limit")
        ws = InlineWebSocketResponse(max_msg_size=WS_HARD_MAX_MSG, compress=False, autoping=True,
                                     inline=self.fast_path.active)
        await ws.prepare(request)
        assert self.services is not None, "media stream before start-up"
        session = CallSession(self.services, ws)
        self.streams[session] = request.remote
        timer = asyncio.get_running_loop().call_later(self.config.media_start_timeout_s, self._start_timeout, session)
        try:
            await session.run()
        finally:
            timer.cancel()
            self.streams.pop(session, None)
        return ws

    def _start_timeout(self, session: CallSession) -> None:
        if not session.started and not session.closed:
            self._close_unstarted(session, "start_timeout")

    def _close_unstarted(self, session: CallSession, reason: str) -> None:
        self.metrics.media_streams_refused.labels(reason=reason).inc()
        log_event(log, "media_stream_refused", logging.WARNING, reason=reason, remote=self.streams.get(session),
                  limit=self.config.media_max_unstarted, timeout_s=self.config.media_start_timeout_s)
        session.closed = True  # at once, so the next upgrade does not count it as waiting
        task = asyncio.get_running_loop().create_task(session.hang_up(reason), name="unstarted-close")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "calls": len(self.calls)})

    async def readyz(self, _request: web.Request) -> web.Response:
        """200 when ready; 503 with ``reason`` (see ``readiness``) otherwise."""
        ready, reason = self.update_readiness()
        pool = self.pool
        body = {
            "ready": ready,
            "reason": reason,
            "draining": self.draining,
            "calls": len(self.calls),
            "cartesia_connected": bool(pool is not None and pool.healthy),
            "cartesia_sockets_open": pool.open_sockets if pool is not None else 0,
            "cartesia_down_for_s": round(pool.down_for_s, 3) if pool is not None else None,
        }
        return web.json_response(body, status=200 if ready else 503)


assert MAX_INBOUND_MESSAGE_BYTES < WS_HARD_MAX_MSG
