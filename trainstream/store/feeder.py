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

A full disk is not retried: its batch is refused at once (its publishers are
waiting for an answer), ``down`` says the disk is full until a write fits
again, and while idle the thread probes for room every ``_WATCH_INTERVAL``,
so the server recovers by itself once space frees.

The writer process inherits the file's lock (``lock_fd``): a server killed
with ``kill -9`` leaves its writer to commit what it was sent, and the next
server cannot take the file (and read where ids stand) until it has. (On
Windows, where a child gets no lock of ours, the next server waits for the
writer's pid instead: ``lock.py``.)
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
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
from trainstream.store.lock import FLOCK, WRITER_CREATIONFLAGS, writer_started
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
#: Bytes a probe takes (and gives back) to see if a full disk has room again.
_PROBE_BYTES = 256 * 1024
#: Bytes the pipes to the writer process may hold (Linux's default limit for
#: an unprivileged process): a batch of a few thousand rows is written in
#: one go. With the 64 KiB default, sending one blocked on the pipe several
#: times, and each time this thread had to win the GIL back from a busy
#: reactor thread (up to a switch interval, 5 ms, each): measured under
#: ``bench/ingest.py``, the writer process had a 2000-event batch (320 KB)
#: 15 ms after the send began, 3.4 ms with this (medians).
_PIPE_BYTES = 1 << 20


def disk_full(error: str) -> bool:
    """Whether a write failed for want of space (SQLITE_FULL, ENOSPC)."""
    return "database or disk is full" in error or "No space left" in error


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
    through ``call_from_thread``: ``on_done(seq, last_id, deleted)`` (every
    item up to ``seq`` is done: its events committed or lost, up to
    ``last_id``, 0 if none; ``deleted`` maps each delete's seq to the events
    it removed, or to why it failed), ``on_trim(floor)`` and ``on_lost(first,
    last, message, full)`` (before the ``on_done`` of its batch; ``full``:
    for want of disk space). Once ``stop()`` returns, every report has been
    made.
    """

    def __init__(
        self,
        path: str,
        last_id: int,
        call_from_thread: Callable[..., object],
        on_done: Callable[[int, int, dict[int, int | str]], None],
        on_trim: Callable[[int], None],
        on_lost: Callable[[int, int, str, bool], None],
        stats: WriterStats,
        lock_fd: int = -1,
    ) -> None:
        self.path = path
        self.stats = stats
        self._call_from_thread = call_from_thread
        self._on_done = on_done
        self._lock_fd = lock_fd
        self._on_trim = on_trim
        self._on_lost = on_lost
        self._written = last_id  # the highest id the file is done with
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._reports: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._closing = threading.Event()
        #: What is wrong with the writer process now (None: all is well).
        self.down: str | None = None
        self._full = False  # the last write failed for want of space
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

    def put(self, seq: int, item: Sequence[Record] | tuple[Any, ...]) -> None:
        """
        Queue item ``seq`` (numbered in order by the caller): a batch of
        records, ``("delete", run)`` or ``("trim", cutoff, limit)``.
        """
        self._queue.put((seq, item))

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
        writer also ends when its stdin does (the server is gone). It
        inherits the file's lock where that is an ``flock`` (POSIX); on
        Windows (no sessions, no ``pass_fds``) it gets a process group of
        its own instead, and its pid is noted in the lock file before it is
        sent anything (``lock.writer_started``).
        """
        child = subprocess.Popen(
            [sys.executable, "-m", "trainstream.store.writer", os.path.abspath(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
            start_new_session=FLOCK,
            pass_fds=(self._lock_fd,) if FLOCK and self._lock_fd >= 0 else (),
            creationflags=WRITER_CREATIONFLAGS,
        )
        writer_started(self._lock_fd, child.pid)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                _widen(stream.fileno())
        return child

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
            queued = [item for item in items if item is not _STOP]
            if not queued:
                continue
            try:
                self._write_batch(queued, series)
            except Exception:  # a bug: lose this batch, never the store
                series.clear()
                _log.failure("history file {path}: writing a batch failed", path=self.path)
                batches = [i for _, i in queued if not isinstance(i, tuple)]
                first = batches[0][0].id if batches else 0
                last = batches[-1][-1].id if batches else 0
                deletes = [s for s, i in queued if isinstance(i, tuple) and i[0] == "delete"]
                lost = [("rows", [r for b in batches for r in b])]
                self._give_up(queued[-1][0], first, last, "an internal error", lost, deletes)
        self._stop_child()

    def _write_batch(
        self, items: list[tuple[int, Any]], series: dict[tuple[str, str], list[Any]]
    ) -> None:
        ops: list[tuple[Any, ...]] = []
        trims: list[tuple[float | None, int | None]] = []
        deletes: list[int] = []  # the seq of each delete op, in order
        rows: list[tuple[Any, ...]] = []
        bad: list[tuple[int, str]] = []
        first = last = 0
        pending = False  # records since the last op
        for seq, item in items:  # in queue order: a delete after inserts sees them
            if isinstance(item, tuple) and item[0] == "trim":
                trims.append((item[1], item[2]))
            elif isinstance(item, tuple):
                if pending:
                    ops.append(rows_op(rows, series, last))
                    rows, pending = [], False
                ops.append(item)
                deletes.append(seq)
            elif item:
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
        self._commit(items[-1][0], ops, trims, deletes, first, last)

    def _commit(
        self,
        seq: int,
        ops: list[tuple[Any, ...]],
        trims: list[tuple[float | None, int | None]],
        deletes: list[int],
        first: int,
        last: int,
    ) -> None:
        """
        Have items up to ``seq`` committed in one transaction, whatever it
        takes: a writer process that died is replaced and sent the batch
        again (unless the file shows it had committed it). Given up after
        ``_ATTEMPTS``, or at once on a full disk.
        """
        attempt = 0
        counts: list[int] = []
        while True:
            attempt += 1
            try:
                _, error, floors, counts = self._exchange((ops, trims))
            except _WriterGoneError as e:
                self._died(str(e))
                if last and ops and self._disk_last_id() >= last:
                    # It had committed them: only the trims are left. What
                    # its deletes removed is not known; they did happen.
                    ops = []
                    counts = [0] * len(deletes)
                reason = f"the writer process {e}"
            else:
                if error is None:
                    break
                # The transaction was rolled back: nothing of it is stored.
                self._failures += 1
                if disk_full(error):
                    self._full = True
                    self.down = (
                        f"history file {self.path}: the disk is full ({error}); "
                        "new events are refused until space frees"
                    )
                    _log.error("{problem}", problem=self.down)
                    self._give_up(seq, first, last, "the disk is full", ops, deletes, trims, True)
                    return
                reason = f"write failed: {error}"
                self.down = f"history file {self.path}: {reason}; retrying"
                _log.error("{problem}", problem=self.down)
            if attempt >= _ATTEMPTS:
                reason = f"{reason}; tried {_ATTEMPTS} times"
                self._give_up(seq, first, last, reason, ops, deletes, trims)
                return
            self._pause()
        self._back()
        if last:
            self._written = last
        done = dict(zip(deletes, counts or [0] * len(deletes), strict=True))
        self._report(self._on_done, seq, last, done)
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
            # Pickled whole first, then written at once (see _PIPE_BYTES).
            child.stdin.write(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
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

    def _back(self) -> None:
        """A write went through: whatever was wrong is over."""
        if self.down is not None:
            _log.info("history file {path}: the writer is back", path=self.path)
        self.down = None
        self._full = False
        self._failures = 0

    def _watch(self) -> None:
        """
        Idle: if the writer process died, start another now, not at the next
        batch; if the disk was full, see whether it has room again.
        """
        child = self.child
        code = None if child is None else child.poll()
        if child is not None and code is None:
            if self._full:
                try:
                    _, error, _, _ = self._exchange(([("probe", _PROBE_BYTES)], []))
                except _WriterGoneError as e:
                    self._died(str(e))
                    return
                if error is None:
                    self._back()
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
        if not self._full:
            self._back()

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

    def _give_up(
        self,
        seq: int,
        first: int,
        last: int,
        reason: str,
        ops: Sequence[tuple[Any, ...]],
        deletes: Sequence[int] = (),
        trims: Sequence[object] = (),
        full: bool = False,
    ) -> None:
        """
        The last resort for a batch that fails every time (or, ``full``,
        hits a full disk): the events of its ``ops`` (ids ``first`` to
        ``last``) are not stored, their ``sync()`` callers are told, no
        client was shown them, and the batches after it go on. Unless the
        disk is full, the file's last id is moved past them (no client ever
        saw those ids).
        """
        rows = sum(len(op[1]) for op in ops if op[0] == "rows")
        if rows:
            if full:
                message = (
                    f"history file {self.path}: the disk is full ({_disk(self.path)}); "
                    f"{rows} events were not stored: free space, then publish them again"
                )
            else:
                self.stats.events_lost += rows
                message = (
                    f"history file {self.path}: events {first} to {last} could not be stored "
                    f"({reason}); they are lost"
                )
            _log.error("{problem}", problem=message)
            self._lose(first, last, message, full)
            if not full:
                try:
                    self._exchange(([("rows", [], [], last)], []))
                except _WriterGoneError as e:
                    self._died(str(e))
        if last:
            self._written = max(self._written, last)
        why = "the disk is full" if full else f"it could not be stored ({reason})"
        failed: dict[int, int | str] = {
            s: f"history file {self.path}: the delete was not done: {why}" for s in deletes
        }
        self._report(self._on_done, seq, last, failed)
        if trims:
            self._report(self._on_trim, 0)

    def _lose(self, first: int, last: int, message: str, full: bool = False) -> None:
        self._report(self._on_lost, first, last, message, full)

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


def _widen(fd: int) -> None:
    """Let the pipe ``fd`` hold ``_PIPE_BYTES`` if the system allows (else as it was)."""
    try:
        import fcntl
    except ImportError:  # Windows: the pipe's size is set when it is made
        return
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setsize is None:
        return
    try:
        fcntl.fcntl(fd, setsize, _PIPE_BYTES)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size, or not a pipe: the default works too


def _disk(path: str) -> str:
    """The filesystem holding ``path``, and its room: ``filesystem /srv, 0 bytes free``."""
    mount = os.path.dirname(os.path.abspath(path))
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    try:
        free = shutil.disk_usage(mount).free  # statvfs's f_bavail * f_frsize; Windows too
    except OSError:
        return f"filesystem {mount}"
    return f"filesystem {mount}, {free} bytes free"


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
