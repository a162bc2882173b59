"""
Checkpoint rewinds: steps going back start a new segment, announced once per
run with ``rewind_to``; history answers the current segment by default.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.test_streaming import ServerTestCase, d
from trainstream.hub import Hub
from trainstream.store.memory import MemoryStore
from trainstream.store.sqlite import SQLiteStore


def points(run: str, name: str, steps: range) -> list[dict[str, object]]:
    return [
        {"type": "metric", "run": run, "name": name, "step": s, "value": float(s), "time": 1.0}
        for s in steps
    ]


class SegmentTests(SynchronousTestCase):
    def test_rewind_starts_a_segment_announced_once(self) -> None:
        hub = Hub(MemoryStore())
        hub.accept(points("r", "loss", range(10)) + points("r", "acc", range(10)))
        before = hub.last_id
        hub.accept(points("r", "loss", range(5, 8)) + points("r", "acc", range(5, 8)))
        statuses = [r.event for r in hub.store.after(before, lambda r: r.type == "status")]
        self.assertEqual(len(statuses), 1)
        self.assertEqual((statuses[0]["rewind_to"], statuses[0]["run"]), (5, "r"))
        self.assertEqual(hub.segments.current("r", "loss"), 1)
        self.assertEqual(hub.segments.current("r", "acc"), 1)
        current = hub.store.series("r", "loss", segment=1)
        self.assertEqual([p[0] for p in current], [5, 6, 7])
        self.assertEqual(len(hub.store.series("r", "loss")), 13)
        # Another run is not affected; a second rewind is announced again.
        hub.accept(points("other", "loss", range(3)) + points("r", "loss", range(2, 3)))
        statuses = [r.event for r in hub.store.after(before, lambda r: r.type == "status")]
        self.assertEqual([s["rewind_to"] for s in statuses], [5, 2])

    def test_run_name_used_twice_ends_finished(self) -> None:
        """
        A short run under a name used before fits in one batch: metrics that
        go back, then ``finished``. The rewind status comes before the point
        that went back, so the run ends ``finished``, not ``running``; the
        answer's ids and count are the publisher's own events.
        """
        from trainstream.runs import RunsService

        hub = Hub(MemoryStore())
        runs = RunsService(hub, reactor, 120.0)
        finished = {"type": "status", "run": "r", "state": "finished", "time": 1.0}
        hub.accept([*points("r", "loss", range(10)), finished])
        self.assertEqual(runs.get("r").state, "finished")
        before = hub.last_id
        accepted, first, last = hub.accept([*points("r", "loss", range(3)), finished])
        self.assertEqual(runs.get("r").state, "finished")
        after = hub.store.after(before, lambda r: True)
        self.assertEqual(
            [(r.type, r.event.get("step"), r.event.get("state")) for r in after],
            [
                ("status", None, "running"),  # rewind_to 0, before the point at step 0
                ("metric", 0, None),
                ("metric", 1, None),
                ("metric", 2, None),
                ("status", None, "finished"),
            ],
        )
        self.assertEqual(after[0].event["rewind_to"], 0)
        self.assertEqual((accepted, first, last), (4, after[1].id, after[-1].id))

    def test_equal_steps_are_not_a_rewind(self) -> None:
        hub = Hub(MemoryStore())
        hub.accept(points("r", "loss", range(3)) + points("r", "loss", range(2, 3)))
        self.assertEqual(hub.segments.current("r", "loss"), 0)


class PersistedSegmentTests(TestCase):
    def test_segments_survive_a_restart(self) -> Deferred[None]:
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = SQLiteStore(path, reactor.callFromThread)
            store.start()
            hub = Hub(store)
            hub.accept(points("r", "loss", range(10)))
            hub.accept(points("r", "loss", range(3)))
            await store.sync()
            store.close()
            again = SQLiteStore(path, reactor.callFromThread)
            again.start()
            self.addCleanup(again.close)
            hub = Hub(again)
            self.assertEqual(hub.segments.current("r", "loss"), 1)
            hub.accept(points("r", "loss", range(3, 4)))  # goes on, no new segment
            self.assertEqual(hub.segments.current("r", "loss"), 1)
            await again.sync()
            self.assertEqual([p[0] for p in again.series("r", "loss", segment=1)], [0, 1, 2, 3])

        return Deferred.fromCoroutine(go())


class RestSegmentsTests(ServerTestCase):
    def test_current_segment_by_default_all_on_request(self) -> Deferred[None]:
        async def go() -> None:
            self.server.hub.accept(points("r", "loss", range(10)))
            self.server.hub.accept(points("r", "loss", range(4, 6)))
            code, body = await self.get_json("/api/runs/r/metrics/loss")
            self.assertEqual(code, 200)
            self.assertEqual([p[0] for p in body["points"]], [4, 5])
            code, body = await self.get_json("/api/runs/r/metrics/loss?segments=all")
            self.assertEqual(len(body["points"]), 12)
            code, body = await self.get_json("/api/runs/r/metrics/loss?segments=some")
            self.assertEqual((code, body["parameter"]), (400, "segments"))

        return d(go())
