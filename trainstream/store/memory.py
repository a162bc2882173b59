"""
A bounded in-memory history: the newest ``max_events`` events.
"""

from __future__ import annotations

import bisect
import itertools
import uuid
from collections import deque
from collections.abc import Callable, Sequence

from trainstream.store import Record


class MemoryStore:
    """
    History in RAM only. It forgets its oldest events past ``max_events``,
    and everything when the process ends, so each instance has a new epoch.
    """

    def __init__(self, max_events: int = 100_000) -> None:
        self.epoch = uuid.uuid4().hex
        self._records: deque[Record] = deque(maxlen=max_events)
        self._last_id = 0

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def oldest_id(self) -> int:
        return self._records[0].id if self._records else self._last_id + 1

    def append(self, records: Sequence[Record]) -> None:
        self._records.extend(records)
        if records:
            self._last_id = records[-1].id

    def after(
        self, after_id: int, match: Callable[[Record], bool], limit: int | None = None
    ) -> list[Record]:
        records = self._records
        start = bisect.bisect_right(records, after_id, key=lambda r: r.id)
        out: list[Record] = []
        for record in itertools.islice(records, start, None):
            if match(record):
                out.append(record)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def close(self) -> None:
        self._records.clear()
