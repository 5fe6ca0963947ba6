"""Webhook call data and handoffs shared by the workers of ``media-bridge serve --workers N``.

The webhook, the media stream and the ``<Connect action>`` request of one call are three
connections, and with ``SO_REUSEPORT`` the kernel may hand each to a different worker. The
in-process ``CallRegistry`` would then lose the webhook's call data (``sessionId``, caller
name, forwarded-from, parent call, call status, the webhook time) and the agent's
``handoffData``. ``SharedCallRegistry`` keeps those two kinds of entries in small files under
a directory the supervisor creates for the process group (on the pod's ``/tmp``, a memory
``emptyDir`` in ``deploy/``), so any worker can take them; live calls stay in memory (a call
lives on exactly one worker).

Why files and not ``<Parameter>``s for the call data: the handoff data is only known after the
TwiML was sent, so it needs a store any worker can read anyway; one store for both keeps the
TwiML and the single-process behaviour unchanged, keeps the webhook-to-start latency metric
(``CLOCK_MONOTONIC`` is the same clock in every process of the host), and lets the webhook's
worker see when its pending call was taken, so its admission count (``occupancy``) does not
keep ghosts of calls that streamed to a sibling.

Bounds: each worker keeps at most ``max_entries`` pending webhooks of its own (oldest
evicted) for at most ``pending_ttl_s``; the handoff directory holds at most ``max_entries``
files (oldest evicted) and a file older than ``pending_ttl_s`` is swept. Each file is one
entry: a few hundred bytes of call data, or the agent's ``handoffData`` (bounded by the agent
message limit). Writes are atomic (temporary file, then ``os.replace``); a take claims the
file with ``os.rename`` first, so two workers never both take one entry. File names are a
hash of the CallSid (no path from the request reaches the file system). A write that fails
(the ``emptyDir`` full) is logged as ``shared_store_failed`` and costs that call its webhook
data or handoff, never the webhook itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final

import orjson

from bridge.logs import log_event
from bridge.registry import PENDING_CALL_TTL_S, CallRegistry, CallT

log = logging.getLogger("bridge.shared_registry")

#: How often a worker sweeps entries left by a worker that died (seconds).
ORPHAN_SWEEP_INTERVAL_S: Final = 10.0


def _file_name(call_sid: str) -> str:
    return hashlib.sha256(call_sid.encode()).hexdigest()[:40] + ".json"


class SharedCallRegistry(CallRegistry[CallT]):
    """``CallRegistry`` with pending webhook data and handoffs in ``directory`` (see module doc).

    Limits: ``max_entries`` pending webhooks per worker and handoff files per directory,
    ``pending_ttl_s`` seconds for either.
    """

    def __init__(self, directory: Path, max_entries: int, pending_ttl_s: float = PENDING_CALL_TTL_S) -> None:
        super().__init__(max_entries, pending_ttl_s)
        self._pending_dir = directory / "pending"
        self._handoff_dir = directory / "handoffs"
        self._pending_dir.mkdir(parents=True, exist_ok=True)
        self._handoff_dir.mkdir(parents=True, exist_ok=True)
        # call_sid -> answered at (monotonic s): webhooks this worker answered whose stream has
        # not started yet on any worker; the file's existence says whether it has.
        self._mine: OrderedDict[str, float] = OrderedDict()
        self._next_sweep = 0.0

    # ------------------------------------------------------------- files

    @staticmethod
    def _write(path: Path, payload: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(payload))
        os.replace(tmp, path)

    @staticmethod
    def _take(path: Path) -> dict[str, Any] | None:
        claimed = path.with_name(f".{path.name}.{os.getpid()}.taken")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:  # never stored, expired, or taken by a sibling
            return None
        except OSError as exc:
            log_event(log, "shared_store_failed", logging.WARNING, entry=path.parent.name, error=str(exc))
            return None
        try:
            data = orjson.loads(claimed.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            data = None
        claimed.unlink(missing_ok=True)
        return data if isinstance(data, dict) else None

    def _sweep_orphans(self) -> None:
        """Remove entries older than the TTL, whoever wrote them (a worker that died cannot)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + ORPHAN_SWEEP_INTERVAL_S
        cutoff = time.time() - self.pending_ttl_s
        for directory in (self._pending_dir, self._handoff_dir):
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                log_event(log, "shared_store_failed", logging.WARNING, entry=directory.name, error=str(exc))
                continue
            for entry in entries:
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    # -------------------------------------------------------- webhook data

    @property
    def occupancy(self) -> int:
        """This worker's live calls plus its answered webhooks whose stream has not started."""
        return len(self.calls) + len(self._mine)

    def _write_or_log(self, path: Path, payload: dict[str, Any], call_sid: str, what: str) -> bool:
        """Write an entry; a full or broken file system costs this call its data, never the webhook."""
        try:
            self._write(path, payload)
        except OSError as exc:
            log_event(log, "shared_store_failed", logging.WARNING, call_sid=call_sid, entry=what, error=str(exc))
            return False
        return True

    def expect(self, call_sid: str, info: dict[str, str]) -> None:
        now = time.monotonic()
        if not self._write_or_log(self._pending_dir / _file_name(call_sid), {"at": now, "info": info}, call_sid,
                                  "webhook"):
            return
        self._mine[call_sid] = now
        self._mine.move_to_end(call_sid)
        while len(self._mine) > self.max_entries:
            old, _ = self._mine.popitem(last=False)
            (self._pending_dir / _file_name(old)).unlink(missing_ok=True)

    def take_call_info(self, call_sid: str) -> tuple[dict[str, str], float | None]:
        self._mine.pop(call_sid, None)
        entry = self._take(self._pending_dir / _file_name(call_sid))
        if entry is None:
            return {}, None
        answered_at, info = entry.get("at"), entry.get("info")
        if not isinstance(answered_at, float) or not isinstance(info, dict) \
                or time.monotonic() - answered_at > self.pending_ttl_s:
            return {}, None
        return {str(k): str(v) for k, v in info.items()}, answered_at

    def expire_pending(self) -> None:
        cutoff = time.monotonic() - self.pending_ttl_s
        for call_sid, answered_at in list(self._mine.items()):
            path = self._pending_dir / _file_name(call_sid)
            if answered_at <= cutoff:
                path.unlink(missing_ok=True)
                del self._mine[call_sid]
            elif not path.exists():  # its stream started, here or on a sibling
                del self._mine[call_sid]
        self._sweep_orphans()

    # ------------------------------------------------------------- handoffs

    def store_handoff(self, call_sid: str, data: Any) -> None:
        if not self._write_or_log(self._handoff_dir / _file_name(call_sid), {"data": data}, call_sid, "handoff"):
            return
        try:
            entries = [e for e in os.scandir(self._handoff_dir) if not e.name.startswith(".")]
        except OSError:
            return
        if len(entries) > self.max_entries:
            def mtime(entry: os.DirEntry[str]) -> float:
                try:
                    return entry.stat().st_mtime
                except FileNotFoundError:
                    return 0.0
            for entry in sorted(entries, key=mtime)[: len(entries) - self.max_entries]:
                Path(entry.path).unlink(missing_ok=True)

    def has_handoff(self, call_sid: str) -> bool:
        return (self._handoff_dir / _file_name(call_sid)).exists()

    def take_handoff(self, call_sid: str) -> tuple[bool, Any]:
        entry = self._take(self._handoff_dir / _file_name(call_sid))
        if entry is None:
            return False, None
        return True, entry.get("data")
