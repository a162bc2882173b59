"""
Which events a subscriber wants, in one place: live fan-out (the Hub) and
reads of the history (``Store.after``) ask the same :class:`Filter`, so a
store can answer it through its indexes and still agree with the Hub.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from attrs import field, frozen

from trainstream.store.records import Record


def _glob(patterns: Iterable[str]) -> re.Pattern[str] | None:
    pats = [p for p in patterns if p]
    if not pats or "*" in pats:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats))


@frozen
class Filter:
    """
    Which events a subscriber wants: run globs, metric-name globs, types.
    An empty tuple (or ``*``) means all. The name filter only applies to
    events that carry a name; status and log events pass it.
    """

    runs: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    _runs: re.Pattern[str] | None = field(init=False, eq=False, repr=False)
    _names: re.Pattern[str] | None = field(init=False, eq=False, repr=False)
    _types: frozenset[str] | None = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_runs", _glob(self.runs))
        object.__setattr__(self, "_names", _glob(self.names))
        types = frozenset(t for t in self.types if t)
        object.__setattr__(self, "_types", None if not types or "*" in types else types)

    @property
    def matches_all(self) -> bool:
        return self._runs is None and self._names is None and self._types is None

    @property
    def wanted_types(self) -> frozenset[str] | None:
        """The types it lets through, ``None`` for all."""
        return self._types

    @property
    def filters_runs(self) -> bool:
        return self._runs is not None

    @property
    def filters_names(self) -> bool:
        return self._names is not None

    def run_matches(self, run: str) -> bool:
        return self._runs is None or self._runs.match(run) is not None

    def name_matches(self, name: str) -> bool:
        return self._names is None or self._names.match(name) is not None

    def matches(self, record: Record) -> bool:
        return self.accepts(record.type, record.run, record.name)

    def select(self, records: Iterable[Record]) -> list[Record]:
        """
        The ``records`` it ``matches``, in order: one pass, with no call per
        record when it only looks at types (the Hub's fan-out, per batch).
        """
        if self._runs is None and self._names is None:
            types = self._types
            if types is None:
                return list(records)
            return [r for r in records if r.type in types]
        accepts = self.accepts
        return [r for r in records if accepts(r.type, r.run, r.name)]

    def accepts(self, kind: str, run: str, name: str | None) -> bool:
        """``matches`` on the fields alone, for rows not yet made records."""
        if self._types is not None and kind not in self._types:
            return False
        if self._runs is not None and self._runs.match(run) is None:
            return False
        if self._names is not None and name is not None and self._names.match(name) is None:
            return False
        return True


#: What ``Store.after`` takes: a :class:`Filter` (which a store may answer
#: from its indexes) or any predicate (read through).
Match = Filter | Callable[[Record], bool]


def predicate(match: Match) -> Callable[[Record], bool]:
    """``match`` as a plain predicate."""
    return match.matches if isinstance(match, Filter) else match
