"""
Adaptive batching on the training side, in virtual time (a ``Clock``, no
socket, no thread): the embedded ``Inbox`` and the remote ``Publisher``
hand an event over at once when idle, and gather events while busy into few
hand-overs, each event at most a window late; order, flush and the rule
"every wake-up ends in a hand-over" are kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_client import PublisherTestCase
from trainstream.api import Event
from trainstream.client.publisher import Publisher
from trainstream.hub import Hub
from trainstream.run import Inbox, Run
from trainstream.server import _INBOX_DELAY, _INBOX_MAX_DELAY, StreamServer
from trainstream.store.memory import MemoryStore

WINDOW = 0.01
TICK = 0.001


class Wakeups:
    """``call_from_thread`` of a reactor that runs what it is handed only when told."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, f: Callable[[], None]) -> None:
        self.calls.append(f)

    def run(self) -> int:
        """The reactor's turn: run the wake-ups handed over so far; how many."""
        calls, self.calls = self.calls, []
        for f in calls:
            f()
        return len(calls)


class Batches:
    """The sink: each batch with the clock's time when it was handed over."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.batches: list[tuple[float, list[Event]]] = []

    def __call__(self, batch: list[Event]) -> None:
        self.batches.append((self.clock.seconds(), batch))

    def events(self) -> list[Event]:
        return [e for _, batch in self.batches for e in batch]

    def delays(self) -> list[float]:
        """Per event: hand-over time minus the time it was put (its ``time``)."""
        return [when - float(e["time"]) for when, batch in self.batches for e in batch]  # type: ignore[arg-type]


def metric(step: int, t: float) -> Event:
    return {"type": "metric", "run": "r", "time": t, "name": "loss", "step": step, "value": 0.5}


def log_at(
    inbox: Inbox, reactor: Wakeups, clock: Clock, rate: float, seconds: float, first: int = 0
) -> int:
    """Put ``rate`` events a second for ``seconds``, steps from ``first``; reactor turns between."""
    n = round(rate * seconds)
    for step in range(first, first + n):
        inbox.put([metric(step, clock.seconds())])
        reactor.run()
        clock.advance(1 / rate)
    return n


class InboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)  # long after any hand-over
        self.reactor = Wakeups()
        self.sink = Batches(self.clock)
        self.inbox = Inbox(self.reactor, self.sink, clock=self.clock, window=WINDOW)

    def put(self, step: int) -> None:
        self.inbox.put([metric(step, self.clock.seconds())])

    def log_at(self, rate: float, seconds: float) -> int:
        return log_at(self.inbox, self.reactor, self.clock, rate, seconds)

    def test_idle_hands_over_at_once(self) -> None:
        """After a quiet spell: one wake-up, and the event is handed over in it."""
        self.put(0)
        self.assertEqual(self.sink.batches, [])  # put only queues
        self.assertEqual(self.reactor.run(), 1)
        self.assertEqual(self.sink.batches, [(100.0, [metric(0, 100.0)])])
        self.clock.advance(WINDOW)  # a window with nothing: idle again, no timer left
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.inbox._scheduled)
        # 20 Hz is idle every time: each point goes at once, in its own batch.
        self.clock.advance(0.05)
        self.log_at(20, 1.0)
        self.assertEqual(self.inbox.batches, 21)
        self.assertEqual(self.inbox.wakeups, 21)
        self.assertEqual(max(self.sink.delays()), 0.0)

    def test_busy_gathers_into_one_hand_over(self) -> None:
        """
        Within the window after a hand-over, puts gather: no wake-up at all
        (the training thread makes no system call), one batch at its end.
        """
        self.put(0)
        self.reactor.run()
        for step in range(1, 100):
            self.put(step)  # the training loop, faster than the reactor's turns
        self.assertEqual(self.reactor.run(), 0)  # busy: the window's timer will take them
        self.assertEqual(len(self.sink.batches), 1)  # not yet: the window is not over
        self.clock.advance(WINDOW)
        self.assertEqual([len(b) for _, b in self.sink.batches], [1, 99])
        self.assertEqual(self.sink.batches[1][0], 100.0 + WINDOW)
        self.assertEqual(self.inbox.wakeups, 1)

    def test_bounded_delay_and_few_hand_overs_under_load(self) -> None:
        """1 kHz for 2 s: about one batch per window, none later than the window, all in order."""
        n = self.log_at(1000, 2.0)
        self.clock.advance(WINDOW)
        events = self.sink.events()
        self.assertEqual([e["step"] for e in events], list(range(n)))
        self.assertLessEqual(max(self.sink.delays()), WINDOW + 1e-9)
        self.assertLessEqual(self.inbox.batches, math.ceil(2.0 / WINDOW) + 1)
        self.assertGreaterEqual(self.inbox.batches, 2.0 / WINDOW / 2)  # and not one in all
        self.assertEqual(self.inbox.wakeups, 1)  # one for the whole busy spell

    def test_a_sink_that_raises_does_not_stop_later_hand_overs(self) -> None:
        """
        A batch the sink fails on (a store closing, a bug) is lost and the
        error goes up to the reactor, which logs it; the events put after it
        still reach the sink, at once when idle.
        """
        failing = [True]

        def sink(batch: list[Event]) -> None:
            if failing[0]:
                failing[0] = False
                raise RuntimeError("the sink failed")
            self.sink(batch)

        inbox = Inbox(self.reactor, sink, clock=self.clock, window=WINDOW)
        inbox.put([metric(0, 100.0)])
        self.assertRaises(RuntimeError, self.reactor.run)
        inbox.put([metric(1, self.clock.seconds())])  # within the window: its end takes it
        self.reactor.run()
        self.clock.advance(WINDOW)
        self.assertEqual(self.sink.events(), [metric(1, 100.0)])
        self.clock.advance(1.0)  # idle again
        inbox.put([metric(2, self.clock.seconds())])
        self.assertEqual(self.reactor.run(), 1)
        self.assertEqual([e["step"] for e in self.sink.events()], [1, 2])

    def test_the_window_runs_from_the_end_of_a_hand_over(self) -> None:
        """What is put while the hub takes a batch waits for the next window."""
        hub_busy = 0.004

        def slow_sink(batch: list[Event]) -> None:
            self.sink(batch)
            self.clock.advance(hub_busy)  # the hub's work takes reactor time

        inbox = Inbox(self.reactor, slow_sink, clock=self.clock, window=WINDOW)
        inbox.put([metric(0, 100.0)])
        self.reactor.run()
        inbox.put([metric(1, self.clock.seconds())])
        self.reactor.run()
        self.clock.advance(WINDOW - 0.001)
        self.assertEqual(len(self.sink.batches), 1)
        self.clock.advance(0.001)
        self.assertEqual([t for t, _ in self.sink.batches], [100.0, 100.0 + hub_busy + WINDOW])

    def test_flush_hands_over_everything_now_and_cancels_the_timer(self) -> None:
        """``drain`` (what flush and stop call) takes all, in order; the window's timer goes."""
        hub = Hub(MemoryStore())
        inbox = Inbox(self.reactor, hub.accept, clock=self.clock, window=WINDOW)
        run = Run("r", inbox, flush_deferred=lambda: None, blocking=lambda: None)  # type: ignore[arg-type,return-value]
        run.log({"loss": 0.5}, step=0)
        self.reactor.run()
        for step in range(1, 50):
            run.log({"loss": 0.5, "acc": 0.1}, step=step)
        self.reactor.run()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # busy: waiting its window
        inbox.drain()  # flush
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(hub.last_id, 1 + 49 * 2)
        self.successResultOf(hub.store.sync())
        steps = [r.event["step"] for r in hub.store.after(0, lambda r: True)]
        self.assertEqual(steps, [0] + [s for s in range(1, 50) for _ in (0, 1)])
        self.clock.advance(1.0)
        self.assertEqual(hub.last_id, 99)  # nothing twice
        run.log({"loss": 0.5}, step=50)  # and the next put wakes the reactor again
        self.assertEqual(self.reactor.run(), 1)
        self.assertEqual(hub.last_id, 100)

    def test_a_wake_up_after_a_flush_strands_nothing(self) -> None:
        """
        A flush drains while a wake-up is still on its way, and a put races
        the drain: every wake-up ends in a hand-over, so nothing is left
        queued with the flag set (later puts would then never wake the reactor).
        """
        self.put(0)  # wake-up 1 on its way
        self.inbox.drain()  # a flush gets there first
        self.put(1)  # wake-up 2
        self.reactor.run()  # both run (event 0 just went: busy, one timer)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(WINDOW)
        self.assertEqual([e["step"] for e in self.sink.events()], [0, 1])
        self.clock.advance(WINDOW)  # nothing more: idle
        self.assertFalse(self.inbox._scheduled)
        self.put(2)
        self.assertEqual(len(self.reactor.calls), 1)  # the flag was clear: a new wake-up
        self.reactor.run()
        self.assertEqual([e["step"] for e in self.sink.events()], [0, 1, 2])  # idle: at once

    def test_a_put_racing_the_idle_transition_is_taken(self) -> None:
        """
        The window's end finds the queue empty; a put lands before the flag
        is cleared (it sees the flag set, so it wakes nobody): the second
        look, after the clear, takes it.
        """
        self.put(0)
        self.reactor.run()
        queue = self.inbox._queue
        self.assertEqual(len(queue), 0)

        class Racing(type(queue)):  # type: ignore[misc]
            raced = False

            def __bool__(inner) -> bool:
                if not inner.raced:  # the window's first look: empty ...
                    inner.raced = True
                    self.put(1)  # ... and the training thread puts just then
                    self.assertEqual(self.reactor.calls, [])  # it saw the flag set
                    return False
                return len(inner) > 0

        self.inbox._queue = Racing()
        self.clock.advance(WINDOW)
        self.assertEqual([e["step"] for e in self.sink.events()], [0, 1])
        self.assertEqual(self.reactor.calls, [])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("put"), st.integers(1, 3)),
                st.tuples(st.just("metrics"), st.integers(1, 3)),
                st.tuples(st.just("turn"), st.just(0)),
                st.tuples(st.just("flush"), st.just(0)),
                st.tuples(st.just("advance"), st.integers(0, 15)),
            ),
            max_size=60,
        )
    )
    def test_any_schedule_keeps_order_and_the_bound(self, ops: list[tuple[str, int]]) -> None:
        """
        Any interleaving of puts (both forms), reactor turns, flushes and time:
        the sink sees every event once, in put order; once the reactor has
        run, no event waits more than the window after its wake-up ran.
        """
        clock = Clock()
        clock.advance(100)
        reactor = Wakeups()
        sink = Batches(clock)
        inbox = Inbox(reactor, sink, clock=clock, window=WINDOW)
        sent = 0
        woken: dict[int, float] = {}  # step -> when the reactor first ran after its put
        queued: list[int] = []
        for op, arg in ops:
            if op == "put":
                inbox.put([metric(sent + i, clock.seconds()) for i in range(arg)])
                queued.extend(range(sent, sent + arg))
                sent += arg
            elif op == "metrics":
                names = {f"m{i}": float(i) for i in range(arg)}
                inbox.put_metrics(("r", clock.seconds(), sent, names))
                queued.extend([sent] * arg)
                sent += 1
            elif op == "turn":
                reactor.run()
                for step in queued:
                    woken.setdefault(step, clock.seconds())
                queued = []
            elif op == "flush":
                inbox.drain()
            else:
                clock.advance(arg / 1000)
                reactor.run()
                for step in queued:
                    woken.setdefault(step, clock.seconds())
                queued = []
            handed = {e["step"] for e in sink.events()}
            for step, at in woken.items():
                if clock.seconds() - at >= WINDOW:
                    self.assertIn(step, handed, "held past the window")
        reactor.run()
        clock.advance(WINDOW)  # the last batch goes
        clock.advance(WINDOW)  # a window with nothing: idle
        steps = [e["step"] for e in sink.events()]
        self.assertEqual(steps, sorted(steps))
        self.assertEqual(len(set(steps)), sent)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(inbox._scheduled)  # so the next put wakes the reactor


class BusyInboxTests(SynchronousTestCase):
    """``max_window``: a loop logging above ``busy_rate`` gets longer windows (api.busy_wait)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.reactor = Wakeups()
        self.sink = Batches(self.clock)
        self.inbox = Inbox(
            self.reactor, self.sink, clock=self.clock, window=WINDOW, max_window=10 * WINDOW
        )

    def log_at(self, rate: float, seconds: float, first: int = 0) -> int:
        return log_at(self.inbox, self.reactor, self.clock, rate, seconds, first)

    def test_a_busy_loop_gets_few_big_batches_each_event_at_most_max_window_late(self) -> None:
        n = self.log_at(5000, 2.0)  # over twice busy_rate (1,500/s): max_window
        self.assertEqual(self.inbox.wait, 10 * WINDOW)
        self.clock.pump([1 / 5000] * 500)  # the last window, then idle
        self.assertEqual([e["step"] for e in self.sink.events()], list(range(n)))
        self.assertLessEqual(max(self.sink.delays()), 10 * WINDOW + 1 / 5000 + 1e-9)
        # about 2 s / 0.1 s (the window grows within the first few batches)
        self.assertLessEqual(self.inbox.batches, 2.0 / (10 * WINDOW) + 8)
        self.assertEqual(self.inbox.wakeups, 1)

    def test_1_khz_keeps_the_short_window_and_slowing_down_brings_it_back(self) -> None:
        n = self.log_at(1000, 1.0)  # below busy_rate
        self.assertEqual(self.inbox.wait, WINDOW)
        self.assertLessEqual(max(self.sink.delays()), WINDOW + 1e-9)
        n += self.log_at(2250, 1.0, first=n)  # halfway to twice busy_rate: half-way to max
        self.assertAlmostEqual(self.inbox.wait, 5.5 * WINDOW, delta=WINDOW)
        before = len(self.sink.events())
        self.log_at(1000, 0.5, first=n)  # one long window at most, then short ones again
        self.assertEqual(self.inbox.wait, WINDOW)
        self.assertLessEqual(max(self.sink.delays()[before:]), 5.5 * WINDOW + WINDOW)
        self.assertEqual(self.inbox.wakeups, 1)

    def test_without_max_window_the_window_never_grows(self) -> None:
        inbox = Inbox(self.reactor, self.sink, clock=self.clock, window=WINDOW)
        log_at(inbox, self.reactor, self.clock, 5000, 1.0)
        self.assertEqual(inbox.wait, WINDOW)

    def test_the_server_lets_a_busy_loop_wait_up_to_its_bound(self) -> None:
        reactor = ThreadedMemoryReactor()
        server = StreamServer({"memory": True, "listen": "tcp:0:interface=127.0.0.1"}, reactor)
        self.assertEqual(server.inbox.max_window, _INBOX_MAX_DELAY)
        self.assertLessEqual(_INBOX_MAX_DELAY, 0.1)


class ThreadedMemoryReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` whose ``callFromThread`` waits for ``turn()``."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = Wakeups()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.wakeups(lambda: f(*args, **kw))


class ServerInboxTests(SynchronousTestCase):
    def test_the_server_batches_run_log_adaptively(self) -> None:
        """The embedded server's ``run.log``: idle at once, busy one batch per window."""
        reactor = ThreadedMemoryReactor()
        reactor.advance(100)
        server = StreamServer({"memory": True, "listen": "tcp:0:interface=127.0.0.1"}, reactor)
        self.assertEqual(server.inbox.window, _INBOX_DELAY)
        self.assertLessEqual(_INBOX_DELAY, 0.02)  # 1 kHz: p99 within 20 ms
        run = server.run("r")
        reactor.wakeups.run()
        self.assertEqual(server.hub.last_id, 1)  # "created", at once
        reactor.advance(1.0)
        run.log({"loss": 0.5}, step=0)
        reactor.wakeups.run()
        self.assertEqual(server.hub.last_id, 2)  # idle: at once
        for step in range(1, 10):  # within the window after step 0
            run.log({"loss": 0.5}, step=step)
            reactor.wakeups.run()
            reactor.advance(_INBOX_DELAY / 20)
        self.assertEqual(server.hub.last_id, 2)  # busy: gathered
        reactor.advance(_INBOX_DELAY)
        self.assertEqual(server.hub.last_id, 11)
        self.assertEqual(server.inbox.batches, 3)
        self.assertEqual(server.inbox.wakeups, 2)  # "created", then step 0 after a quiet second
        run.log({"loss": 0.5}, step=10)
        d = server.flush_deferred()  # flush: at once
        self.assertEqual(server.hub.last_id, 12)
        self.successResultOf(d)


class PublisherBatchingTests(PublisherTestCase):
    """The remote ``Publisher``: the same rules, with one POST under way at a time."""

    defaults = {"linger": WINDOW}

    def test_defaults_meet_the_goal(self) -> None:
        pub = Publisher(
            "http://h:1", "r", report_every=0, flush_at_exit=0, clock=self.clock,
            transport=self.server,
        )  # fmt: skip
        self.assertLessEqual(pub.linger, 0.015)  # 1 kHz: p99 within 20 ms with a POST or two

    def test_idle_sends_at_once(self) -> None:
        pub = self.publisher()
        self.clock.advance(0)  # "created"
        self.clock.advance(5.0)
        pub.log({"loss": 0.5}, step=0, time_s=5.0)
        self.clock.advance(0)
        self.assertEqual(self.server.times(), [0.0, 5.0])
        self.clock.advance(0.05)  # 20 Hz: idle each time
        for step in range(1, 21):
            pub.log({"loss": 0.5}, step=step)
            self.clock.advance(0)
            self.clock.advance(0.05)
        self.assertEqual(len(self.server.posts), 22)
        self.assertEqual(self.server.steps(), list(range(21)))

    def test_busy_gathers_one_post_per_linger_bounded_delay(self) -> None:
        """1 kHz for 2 s: about one POST per linger, each event at most a linger late."""
        pub = self.publisher()
        self.clock.advance(0)
        logged: dict[int, float] = {}
        for step in range(2000):
            logged[step] = self.clock.seconds()
            pub.log({"loss": 0.5}, step=step)
            self.clock.advance(TICK)
        self.clock.pump([TICK] * 20)
        delays = [
            when - logged[e["step"]] for when, events in self.server.posts for e in events
            if e["type"] == "metric"
        ]  # fmt: skip
        self.assertEqual(self.server.steps(), list(range(2000)))
        # A linger, plus at most one tick of the clock (the reactor's lag here).
        self.assertLessEqual(max(delays), WINDOW + TICK + 1e-9)
        self.assertLessEqual(len(self.server.posts), 1 + math.ceil(2.0 / WINDOW) + 1)
        self.assertGreater(len(self.server.posts), 2.0 / WINDOW / 2)

    def test_events_logged_during_a_post_go_in_the_next(self) -> None:
        """
        One POST at a time: what is logged while one is under way waits for
        it to end, then ``linger`` after it began, or at once if it took longer.
        """
        pub = self.publisher()
        answer = self.server.answer
        durations = iter([0.002, 0.05, 0.0, 0.0])

        def slow(events: list[dict[str, Any]]) -> tuple[int, bytes]:
            took = next(durations)
            if events[-1].get("step") == 0:
                pub.log({"loss": 0.5}, step=1)  # the training loop logs meanwhile
                pub.log({"loss": 0.5}, step=2)
            self.clock.rightNow += took  # the POST's round trip
            result: tuple[int, bytes] = answer(events)
            return result

        self.server.answer = slow
        pub.log({"loss": 0.5}, step=0)
        self.clock.advance(0)
        self.assertEqual([len(e) for _, e in self.server.posts], [2])  # "created", step 0
        self.clock.advance(WINDOW - 0.002)
        self.assertEqual(self.server.times(), [0.0, WINDOW])  # a linger after the first began
        self.assertEqual([e["step"] for e in self.server.posts[1][1]], [1, 2])
        # That one took 50 ms: what it gathered goes as soon as it ends.
        pub.log({"loss": 0.5}, step=3)  # (logged "during" it, from the clock's view)
        self.clock.advance(0)
        self.assertEqual(self.server.times(), [0.0, WINDOW, WINDOW + 0.05])
        self.assertEqual(self.server.steps(), [0, 1, 2, 3])

    def test_flush_does_not_wait_for_the_linger(self) -> None:
        pub = self.publisher(linger=10.0)
        self.clock.advance(0)  # "created": idle, at once
        pub.log({"loss": 0.5}, step=0)  # busy for 10 s ...
        self.clock.advance(1.0)
        self.assertEqual(len(self.server.posts), 1)
        self.assertFalse(pub.flush(timeout=0))  # ... but a flush sends now
        self.clock.advance(0)
        self.assertEqual(self.server.times(), [0.0, 1.0])
        self.assertTrue(pub.flush(timeout=0))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the linger's call is gone

    def test_a_busier_loop_waits_longer_up_to_a_bound(self) -> None:
        """
        2,000 events/s (2 metrics at 1 kHz): the wait grows with the rate
        above busy_rate (1,500/s: a third of the way to max_linger, 4
        lingers), so there are fewer POSTs, each event at most that wait
        late; back at 1 kHz it is one linger again, and after a quiet spell
        an event goes at once.
        """
        pub = self.publisher()
        self.clock.advance(0)
        logged: dict[int, float] = {}
        metrics = {f"m{i}": 0.5 for i in range(2)}
        for step in range(2000):
            logged[step] = self.clock.seconds()
            pub.log(metrics, step=step)
            self.clock.advance(TICK)
        busy_posts = len(self.server.posts)
        self.assertAlmostEqual(pub.wait, WINDOW * 4, delta=WINDOW * 0.6)
        delays = [
            when - logged[e["step"]] for when, events in self.server.posts for e in events
            if e["type"] == "metric"
        ]  # fmt: skip
        self.assertLessEqual(max(delays), pub.max_linger + TICK + 1e-9)
        # about 2 s / 4 lingers, instead of 2 s / 1 linger at 1 kHz
        self.assertLess(busy_posts, 2.0 / WINDOW / 3)
        self.assertGreater(busy_posts, 2.0 / (WINDOW * 4) / 2)
        for step in range(2000, 2300):  # 1 kHz again
            pub.log({"m0": 0.5}, step=step)
            self.clock.advance(TICK)
        self.assertEqual(pub.wait, WINDOW)
        self.clock.pump([TICK] * 50)
        self.clock.advance(5.0)
        pub.log({"m0": 0.5}, step=3000)
        self.clock.advance(0)
        self.assertEqual(self.server.times()[-1], self.clock.seconds())  # idle: at once
        self.assertEqual(self.server.steps()[-1], 3000)

    def test_a_loop_catching_up_is_not_taken_for_a_busier_one(self) -> None:
        """
        1 kHz with a stall of 40 ms every half second, after which the loop
        logs the 40 missed points at once (as bench/latency.py's does): the
        batch that takes them measures its rate since the POST before the
        stall, so the wait stays one linger and no point waits much longer.
        """
        pub = self.publisher()
        self.clock.advance(0)
        logged: dict[int, float] = {}
        step = 0
        for _ in range(4):
            for _ in range(460):
                logged[step] = self.clock.seconds()
                pub.log({"m0": 0.5}, step=step)
                step += 1
                self.clock.advance(TICK)
            self.clock.pump([TICK] * 40)  # the stall ...
            for _ in range(40):  # ... and the catching up
                logged[step] = self.clock.seconds()
                pub.log({"m0": 0.5}, step=step)
                step += 1
            self.assertEqual(pub.wait, WINDOW)
        self.clock.pump([TICK] * 100)
        delays = [
            when - logged[e["step"]] for when, events in self.server.posts for e in events
            if e["type"] == "metric"
        ]  # fmt: skip
        self.assertEqual(len(delays), step)
        self.assertLessEqual(max(delays), WINDOW + 2 * TICK + 1e-9)

    def test_bad_timing_parameters_are_named(self) -> None:
        for kwargs, named in (
            ({"busy_rate": 0}, "busy_rate"),
            ({"busy_rate": -5.0}, "busy_rate"),
            ({"busy_rate": float("nan")}, "busy_rate"),
            ({"linger": -0.1}, "linger"),
            ({"max_linger": float("nan")}, "max_linger"),
        ):
            with self.assertRaises(ValueError) as caught:
                self.publisher(**kwargs)
            self.assertIn(f"Publisher {named} must be", str(caught.exception))

    def test_the_wait_never_passes_max_linger(self) -> None:
        pub = self.publisher(max_linger=WINDOW * 3)
        self.clock.advance(0)
        for step in range(500):
            pub.log({f"m{i}": 0.5 for i in range(100)}, step=step)  # 100,000 events/s
            self.clock.advance(TICK)
        self.assertEqual(pub.wait, WINDOW * 3)
        gaps = [b - a for a, b in itertools.pairwise(self.server.times()[1:])]
        self.assertLessEqual(max(gaps), WINDOW * 3 + TICK + 1e-9)
