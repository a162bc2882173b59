"""
The history file's layout: the schema, its migrations, and what ``meta``
holds (epoch, last_id, floor).

A new file is made at version 1 and migrated up like any older file, so
every file goes one way. A migration is a function from version N to N+1,
run with the others in one transaction at open (``_MIGRATIONS``); a file
newer than this code is refused rather than guessed at.

Version 2 has the indexes that let a filtered read (``reads.py``) go
straight to what it matches: events by (type, id) and by (run, type, id)
(in place of (run, id)), metrics by (run, name, id); every SQLite index
ends with the rowid, here the event id.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable

from attrs import frozen

from trainstream.errors import StoreError
from trainstream.store import rollup

SCHEMA_VERSION = 2

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,   -- the event id, and by that its index
    type TEXT NOT NULL,
    run TEXT NOT NULL,
    name TEXT,
    step INTEGER,
    value REAL,               -- metric value, NULL for NaN (SQLite has no NaN)
    time REAL NOT NULL,
    json TEXT NOT NULL,
    segment INTEGER           -- metric: segment of its series (a new one per rewind)
);
CREATE INDEX events_series ON events (run, name, segment, step) WHERE type = 'metric';
CREATE INDEX events_run ON events (run);
-- One row per series: where it stands, so a restart need not scan events.
CREATE INDEX events_registry ON events (id) WHERE type IN ('status', 'hparams', 'alert');
-- One row per series: where it stands and its summary over its whole life
-- (min/max over finite values), so a restart scans no points.
CREATE TABLE series (
    run TEXT NOT NULL,
    name TEXT NOT NULL,
    segment INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    count INTEGER NOT NULL,
    min REAL,
    max REAL,
    last_value REAL,          -- NULL for NaN
    last_time REAL NOT NULL,
    last_id INTEGER NOT NULL,
    PRIMARY KEY (run, name)
);
"""


def _read_indexes(db: sqlite3.Connection) -> None:
    """
    1 -> 2: the indexes of filtered reads, built from the rows already
    there. (run, type) serves all that (run) did, which is dropped: each
    index costs every insert.
    """
    db.execute("CREATE INDEX events_type ON events (type)")
    db.execute("CREATE INDEX events_run_type ON events (run, type)")
    db.execute("DROP INDEX events_run")
    db.execute("CREATE INDEX events_metric ON events (run, name) WHERE type = 'metric'")


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    # version N -> N + 1
    1: _read_indexes,
}


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the file at ``path`` to ``SCHEMA_VERSION`` (made if empty)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"history file {path} has schema version {version}, newer than this "
            f"trainstream's {SCHEMA_VERSION}: upgrade trainstream or use another --db"
        )
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in _SCHEMA_1.split(";"):
                if statement.strip():
                    db.execute(statement)
            rollup.ensure_schema(db)
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            db.execute("INSERT INTO meta VALUES ('last_id', '0')")
            db.execute("INSERT INTO meta VALUES ('floor', '1')")
            version = 1
        while version < SCHEMA_VERSION:
            _MIGRATIONS[version](db)
            version += 1
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


@frozen
class Meta:
    """What ``meta`` says: the history's epoch, the highest id ever given, the floor."""

    epoch: str
    last_id: int
    floor: int


def read_meta(db: sqlite3.Connection, path: str) -> Meta:
    """
    :raises StoreError: naming the file and the row when ``meta`` is damaged.
    """
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    values: dict[str, int] = {}
    for key in ("last_id", "floor"):
        try:
            values[key] = int(rows[key])
        except (KeyError, TypeError, ValueError):
            raise StoreError(
                f"history file {path} is damaged: its meta row {key!r} is "
                f"{'missing' if key not in rows else repr(rows[key])}; move the file aside "
                "to start a new history"
            ) from None
    epoch = rows.get("epoch")
    if not isinstance(epoch, str) or not epoch:
        raise StoreError(
            f"history file {path} is damaged: its meta row 'epoch' is missing; "
            "move the file aside to start a new history"
        )
    return Meta(epoch, values["last_id"], values["floor"])
