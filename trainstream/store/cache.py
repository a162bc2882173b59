"""
The newest events in memory, in id order: the whole of a memory history,
and what a SQLite history keeps so live clients and short replays rarely
touch the disk. Bounded in bytes, so a few big events cost what many small
ones do: 100,000 log events of 60 KB would otherwise be 12 GB.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter

from trainstream.config import DEFAULT_CACHE_MB
from trainstream.store.records import Record

_id = attrgetter("id")

#: ``--cache-mb``'s default, in bytes.
DEFAULT_CACHE_BYTES = int(DEFAULT_CACHE_MB * 2**20)

#: What one cached record costs besides the characters of its JSON, in
#: bytes: the slim ``Record`` (slots, GC header), its JSON's string header,
#: its ``run`` string, its id and size, its list slot. Measured on CPython
#: 3.11 with ``tracemalloc``: 195 to 225, rounded up for the allocator's own
#: headers; counted so that tiny events are bounded too.
RECORD_OVERHEAD = 256

# Stands in a dropped record's slot until the list is compacted, so what was
# dropped is freed at once; searches never look below the start.
_DROPPED = Record(0, "", "", None, None, "")


class RecentEvents:
    """
    The newest records, oldest first, found by id in O(log n): as many as
    fit in ``max_bytes`` (each counted as its ``size`` plus
    ``RECORD_OVERHEAD``), and at most ``max_records`` if that is given;
    the oldest go first. Records are held :meth:`~Record.slim` (their JSON,
    not their dict), so each event is kept once.

    A list with a moving start rather than a deque: a deque's items cost
    O(n) to reach by index, and reads look records up by id.
    """

    def __init__(self, *, max_bytes: int, max_records: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._records: list[Record] = []
        self._start = 0  # slots before it are dropped, kept until compacted
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records) - self._start

    def __iter__(self) -> Iterator[Record]:
        records = self._records
        return (records[i] for i in range(self._start, len(records)))

    def __reversed__(self) -> Iterator[Record]:
        records = self._records
        return (records[i] for i in range(len(records) - 1, self._start - 1, -1))

    @property
    def bytes(self) -> int:
        """What the records held count for against ``max_bytes``."""
        return self._bytes

    @property
    def first_id(self) -> int | None:
        """The id of the oldest record held, ``None`` when empty."""
        return self._records[self._start].id if len(self) else None

    def extend(self, records: Sequence[Record]) -> bool:
        """Add newer ``records`` (slim); whether older ones were dropped for them."""
        self._records.extend([r.slim() for r in records])
        self._bytes += sum([r.size for r in records]) + RECORD_OVERHEAD * len(records)
        return self._evict()

    def _evict(self) -> bool:
        held, start, end = self._records, self._start, len(self._records)
        max_bytes = self.max_bytes
        floor = start if self.max_records is None else end - self.max_records
        dropped = 0
        while start < end and (self._bytes > max_bytes or start < floor):
            self._bytes -= held[start].size + RECORD_OVERHEAD
            held[start] = _DROPPED
            start += 1
            dropped += 1
        if not dropped:
            return False
        self._start = start
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
        self._bytes = sum(r.size for r in self._records) + RECORD_OVERHEAD * len(self._records)
        return before - len(self)

    def drop_below(self, floor: int) -> None:
        """Drop the records with id below ``floor``."""
        held, start = self._records, self._start
        end = bisect.bisect_left(held, floor, lo=start, key=_id)
        for i in range(start, end):
            self._bytes -= held[i].size + RECORD_OVERHEAD
            held[i] = _DROPPED
        self._start = end
        self._compact()

    def clear(self) -> None:
        self._records = []
        self._start = 0
        self._bytes = 0
