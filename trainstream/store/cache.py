"""
The newest events in memory, in id order: the whole of a memory history,
and what a SQLite history keeps so live clients and short replays rarely
touch the disk.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter

from trainstream.store.records import Record

_id = attrgetter("id")


class RecentEvents:
    """
    At most ``capacity`` records, oldest first, found by id in O(log n).

    A list with a moving start rather than a deque: a deque's items cost
    O(n) to reach by index, and reads look records up by id.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: list[Record] = []
        self._start = 0  # records before it are dropped, kept until compacted

    def __len__(self) -> int:
        return len(self._records) - self._start

    def __iter__(self) -> Iterator[Record]:
        records = self._records
        return (records[i] for i in range(self._start, len(records)))

    @property
    def first_id(self) -> int | None:
        """The id of the oldest record held, ``None`` when empty."""
        return self._records[self._start].id if len(self) else None

    def extend(self, records: Sequence[Record]) -> bool:
        """Add newer ``records``; whether older ones were dropped for them."""
        self._records.extend(records)
        excess = len(self) - self.capacity
        if excess <= 0:
            return False
        self._start += excess
        self._compact()
        return True

    def _compact(self) -> None:
        # Once as many are dropped as held: amortized O(1) per record.
        if self._start >= max(len(self), 1024):
            del self._records[: self._start]
            self._start = 0

    def _index_after(self, after_id: int) -> int:
        return bisect.bisect_right(self._records, after_id, lo=self._start, key=_id)

    def get(self, event_id: int) -> Record | None:
        """The record with id ``event_id``, if held."""
        records = self._records
        i = bisect.bisect_left(records, event_id, lo=self._start, key=_id)
        return records[i] if i < len(records) and records[i].id == event_id else None

    def after(self, after_id: int) -> Iterator[Record]:
        """The records with id above ``after_id``, oldest first."""
        records = self._records
        return (records[i] for i in range(self._index_after(after_id), len(records)))

    def collect(
        self,
        after_id: int,
        match: Callable[[Record], bool],
        limit: int | None,
        out: list[Record],
    ) -> None:
        """Append to ``out`` those after ``after_id`` that ``match``, until it holds ``limit``."""
        if limit is not None and len(out) >= limit:
            return
        for record in self.after(after_id):
            if match(record):
                out.append(record)
                if limit is not None and len(out) >= limit:
                    return

    def keep(self, wanted: Callable[[Record], bool]) -> int:
        """Drop the records not ``wanted``; how many were dropped."""
        before = len(self)
        self._records = [r for r in self if wanted(r)]
        self._start = 0
        return before - len(self)

    def drop_below(self, floor: int) -> None:
        """Drop the records with id below ``floor``."""
        self._start = bisect.bisect_left(self._records, floor, lo=self._start, key=_id)
        self._compact()

    def clear(self) -> None:
        self._records = []
        self._start = 0
