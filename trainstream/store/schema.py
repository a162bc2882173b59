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

import shlex
import sqlite3
import uuid
from collections.abc import Callable
from functools import cache

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


#: What SQLite says of a file that is not (or no longer) a SQLite database.
NOT_SQLITE = ("file is not a database", "unsupported file format")
#: SQLite's codes for a file whose content is damaged (``sqlite_errorname``).
_DAMAGE_CODES = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_FORMAT"})
#: What SQLite says (in part) when a table, index or column of the layout is
#: not in the file or is there twice (a header that says "new file" over an
#: old one), the schema or a page is malformed, or a stored text is not text.
_DAMAGE_TEXT = (
    "no such table",
    "no such index",
    "no such column",
    "already exists",
    "malformed",
    "Could not decode",
)


class DamagedError(StoreError):
    """A history file whose content is damaged: ``what`` is wrong with ``path``."""

    def __init__(self, path: str, what: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.what = what


def damaged(path: str, what: str) -> DamagedError:
    """
    The one line a damaged history file gets: the file, what is wrong, what
    to do (``python -m trainstream repair`` keeps what can be read).
    """
    if what in NOT_SQLITE:
        return DamagedError(
            path,
            what,
            f"history file {path} is not a SQLite database ({what}): if the path names "
            "another file, give the history's; if this is the history, its first page is "
            "damaged and nothing can be read from it: move it aside to start a new one",
        )
    return DamagedError(
        path,
        what,
        f"history file {path} is damaged ({what}); move it aside to start a new history, "
        f"or run `python -m trainstream repair {shlex.quote(path)}` to keep what can be read",
    )


def is_damage(error: sqlite3.Error) -> bool:
    """
    Whether ``error`` says the file's content is damaged (not that it is
    busy, read-only, or the disk is full: those are not the file's fault).
    """
    if getattr(error, "sqlite_errorname", None) in _DAMAGE_CODES:
        return True
    text = str(error)
    return isinstance(error, sqlite3.DatabaseError) and any(t in text for t in _DAMAGE_TEXT)


def translated(path: str, error: sqlite3.Error) -> StoreError:
    """``error``, raised reading ``path``, as the line a user gets."""
    if is_damage(error):
        return damaged(path, str(error))
    return StoreError(f"cannot read history file {path}: {error}")


@cache
def _layout() -> frozenset[tuple[str, str]]:
    """The (type, name) of every table and index a current file has."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(db, ":memory:")
        return frozenset(_objects(db))
    finally:
        db.close()


def _objects(db: sqlite3.Connection) -> list[tuple[str, str]]:
    return db.execute(
        "SELECT type, name FROM sqlite_master "
        "WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite_%'"
    ).fetchall()


def read_meta(db: sqlite3.Connection, path: str) -> Meta:
    """
    What ``meta`` says, once the file is known to have every table and
    index of the layout, and ``last_id`` is known to be at least the highest
    event id (else ids would be given twice). Cheap: no scan.

    :raises StoreError: naming the file, what is missing or wrong, and what
        to do (``damaged``).
    :raises sqlite3.DatabaseError: when SQLite cannot read the file.
    """
    missing = sorted(_layout() - set(_objects(db)))
    if missing:
        kind, name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise damaged(path, f"its {kind} {name!r} is missing{more}")
    rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
    values: dict[str, int] = {}
    for key in ("last_id", "floor"):
        text = rows.get(key)
        if text is None:
            raise damaged(path, f"its meta row {key!r} is missing")
        try:
            values[key] = int(text)
        except (TypeError, ValueError):
            raise damaged(path, f"its meta row {key!r} is {_brief(text)}, not an integer") from None
    if values["last_id"] < 0 or values["floor"] < 1:
        raise damaged(path, f"its meta says last_id {values['last_id']}, floor {values['floor']}")
    epoch = rows.get("epoch")
    if not isinstance(epoch, str) or not epoch:
        raise damaged(
            path, f"its meta row 'epoch' is {'missing' if epoch is None else _brief(epoch)}"
        )
    highest = db.execute("SELECT MAX(id) FROM events").fetchone()[0]
    if isinstance(highest, int) and highest > values["last_id"]:
        raise damaged(
            path,
            f"its meta row 'last_id' is {values['last_id']}, below its highest event id {highest}",
        )
    return Meta(epoch, values["last_id"], values["floor"])


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
