"""
Following a logdir: find its event files, read what they gained, publish
it, remember how far that got. Blocking code for one thread of its own
(the CLI's main thread, or the server's follow thread): it waits on the
disk and on its :class:`Sink`, never on a reactor.

The state (a small JSON file, replaced atomically) holds, per event file,
the offset just past the last record whose events the server acknowledged
(stored durably), and each run's ``tag -> plugin``. Before a batch is sent
the state also records where the batch ends (``pending``) and the id the
history had reached (``after_id``); once the batch is acknowledged the
offsets move there and ``pending`` is cleared. After a ``kill -9`` the
follower reads again from the acknowledged offsets; the events of records
up to ``pending`` may or may not have been stored, so they are compared
with what the history holds of their runs after ``after_id`` and only the
missing ones are sent: nothing twice, nothing lost.

The state is kept per logdir and per history (the server's ``epoch``): a
server whose history was replaced gets the whole logdir again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from trainstream.events import MAX_RUN_LENGTH, EventError, validate_event
from trainstream.follow.decode import Decoder, Protos, load_protos, sanitize
from trainstream.follow.records import read_records

__all__ = ["Follower", "Sink", "Stopped", "default_state_path", "run_name"]

Event = dict[str, object]
#: ``report(level, message)``: ``level`` is ``"info"``, ``"warning"`` or ``"error"``.
Report = Callable[[str, str], None]

#: Bytes of records read per poll at most (a large logdir is loaded in many batches).
READ_BUDGET = 1 << 20
#: The state file's format.
STATE_VERSION = 1


class Stopped(Exception):  # noqa: N818  (not an error: a stop asked for)
    """The follower was asked to stop while it waited for its sink."""


class Sink(Protocol):
    """Where the follower's events go: a server over HTTP, or the server's own hub."""

    def identity(self) -> tuple[str, int]:
        """The history's ``epoch`` and ``last_id`` (waits until the server answers)."""
        ...

    def send(self, events: list[Event]) -> int | None:
        """
        Returns once ``events`` are stored durably (retrying while the
        server is unreachable), with the id of the last of them (``None``
        if the server refused them all); raises :class:`Stopped` if asked
        to stop first.
        """
        ...

    def stored_since(self, after_id: int, runs: set[str]) -> list[Event]:
        """The stored events of ``runs`` with an id above ``after_id``, in id order."""
        ...


def run_name(logdir: str, directory: str) -> str:
    """
    A directory's run name, as TensorBoard shows it: its path relative to
    the logdir with ``/`` between parts (``exp1/train``); the logdir's own
    files are the run named after the logdir (its last component).
    """
    rel = os.path.relpath(directory, logdir)
    if rel == ".":
        rel = os.path.basename(os.path.abspath(logdir)) or "logdir"
    return sanitize(rel.replace(os.sep, "/"), MAX_RUN_LENGTH)


def is_event_file(name: str) -> bool:
    """What TensorBoard reads: a file whose name holds ``tfevents``."""
    return "tfevents" in name and not name.startswith(".")


def default_state_path(logdir: str, epoch: str) -> str:
    """The state file of ``logdir`` followed into the history ``epoch``, in the user's data dir."""
    from platformdirs import user_data_dir

    key = hashlib.sha256(f"{os.path.abspath(logdir)}\n{epoch}".encode()).hexdigest()[:20]
    return os.path.join(user_data_dir("trainstream", appauthor=False), "follow", key + ".json")


@dataclass
class State:
    """What the follower remembers (see the module's docstring)."""

    logdir: str
    epoch: str
    offsets: dict[str, int] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    plugins: dict[str, dict[str, str]] = field(default_factory=dict)
    pending: dict[str, int] | None = None
    #: with ``pending``: the history's last id before that batch was sent
    after_id: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "version": STATE_VERSION,
            "logdir": self.logdir,
            "epoch": self.epoch,
            "offsets": self.offsets,
            "damaged": self.damaged,
            "plugins": self.plugins,
            "pending": self.pending,
            "after_id": self.after_id,
        }

    @classmethod
    def load(cls, path: str, logdir: str, epoch: str) -> State:
        """The state at ``path``, or a new one if there is none or it is another history's."""
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return cls(logdir, epoch)
        except (OSError, ValueError) as e:
            raise OSError(
                f"follow state {path} cannot be read ({e}): remove it to start over"
            ) from None
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise OSError(f"follow state {path} is not one this trainstream wrote")
        if raw.get("epoch") != epoch:
            return cls(logdir, epoch)  # another history: it gets everything
        return cls(
            logdir,
            epoch,
            {str(k): int(v) for k, v in raw["offsets"].items()},
            {str(k): str(v) for k, v in raw.get("damaged", {}).items()},
            {str(r): dict(t) for r, t in raw.get("plugins", {}).items()},
            None if raw.get("pending") is None else dict(raw["pending"]),
            None if raw.get("after_id") is None else int(raw["after_id"]),
        )

    def save(self, path: str) -> None:
        """Replace the file at ``path`` atomically: a crash leaves all of it or the old one."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".follow-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


@dataclass
class Read:
    """One poll's reading: events in file order, and where each file's reading ended."""

    events: list[Event] = field(default_factory=list)
    #: per event: whether it came from a record the last run may have sent already
    maybe_sent: list[bool] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    more: bool = False  # the budget ran out before the end of some file
    changed: bool = False  # offsets moved or a file was found damaged: save the state


class Follower:
    """
    Follows one logdir into one sink. :meth:`run` loops until :meth:`stop`;
    :meth:`poll` is one round (tests call it directly).

    :param sink: where :meth:`poll` publishes; ``None`` for a follower
        whose steps (:meth:`read`, :meth:`unsent`, :meth:`mark_pending`,
        :meth:`acknowledge`) are driven by the server's service.
    :param state_path: the state file; by default one per logdir and
        history in the user's data dir (:func:`default_state_path`).
    :param interval: seconds between polls of the files' sizes.
    """

    def __init__(
        self,
        logdir: str,
        sink: Sink | None,
        report: Report,
        state_path: str | None = None,
        interval: float = 0.25,
        protos: Protos | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.logdir = os.path.abspath(logdir)
        self.sink = sink
        self.report = report
        self.state_path = state_path
        self.interval = interval
        self._protos = protos
        #: set to stop: the sink waits on it too (share it with the sink)
        self._stop = stop or threading.Event()
        self.state: State | None = None
        self.decoder: Decoder | None = None
        #: events acknowledged by the sink since start
        self.sent = 0
        #: events not sent again after a restart because the server had them
        self.deduplicated = 0
        #: an id the history had reached before anything not yet sent
        self.last_id = 0
        self._missing_said = False

    def stop(self) -> None:
        """Ask :meth:`run` to end (from any thread); it returns after the current poll."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; ``True`` if asked to stop meanwhile."""
        return self._stop.wait(seconds)

    def start(self, identity: tuple[str, int] | None = None) -> None:
        """
        Load the protos and the state of a history: its ``(epoch, last_id)``
        (by default the sink's).
        """
        protos = self._protos or load_protos()
        if identity is None:
            assert self.sink is not None
            identity = self.sink.identity()
        epoch, self.last_id = identity
        if self.state_path is None:
            self.state_path = default_state_path(self.logdir, epoch)
        self.state = State.load(self.state_path, self.logdir, epoch)
        self.decoder = Decoder(protos, self.state.plugins)
        known = len(self.state.offsets)
        self.report(
            "info",
            f"following {self.logdir} ({known} event files known, state {self.state_path}, "
            f"{protos.source} protos)",
        )

    def run(self) -> None:
        """
        Poll until stopped. A state file that cannot be written is said and
        tried again (what it had not saved is read again and compared, as
        after a kill); the sink's errors other than :class:`Stopped` end it.
        """
        try:
            if self.state is None:
                self.start()
            while not self._stop.is_set():
                try:
                    more = self.poll()
                except OSError as e:  # the state file (disk full, ...): try again later
                    self.report("error", f"following {self.logdir}: {e}; retrying in 5 s")
                    more = False
                    if self._stop.wait(5.0):
                        break
                if not more and self._stop.wait(self.interval):
                    break
        except Stopped:
            pass

    # One round: read (disk), compare (after a kill), mark, send, acknowledge (disk)

    def poll(self) -> bool:
        """
        Read what the files gained, publish it through the sink, then save
        the state (the command's loop; the server's service runs the same
        steps with the hub in between: ``trainstream.follow.service``).

        :return: whether more was left to read (the budget ran out).
        """
        assert self.sink is not None, "a follower without a sink is driven step by step"
        read = self.read()
        if not read.changed:
            return read.more
        events = self.unsent(read, self.sink.stored_since)
        if events:
            self.mark_pending(read)
            last_id = self.sink.send(events)
            self.sent += len(events)
            if last_id is not None:
                self.last_id = max(self.last_id, last_id)
        self.acknowledge(read)
        return read.more

    def read(self) -> Read:
        """Read what the files gained (blocking disk I/O: not in the reactor thread)."""
        state, decoder = self.state, self.decoder
        assert state is not None and decoder is not None, "start() first"
        if not os.path.isdir(self.logdir):
            if not self._missing_said:
                self._missing_said = True
                self.report("warning", f"logdir {self.logdir} does not exist (yet): waiting")
            return Read()
        self._missing_said = False
        damaged = len(state.damaged)
        read = self._read(state, decoder)
        for run, tag, what in decoder.skipped:
            self.report("info", f"run {run}: tag {tag!r} skipped: {what}")
        decoder.skipped.clear()
        moved = read.offsets != {k: state.offsets.get(k, 0) for k in read.offsets}
        read.changed = moved or len(state.damaged) != damaged
        return read

    def mark_pending(self, read: Read) -> None:
        """Save where the batch about to be sent ends (disk I/O)."""
        state = self.state
        assert state is not None and self.state_path is not None
        # With a killed run's window, if it is still ahead.
        ends = {**state.offsets, **read.offsets}
        for k, v in (state.pending or {}).items():
            ends[k] = max(ends.get(k, 0), v)
        state.pending = ends
        state.after_id = self.last_id
        state.save(self.state_path)

    def acknowledge(self, read: Read) -> None:
        """The batch of ``read`` is stored: move the offsets past it and save (disk I/O)."""
        state = self.state
        assert state is not None and self.state_path is not None
        state.offsets.update(read.offsets)
        if state.pending is not None and all(
            state.offsets.get(k, 0) >= v for k, v in state.pending.items()
        ):
            state.pending = None
            state.after_id = None
        state.save(self.state_path)

    def event_files(self) -> list[tuple[str, str]]:
        """``(path relative to the logdir, run name)`` of every event file, in a stable order."""
        found: list[tuple[str, str]] = []
        for directory, subdirs, files in os.walk(self.logdir):
            subdirs.sort()
            names = sorted(n for n in files if is_event_file(n))
            if names:
                run = run_name(self.logdir, directory)
                for name in names:
                    rel = os.path.relpath(os.path.join(directory, name), self.logdir)
                    found.append((rel.replace(os.sep, "/"), run))
        return found

    def _read(self, state: State, decoder: Decoder) -> Read:
        read = Read()
        budget = READ_BUDGET
        for rel, run in self.event_files():
            if rel in state.damaged:
                continue
            path = os.path.join(self.logdir, rel)
            offset = state.offsets.get(rel, 0)
            try:
                size = os.path.getsize(path)
                if size < offset:
                    self._damaged(state, rel, f"it shrank to {size} bytes (read up to {offset})")
                    continue
                if size == offset:
                    continue
                if budget <= 0:
                    read.more = True
                    continue
                with open(path, "rb") as f:
                    records, end, damage = read_records(f, offset, budget)
            except OSError as e:
                self.report("warning", f"event file {path} cannot be read now: {e}")
                continue
            budget -= end - offset
            if end < size and damage is None and budget <= 0:
                read.more = True
            pending = state.pending.get(rel, 0) if state.pending else 0
            for data, record_end in records:
                try:
                    events = list(decoder.events(run, data))
                except Exception as e:  # a record that frames but does not parse
                    damage = f"a record before byte {record_end} is no TensorBoard event ({e})"
                    end = record_end
                    break
                for event in events:
                    checked = self._checked(event)
                    if checked is not None:
                        read.events.append(checked)
                        read.maybe_sent.append(record_end <= pending)
            read.offsets[rel] = end
            if damage is not None:
                self._damaged(state, rel, damage)
        return read

    def _checked(self, event: Event) -> Event | None:
        try:
            return validate_event(event)
        except EventError as e:
            self.report("warning", f"an event of run {event.get('run')} dropped: {e}")
            return None

    def _damaged(self, state: State, rel: str, why: str) -> None:
        state.damaged[rel] = why
        self.report(
            "error",
            f"event file {os.path.join(self.logdir, rel)} is damaged {why}; "
            "it is not read further (the other files are)",
        )

    def window(self, read: Read) -> tuple[int, set[str]] | None:
        """
        After a kill: the id the server's history had before the batch that
        may have been stored, and that batch's runs; ``None`` otherwise.
        """
        state = self.state
        if state is None or state.pending is None:
            return None
        runs = {
            str(e["run"]) for e, maybe in zip(read.events, read.maybe_sent, strict=True) if maybe
        }
        return (state.after_id or 0, runs) if runs else None

    def unsent(self, read: Read, stored: Callable[[int, set[str]], list[Event]]) -> list[Event]:
        """
        The events of ``read`` less those a killed follower had sent already:
        after a kill (a ``pending`` window), the events of records up to it
        are compared with what the history holds of their runs since that
        batch (``stored``: the sink's or the store's), by type, run, time,
        name, step and message, each stored event matching once.
        """
        window = self.window(read)
        if window is None:
            return read.events
        have = Counter(_key(e) for e in stored(*window))
        kept: list[Event] = []
        for event, maybe in zip(read.events, read.maybe_sent, strict=True):
            if maybe:
                key = _key(event)
                if have[key] > 0:
                    have[key] -= 1
                    self.deduplicated += 1
                    continue
            kept.append(event)
        if len(kept) < len(read.events):
            self.report(
                "info",
                f"{len(read.events) - len(kept)} events of the last batch before a stop "
                "were stored already: not sent again",
            )
        return kept


def _key(event: Event) -> tuple[object, ...]:
    """What tells one event from another of its run (not its value: a float may print apart)."""
    return tuple(event.get(k) for k in ("type", "run", "time", "name", "step", "message"))
