"""
The cyclic garbage collector's schedule in a process that is a trainstream
server and nothing else (``twistd trainstream``, the SQLite writer process).

CPython's default (a young-generation collection every 700 allocations)
suits small programs. At ingest rates a batch of 2,000 events is tens of
thousands of live container objects: with the default, each survives many
young collections, is promoted, and the recent-events cache's records make
every full collection long. Measured with ``bench/ingest.py`` (the reactor
thread's CPU per acknowledged event, SQLite, one run): 18.5-19.6 us with
the default, 13.4-14.5 us with these thresholds, about the same as with the
collector off. Objects made at startup (modules, routes, the reactor) are
frozen first so no full collection walks them again.

Embedded servers leave the collector alone: that process is the user's.
"""

from __future__ import annotations

import gc

#: Allocations between young collections, and collections between each
#: older one (at least these; a process that asked for more keeps it).
THRESHOLDS = (20_000, 20, 20)


def tune() -> None:
    """Freeze what exists now and space collections out (see the module's text)."""
    gc.freeze()
    current = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(current, THRESHOLDS, strict=True)))
