"""
``twistd trainstream --logdir DIR``: the server follows a logdir itself.

:class:`FollowService` drives a :class:`~trainstream.follow.follower.Follower`
from the reactor, one round at a time: what touches the disk (reading the
event files, saving the state) runs in the reactor's thread pool
(``deferToThread``); the events go through the hub in the reactor thread
(``hub.publish``: the state moves on once the history committed them).
After a kill, the events of the last unacknowledged batch are compared
with what the store holds of their runs since (``store.read_after``, off
the reactor thread, as ``GET /api/events`` reads it) before anything is sent.
Started after the listeners, stopped first: a round under way ends (its
batch committed, its state saved) before the history closes.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from trainstream.errors import ConfigError
from trainstream.follow.decode import load_protos
from trainstream.follow.follower import Follower, Read
from trainstream.store.filter import Filter

__all__ = ["FollowService"]

_log = Logger()

#: Seconds before a round that failed (a state file that cannot be written,
#: a history that cannot store) is tried again.
RETRY_AFTER = 1.0
#: Events per ``hub.publish`` at most (the reactor is free between them).
BATCH = 1_000
#: Events per store read when comparing after a kill.
PAGE = 10_000


class FollowService(Service):
    """
    Follow ``logdir`` into ``hub`` while running.

    :param state_path: the follower's state file (default: in the user's
        data dir, one per logdir and history).
    """

    def __init__(
        self,
        logdir: str,
        hub: Any,
        reactor: Any,
        state_path: str | None = None,
        interval: float = 0.25,
    ) -> None:
        self.setName("follow")  # type: ignore[no-untyped-call]
        self.logdir = logdir
        self.hub = hub
        self.reactor = reactor
        self.state_path = state_path
        self.interval = interval
        self.follower: Follower | None = None
        self._round: Deferred[None] | None = None
        self._next: Any = None

    def startService(self) -> None:
        if os.path.exists(self.logdir) and not os.path.isdir(self.logdir):
            raise ConfigError(f"--logdir {self.logdir} is a file, not a directory")
        try:
            protos = load_protos()
        except ModuleNotFoundError as e:
            raise ConfigError(f"--logdir {self.logdir}: {e}") from None
        super().startService()  # type: ignore[no-untyped-call]
        follower = Follower(self.logdir, None, self._report, self.state_path, self.interval, protos)
        self.follower = follower
        self._round = deferToThread(follower.start, (self.hub.epoch, self.hub.last_id))
        self._round.addCallbacks(lambda _: self._schedule(0), self._failed_start)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        done, self._round = self._round, None
        if done is None or done.called:
            return succeed(None)
        # The round under way ends (its batch committed, its state saved).
        waiter: Deferred[None] = Deferred()
        done.addBoth(lambda _: waiter.callback(None))
        return waiter

    def _failed_start(self, failure: Any) -> None:
        _log.error("following {logdir} could not start: {e}", logdir=self.logdir, e=failure.value)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._next = self.reactor.callLater(delay, self._start_round)

    def _start_round(self) -> None:
        self._next = None
        if not self.running:
            return
        self._round = Deferred.fromCoroutine(self._one_round())

    async def _one_round(self) -> None:
        follower = self.follower
        assert follower is not None
        try:
            more = await self._publish_round(follower)
        except Exception as e:
            self._report("error", f"following {self.logdir}: {e}; retrying in {RETRY_AFTER} s")
            self._schedule(RETRY_AFTER)
            return
        self._schedule(0 if more else self.interval)

    async def _publish_round(self, follower: Follower) -> bool:
        read: Read = await deferToThread(follower.read)
        if not read.changed:
            return read.more
        window = follower.window(read)
        stored = [] if window is None else await self._stored_since(*window)
        events = follower.unsent(read, lambda *_: stored)
        if events:
            await deferToThread(follower.mark_pending, read)
            for i in range(0, len(events), BATCH):
                _, _, last_id = await self.hub.publish(events[i : i + BATCH])
                follower.last_id = max(follower.last_id, last_id)
            follower.sent += len(events)
        await deferToThread(follower.acknowledge, read)
        return read.more

    async def _stored_since(self, after_id: int, runs: set[str]) -> list[dict[str, object]]:
        """(After a kill.) The stored events of ``runs`` after ``after_id`` (off the reactor)."""
        store = self.hub.store
        flt = Filter(runs=tuple(sorted(runs)))
        out: list[dict[str, object]] = []
        while after_id < self.hub.last_id:
            page = await maybeDeferred(store.read_after, after_id, flt, PAGE)
            out.extend(record.event for record in page.records)
            if page.upto <= after_id:
                break
            after_id = page.upto
        return out

    def _report(self, level: str, message: str) -> None:
        """The follower's news, logged in the reactor thread (it may speak from another)."""
        emit = {"error": _log.error, "warning": _log.warn}.get(level, _log.info)
        self.reactor.callFromThread(emit, "{message}", message=message)
