"""
How the cluster talks to Redis: its keys, one reconnecting connection, and
stream entries to records and back (the engine's plumbing, apart from its
logic: ``engine.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred

from trainstream.config import RedisURL
from trainstream.errors import ConfigError
from trainstream.hub import make_record
from trainstream.store import Record

#: Seconds a Redis command may take before its connection is given up.
REPLY_TIMEOUT = 5.0


class Keys:
    """The cluster's Redis keys, all under one prefix (two clusters may share a Redis)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.counter = prefix + "seq"
        self.stream = prefix + "events"
        self.epoch = prefix + "epoch"
        self.times = prefix + "times"
        self.leader = prefix + "leader"

    def batch(self, token: str) -> str:
        return self.prefix + "batch:" + token


def load_txredisapi() -> Any:
    """txredisapi, imported only now; if missing, a ConfigError saying how to install it."""
    try:
        import txredisapi  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("--redis needs txredisapi: pip install 'trainstream[redis]'") from None
    return txredisapi


def redis_text(value: object) -> str:
    """A Redis reply's string (txredisapi decodes to ``str``; ``bytes`` are taken too)."""
    return value.decode() if isinstance(value, bytes) else str(value)


#: The segment field of a control entry (a cluster-wide ``DELETE``), not an event.
CONTROL = -1


def entry_fields(entry: Sequence[Any]) -> tuple[int, int, dict[str, object], str]:
    """A stream entry ``[id, [field, value, ...]]``: its id, segment, event (or control), origin."""
    raw_id, flat = entry
    event_id = int(redis_text(raw_id).split("-", 1)[0])
    fields = {redis_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    event: dict[str, object] = json.loads(redis_text(fields["e"]))
    if event.get("type") == "metric" and isinstance(event.get("value"), str):
        event["value"] = float(str(event["value"]))  # "NaN", "Infinity" on the wire
    return event_id, int(redis_text(fields["s"])), event, redis_text(fields.get("o", ""))


def entry_record(entry: Sequence[Any]) -> tuple[Record, str]:
    """An event's stream entry as the Record the publishing server would make, and its origin."""
    event_id, segment, event, origin = entry_fields(entry)
    return make_record(event_id, event, segment), origin


class Connection:
    """One txredisapi connection that reconnects by itself, and whether it is up now."""

    def __init__(self, url: RedisURL) -> None:
        txredisapi = load_txredisapi()
        self.handler = txredisapi.lazyConnection(
            url.host,
            url.port,
            dbid=url.db,
            reconnect=True,
            connectTimeout=2,
            replyTimeout=REPLY_TIMEOUT,
            convertNumbers=False,
        )
        factory = self.handler._factory
        factory.initialDelay = 0.2  # back off from 0.2 s to 2 s between attempts
        factory.maxDelay = 2

    @property
    def current(self) -> object | None:
        """The live protocol, or ``None`` while disconnected."""
        pool = self.handler._factory.pool
        return pool[0] if pool and pool[0].connected else None

    def call(self, method: str, *args: Any) -> Deferred[Any]:
        """
        ``method`` of the live connection (``eval``, ``execute_command``), or
        a failure at once while there is none: never queued for a reconnect,
        so a publish during an outage is refused now, not held.
        """
        current = self.current
        if current is None:
            return fail(ConnectionRefusedError("not connected"))
        return maybeDeferred(getattr(current, method), *args)

    def disconnect(self) -> Deferred[None]:
        d: Deferred[None] = self.handler.disconnect()
        return d


def raise_floor(store: object, floor: int) -> None:
    """
    Tell the local store that ids below ``floor`` are not in it (so a resume
    from before them gets ``reset``). Both stores keep that floor as
    ``_floor`` (``oldest_id``); no public hook exists yet (see docs/cluster.md).
    """
    if hasattr(store, "_floor"):
        store._floor = max(store._floor, floor)
