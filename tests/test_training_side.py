"""
The training side never waits: ``run.log()`` only queues, and wakes the
reactor at most once per batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS, connect_sse
from trainstream.events import EventError
from trainstream.hub import Hub
from trainstream.run import Inbox, Run
from trainstream.server import StreamServer
from trainstream.store.memory import MemoryStore


class HeldReactor:
    """A reactor that never runs what it is handed: proves nobody waits on it."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, f: Callable[[], None]) -> None:
        self.calls.append(f)


class InboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = Hub(MemoryStore())
        self.reactor = HeldReactor()
        self.inbox = Inbox(self.reactor, self.hub.accept)
        self.run = Run("r", self.inbox, flush_deferred=lambda: succeed(None), blocking=lambda: None)

    def test_log_only_queues_and_wakes_once_per_batch(self) -> None:
        """10,000 calls while the reactor is busy: all return, one wake-up."""
        for step in range(10_000):
            self.run.log({"loss": 1.0 / (step + 1)}, step=step)
        self.assertEqual(len(self.reactor.calls), 1)
        self.assertEqual(self.hub.last_id, 0)
        self.reactor.calls.pop()()  # the reactor gets to it
        self.assertEqual(self.hub.last_id, 10_000)
        self.run.log({"loss": 0.5}, step=10_000)
        self.assertEqual(len(self.reactor.calls), 1)  # a new batch, a new wake-up

    def test_bad_input_raises_in_the_caller(self) -> None:
        for metrics, step, field in (
            ({"loss": 1.0}, -1, "step"),
            ({"loss": 1.0}, 1.5, "step"),
            ({"": 1.0}, 1, "name"),
            ({"bad name!": 1.0}, 1, "name"),
            ({"loss": "high"}, 1, "value"),
            ({"loss": True}, 1, "value"),
        ):
            with self.assertRaises(EventError) as e:
                self.run.log(metrics, step=step)  # type: ignore[arg-type]
            self.assertIn(field, str(e.exception))
        self.assertEqual(self.reactor.calls, [])

    def test_fast_path_gives_the_same_events(self) -> None:
        """Known names and plain numbers are queued as they are; the events are the same."""
        self.run.log({"loss": 1.0, "acc": 2}, step=1, time_s=10.0)  # first: checked
        metrics = {"loss": 0.5, "acc": float("nan")}
        self.run.log(metrics, step=2, time_s=11.0)  # known names: the fast path
        metrics["loss"] = 99.0  # the caller's dict may change afterwards
        self.reactor.calls.pop()()
        events = [r.event for r in self.hub.store.after(0, lambda r: True)]
        self.assertEqual(
            [(e["name"], e["step"], e["time"]) for e in events],
            [("loss", 1, 10.0), ("acc", 1, 10.0), ("loss", 2, 11.0), ("acc", 2, 11.0)],
        )
        self.assertEqual(events[2]["value"], 0.5)
        self.assertIn('"value":"NaN"', self.hub.store.after(3, lambda r: True)[0].json)
        # A new name, or a value of another type, still goes through the checks.
        with self.assertRaises(EventError):
            self.run.log({"loss": 1.0, "bad name!": 1.0}, step=3)
        with self.assertRaises(EventError):
            self.run.log({"loss": "high"}, step=3)

    def test_run_name_is_fixed(self) -> None:
        """The name was checked once: it cannot be changed under queued events."""
        with self.assertRaises(AttributeError):
            self.run.name = "x" * 10_000  # type: ignore[misc]
        self.assertEqual(self.run.name, "r")

    def test_special_values(self) -> None:
        self.run.log({"a": float("nan"), "b": "Infinity", "c": "-Infinity", "d": 3}, step=1)
        self.reactor.calls.pop()()
        values = [r.json.split('"value":')[1] for r in self.hub.store.after(0, bool)]
        self.assertEqual(values, ['"NaN"}', '"Infinity"}', '"-Infinity"}', "3}"])


class ResumeUnderLoadTests(TestCase):
    timeout = 120

    def test_resume_while_a_publisher_runs(self) -> Deferred[None]:
        """
        Clients resume by id while a training thread keeps logging: each gets
        every event after its id exactly once, in order, replay and live alike.
        """
        server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(server.stop)

        async def go() -> None:
            await server.start()
            run = server.run("busy")
            stop = threading.Event()
            steps = {"n": 0}

            def train() -> None:
                while not stop.is_set() and steps["n"] < 10_000:
                    run.log({"train/loss": 0.1, "train/acc": 0.9}, step=steps["n"])
                    steps["n"] += 1
                    if steps["n"] % 10 == 0:
                        stop.wait(0.001)  # the training step's own work

            training = deferToThread(train)
            clients = []
            for i in range(5):
                while server.hub.last_id < 2000 * (i + 1) and not training.called:
                    await deferToThread(lambda: None)
                after = server.hub.last_id - 1500
                clients.append(
                    (
                        after,
                        await connect_sse(
                            server.urls["sse"] + "?type=metric", **{"Last-Event-ID": str(after)}
                        ),
                    )
                )
            self.assertFalse(training.called, "the publisher ended before the clients resumed")
            stop.set()
            await training
            server.flush_deferred()
            last = server.hub.last_id
            for after, client in clients:
                await client.wait_for(last - after)
                ids = [e["id"] for e in client.events]
                self.assertEqual(ids, list(range(after + 1, last + 1)))

        return Deferred.fromCoroutine(go())


_NAMES = st.sampled_from(["loss", "acc", "lr", "train/loss", "a.b:c-d_e"])
_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
_CALLS = st.lists(
    st.tuples(
        st.dictionaries(_NAMES, _VALUES, min_size=1, max_size=3),
        st.integers(min_value=0, max_value=2**63 - 1),
        st.floats(min_value=0.0, max_value=1e12),  # given: time.time() would differ
        st.booleans(),  # flush (the reactor takes the queue) after this call
    ),
    min_size=1,
    max_size=20,
)


class CheckedSinkTests(SynchronousTestCase):
    """
    A batch made only of ``run.log`` calls that ``plain_log`` let through
    goes to the hub unchecked (``accept_checked``): it must store exactly
    what the checked way stores, and anything else must still be checked.
    """

    def hub_and_run(self, checked: bool) -> tuple[Hub, Run, HeldReactor, list[str]]:
        hub = Hub(MemoryStore(), now=lambda: 1e9)
        reactor = HeldReactor()
        taken: list[str] = []

        def sink(events: list[dict[str, object]]) -> None:
            taken.append("checked")
            hub.accept(events)

        def unchecked(events: list[dict[str, object]]) -> None:
            taken.append("unchecked")
            hub.accept_checked(events)

        inbox = Inbox(reactor, sink, checked_sink=unchecked if checked else None)
        run = Run("r", inbox, flush_deferred=lambda: succeed(None), blocking=lambda: None)
        return hub, run, reactor, taken

    @settings(max_examples=150, deadline=None)
    @given(_CALLS)
    def test_the_unchecked_way_stores_the_same(
        self, calls: list[tuple[dict[str, object], int, float, bool]]
    ) -> None:
        stored = []
        for checked in (False, True):
            hub, run, reactor, _ = self.hub_and_run(checked)
            for metrics, step, t, flush in calls:
                run.log(metrics, step=step, time_s=t)
                if flush:
                    while reactor.calls:
                        reactor.calls.pop(0)()
            while reactor.calls:
                reactor.calls.pop(0)()
            stored.append([(r.id, r.json) for r in hub.store.after(0, lambda r: True)])
        self.assertEqual(stored[0], stored[1])
        self.assertTrue(stored[1])

    def test_only_plain_log_calls_skip_the_check(self) -> None:
        hub, run, reactor, taken = self.hub_and_run(True)
        run.log({"loss": 1.0}, step=1)  # a new name: checked by metric_events, a list
        reactor.calls.pop()()
        run.log({"loss": 0.5}, step=2)  # known name, plain value: the tuple form
        reactor.calls.pop()()
        run.log({"loss": 0.25}, step=3)
        run.status("running")  # in the same batch: the whole batch is checked
        reactor.calls.pop()()
        self.assertEqual(taken, ["checked", "unchecked", "checked"])
        self.assertEqual(hub.last_id, 4)
