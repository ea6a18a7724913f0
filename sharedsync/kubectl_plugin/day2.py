"""The day-2 commands: set the operator's annotation on a SharedVolume, and with ``--wait``
follow its status until the operator reports the outcome.

Nothing here acts on replicas: the operator does (operator/README.md, "Day-2 operations"). So
what counts as done is read from what the operator writes, exactly as documented:

- sync-now: ``status.lastSyncNow`` equals the value we set (a fresh timestamp, so an earlier
  request can never look like ours);
- switchover: ``status.primary`` is the target and the annotation is gone (the operator removes
  it once the promotion was made);
- rebuild: once the operator took the request (it removes the annotation), the target's
  replica was seen ``Rebuilding`` and is ``InSync`` again.

Requests the operator refuses are reported as Warning events (SwitchoverRefused,
RebuildRefused); a wait stops with the operator's message when a new one appears. Obvious
mistakes (a node with no replica, rebuilding the primary) are refused here before anything is
written, from the layout the operator keeps in status.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

from .kube import Cluster, Obj, PluginError
from .render import REBUILD, SWITCHOVER, SYNC_NOW

#: How often a wait reads the volume (and its events) again.
POLL_INTERVAL = 1.0
SWITCHOVER_REFUSED = "SwitchoverRefused"
REBUILD_REFUSED = "RebuildRefused"
REBUILD_STARTED = "RebuildStarted"

#: A wait's judgement of the volume and of the events about it that are newer than the
#: request: None to keep waiting, else the line that says it is done.
Verdict = Callable[[Obj, list[Obj]], str | None]


def now_stamp() -> str:
    """The sync-now value: an RFC 3339 UTC time with microseconds, unique per request."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _name(volume: Obj) -> str:
    return str(volume["metadata"]["name"])


def _status(volume: Obj) -> Obj:
    status: Obj = volume.get("status") or {}
    return status


def _replica(volume: Obj, node: str) -> Obj | None:
    for replica in _status(volume).get("replicas") or ():
        if replica.get("node") == node:
            found: Obj = replica
            return found
    return None


def _check_holds_replica(volume: Obj, node: str) -> None:
    nodes = [str(r.get("node")) for r in _status(volume).get("replicas") or ()]
    if nodes and node not in nodes:
        raise PluginError(f"error: node {node} holds no replica of SharedVolume {_name(volume)} "
                          f"(its replicas: {', '.join(nodes)})")


class Waiter:
    """Polls one SharedVolume (and the events about it) until a verdict, a refusal, or the
    deadline."""

    def __init__(self, cluster: Cluster, volume: Obj, limit: float, out: TextIO,
                 refusals: frozenset[str] = frozenset(), events: bool = False) -> None:
        self.cluster = cluster
        self.name = _name(volume)
        self.uid = str(volume["metadata"].get("uid") or "")
        self.limit = limit
        self.out = out
        self.refusals = refusals
        self.follow_events = events or bool(refusals)
        self._seen_events: set[str] | None = None

    async def remember_events(self) -> None:
        """Take note of the events that exist before the request: only later ones count. Call
        it before making the request. Without the right to list events, none are followed."""
        if self.follow_events and self.uid:
            events = await self.cluster.events(self.uid)
            if events is not None:
                self._seen_events = {str(e["metadata"]["name"]) for e in events}

    async def _new_events(self) -> list[Obj]:
        if self._seen_events is None:
            return []
        seen = self._seen_events
        return [e for e in await self.cluster.events(self.uid) or ()
                if str(e["metadata"]["name"]) not in seen]

    async def until(self, what: str, verdict: Verdict,
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> Obj:
        deadline = time.monotonic() + self.limit
        while True:
            volume = await self.cluster.volume(self.name)
            if volume is None:
                raise PluginError(f"error: SharedVolume {self.name} was deleted while waiting "
                                  f"for {what}")
            events = await self._new_events()
            done = verdict(volume, events)
            if done is not None:
                print(done, file=self.out, flush=True)
                return volume
            for event in events:
                if event.get("reason") in self.refusals:
                    raise PluginError(f"error: the operator refused: {event.get('reason')}: "
                                      f"{event.get('message') or ''}")
            if time.monotonic() >= deadline:
                raise PluginError(
                    f"error: timed out after {self.limit:g}s waiting for {what} on "
                    f"SharedVolume {self.name}; is the operator running? (kubectl describe "
                    f"sv {self.name}, kubectl get events -A --field-selector "
                    f"involvedObject.name={self.name})")
            await sleep(POLL_INTERVAL)


def _time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _event_time(event: Obj) -> datetime.datetime | None:
    return _time(event.get("eventTime")) or _time(event.get("lastTimestamp")) \
        or _time(event.get("firstTimestamp"))


async def sync_now(cluster: Cluster, volume: Obj, *, wait: float | None,
                   out: TextIO) -> None:
    name, stamp = _name(volume), now_stamp()
    await cluster.annotate(name, {SYNC_NOW: stamp})
    print(f"sharedvolume/{name}: {SYNC_NOW}={stamp} requested", file=out, flush=True)
    if wait is None:
        return

    def synced(v: Obj, events: list[Obj]) -> str | None:
        del events
        if _status(v).get("lastSyncNow") == stamp:
            return f"sharedvolume/{name}: synced ({SYNC_NOW}={stamp} done)"
        return None

    await Waiter(cluster, volume, wait or 0.0, out).until(f"sync-now {stamp}", synced)


async def switchover(cluster: Cluster, volume: Obj, node: str, *, wait: float | None,
                     out: TextIO) -> None:
    name = _name(volume)
    annotations = volume["metadata"].get("annotations") or {}
    if _status(volume).get("primary") == node and SWITCHOVER not in annotations:
        print(f"sharedvolume/{name}: {node} is the primary already", file=out, flush=True)
        return
    _check_holds_replica(volume, node)
    waiter = Waiter(cluster, volume, wait or 0.0, out, frozenset({SWITCHOVER_REFUSED}))
    if wait is not None:
        await waiter.remember_events()
    await cluster.annotate(name, {SWITCHOVER: node})
    print(f"sharedvolume/{name}: switchover to {node} requested", file=out, flush=True)
    if wait is None:
        return

    def moved(v: Obj, events: list[Obj]) -> str | None:
        del events
        status = _status(v)
        pending = SWITCHOVER in (v["metadata"].get("annotations") or {})
        if status.get("primary") == node and not pending:
            return f"sharedvolume/{name}: primary is {node} (epoch {status.get('epoch')})"
        return None

    await waiter.until(f"the primary to move to {node}", moved)


async def rebuild(cluster: Cluster, volume: Obj, node: str, *, wait: float | None,
                  out: TextIO) -> None:
    name = _name(volume)
    if _status(volume).get("primary") == node:
        raise PluginError(f"error: node {node} holds the primary of SharedVolume {name}; move "
                          f"it first (kubectl sharedsync switchover {name} --to OTHER-NODE)")
    _check_holds_replica(volume, node)
    waiter = Waiter(cluster, volume, wait or 0.0, out, frozenset({REBUILD_REFUSED}))
    if wait is not None:
        await waiter.remember_events()
    await cluster.annotate(name, {REBUILD: node})
    print(f"sharedvolume/{name}: rebuild of the replica on {node} requested", file=out,
          flush=True)
    if wait is None:
        return
    seen_rebuilding = False

    def rebuilt(v: Obj, events: list[Obj]) -> str | None:
        """Done once the replica was seen Rebuilding and is InSync again; or, for a rebuild
        too quick for any status to show it, once it is InSync with a last sync later than the
        operator's RebuildStarted event."""
        nonlocal seen_rebuilding
        if REBUILD in (v["metadata"].get("annotations") or {}):
            return None  # not taken yet: a Rebuilding now would be an earlier rebuild's
        replica = _replica(v, node) or {}
        state = replica.get("state")
        if state == "Rebuilding" and not seen_rebuilding:
            seen_rebuilding = True
            print(f"sharedvolume/{name}: replica on {node} is Rebuilding", file=out, flush=True)
        elif seen_rebuilding and state == "Failed":
            raise PluginError(f"error: the rebuild of the replica on {node} failed: "
                              f"{replica.get('message') or 'no message'}")
        if state != "InSync":
            return None
        started = [t for e in events if e.get("reason") == REBUILD_STARTED
                   and (t := _event_time(e)) is not None]
        synced_at = _time(replica.get("lastSyncTime"))
        quick = bool(started) and synced_at is not None and synced_at > max(started)
        if seen_rebuilding or quick:
            return f"sharedvolume/{name}: replica on {node} rebuilt and InSync"
        return None

    await waiter.until(f"the replica on {node} to be rebuilt", rebuilt)
