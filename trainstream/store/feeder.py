"""
The writer thread: what the reactor appends reaches the file through it.

It takes everything queued since its last transaction as one batch, turns
it into ready rows (``rows.py``), hands them to the writer process
(``writer.py``) and waits for its answer, then tells the reactor thread how
far the file got. Nothing that process does can stop the thread: if it dies
(killed, crashed), the thread starts another and sends it the batch that
was not committed (unless the file shows it was), so nothing accepted is
lost and ids stay as given; meanwhile ``down`` says so, for health. A row
SQLite cannot take is kept out of its transaction and only its ``sync()``
callers are told; a batch the process refuses every time is given up after
``_ATTEMPTS``, with the same kind of error for its callers only.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define
from twisted.logger import Logger

import trainstream
from trainstream.store.records import Record
from trainstream.store.rows import add_rows, rows_op

_log = Logger()

_STOP = object()

#: Times one batch is sent to a writer process (each death or failed write
#: counts) before it is given up: a batch that fails every time must not
#: hold up the ones after it.
_ATTEMPTS = 5
#: Seconds between looks, while idle, at whether the writer process lives.
_WATCH_INTERVAL = 0.5


class _WriterGoneError(Exception):
    """The writer process is gone (killed, crashed) or could not be started."""


@define
class WriterStats:
    """Counters of a history's writer over the life of its store (its restarts included)."""

    #: Times the writer process was started again after it died.
    writer_restarts: int = 0
    #: Accepted events that could not be stored (see ``Feeder._give_up``).
    events_lost: int = 0


class Feeder:
    """
    The writer thread and its writer process, for one open history file.

    The reactor thread calls ``put``, ``stop`` and reads ``down`` and
    ``child``; the rest runs in the thread, which reports back, in order,
    through ``call_from_thread``: ``on_commit(last_id)`` (every id up to it
    is committed or lost), ``on_trim(floor)`` and ``on_lost(first, last,
    message)``. Once ``stop()`` returns, every report has been made.
    """

    def __init__(
        self,
        path: str,
        last_id: int,
        call_from_thread: Callable[..., object],
        on_commit: Callable[[int], None],
        on_trim: Callable[[int], None],
        on_lost: Callable[[int, int, str], None],
        stats: WriterStats,
    ) -> None:
        self.path = path
        self.stats = stats
        self._call_from_thread = call_from_thread
        self._on_commit = on_commit
        self._on_trim = on_trim
        self._on_lost = on_lost
        self._written = last_id  # the highest id the file is done with
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._reports: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._closing = threading.Event()
        #: What is wrong with the writer process now (None: all is well).
        self.down: str | None = None
        self._failures = 0  # in a row, for the pause between attempts
        self.child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        # The package is found in the writer process as it is here.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(trainstream.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._env = env

    def start(self) -> None:
        """
        Start the writer process and the thread.

        :raises OSError: the process could not be started (nothing is left running).
        """
        self.child = self._spawn()
        thread = threading.Thread(target=self._write_loop, name="trainstream-sqlite", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._stop_child()
            raise
        self._thread = thread

    def put(self, item: Sequence[Record] | tuple[Any, ...]) -> None:
        """Queue a batch of records, ``("delete", run)`` or ``("trim", cutoff, limit)``."""
        self._queue.put(item)

    def stop(self) -> None:
        """
        Commit what is queued, stop the thread and the process (waits for
        both), then make the reports still on their way to the reactor.
        """
        self._closing.set()  # no more pauses between attempts
        self._queue.put(_STOP)
        thread = self._thread
        if thread is not None:
            thread.join(60)
            child = self.child
            if thread.is_alive() and child is not None:
                # Stuck: it must not write once another may own the file.
                _log.error("history file {path}: writer stuck; killing it", path=self.path)
                child.kill()
                child.wait(10)
        self._deliver()

    def _report(self, callback: Callable[..., None], *args: Any) -> None:
        """Writer thread: have ``callback(*args)`` called in the reactor thread, in order."""
        self._reports.append((callback, args))
        self._call_from_thread(self._deliver)

    def _deliver(self) -> None:
        """Reactor thread: make the reports made so far (once each, in order)."""
        reports = self._reports
        while reports:
            callback, args = reports.popleft()
            callback(*args)

    def exit_status(self) -> str | None:
        """How the writer process ended, if it has (no wait), as ``_exit_text`` says it."""
        child = self.child
        code = None if child is None else child.poll()  # WNOHANG
        return None if code is None else _exit_text(code)

    def _spawn(self) -> subprocess.Popen[bytes]:
        """
        Start a writer process. In a session of its own: a terminal's Ctrl-C
        (SIGINT to its foreground process group) is for the server to
        handle, which then commits what is queued and stops its writer; the
        writer also ends when its stdin does (the server is gone).
        """
        return subprocess.Popen(
            [sys.executable, "-m", "trainstream.store.writer", os.path.abspath(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )

    def _write_loop(self) -> None:
        """
        The writer thread: batches what has queued up into ready rows and
        hands them to the writer process (``writer.py``), one transaction at
        a time, then tells the reactor how far the file got. A writer
        process that dies is started again and given the batch it had not
        committed; nothing here ends this thread but ``close()``.
        """
        series: dict[tuple[str, str], list[Any]] = {}
        stop = False
        while not stop:
            try:
                items = [self._queue.get(timeout=_WATCH_INTERVAL)]
            except queue.Empty:
                self._watch()
                continue
            while True:  # take everything queued: one transaction for all
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            try:
                self._write_batch(items, series)
            except Exception:  # a bug: lose this batch, never the store
                series.clear()
                _log.failure("history file {path}: writing a batch failed", path=self.path)
                batches = [i for i in items if i is not _STOP and not isinstance(i, tuple)]
                if batches:
                    first, last = batches[0][0].id, batches[-1][-1].id
                    self._give_up(first, last, "an internal error", last - first + 1)
        self._stop_child()

    def _write_batch(self, items: list[Any], series: dict[tuple[str, str], list[Any]]) -> None:
        ops: list[tuple[Any, ...]] = []
        trims: list[tuple[float | None, int | None]] = []
        rows: list[tuple[Any, ...]] = []
        bad: list[tuple[int, str]] = []
        first = last = 0
        pending = False  # records since the last op
        for item in items:  # in queue order: a delete after inserts sees them
            if item is _STOP:
                continue
            if isinstance(item, tuple) and item[0] == "trim":
                trims.append((item[1], item[2]))
            elif isinstance(item, tuple):
                if pending:
                    ops.append(rows_op(rows, series, last))
                    rows, pending = [], False
                ops.append(item)
            else:
                add_rows(item, rows, series, bad)
                first = first or item[0].id
                last = item[-1].id
                pending = True
        if pending:
            # Even with no rows left (all bad), so the file's last id moves on.
            ops.append(rows_op(rows, series, last))
        for event_id, problem in bad:
            self.stats.events_lost += 1
            message = f"history file {self.path}: event {event_id} cannot be stored: {problem}"
            _log.error("{problem}", problem=message)
            self._lose(event_id, event_id, message)
        if ops or trims:
            self._commit(ops, trims, first, last)

    def _commit(
        self,
        ops: list[tuple[Any, ...]],
        trims: list[tuple[float | None, int | None]],
        first: int,
        last: int,
    ) -> None:
        """
        Have one batch committed, whatever it takes: a writer process that
        died is replaced and sent the batch again (unless the file shows it
        had committed it). Given up after ``_ATTEMPTS``.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                _, error, floors = self._exchange((ops, trims))
            except _WriterGoneError as e:
                self._died(str(e))
                if last and ops and self._disk_last_id() >= last:
                    ops = []  # it had committed them: only the trims are left
                reason = f"the writer process {e}"
            else:
                if error is None:
                    break
                # The transaction was rolled back: nothing of it is stored.
                self._failures += 1
                reason = f"write failed: {error}"
                self.down = f"history file {self.path}: {reason}; retrying"
                _log.error("{problem}", problem=self.down)
            if attempt >= _ATTEMPTS:
                rows = sum(len(op[1]) for op in ops if op[0] == "rows")
                reason = f"{reason}; tried {_ATTEMPTS} times"
                self._give_up(first, last, reason, rows, len(trims) > 0)
                return
            self._pause()
        if self.down is not None:
            _log.info("history file {path}: the writer is back", path=self.path)
        self.down = None
        self._failures = 0
        if last:
            self._written = last
            self._report(self._on_commit, last)
        for floor in floors:
            if isinstance(floor, str):  # the retention failed: the floor stays
                _log.error("history file {path}: {e}", path=self.path, e=floor)
                self._report(self._on_trim, 0)
            else:  # None: the file holds no event, the next id is the floor
                self._report(self._on_trim, self._written + 1 if floor is None else floor)

    def _exchange(self, message: object) -> Any:
        """Send ``message`` to the writer process (started if needed), return its answer."""
        child = self.child
        if child is None:
            try:
                child = self.child = self._spawn()
            except OSError as e:
                raise _WriterGoneError(f"could not be started ({e})") from None
        assert child.stdin is not None and child.stdout is not None
        try:
            pickle.dump(message, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
            return pickle.load(child.stdout)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            raise _WriterGoneError(_exit_text(_reap(child))) from None

    def _died(self, reason: str) -> None:
        """The writer process is gone: say so; the next exchange starts another."""
        child, self.child = self.child, None
        if child is not None:
            _reap(child)
        self.stats.writer_restarts += 1
        self._failures += 1
        self.down = f"history file {self.path}: the writer process {reason}; restarting it"
        _log.error("{problem}", problem=self.down)

    def _watch(self) -> None:
        """Idle: if the writer process died, start another now, not at the next batch."""
        child = self.child
        code = None if child is None else child.poll()
        if child is not None and code is None:
            return
        if code is not None:
            self._died(_exit_text(code))
        else:
            self._pause()  # none could be started: not in a tight loop
        try:
            self._exchange(([], []))  # starts one; it answers once the file is open
        except _WriterGoneError as e:
            self._died(str(e))
            return
        _log.info("history file {path}: the writer is back", path=self.path)
        self.down = None
        self._failures = 0

    def _pause(self) -> None:
        """Between attempts: longer the more failed in a row (none once closing)."""
        self._closing.wait(min(5.0, 0.05 * 2 ** max(0, self._failures - 1)))

    def _disk_last_id(self) -> int:
        """The last id the file has committed (-1: unknown)."""
        try:
            db = sqlite3.connect(self.path, timeout=5)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return -1
        return int(row[0]) if row else -1

    def _give_up(self, first: int, last: int, reason: str, rows: int, trims: bool = False) -> None:
        """
        The last resort for a batch that fails every time: its ``rows``
        events (ids ``first`` to ``last``) are lost, their ``sync()``
        callers are told, and the batches after it go on. The file's last
        id still moves past them, so no id is ever given twice.
        """
        if rows:
            self.stats.events_lost += rows
            message = (
                f"history file {self.path}: events {first} to {last} could not be stored "
                f"({reason}); they are lost"
            )
            _log.error("{problem}", problem=message)
            self._lose(first, last, message)
            try:
                self._exchange(([("rows", [], [], last)], []))
            except _WriterGoneError as e:
                self._died(str(e))
        if last:
            self._written = max(self._written, last)
            self._report(self._on_commit, last)
        if trims:
            self._report(self._on_trim, 0)

    def _lose(self, first: int, last: int, message: str) -> None:
        self._report(self._on_lost, first, last, message)

    def _stop_child(self) -> None:
        """After the last batch: the writer process ends once its stdin does."""
        child, self.child = self.child, None
        if child is None:
            return
        assert child.stdin is not None
        try:
            pickle.dump(None, child.stdin)
            child.stdin.flush()
        except OSError:
            pass  # gone already
        _reap(child, 30)


def _reap(child: subprocess.Popen[bytes], within: float = 2) -> int:
    """
    Close the pipes of a writer process that is done (or whose pipe broke),
    and its exit status; killed if it lingers past ``within`` seconds.
    """
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    try:
        return child.wait(within)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait(10)


def _exit_text(code: int) -> str:
    """``was killed by SIGKILL``, ``exited with status 1``, ..."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
