"""
Searching a run's log events (``GET /api/runs/{run}/logs?level=&q=``).

A search reads the run's ``log`` events in id order, page by page, through
the store's filtered reads (``Store.after_cached`` from memory in the
reactor thread, else ``Store.read_after`` off it: the run and type are
answered from indexes), and keeps those whose level is one asked for and
whose message holds the text (case-insensitive). One request reads at most
``SCAN_BUDGET`` log events: a search that has not reached the end by then
answers what it found with ``next_after``, the id to go on after, so a
search over millions of lines is many short requests, never one long one.
"""

from __future__ import annotations

from collections.abc import Collection

from attrs import frozen
from twisted.internet.defer import Deferred, maybeDeferred, succeed

from trainstream.store import Page, Record, Store
from trainstream.store.filter import Filter

#: Log events one request reads at most (the matches are fewer).
SCAN_BUDGET = 100_000
#: Log events read per store read.
PAGE = 2_000
#: Matches one request answers at most, and by default.
MAX_LIMIT = 1_000
DEFAULT_LIMIT = 100
#: The longest search text.
MAX_QUERY = 256


@frozen
class LogPage:
    """What a search found: ``logs`` in id order, and where to go on (``None``: the end)."""

    logs: list[Record]
    scanned: int
    next_after: int | None


def search_logs(
    store: Store,
    last_id: int,
    run: str,
    levels: Collection[str] | None,
    text: str | None,
    after: int = 0,
    limit: int = DEFAULT_LIMIT,
) -> Deferred[LogPage]:
    """
    The log events of ``run`` after ``after`` (up to ``last_id``, the
    newest visible id when asked) with a level in ``levels``
    (``None``: any) whose message contains ``text`` (``None``: any),
    case-insensitively; at most ``limit``. Fails with ``StoreError`` as the
    store's reads do.
    """
    flt = Filter(runs=(run,), types=("log",))
    wanted = frozenset(levels) if levels else None
    needle = text.casefold() if text else None
    found: list[Record] = []
    scanned = 0

    def matches(record: Record) -> bool:
        event = record.event
        if wanted is not None and event.get("level") not in wanted:
            return False
        return needle is None or needle in str(event.get("message", "")).casefold()

    def read(position: int) -> Deferred[LogPage]:
        cached = store.after_cached(position, flt, PAGE)
        if cached is not None:  # memory holds it all: up to last_id unless the page is full
            upto = cached[-1].id if len(cached) == PAGE else max(last_id, position)
            d: Deferred[Page] = succeed(Page(cached, upto))
        else:
            d = maybeDeferred(store.read_after, position, flt, PAGE)
        return d.addCallback(take, position)

    def take(page: Page, position: int) -> LogPage | Deferred[LogPage]:
        nonlocal scanned
        for record in page.records:
            scanned += 1
            if matches(record):
                found.append(record)
                if len(found) >= limit:
                    return LogPage(found, scanned, record.id)
        if page.upto >= last_id or page.upto <= position:
            return LogPage(found, scanned, None)  # the end of what was stored when asked
        if scanned >= SCAN_BUDGET:
            return LogPage(found, scanned, page.upto)
        return read(page.upto)

    return read(after)


__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_QUERY", "SCAN_BUDGET", "LogPage", "search_logs"]
