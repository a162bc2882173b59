"""
Reads of the disk never run in the reactor thread (issue #11 item 6): a
replay or a poll that needs the file asks ``Store.read_after``, which reads
in the store's own threads; memory (the cache) is read at once.

The replay's promise under that: a subscriber sees every matching visible
event after its resume point exactly once, in id order, with no gap, what
ever commits, pauses, closes, deletes, cache evictions and retention trims
happen while a read is out. Shown by a hypothesis test on a history whose
commits and reads the test fires, then on a real ``SQLiteStore``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings, strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from tests.test_store_lifecycle import Pump, open_store
from tests.test_subscription import FakeSink, log, metric
from tests.webtools import REST_PORT, FakeBackend, make_site
from trainstream import subscription as subscription_module
from trainstream.errors import StoreError
from trainstream.hub import Hub
from trainstream.store import Page, Record, readers as readers_module, reads
from trainstream.store.filter import Filter
from trainstream.store.memory import MemoryStore
from trainstream.store.readers import READ_THREADS, Readers
from trainstream.store.sqlite import SQLiteStore
from trainstream.subscription import Subscription


class FakeHistory:
    """
    A history whose commits, cache and disk reads the test drives. The
    cache answers for every visible event from ``cache_start`` on; a read
    that needs what is below it is answered when the test fires it, from
    the history as it was when asked or as it is then (a WAL reader's
    snapshot starts somewhere in between), up to what was visible and
    cached when it was asked, and then from the cache if it still holds it:
    what ``SQLiteStore.read_after`` does.
    """

    epoch = "fake"

    def __init__(self) -> None:
        self.given = 0
        self.visible = 0
        self.floor = 1
        self.cache_start = 1
        self.held: list[Record] = []  # what is visible and not trimmed or deleted
        self.committed: dict[int, Record] = {}  # every event ever visible
        self.deleted: set[int] = set()
        self.appends: list[tuple[Sequence[Record], Deferred[list[Record]]]] = []
        self.reads: list[tuple[Deferred[Page], int, Filter, int, int, list[Record]]] = []

    @property
    def last_id(self) -> int:
        return self.given

    @property
    def oldest_id(self) -> int:
        return self.floor

    def segments(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {}

    def append(self, records: Sequence[Record]) -> Deferred[list[Record]]:
        d: Deferred[list[Record]] = Deferred()
        self.given = records[-1].id
        self.appends.append((records, d))
        return d

    def commit(self, batches: int) -> None:
        while batches and self.appends:
            records, d = self.appends.pop(0)
            self.held.extend(records)
            self.committed.update((r.id, r) for r in records)
            self.visible = records[-1].id
            d.callback(list(records))
            batches -= 1

    def evict(self, n: int) -> None:
        self.cache_start = min(self.visible + 1, self.cache_start + n)

    def trim(self, n: int) -> None:
        self.floor = min(self.visible + 1, self.floor + n)
        self.held = [r for r in self.held if r.id >= self.floor]
        self.cache_start = max(self.cache_start, self.floor)

    def delete(self, run: str) -> None:
        self.deleted.update(r.id for r in self.held if r.run == run)
        self.held = [r for r in self.held if r.run != run]

    def _matching(
        self, records: list[Record], after_id: int, upto: int, flt: Filter, limit: int
    ) -> list[Record]:
        return [r for r in records if after_id < r.id <= upto and flt.matches(r)][:limit]

    def after_cached(self, after_id: int, flt: Filter, limit: int) -> list[Record] | None:
        if after_id + 1 < self.cache_start:
            return None
        return self._matching(self.held, after_id, self.visible, flt, limit)

    def read_after(self, after_id: int, flt: Filter, limit: int) -> Deferred[Page]:
        cached = self.after_cached(after_id, flt, limit)
        if cached is not None:
            full = len(cached) >= limit
            return succeed(Page(cached, cached[-1].id if full else max(after_id, self.visible)))
        d: Deferred[Page] = Deferred()
        upto = min(self.visible, self.cache_start - 1)
        self.reads.append((d, after_id, flt, limit, upto, list(self.held)))
        return d

    def fire(self, i: int, now: bool) -> None:
        d, after_id, flt, limit, upto, then = self.reads.pop(i % len(self.reads))
        got = self._matching(self.held if now else then, after_id, upto, flt, limit)
        if len(got) >= limit:
            d.callback(Page(got, got[-1].id))
            return
        more = self.after_cached(upto, flt, limit - len(got))
        if more is None:
            d.callback(Page(got, upto))
            return
        got += more
        d.callback(Page(got, got[-1].id if len(got) >= limit else self.visible))


EVERYTHING = Filter()
FILTERS = (EVERYTHING, Filter(runs=("a",)), Filter(types=("metric",)), Filter(runs=("c*",)))

op = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 8), st.sampled_from("abc")),
    st.tuples(st.just("commit"), st.integers(1, 3), st.just("")),
    st.tuples(st.just("fire"), st.integers(0, 7), st.sampled_from(("now", "then"))),
    st.tuples(st.just("pause"), st.integers(0, 3), st.just("")),
    st.tuples(st.just("resume"), st.integers(0, 3), st.just("")),
    st.tuples(st.just("pause_on_write"), st.integers(0, 3), st.just("")),
    st.tuples(st.just("evict"), st.integers(1, 20), st.just("")),
    st.tuples(st.just("trim"), st.integers(1, 10), st.just("")),
    st.tuples(st.just("delete"), st.just(0), st.sampled_from("abc")),
    st.tuples(st.just("close"), st.integers(0, 3), st.just("")),
)


class ReplayInterleavingTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(op, max_size=60),
        st.lists(st.integers(0, 40), min_size=4, max_size=4),
        st.integers(0, 40),
    )
    def test_every_matching_event_once_in_order(
        self, ops: list[tuple[str, int, str]], afters: list[int], evicted: int
    ) -> None:
        """
        Whatever happens while reads are out, each subscriber sees strictly
        increasing ids, only events that were visible and match its filter,
        and every matching event after its resume point except those deleted
        or trimmed (a trim past it is told by a reset first); a closed one
        is written nothing more.
        """
        self.patch(subscription_module, "_REPLAY_BATCH", 4)
        self.patch(subscription_module, "_CHUNK_BYTES", 250)  # two or three events a chunk
        store = FakeHistory()
        hub = Hub(store)  # type: ignore[arg-type]
        step = 0

        def publish(n: int, run: str) -> None:
            nonlocal step
            kinds = [
                metric(run, "loss", step + i) if i % 2 else log(run, step + i) for i in range(n)
            ]
            step += n
            hub.accept(kinds)

        for run in "abcabc":
            publish(7, run)
        store.commit(100)
        store.evict(evicted)
        sinks: list[FakeSink] = []
        subs: list[Subscription] = []
        for flt, after in zip(FILTERS, afters, strict=True):
            sink = FakeSink()
            sub = hub.subscribe(sink, flt)  # type: ignore[arg-type]
            sink.subscription = sub
            sinks.append(sink)
            subs.append(sub)
            sub.start(after)
        written_at_close: dict[int, int] = {}
        for kind, n, arg in ops:
            if kind == "publish":
                publish(n, arg)
            elif kind == "commit":
                store.commit(n)
            elif kind == "fire" and store.reads:
                store.fire(n, arg == "now")
            elif kind == "pause":
                subs[n].pause()
            elif kind == "resume":
                subs[n].resume()
            elif kind == "pause_on_write":
                sinks[n].pause_after_write = not sinks[n].pause_after_write
            elif kind == "evict":
                store.evict(n)
            elif kind == "trim":
                store.trim(n)
            elif kind == "delete":
                store.delete(arg)
            elif kind == "close" and not subs[n].closed:
                hub.unsubscribe(subs[n])
                written_at_close[n] = len(sinks[n].records)
        # Then let everything happen: commits, reads, clients that take all.
        for sink in sinks:
            sink.pause_after_write = False
        for sub in subs:
            sub.resume()
        rounds = 0
        while (store.appends or store.reads) and rounds < 10_000:
            store.commit(100)
            if store.reads:
                store.fire(0, True)
            rounds += 1
        publish(1, "a")  # and one live event more
        store.commit(100)
        for i, (sub, sink, after) in enumerate(zip(subs, sinks, afters, strict=True)):
            ids = sink.ids
            self.assertEqual(ids, sorted(set(ids)), f"subscriber {i}: out of order or twice")
            for r in sink.records:
                self.assertIs(store.committed.get(r.id), r)  # visible when sent
                self.assertTrue(sub.filter.matches(r))
            self.assertFalse(sub.replaying and not sub.closed, f"subscriber {i} never went live")
            if sub.closed:
                self.assertEqual(len(sink.records), written_at_close[i])
                continue
            sent = set(ids)
            reset_to = max((oldest for _, oldest in sink.resets), default=0)
            for event_id, r in store.committed.items():
                if event_id > after and sub.filter.matches(r) and event_id not in sent:
                    self.assertTrue(
                        event_id in store.deleted or event_id < reset_to,
                        f"subscriber {i} missed event {event_id} (resets {sink.resets})",
                    )


class SQLiteReplayTests(SynchronousTestCase):
    """A real history file, its writer's reports and read threads' answers run by the test."""

    def setUp(self) -> None:
        self.pump = Pump()
        self.store = open_store(self, self.mktemp() + ".sqlite3", self.pump, cache_events=20)
        self.hub = Hub(self.store)

    def publish(self, n: int, run: str = "r") -> None:
        self.hub.accept([log(run, i) for i in range(n)])
        self.pump.until(self.store.sync())

    def subscribe(self, flt: Filter = EVERYTHING, after: int | None = 0) -> FakeSink:
        sink = FakeSink()
        sub = self.hub.subscribe(sink, flt)  # type: ignore[arg-type]
        sink.subscription = sub
        sub.start(after)
        return sink

    def test_a_replay_from_disk_reads_it_in_a_read_thread(self) -> None:
        """
        Nothing is read from the file in the reactor thread: the replay waits
        for the read thread; events committed meanwhile come once, in order.
        """
        self.publish(500)
        threads: list[str] = []
        select = reads.select

        def spy(*args: Any) -> None:
            threads.append(threading.current_thread().name)
            select(*args)

        self.patch(reads, "select", spy)
        sink = self.subscribe()
        sub = sink.subscription
        assert sub is not None
        self.assertTrue(sub.replaying)
        self.assertEqual(sink.ids, [])  # the read is out
        self.hub.accept([log("live", i) for i in range(30)])  # committed while it is out
        self.pump.until(sub.live())
        self.publish(5)
        self.assertEqual(sink.ids, list(range(1, 536)))
        self.assertTrue(threads)
        self.assertNotIn(threading.current_thread().name, threads)
        self.assertTrue(all("trainstream-reads" in name for name in threads), threads)

    def test_a_slow_client_is_never_read_twice(self) -> None:
        """What a read brought and the client did not take yet waits: each row is decoded once."""
        self.publish(3000)
        decoded = 0
        decode = readers_module.decode

        def counting(row: Any) -> Record:
            nonlocal decoded
            decoded += 1
            return decode(row)

        self.patch(readers_module, "decode", counting)
        self.patch(subscription_module, "_CHUNK_BYTES", 2000)  # a chunk: a few events
        sink = self.subscribe()
        sink.pause_after_write = True
        sub = sink.subscription
        assert sub is not None
        writes = 0
        while sub.replaying and writes < 10_000:
            if sub._reading is not None:
                f, args = self.pump.calls.get(timeout=30)
                f(*args)
            sub.resume()
            writes += 1
        self.assertEqual(sink.ids, list(range(1, 3001)))
        self.assertGreater(len(sink.frames), 100)  # it went in many pieces
        self.assertLessEqual(decoded, 3000 - 20)  # the cache held the rest

    def test_a_closed_subscription_cancels_its_read(self) -> None:
        """Its read is skipped or interrupted (nobody waits), and nothing more is written."""
        self.publish(300)
        asked: list[Deferred[Page]] = []
        read_after = self.store.read_after

        def spy(*args: Any) -> Deferred[Page]:
            d = read_after(*args)
            outcome: Deferred[Page] = Deferred()
            asked.append(outcome)
            d.addBoth(lambda r: outcome.callback(r) or r)
            return d

        self.patch(self.store, "read_after", spy)
        sink = self.subscribe(after=10)
        sub = sink.subscription
        assert sub is not None
        self.assertIsNotNone(sub._reading)
        self.hub.unsubscribe(sub)
        self.failureResultOf(asked[0], CancelledError)
        self.publish(3)  # the read thread's late answer, if any, is run here: ignored
        self.assertEqual((sink.ids, sink.resets, sink.overflows), ([], [], []))
        page = self.pump.until(read_after(10, EVERYTHING, 5))  # the threads still read
        self.assertEqual([r.id for r in page.records], [11, 12, 13, 14, 15])

    def test_cancelled_reads_do_not_hold_up_the_others(self) -> None:
        """A queued read cancelled is never run; a running one is interrupted."""
        readers = Readers(self.store.path, self.pump)
        readers.start()
        self.addCleanup(readers.stop)
        ran: list[str] = []

        def endless(db: sqlite3.Connection) -> object:
            ran.append("endless")
            return db.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                "SELECT COUNT(*) FROM c"
            ).fetchone()

        def never(db: sqlite3.Connection) -> None:
            ran.append("never")

        running = [readers.run(endless) for _ in range(READ_THREADS)]
        queued = readers.run(never)
        queued.cancel()
        self.failureResultOf(queued, CancelledError)
        deadline = time.monotonic() + 30
        while len(ran) < READ_THREADS:  # both threads are in the endless query
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.005)
        for d in running:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(self.pump.until(readers.run(lambda db: "read")), "read")
        self.assertEqual(ran, ["endless"] * READ_THREADS)

    def test_a_read_sees_only_what_was_visible_when_asked(self) -> None:
        """
        The file may hold more (committed, the reactor not told yet): a read
        returns only what was visible, and says so in ``upto``.
        """
        self.publish(100)
        self.hub.accept([log("later", i) for i in range(50)])
        path = self.store.path
        deadline = time.monotonic() + 30
        with sqlite3.connect(path) as other:  # the writer commits; its report waits in the pump
            while other.execute("SELECT COUNT(*) FROM events").fetchone()[0] < 150:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.01)
        d = self.store.read_after(0, Filter(), 1000)
        waiting: list[Any] = []
        got: list[Page] = []
        d.addCallback(got.append)
        while not got:  # run the read thread's answer, hold the writer's reports
            f, args = self.pump.calls.get(timeout=30)
            if getattr(f, "__func__", None) is Readers._answer:
                f(*args)
            else:
                waiting.append((f, args))
        self.assertEqual([r.id for r in got[0].records], list(range(1, 101)))
        self.assertEqual(got[0].upto, 100)
        for f, args in waiting:
            f(*args)

    def test_a_read_out_when_the_store_closes_fails(self) -> None:
        self.publish(100)
        d = self.store.read_after(0, Filter(runs=("nosuch",)), 10)
        self.store.close()
        failure = self.failureResultOf(d, StoreError)
        self.assertIn("closed", str(failure.value))
        self.assertFalse([t for t in threading.enumerate() if "trainstream-reads" in t.name])
        with self.assertRaises(StoreError):
            self.store.read_after(0, Filter(), 10)

    def test_cached_reads_answer_at_once(self) -> None:
        """What the cache holds is read in the reactor thread, the file not asked."""
        self.publish(100)
        self.assertIsNone(self.store.after_cached(50, Filter(), 10))
        cached = self.store.after_cached(85, Filter(), 10)
        assert cached is not None
        self.assertEqual([r.id for r in cached], list(range(86, 96)))
        page = self.successResultOf(self.store.read_after(90, Filter(runs=("nosuch",)), 10))
        self.assertEqual((page.records, page.upto), ([], 100))

    def test_a_filter_matching_nothing_on_disk_covers_it_in_one_read(self) -> None:
        self.publish(1000)
        sink = self.subscribe(Filter(runs=("nosuch",)), after=1)
        sub = sink.subscription
        assert sub is not None
        self.pump.until(sub.live())
        self.assertFalse(sub.replaying)
        self.hub.accept([log("nosuch", 0)])
        self.pump.until(self.store.sync())
        self.assertEqual(sink.ids, [1001])


class UnreportedTrimTests(SynchronousTestCase):
    def test_a_trim_the_reactor_has_not_heard_of_is_a_reset(self) -> None:
        """
        Retention has dropped ids 1-50 in the file, its report not yet run:
        a replay from id 10 read in a read thread finds them gone, and the
        client is told (a reset to 51) instead of silently missing them.
        """
        pump = Pump()
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_events=10)
        hub = Hub(store)
        now = time.time()
        hub.accept([log("r", i) for i in range(50)])  # time 1.0: old
        hub.accept([{**log("r", i), "time": now} for i in range(50, 100)])
        pump.until(store.sync())
        store.trim(1, None)  # older than a day
        deadline = time.monotonic() + 10
        while True:  # the writer has done it; its report waits in the pump
            with sqlite3.connect(store.path) as db:
                if db.execute("SELECT MIN(id) FROM events").fetchone()[0] == 51:
                    break
            self.assertLess(time.monotonic(), deadline, "retention did not run")
            time.sleep(0.02)
        self.assertEqual(store.oldest_id, 1)  # the reactor has not heard
        held = []
        assert store._open is not None
        writer_reports = store._open.feeder._deliver
        sink = FakeSink()
        sub = hub.subscribe(sink, EVERYTHING)  # type: ignore[arg-type]
        sub.start(10)
        live = sub.live()
        deadline = time.monotonic() + 10
        while not live.called:  # run the read threads' answers, hold the writer's
            self.assertLess(time.monotonic(), deadline, "the replay did not end")
            f, args = pump.calls.get(timeout=5)
            if getattr(f, "__func__", None) is getattr(writer_reports, "__func__", None):
                held.append((f, args))
            else:
                f(*args)
        self.assertEqual(sink.resets, [("history no longer holds the events after that id", 51)])
        self.assertEqual(sink.ids, list(range(51, 101)))
        for f, args in held:
            f(*args)


class DeletedDuringReadTests(SynchronousTestCase):
    def test_a_run_deleted_while_a_read_was_out_is_not_shown(self) -> None:
        """
        The read thread has read run "gone" from the file; before its answer
        is back, the delete of "gone" is committed and answered: the client
        must not be shown events of a run the user was told is deleted.
        """
        pump = Pump()
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_events=10)
        hub = Hub(store)
        hub.accept([log("gone" if i % 2 else "kept", i) for i in range(100)])
        pump.until(store.sync())
        gate = threading.Event()
        self.addCleanup(gate.set)
        select = reads.select

        def read_then_wait(*args: Any) -> None:
            select(*args)
            gate.wait(10)  # the rows are read; the answer waits for the delete

        self.patch(reads, "select", read_then_wait)
        sink = FakeSink()
        sub = hub.subscribe(sink, EVERYTHING)  # type: ignore[arg-type]
        sub.start(0)
        live = sub.live()
        self.assertEqual(pump.until(store.delete_run("gone")), 50)
        gate.set()
        pump.until(live)
        self.assertEqual([r.run for r in sink.records], ["kept"] * 50)


class MemoryReadTests(SynchronousTestCase):
    def test_memory_reads_are_at_once(self) -> None:
        store = MemoryStore()
        hub = Hub(store)
        hub.accept([log("r", i) for i in range(10)])
        self.assertEqual([r.id for r in store.after_cached(3, Filter(), 2)], [4, 5])
        page = self.successResultOf(store.read_after(3, Filter(), 100))
        self.assertEqual(([r.id for r in page.records], page.upto), (list(range(4, 11)), 10))
        page = self.successResultOf(store.read_after(3, Filter(), 2))
        self.assertEqual(page.upto, 5)


class RestReadTests(SynchronousTestCase):
    def test_get_events_reads_the_disk_off_the_reactor_thread(self) -> None:
        pump = Pump()
        store = SQLiteStore(self.mktemp() + ".sqlite3", pump, cache_events=10)
        self.addCleanup(store.close)
        backend = FakeBackend(store=store)
        stub = StubTreq(make_site(backend).resource)
        backend.hub.accept([log("a" if i % 2 else "b", i) for i in range(200)])
        pump.until(store.sync())
        d = stub.get(f"http://127.0.0.1:{REST_PORT}/api/events?after=5&run=a&limit=50")
        stub.flush()
        self.assertNoResult(d)  # the read is out
        answered: list[object] = []
        d.addBoth(lambda r: answered.append(r) or r)
        deadline = time.monotonic() + 30
        while not answered:
            f, args = pump.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args)
            stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        stub.flush()
        answer = json.loads(body)
        self.assertEqual(response.code, 200)
        self.assertEqual([e["id"] for e in answer["events"]], list(range(6, 106, 2)))
        self.assertEqual(answer["last_id"], 200)
        # From the cache: at once.
        d = stub.get(f"http://127.0.0.1:{REST_PORT}/api/events?after=195&run=a")
        stub.flush()
        answer = json.loads(self.successResultOf(self.successResultOf(d).content()))
        self.assertEqual([e["id"] for e in answer["events"]], [196, 198, 200])
