"""
Several servers, one history: a cluster on Redis Streams (``--redis``).

    engine.py   ClusterEngine: the publish script, the feed, the leader lease
    hub.py      ClusterHub: the Hub whose ids come from Redis
    scripts.py  the Lua scripts, each atomic in Redis

The design, the keys, retention and what happens when a server or Redis
fails: docs/cluster.md. Nothing here is imported unless ``redis`` is
configured; txredisapi is imported only when the engine starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from trainstream.cluster.engine import ClusterEngine, ClusterUnavailableError
from trainstream.cluster.hub import ClusterHub
from trainstream.config import Config, parse_redis_url
from trainstream.ranks import RanksService
from trainstream.runs import RunsService
from trainstream.store import Store


def build_cluster(config: Config, store: Store, reactor: Any) -> tuple[ClusterHub, ClusterEngine]:
    """The hub and the engine (a service, to start after the history) of ``config.redis``."""
    assert config.redis is not None
    engine = ClusterEngine(
        parse_redis_url(config.redis),
        config.redis_prefix,
        config.redis_maxlen,
        config.redis_retention,
        reactor,
    )
    return ClusterHub(store, engine), engine


def delete_everywhere(
    engine: ClusterEngine, runs: RunsService, ranks: RanksService
) -> Callable[[str], Deferred[Any]]:
    """
    ``runs.delete`` for a cluster member: ``DELETE /api/runs/{run}`` becomes
    a control entry in the stream, applied by every server in stream order
    (its store, its registries); it fires with what this server removed,
    once it has. The local delete the entry applies is ``runs.delete`` as it
    was.
    """
    local = runs.delete

    def apply(control: dict[str, object]) -> Deferred[Any]:
        if control.get("op") != "delete":
            return succeed(None)
        run = str(control["run"])

        def done(removed: int | None) -> int | None:
            ranks.forget(run)
            return removed

        return local(run).addCallback(done)

    engine.on_control = apply

    def delete(run: str) -> Deferred[Any]:
        if runs.get(run) is None:
            return succeed(None)  # 404, as alone
        return engine.submit_control({"op": "delete", "run": run})

    return delete


__all__ = [
    "ClusterEngine",
    "ClusterHub",
    "ClusterUnavailableError",
    "build_cluster",
    "delete_everywhere",
]
