"""
The events of a remote server, read the other way: :class:`Subscriber`, an
iterator of dicts resuming by id across reconnects (the resuming SSE client
of :mod:`trainstream.client.sse`), and :func:`subscribe_deferred`, its form
for code in the reactor thread (Twisted is imported only when it is called).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from trainstream.client.http import ClientError, parse_endpoint
from trainstream.client.sse import Event as StreamEvent, Reset, SSEClient

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = ["Subscriber", "SubscriberError", "subscribe_deferred"]

Event = dict[str, object]
#: A refusal that retrying will not fix (401, a bad filter, no trainstream server).
SubscriberError = ClientError


class Subscriber:
    """
    The events of a remote server, as an iterator of dicts, resuming by id.

    A blocking client (no reactor, no thread of its own): iterating reads the
    server's ``/events`` stream (Server-Sent Events) with
    ``trainstream.client.sse.SSEClient``, the resuming reader of
    ``trainstream tail``. After a disconnect, an ``overflow`` (too slow) or a server
    restart it reconnects with backoff (the server's ``retry:``) and
    ``Last-Event-ID``, so no event is handed out twice or skipped while the
    server still holds it. When it no longer does (history trimmed, or a new
    history: another ``epoch``), a ``{"type": "reset", "reason",
    "oldest_id"}`` dict is handed out first; it has no ``id``.

    The iterator ends only after ``close()`` (from any thread, or leaving the
    ``with`` block); a refusal that retrying will not fix (401, a bad filter,
    a URL that is no trainstream server) raises ``SubscriberError``.
    ``last_id`` is the id of the latest event handed out: give it as
    ``after`` to a new ``Subscriber`` to go on from there.

    :param url: the server (any listener; a base, ``/api`` or ``/events`` URL).
    :param runs: run globs (``*`` matches any); ``names``: metric-name
        globs; ``types``: event types. Empty: everything.
    :param after: first replay every stored matching event after this id
        (0: the whole history); ``None``: live events only.
    """

    def __init__(
        self,
        url: str,
        runs: Sequence[str] = (),
        names: Sequence[str] = (),
        types: Sequence[str] = (),
        after: int | None = None,
        token: str | None = None,
        backoff_max: float = 10.0,
        read_timeout: float = 45.0,
    ) -> None:
        endpoint = parse_endpoint(url)
        self._client = SSEClient(
            endpoint,
            token,
            runs=runs,
            names=names,
            types=types,
            after=after,
            backoff_max=backoff_max,
            read_timeout=read_timeout,
        )
        self._items = cast(Generator[StreamEvent | Reset, None, None], self._client.items())

    @property
    def last_id(self) -> int | None:
        """The id after which the stream goes on (``after`` until an event came)."""
        return self._client.last_id

    @property
    def connections(self) -> int:
        """How many times a stream was opened (1 + reconnections)."""
        return self._client.connections

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        item = next(self._items)
        if isinstance(item, Reset):
            return item.to_json()
        return item.data

    def close(self) -> None:
        """Stop: from any thread; a ``next()`` waiting for an event ends the iteration."""
        self._client.close()
        with contextlib.suppress(ValueError):  # running in another thread: it ends by itself
            self._items.close()

    @property
    def closed(self) -> bool:
        return self._client.closed

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def subscribe_deferred(
    url: str,
    callback: Callable[[Event], object],
    runs: Sequence[str] = (),
    names: Sequence[str] = (),
    types: Sequence[str] = (),
    after: int | None = None,
    token: str | None = None,
    reactor: Any = None,
) -> Deferred[int | None]:
    """
    For code in the reactor thread: a ``Subscriber`` whose ``next()`` runs
    in a thread of its own, each event handed to ``callback(event)`` in the
    reactor thread, one at a time. The next event is asked for only once the
    callback is done: if it returns a Deferred, once that fires (so a slow
    consumer slows the reading, and the server's slow-client rules apply
    instead of a queue growing here). The reactor never waits on the thread,
    nor the thread on the reactor.

    The returned Deferred fires when the subscription ends:

    - with the ``last_id`` handed out, when ``callback`` returns ``False``
      (give it as ``after`` to go on later);
    - with ``CancelledError`` when it is cancelled (``d.cancel()``), which
      stops the subscription;
    - with the error, when the callback raises (or its Deferred fails) or the
      server refuses for good (``SubscriberError``).

    The reactor's shutdown stops it too (the Deferred then fails with
    ``CancelledError``), and waits for its thread to end.
    """
    from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        subscriber = Subscriber(url, runs, names, types, after, token)
    except SubscriberError:
        return fail()
    pool = ThreadPool(minthreads=1, maxthreads=1, name="trainstream-subscriber")
    pool.start()
    end = object()

    def next_event() -> Event | object:
        return next(subscriber, end)

    async def read() -> int | None:
        try:
            while not subscriber.closed:
                event = await deferToThreadPool(reactor, pool, next_event)
                if event is end or subscriber.closed:
                    break
                if await maybeDeferred(callback, cast(Event, event)) is False:
                    break
        finally:
            subscriber.close()
            pool.stop()  # its one thread is idle now: no next() is running
        if cancelled:
            raise CancelledError()
        return subscriber.last_id

    cancelled = False

    def cancel(_: Deferred[int | None]) -> None:
        nonlocal cancelled
        cancelled = True
        subscriber.close()  # a next() waiting for an event returns: read() ends

    done: Deferred[int | None] = Deferred(cancel)

    def finish(result: int | Failure | None) -> None:
        if done.called:
            return  # cancelled: it has failed already
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)

    reading = Deferred.fromCoroutine(read())
    reading.addBoth(finish)
    trigger = reactor.addSystemEventTrigger("before", "shutdown", _stop, done, reading)
    reading.addBoth(_untrigger, reactor, trigger)
    return done


def _stop(done: Deferred[int | None], reading: Deferred[int | None]) -> Deferred[None]:
    """At the reactor's shutdown: cancel, and let it wait for the reading to end."""
    from twisted.internet.defer import Deferred

    waited: Deferred[None] = Deferred()
    reading.addBoth(lambda _: waited.callback(None))
    done.cancel()
    return waited


def _untrigger(result: object, reactor: Any, trigger: object) -> object:
    reactor.removeSystemEventTrigger(trigger)
    return result
