"""
A damaged history file gets one clear line, never a traceback: at the start
of a store (in process, in ``twistd``, in an embedded script), and in the
reads a running server makes (a replay leaves out what cannot be read, and
says so once). ``python -m trainstream check`` says what is wrong without
changing the file; ``repair`` keeps what can be read, ids and all.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_store_recovery import read_until, start_child
from trainstream.__main__ import main
from trainstream.errors import StoreError
from trainstream.events import encode_event
from trainstream.hub import Hub
from trainstream.ranks import RanksService
from trainstream.runs import RunsService
from trainstream.store import Filter, Record, sqlite as sqlite_store
from trainstream.store.lock import FileLock
from trainstream.store.rows import add_rows, rows_op
from trainstream.store.schema import migrate
from trainstream.store.sqlite import SQLiteStore
from trainstream.store.writer import apply, connect

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTEN = "tcp:0:interface=127.0.0.1"
METRICS = 3000  # metric events of run "r" (steps 0..2999); run "q" has every 10th step


# A history, built with the code a server writes with


def history_events() -> list[dict[str, object]]:
    """Status and hparams first (what a start reads), metrics, logs, a last status."""
    out: list[dict[str, object]] = [
        {"type": "status", "run": "r", "state": "running", "time": 1.0},
        {"type": "hparams", "run": "r", "params": {"lr": 0.1}, "time": 1.0},
        {"type": "status", "run": "q", "state": "running", "time": 1.0},
    ]
    for step in range(METRICS):
        point = {"type": "metric", "step": step, "time": 2.0}
        out.append({**point, "run": "r", "name": "loss", "value": 1.0 / (step + 1)})
        if step % 10 == 0:
            out.append({**point, "run": "q", "name": "acc", "value": 0.5})
        if step % 500 == 0:
            out.append(
                {"type": "log", "run": "r", "level": "info", "message": f"at {step}", "time": 2.0}
            )
    out.append({"type": "status", "run": "r", "state": "finished", "time": 3.0})
    return out


def build(path: str) -> int:
    """Write the history at ``path`` (rows, series, rollups, meta); its last id."""
    records = []
    for i, event in enumerate(history_events(), start=1):
        e = {"id": i, **event}
        name = e.get("name")
        records.append(
            Record(
                id=i,
                type=str(e["type"]),
                run=str(e["run"]),
                name=name if isinstance(name, str) else None,
                event=e,
                json=encode_event(e),
            )
        )
    db = connect(path)
    try:
        migrate(db, path)
        for start in range(0, len(records), 1000):
            batch = records[start : start + 1000]
            rows: list[tuple[Any, ...]] = []
            series: dict[tuple[str, str], list[Any]] = {}
            add_rows(batch, rows, series, [])
            apply(db, [rows_op(rows, series, batch[-1].id)])
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return len(records)


def sql(*statements: str) -> Callable[[str], None]:
    def damage(path: str) -> None:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            for statement in statements:
                db.execute(statement)

    return damage


def pages_of(path: str, btree: str, kind: str | None = None) -> list[int]:
    """The page numbers of a table or index (``kind``: 'leaf', 'internal'), in order."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        query = "SELECT pageno FROM dbstat WHERE name = ?" + (" AND pagetype = ?" if kind else "")
        args = (btree, kind) if kind else (btree,)
        return sorted(p for (p,) in db.execute(query, args))


def overwrite(path: str, first_page: int, count: int = 1, seed: int = 11) -> None:
    """Pages ``first_page``.. (1-based) overwritten with random bytes (the same each run)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    noise = random.Random(seed).randbytes(page_size * count)
    with open(path, "r+b") as f:
        f.seek((first_page - 1) * page_size)
        f.write(noise)


def middle_leaf(path: str) -> None:
    """An events page in the middle of the file: metric rows only (nothing a start reads)."""
    leaves = pages_of(path, "events", "leaf")
    overwrite(path, leaves[len(leaves) // 2])


def events_root(path: str) -> None:
    """The page every read of ``events`` goes through."""
    overwrite(path, min(pages_of(path, "events", "internal")))


def series_page(path: str) -> None:
    overwrite(path, pages_of(path, "series")[0])


def header(path: str) -> None:
    overwrite(path, 1)


def truncated(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def not_sqlite(path: str) -> None:
    with open(path, "w") as f:
        f.write("these are my notes, not a history\n" * 200)


#: Damage a start finds: each case, what the line says.
AT_START: dict[str, tuple[Callable[[str], None], str]] = {
    "pages at the header": (header, "is not a SQLite database (file is not a database)"),
    "the events root page": (events_root, "is damaged (database disk image is malformed)"),
    "the series page": (series_page, "is damaged (database disk image is malformed)"),
    "truncated": (truncated, "is damaged (database disk image is malformed)"),
    "not SQLite": (not_sqlite, "is not a SQLite database (file is not a database)"),
    "meta missing": (sql("DROP TABLE meta"), "(its table 'meta' is missing)"),
    "last_id missing": (
        sql("DELETE FROM meta WHERE key = 'last_id'"),
        "(its meta row 'last_id' is missing)",
    ),
    "last_id not an integer": (
        sql("UPDATE meta SET value = 'abc' WHERE key = 'last_id'"),
        "(its meta row 'last_id' is 'abc', not an integer)",
    ),
    "last_id below the ids": (
        sql("UPDATE meta SET value = '5' WHERE key = 'last_id'"),
        "(its meta row 'last_id' is 5, below its highest event id",
    ),
    "epoch missing": (
        sql("DELETE FROM meta WHERE key = 'epoch'"),
        "(its meta row 'epoch' is missing)",
    ),
    "floor not an integer": (
        sql("UPDATE meta SET value = '1.5' WHERE key = 'floor'"),
        "(its meta row 'floor' is '1.5', not an integer)",
    ),
    "a status row of invalid JSON": (
        sql('UPDATE events SET json = \'{"type": "status", \' WHERE id = 1'),
        "(event 1 is not valid JSON (",
    ),
    "a status row that is no object": (
        sql("UPDATE events SET json = '[1, 2]' WHERE id = 1"),
        "(event 1 is JSON list, not an event object)",
    ),
    "rollup table missing": (sql("DROP TABLE rollup"), "(its table 'rollup' is missing)"),
    "series table missing": (sql("DROP TABLE series"), "(its table 'series' is missing)"),
    "an index missing": (sql("DROP INDEX events_type"), "(its index 'events_type' is missing)"),
}


def never(f: Callable[..., object], *args: object) -> None:
    """``call_from_thread`` for a store that is only read: no report is needed."""


def damaged_copy(test: SynchronousTestCase, damage: Callable[[str], None]) -> tuple[str, int]:
    path = os.path.abspath(test.mktemp() + ".sqlite3")
    last = build(path)
    damage(path)
    return path, last


def open_like_a_server(test: SynchronousTestCase, path: str) -> SQLiteStore:
    """What a server's start reads: the store, the Hub's segments, the runs and ranks."""
    store = SQLiteStore(path, never)
    store.start()
    test.addCleanup(store.close)
    try:
        hub = Hub(store)
        hub.open()
        RunsService(hub, Clock(), 60).load()
        RanksService(hub).load()
    except BaseException:
        store.close()  # as a server's failed start does
        raise
    return store


@contextlib.contextmanager
def logged() -> Iterator[list[str]]:
    """The text of every log event meanwhile."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class StartTests(SynchronousTestCase):
    """Every damage a start meets: one StoreError line naming the file and what to do."""

    def assert_one_line(self, path: str, error: StoreError, says: str) -> None:
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertIn(f"history file {path} ", text)
        self.assertIn(says, text)
        if "not a SQLite database" in text:
            self.assertIn("move it aside", text)
        else:
            self.assertIn(f"python -m trainstream repair {path}", text)

    def test_each_damage_gives_one_line(self) -> None:
        # The same history undamaged starts, every event there.
        path, last = damaged_copy(self, lambda path: None)
        store = open_like_a_server(self, path)
        self.assertEqual((store.last_id, len(store.after(0, Filter()))), (last, last))
        for case, (damage, says) in AT_START.items():
            with self.subTest(case):
                path, _ = damaged_copy(self, damage)
                error = self.assertRaises(StoreError, open_like_a_server, self, path)
                self.assert_one_line(path, error, says)
                # Nothing is left held: the same process gets the same line again.
                again = self.assertRaises(StoreError, open_like_a_server, self, path)
                self.assertEqual(str(again), str(error))

    def test_a_busy_file_is_not_called_damaged(self) -> None:
        """SQLite's "database is locked" is not damage: no advice to move the file."""
        path, _ = damaged_copy(self, lambda path: None)
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN EXCLUSIVE")  # the store's migration cannot begin
        self.addCleanup(other.execute, "ROLLBACK")
        self.patch(sqlite_store, "connect", _impatient)
        error = self.assertRaises(StoreError, SQLiteStore(path, never).start)
        self.assertEqual(str(error), f"cannot read history file {path}: database is locked")


def _impatient(path: str) -> sqlite3.Connection:
    """``writer.connect`` without its 5 s wait for a busy file."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.05)
    db.execute("PRAGMA journal_mode=WAL")
    return db


class RuntimeReadTests(SynchronousTestCase):
    """
    Damage a start does not read: the server runs, and each read leaves out
    what cannot be read or decoded, with one logged line naming the file
    and the ids, instead of failing the request.
    """

    def test_an_unreadable_page_is_left_out_of_a_replay(self) -> None:
        path, last = damaged_copy(self, middle_leaf)
        store = open_like_a_server(self, path)
        with logged() as lines:
            ids = [r.id for r in store.after(0, Filter())]
            again = [r.id for r in store.after(0, Filter())]
            metric_ids = [r.id for r in store.after(0, Filter(types=("metric",), runs=("r",)))]
        self.assertEqual(again, ids)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual((ids[0], ids[-1]), (1, last))
        gaps = [(a, b) for a, b in itertools.pairwise(ids) if b != a + 1]
        self.assertEqual(len(gaps), 1, gaps)
        missing = range(gaps[0][0] + 1, gaps[0][1])
        self.assertLess(len(missing), 200)
        self.assertFalse(set(missing) & set(metric_ids))
        self.assertGreater(len(metric_ids), METRICS - 200)
        said = [line for line in lines if path in line]
        self.assertTrue(said)
        self.assertTrue(all("cannot be read" in line for line in said), said)
        self.assertIn(f"the events after id {gaps[0][0]} up to id", said[0])
        self.assertIn(f"python -m trainstream check {path}", said[0])
        self.assertEqual(len(said), len(set(said)))  # a second replay says nothing new

    def test_rows_that_are_no_event_are_left_out(self) -> None:
        bad = {500: "{not json", 900: "[1, 2]", 1300: '"a string"', 1700: "null"}
        path, last = damaged_copy(
            self,
            sql(*(f"UPDATE events SET json = '{text}' WHERE id = {i}" for i, text in bad.items())),
        )
        store = open_like_a_server(self, path)
        for match in (Filter(), Filter(types=("metric",)), Filter(runs=("r",), names=("loss",))):
            with logged() as lines:
                ids = [r.id for r in store.after(0, match)]
            self.assertFalse(set(bad) & set(ids))
            self.assertIn(499, ids)
            self.assertIn(last - 1, ids)
        with logged() as lines:
            store.after(0, Filter(), 10_000)
        self.assertEqual([line for line in lines if path in line], [])  # said once per row
        with logged() as lines:  # a new bad row is said
            sql("UPDATE events SET json = '{' WHERE id = 2000")(path)
            ids = [r.id for r in store.after(1990, Filter(), 20)]
        self.assertNotIn(2000, ids)
        said = [line for line in lines if path in line]
        self.assertEqual(len(said), 1, lines)
        self.assertIn("event 2000 is not valid JSON", said[0])
        self.assertIn("it is left out", said[0])

    def test_metric_history_with_unreadable_rollups(self) -> None:
        """The rollups' pages are damaged: the history is read from the points instead."""

        def damage(path: str) -> None:
            overwrite(path, pages_of(path, "rollup")[-1])

        path, _ = damaged_copy(self, damage)
        store = open_like_a_server(self, path)
        with logged() as lines:
            points, downsampled = store.history("r", "loss", None, None, None, 100_000)
        self.assertEqual([p[0] for p in points], list(range(METRICS)))
        self.assertFalse(downsampled)
        said = [line for line in lines if path in line]
        self.assertEqual(len(said), 1, lines)
        self.assertIn("the rollups cannot be read", said[0])
        thinned, downsampled = store.history("r", "loss", None, 0, 999, 100)
        self.assertTrue(downsampled)
        self.assertLessEqual(len(thinned), 100)
        self.assertIn((0, 1.0, 2.0), thinned)  # the spike (the highest value) is kept


class CheckTests(SynchronousTestCase):
    """``python -m trainstream check PATH``: reads only; 0 when whole, 1 when damaged."""

    def test_a_whole_file(self) -> None:
        path, last = damaged_copy(self, lambda path: None)
        code, out, err = run_main("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[0], f"history file {path}: ok")
        self.assertIn(f"last_id {last}, floor 1", out)
        self.assertIn(f"events: {last}, every one decodes", out)

    def test_each_damage_is_reported(self) -> None:
        cases = {
            **{case: damage for case, (damage, _) in AT_START.items()},
            "an unreadable page": middle_leaf,
            "a metric row of invalid JSON": sql("UPDATE events SET json = '{' WHERE id = 700"),
        }
        for case, damage in cases.items():
            with self.subTest(case):
                path, _ = damaged_copy(self, damage)
                before = _digest(path)
                code, out, err = run_main("check", path)
                self.assertEqual((code, err), (1, ""), out)
                lines = out.splitlines()
                self.assertEqual(lines[0], f"history file {path} is damaged:")
                self.assertEqual(
                    lines[-1],
                    f"to keep what can be read: python -m trainstream repair {path} "
                    "(the damaged file is kept beside it)",
                )
                self.assertLess(len(lines), 20)
                self.assertEqual(_digest(path), before)  # it only read
                if case == "a metric row of invalid JSON":
                    total = len(history_events())
                    self.assertIn(f"  events: {total - 1} readable, at most 1 lost:", lines)
                    self.assertIn("    event 700 is not valid JSON", out)

    def test_what_check_says(self) -> None:
        path, _ = damaged_copy(self, sql("UPDATE meta SET value = 'x' WHERE key = 'last_id'"))
        _, out, _ = run_main("check", path)
        self.assertIn("  meta: its meta row 'last_id' is 'x', not an integer", out)
        path, _ = damaged_copy(self, truncated)
        _, out, _ = run_main("check", path)
        self.assertIn("  it is cut off: ", out)
        self.assertIn("readable, an unknown number lost:", out)
        code, out, _ = run_main("check", path + ".nothing")
        self.assertEqual(code, 1)
        self.assertIn("there is no such file", out)


def _digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stored(path: str) -> tuple[list[int], dict[str, str], list[tuple[Any, ...]]]:
    """Ids, meta and series rows of a (whole) file."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        ids = [i for (i,) in db.execute("SELECT id FROM events ORDER BY id")]
        meta = dict(db.execute("SELECT key, value FROM meta"))
        series = db.execute(
            "SELECT run, name, segment, last_step, count, min, max, last_id FROM series "
            "ORDER BY run, name"
        ).fetchall()
    return ids, meta, series


class RepairTests(SynchronousTestCase):
    """``python -m trainstream repair PATH``: what can be read, in a new file."""

    def repair(self, path: str) -> str:
        code, out, err = run_main("repair", path)
        self.assertEqual((code, err), (0, ""), out)
        return out

    def test_repair_keeps_what_can_be_read(self) -> None:
        path, last = damaged_copy(self, middle_leaf)
        sql("UPDATE events SET json = '{' WHERE id = 100")(path)
        damaged = _digest(path)
        out = self.repair(path)
        ids, meta, series = stored(path)
        asides = [a for a in glob.glob(path + ".damaged-*") if not a.endswith(("-wal", "-shm"))]
        self.assertEqual(len(asides), 1, asides)
        aside = asides[0]
        self.assertRegex(aside, r"\.damaged-\d{8}T\d{6}Z$")
        self.assertEqual(_digest(aside), damaged)
        self.assertNotIn(100, ids)
        self.assertEqual((ids[0], ids[-1]), (1, last))
        lost = set(range(1, last + 1)) - set(ids)
        self.assertLess(len(lost), 200)
        self.assertIn(f"{len(ids)} events recovered, at most {len(lost)} lost", out)
        self.assertIn("event 100 is not valid JSON", out)
        self.assertIn(f"the damaged file is now {aside}", out)
        self.assertEqual(meta["last_id"], str(last))
        # The series summaries count what was recovered.
        loss = next(s for s in series if s[:2] == ("r", "loss"))
        with contextlib.closing(sqlite3.connect(path)) as db:
            count = db.execute(
                "SELECT COUNT(*) FROM events WHERE run = 'r' AND name = 'loss'"
            ).fetchone()[0]
        self.assertEqual(loss[4], count)
        self.assertEqual((loss[3], loss[6]), (METRICS - 1, 1.0))
        # And the repaired file is whole, and opens.
        code, out, _ = run_main("check", path)
        self.assertEqual(code, 0, out)
        store = open_like_a_server(self, path)
        self.assertEqual([r.id for r in store.after(0, Filter(), 10_000)], ids)
        points, _ = store.history("r", "loss", None, None, None, 100_000)
        self.assertEqual(len(points), count)

    def test_the_epoch_is_kept(self) -> None:
        path, _ = damaged_copy(self, middle_leaf)
        before = meta_of(path)
        out = self.repair(path)
        self.assertEqual(meta_of(path)["epoch"], before["epoch"])
        self.assertIn("epoch kept", out)

    def test_ids_go_on_after_the_highest_the_file_shows(self) -> None:
        """
        last_id unreadable, the newest events gone: ids go on after the
        highest id the file still shows anywhere (here the series summary).
        """
        last = len(history_events())
        path, _ = damaged_copy(
            self,
            sql(
                "UPDATE meta SET value = 'x' WHERE key = 'last_id'",
                f"DELETE FROM events WHERE id > {last - 50}",
            ),
        )
        out = self.repair(path)
        ids, meta, _ = stored(path)
        self.assertEqual(ids[-1], last - 50)
        self.assertEqual(meta["last_id"], str(last - 1))  # the series' last metric id
        self.assertIn(f"new events get ids after {last - 1}", out)

    def test_a_cut_off_file(self) -> None:
        path, last = damaged_copy(self, truncated)
        out = self.repair(path)
        ids, _, _ = stored(path)
        self.assertGreater(len(ids), 100)
        self.assertEqual(ids, list(range(1, len(ids) + 1)))
        self.assertIn(f"{len(ids)} events recovered, at most {last - len(ids)} lost", out)

    def test_a_file_that_is_no_database(self) -> None:
        path, _ = damaged_copy(self, not_sqlite)
        out = self.repair(path)
        ids, meta, _ = stored(path)
        self.assertEqual((ids, meta["last_id"]), ([], "0"))
        self.assertIn("0 events recovered", out)
        self.assertIn("epoch new", out)
        open_like_a_server(self, path)

    def test_refused_while_a_server_holds_the_file(self) -> None:
        path, _ = damaged_copy(self, middle_leaf)
        held = FileLock(path)
        self.addCleanup(held.release)
        before = _digest(path)
        code, out, err = run_main("repair", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err.strip(),
            f"trainstream repair: history file {path} is in use by a running trainstream "
            f"server (pid {os.getpid()}): stop that server, then repair the file",
        )
        self.assertEqual(_digest(path), before)
        self.assertEqual(glob.glob(path + ".*"), [path + ".lock"])

    def test_no_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        code, out, err = run_main("repair", path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"there is no history file at {path}", err)


def meta_of(path: str) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT key, value FROM meta"))


# Real processes: twistd, an embedded script


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200, answer.status
        return json.load(answer)


def post(url: str, events: list[dict[str, object]]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(events).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


class ProcessTests(SynchronousTestCase):
    def start(self, args: list[str]) -> subprocess.Popen[bytes]:
        return start_child(self, args)

    def twistd(self, db: str) -> subprocess.Popen[bytes]:
        return self.start(
            [
                *(TWISTD, "-n", "--pidfile=", "trainstream"),
                *("--rest", LISTEN, "--sse", LISTEN, "--ws", LISTEN),
                *("--ports-file", db + ".ports", "--db", db),
            ]
        )

    def serving(self, db: str) -> tuple[subprocess.Popen[bytes], str]:
        process = self.twistd(db)
        read_until(process, b"trainstream listening", 30)
        with open(db + ".ports") as f:
            return process, str(json.load(f)["rest"])

    def stop(self, process: subprocess.Popen[bytes]) -> str:
        os.kill(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        return (out + err).decode(errors="replace")

    def test_twistd_refuses_a_damaged_file_in_one_line(self) -> None:
        for case in ("meta missing", "pages at the header", "a status row of invalid JSON"):
            with self.subTest(case):
                damage, says = AT_START[case]
                db, _ = damaged_copy(self, damage)
                process = self.twistd(db)
                out, err = process.communicate(timeout=30)
                text = (out + err).decode(errors="replace")
                self.assertNotEqual(process.returncode, 0, text)
                self.assertNotIn("Traceback", text)
                said = [line for line in text.splitlines() if f"history file {db}" in line]
                self.assertEqual(len(said), 1, text)
                self.assertIn(f"trainstream: history file {db} ", said[0])
                self.assertIn(says, said[0])

    def test_twistd_serves_what_can_be_read(self) -> None:
        """An unreadable page and a bad row: GET /api/events answers 200 without them."""
        db, last = damaged_copy(self, middle_leaf)
        sql("UPDATE events SET json = '[]' WHERE id = 50")(db)
        process, rest = self.serving(db)
        ids: list[int] = []
        after = 0
        while True:
            page = get(f"{rest}/events?after={after}&limit=1000")
            ids += [e["id"] for e in page["events"]]
            if not page["events"]:
                break
            after = page["events"][-1]["id"]
        self.assertEqual((ids[0], ids[-1]), (1, last))
        self.assertNotIn(50, ids)
        self.assertGreater(len(ids), last - 200)
        history = get(f"{rest}/runs/r/metrics/loss?max_points=100")
        self.assertTrue(history["points"])
        text = self.stop(process)
        self.assertNotIn("Traceback", text)
        self.assertIn(f"history file {db}: event 50 is JSON list, not an event object", text)
        self.assertIn(f"history file {db}: the events after id ", text)

    def test_repaired_file_serves_its_events_and_ids_go_on(self) -> None:
        db, last = damaged_copy(self, middle_leaf)
        sql("UPDATE meta SET value = 'lost' WHERE key = 'last_id'")(db)
        code, out, err = run_main("repair", db)
        self.assertEqual(code, 0, out + err)
        ids, _, _ = stored(db)
        process, rest = self.serving(db)
        served = get(f"{rest}/events?after=0&limit=10000")
        self.assertEqual([e["id"] for e in served["events"]], ids)
        history = get(f"{rest}/runs/r/metrics/loss?max_points=100000")
        loss = [i for i, e in zip(ids, served["events"], strict=True) if e.get("name") == "loss"]
        self.assertEqual(len(history["points"]), len(loss))
        run = get(f"{rest}/runs/r")
        self.assertEqual(run["state"], "finished")
        event = {"type": "log", "run": "r", "level": "info", "message": "again", "time": 4.0}
        answer = post(f"{rest}/events", [event])
        self.assertEqual(answer["first_id"], last + 1)
        self.assertNotIn("Traceback", self.stop(process))

    def test_an_embedded_script_gets_the_line(self) -> None:
        db, _ = damaged_copy(self, AT_START["meta missing"][0])
        script = textwrap.dedent(
            """
            import sys
            import trainstream

            try:
                trainstream.get_stream_server({"listen": sys.argv[2], "db": sys.argv[1]})
            except trainstream.TrainstreamError as e:
                print(type(e).__mro__[1:3], file=sys.stderr)
                print(e)
                sys.exit(3)
            """
        )
        process = self.start([sys.executable, "-c", script, db, LISTEN])
        out, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 3, err)
        self.assertIn(b"StoreError", err)
        self.assertEqual(
            out.decode().splitlines(),
            [
                f"history file {db} is damaged (its table 'meta' is missing); move it aside to "
                f"start a new history, or run `python -m trainstream repair {db}` to keep what "
                "can be read"
            ],
        )
