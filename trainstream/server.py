"""
One trainstream server, composed the Twisted way: ``makeService(config,
reactor)`` returns a ``MultiService`` of small services, started in this
order and stopped in the reverse one:

    history     the store opens (lock, file, writer process); the hub
                continues from its last id
    retention   --retain-days / --max-db-mb, every minute (SQLite only)
    listeners   one per role: bind; on stop, close and drain (listeners.py)
    runs        the runs registry: loads what the history holds, stall checks
    ranks       distributed ranks: aggregates and rank_behind alerts
    demo        a synthetic run (--demo)
    follow      a TensorBoard logdir followed live (--logdir, trainstream.follow)
    monitoring  reactor lag, listener accept checks, the server's own faults as
                alerts on run trainstream/server (trainstream.faults, lag.py)

Constructors do no I/O: nothing opens, binds or spawns until the service
starts, so twistd and the embedded manager build and run the very same
services (twistd after it daemonized). Blocking calls from other threads
are the embedded layer's business (``embedded.py``), never this module's.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from trainstream.config import Config, default_db_path
from trainstream.configfile import Reloaded, effective, reload as reload_config_file
from trainstream.errors import TrainstreamError
from trainstream.events import EventError
from trainstream.faults import Monitoring
from trainstream.hub import Hub
from trainstream.listeners import Listener, build_listeners
from trainstream.ranks import RanksService
from trainstream.run import Inbox, Run
from trainstream.runs import RunsService
from trainstream.store import Store
from trainstream.store.memory import MemoryStore
from trainstream.store.service import RetentionService, StoreService
from trainstream.store.sqlite import SQLiteStore
from trainstream.web.backend import ServerStatus
from trainstream.web.clients import Clients
from trainstream.web.site import build_site

if TYPE_CHECKING:
    from trainstream.cluster import ClusterEngine

_log = Logger()

# run.log(): a point logged after a quiet spell reaches the hub at once; while
# the loop logs faster than this, its points go in one batch per this many
# seconds (each at most this late), so the reactor takes the GIL that often.
_INBOX_DELAY = 0.01
#: ... and while it logs more than ``api.BUSY_RATE`` events/s, up to this
#: (fewer, bigger batches: the reactor interrupts training less often).
_INBOX_MAX_DELAY = 0.1
#: Seconds a stop waits for what was published to be committed and acknowledged.
_STOP_COMMIT_WAIT = 10.0


class HistoryService(StoreService):
    """The store, opened at start (the hub continues from it), committed and closed at stop."""

    def __init__(self, store: Store, hub: Hub) -> None:
        super().__init__(store)
        self.setName("history")  # type: ignore[no-untyped-call]
        self.hub = hub

    def startService(self) -> None:
        super().startService()
        self.hub.open()


class StreamServer(MultiService):
    """
    A Hub, its store, its clients, and one listener per role, all served by
    one ``Site``. ``start()`` and ``stop()`` may be repeated; the runs
    registry and the ``Run`` objects outlive a stop.
    """

    def __init__(
        self, config: Config | Mapping[str, Any] | None = None, reactor: Any = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        #: The config as given; ``config`` is it with its ``--config`` file under it.
        self.requested = Config.from_value(config)
        self.config = effective(self.requested)
        #: Counts the successful reloads of the config file (``configfile.reload``).
        self.config_version = 1
        self.reactor: Any = reactor
        #: How a thread other than the reactor's waits on a Deferred
        #: (``embedded.call_blocking``); set by the embedded manager.
        self.blocking: Callable[..., Any] | None = None
        self.store: Store = _make_store(self.config, reactor)
        #: The cluster engine (``--redis``), or ``None`` for a server on its own.
        self.cluster: ClusterEngine | None = None
        if self.config.redis is None:
            self.hub = Hub(self.store)
        else:
            from trainstream.cluster import build_cluster

            self.hub, self.cluster = build_cluster(self.config, self.store, reactor)
        self.clients = Clients()
        self.inbox = Inbox(
            lambda f: self.reactor.callFromThread(f),
            self._accept_logged,
            clock=self.reactor,
            window=_INBOX_DELAY,
            checked_sink=self.hub.accept_checked,
            max_window=_INBOX_MAX_DELAY,
        )
        self.site = build_site(self, self.config, self.reactor)
        self.runs = RunsService(self.hub, self.reactor, self.config.stall_after)
        self.ranks = RanksService(self.hub)
        self._listeners = build_listeners(
            self.config.listeners(), self.site, self.clients, reactor, self.config.close_timeout
        )
        for role in self._listeners.roles:
            role.fallback = self.config.port_fallback  # --port-fallback N
        self._listeners.setName("listeners")  # type: ignore[no-untyped-call]
        HistoryService(self.store, self.hub).setServiceParent(self)  # type: ignore[no-untyped-call]
        if self.cluster is not None:
            # After the history (the feed continues from its last id), before
            # the listeners; server-made events are the leader's alone.
            self.cluster.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.runs.check_stalls = _leader_only(self.cluster, self.runs.check_stalls)  # type: ignore[method-assign]
            from trainstream.cluster import delete_everywhere

            self.runs.delete = delete_everywhere(self.cluster, self.runs, self.ranks)  # type: ignore[method-assign,assignment]
        if isinstance(self.store, SQLiteStore) and (
            self.config.retain_days or self.config.max_db_mb
        ):
            RetentionService(
                self.store, reactor, self.config.retain_days, self.config.max_db_mb
            ).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.runs.setName("runs")  # type: ignore[no-untyped-call]
        self.ranks.setName("ranks")  # type: ignore[no-untyped-call]
        for service in (self._listeners, self.runs, self.ranks):
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
        if self.config.demo:
            from trainstream.demo import DemoService

            DemoService(self.hub, reactor).setServiceParent(self)  # type: ignore[no-untyped-call]
        if self.config.logdir:
            from trainstream.follow.service import FollowService

            follow = FollowService(self.config.logdir, self.hub, reactor)
            follow.setServiceParent(self)  # type: ignore[no-untyped-call]
        # Reactor lag, listener checks, the server's own faults (docs/operations.md).
        self.monitoring = Monitoring(
            self.hub, reactor, self.config.lag_warn, lambda: self._listeners.bound
        )
        self.monitoring.setServiceParent(self)  # type: ignore[no-untyped-call]
        self._started_at = time.monotonic()
        self._stop_waiters: list[Deferred[None]] = []
        self._start_error: BaseException | None = None

    # Lifecycle

    @property
    def listening(self) -> bool:
        return bool(self._listeners.bound)

    @property
    def listeners(self) -> list[Listener]:
        return self._listeners.bound

    def start(self) -> Deferred[StreamServer]:
        """
        Start every service in order: the history opens, every listener
        binds, the registries load.

        :return: fires with this server once every port is bound, or fails
            with ``PortInUseError``/``ListenError``/``ConfigError``/
            ``StoreError`` after stopping whatever it had started (ports
            closed, history file released).
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> StreamServer:
        if self.running:
            return self
        self._start_error = None
        try:
            for child in self:
                child.privilegedStartService()
            for child in self:
                child.startService()
        except BaseException as e:
            # Said now, before the rollback below takes reactor turns:
            # twistd reads it synchronously (privilegedStartService).
            self._start_error = e
            for child in reversed(list(self)):  # each stops whatever it got to
                await maybeDeferred(child.stopService)
            raise
        Service.startService(self)  # type: ignore[no-untyped-call]
        self._started_at = time.monotonic()
        self.store.announce(self.urls)
        if self.config.ports_file:
            self._write_ports_file(self.config.ports_file)
        _log.info("trainstream listening: {urls}", urls=self.urls)
        return self

    def stop(self) -> Deferred[None]:
        """
        Publish what ``run.log`` queued, then stop every service in reverse
        order: the registries, the listeners (every port closed, every
        connection gone), the history (committed, file released). A stop
        asked for while one runs fires when that one ends.
        """
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if len(self._stop_waiters) == 1:
            Deferred.fromCoroutine(self._stop()).addBoth(self._stopped)
        return waiter

    def _stopped(self, result: object) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _stop(self) -> None:
        if not self.running:
            return
        # Whatever the training code queued before the stop is still published.
        self.inbox.drain()
        # And acknowledged: what publishers sent is committed, and their 200s
        # and acks go out, before any connection is closed (bounded: a
        # history that cannot commit is closed by its own service below).
        try:
            await self.hub.sync().addTimeout(_STOP_COMMIT_WAIT, self.reactor)
        except Exception as e:
            _log.warn("stopping before every event was stored: {e}", e=e)
        Service.stopService(self)  # type: ignore[no-untyped-call]
        for child in reversed(list(self)):
            if child.running:
                await maybeDeferred(child.stopService)

    def close(self) -> None:
        """Release the history file now (a stop does it too); safe to repeat."""
        self.store.close()

    # twistd calls these; embedded code calls start/stop.

    def privilegedStartService(self) -> None:
        failures: list[Failure] = []
        self.start().addErrback(failures.append)
        error = failures[0].value if failures else self._start_error
        if error is not None:
            # Everything starts synchronously (TCP, SSL and UNIX endpoints
            # bind at once): whichever part fails, say why and exit, instead
            # of running a server with no ports.
            if isinstance(error, TrainstreamError):
                raise SystemExit(f"trainstream: {error}")
            raise error

    def startService(self) -> None:
        if not self.running:
            self.start()

    def stopService(self) -> Deferred[None]:
        return self.stop()

    # What the web layer sees (web.backend.Backend)

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    @property
    def urls(self) -> dict[str, str]:
        """Where clients connect: ``sse``, ``ws``, ``rest`` and ``dashboard``."""
        by_role = {listener.role: listener for listener in self.listeners}
        if not by_role:
            return {}
        if "listen" in by_role:
            sse = ws = rest = by_role["listen"]
        else:
            sse, ws, rest = by_role["sse"], by_role["ws"], by_role["rest"]
        return {
            "sse": sse.base("http") + "/events",
            "ws": ws.base("ws") + "/ws",
            "rest": rest.base("http") + "/api",
            "dashboard": rest.base("http") + "/",
        }

    def status(self) -> ServerStatus:
        """The snapshot the web layer shows."""
        return ServerStatus(
            uptime_s=self.uptime(),
            urls=self.urls,
            listeners=tuple(
                s for s in (li.status() for li in self._listeners.roles) if s is not None
            ),
            problems=(
                *(self.cluster.problems() if self.cluster is not None else ()),
                *self.monitoring.problems(),
            ),
            lag=self.monitoring.lag.status(),
            config_version=self.config_version,
            cluster=self.cluster.describe() if self.cluster is not None else None,
        )

    def reload_config(self) -> Reloaded:
        """Read the ``--config`` file again; apply what can change live (``configfile``)."""
        return reload_config_file(self)

    def _write_ports_file(self, path: str) -> None:
        """Write ``urls`` as JSON atomically: a reader sees all of it or nothing."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".ports-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.urls, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    # Publishing from training code

    def run(self, name: str, hparams: Mapping[str, object] | None = None) -> Run:
        """A handle to log a training run; announces it as ``created``."""
        run = Run(name, self.inbox, self.flush_deferred, lambda: self.blocking)
        run.status("created")
        if hparams:
            run.hparams(hparams)
        return run

    def flush_deferred(self) -> Deferred[None]:
        """Reactor thread: publish everything queued so far, and store it."""
        self.inbox.drain()
        return self.hub.sync()

    def _accept_logged(self, events: list[dict[str, object]]) -> None:
        """
        ``run.log`` batches into the one way in. They were checked in the
        training thread by the same rules; should one fail anyway, only it is
        dropped, and said.
        """
        try:
            self.hub.accept(events)
        except EventError:
            for event in events:
                try:
                    self.hub.accept([event])
                except EventError as e:
                    _log.error("run.log event dropped: {error}", error=e)


def _leader_only(cluster: ClusterEngine, check: Callable[[], None]) -> Callable[[], None]:
    """``check`` run only while this server leads the cluster, caught up with it."""

    def checked() -> None:
        if cluster.leader and cluster.live:
            check()

    return checked


def _make_store(config: Config, reactor: Any) -> Store:
    """The history the config asks for (not opened yet: that is ``start()``)."""
    cache_bytes = int(config.cache_mb * 2**20)
    if config.memory:
        return MemoryStore(config.max_history, cache_bytes)
    return SQLiteStore(
        config.db or default_db_path(),
        lambda f, *a: reactor.callFromThread(f, *a),
        cache_events=config.max_history,
        cache_bytes=cache_bytes,
    )


def makeService(config: Config | Mapping[str, Any] | None, reactor: Any) -> StreamServer:
    """The server as one ``MultiService``, for twistd and the embedded manager alike."""
    return StreamServer(config, reactor)


__all__ = ["HistoryService", "StreamServer", "makeService"]
