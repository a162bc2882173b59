"""
A store as Twisted services: opened in ``startService``, committed and
closed in ``stopService``; retention on a timer beside it.

Compose :class:`StoreService` before anything that reads or writes the
store (a ``MultiService`` starts its children in order and stops them in
reverse), and :class:`RetentionService` after it.
"""

from __future__ import annotations

from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from trainstream.store import Store

_log = Logger()


class StoreService(Service):
    """
    Runs ``store``: ``store.start()`` (a ``StoreError`` propagates, naming
    the history and what to do), then on stop ``sync()`` and ``close()``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def startService(self) -> None:
        self.store.start()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        """Fires once what was appended is committed (or said lost) and the store is closed."""
        super().stopService()  # type: ignore[no-untyped-call]
        store = self.store
        d: Deferred[None] = maybeDeferred(store.sync)

        def failed(failure: Failure) -> None:
            _log.failure("history: not everything appended could be stored", failure)

        d.addErrback(failed)
        d.addCallback(lambda _: store.close())
        return d


class Trimmable(Protocol):
    """A store with retention (``SQLiteStore``)."""

    def trim(self, retain_days: float | None, max_db_mb: float | None) -> Deferred[int]:
        """Drop the oldest events past the limits; fires with the new oldest id."""


class RetentionService(Service):
    """Enforces ``--retain-days`` and ``--max-db-mb`` every ``interval`` seconds."""

    def __init__(
        self,
        store: Trimmable,
        clock: IReactorTime,
        retain_days: float | None,
        max_db_mb: float | None,
        interval: float = 60.0,
    ) -> None:
        self.store = store
        self.retain_days = retain_days
        self.max_db_mb = max_db_mb
        self._loop = LoopingCall(self._run)
        self._loop.clock = clock
        self.interval = interval

    def _run(self) -> Deferred[int]:
        return self.store.trim(self.retain_days, self.max_db_mb)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
