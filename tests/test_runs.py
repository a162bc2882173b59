"""
The runs registry (state, summaries, stall detection, NaN alerts), the memory
store's metric history and deletion, and downsampling: deterministically, on
a Clock.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from trainstream.hub import Hub
from trainstream.runs import RunsService
from trainstream.server import StreamServer
from trainstream.store import Record, downsample
from trainstream.store.memory import MemoryStore
from trainstream.web.rest import split_run_path


def metric(run: str, step: int, value: Any = 0.5, name: str = "train/loss") -> dict[str, Any]:
    return {"type": "metric", "run": run, "name": name, "step": step, "value": value, "time": 10.0}


def status(run: str, state: str, time: float = 10.0) -> dict[str, Any]:
    return {"type": "status", "run": run, "state": state, "time": time}


class RegistryTestCase(SynchronousTestCase):
    stall_after = 30.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(10_000)
        self.hub = Hub(self.store, now=lambda: 1000.0 + self.clock.seconds())
        self.runs = RunsService(self.hub, self.clock, self.stall_after)

    def events(self, **match: str) -> list[dict[str, Any]]:
        def wanted(r: Record) -> bool:
            return all(r.event.get(k) == v for k, v in match.items())

        return [r.event for r in self.store.after(0, wanted)]


class StateTests(RegistryTestCase):
    def test_first_metric_makes_running(self) -> None:
        self.hub.accept([metric("a", 1)])
        info = self.runs.get("a")
        assert info is not None
        self.assertEqual(info.state, "running")

    def test_created_then_metric_then_finished(self) -> None:
        self.hub.accept([status("a", "created", 5.0)])
        self.assertEqual(self.runs.get("a").state, "created")  # type: ignore[union-attr]
        self.hub.accept([metric("a", 1)])
        self.assertEqual(self.runs.get("a").state, "running")  # type: ignore[union-attr]
        self.hub.accept([status("a", "finished", 20.0)])
        info = self.runs.get("a")
        assert info is not None
        self.assertEqual(info.state, "finished")
        self.assertEqual((info.created, info.updated), (5.0, 20.0))

    def test_summaries(self) -> None:
        """Per metric: count, last step/value, min/max over finite values only."""
        self.hub.accept(
            [
                {"type": "hparams", "run": "a", "params": {"lr": 0.1, "opt": "sgd"}},
                metric("a", 1, 3.0),
                metric("a", 2, "NaN"),
                metric("a", 3, -1.5),
                metric("a", 4, "Infinity"),
                metric("a", 5, 2.0),
                metric("a", 7, 0.9, name="val/acc"),
                {"type": "hparams", "run": "a", "params": {"lr": 0.01, "bs": 64}},
            ]
        )
        info = self.runs.get("a")
        assert info is not None
        self.assertEqual(info.hparams, {"lr": 0.01, "opt": "sgd", "bs": 64})
        self.assertEqual(info.last_step, 7)
        self.assertEqual(list(info.metrics), ["train/loss", "val/acc"])
        loss = info.metrics["train/loss"].to_json()
        self.assertEqual(
            loss, {"count": 5, "last_step": 5, "last_value": 2.0, "min": -1.5, "max": 3.0}
        )
        summary = info.summary()
        self.assertEqual(summary["metrics"], ["train/loss", "val/acc"])
        self.assertEqual(summary["last_step"], 7)

    def test_all_nan_has_no_min_max(self) -> None:
        self.hub.accept([metric("a", 1, "NaN")])
        loss = self.runs.get("a").metrics["train/loss"]  # type: ignore[union-attr]
        self.assertEqual((loss.count, loss.min, loss.max), (1, None, None))
        assert loss.last_value is not None
        self.assertTrue(math.isnan(loss.last_value))

    def test_rebuilt_from_history(self) -> None:
        """A registry made over a store that already holds events knows its runs, alerts no more."""
        self.hub.accept([metric("old", 1, "NaN"), status("old", "finished")])
        before = self.hub.last_id
        again = RunsService(self.hub, self.clock, self.stall_after)
        self.assertIsNone(again.get("old"))  # constructing reads nothing
        again.load()  # as startService does, once the store is open
        info = again.get("old")
        assert info is not None
        self.assertEqual(info.state, "finished")
        self.assertEqual(info.metrics["train/loss"].count, 1)
        self.hub.observers.remove(self.runs.observe)
        self.hub.accept([metric("old", 2, "NaN")])
        self.assertEqual(self.hub.last_id, before + 1)  # the NaN alone: no second alert


class StallTests(RegistryTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.runs.startService()
        self.addCleanup(self.runs.stopService)

    def stalled(self) -> list[dict[str, Any]]:
        return self.events(type="status", state="stalled")

    def test_stall_after_silence(self) -> None:
        self.hub.accept([metric("a", 1)])
        self.clock.advance(29)
        self.assertEqual(self.stalled(), [])
        self.clock.advance(1)
        [event] = self.stalled()
        self.assertEqual(event["run"], "a")
        self.assertEqual(event["message"], "no event for 30 s")
        self.assertEqual(self.runs.get("a").state, "stalled")  # type: ignore[union-attr]
        self.assertEqual(self.runs.stalls_total, 1)
        # Stalled once: more silence publishes nothing more.
        self.clock.pump([1] * 100)
        self.assertEqual(len(self.stalled()), 1)

    def test_events_keep_a_run_alive(self) -> None:
        self.hub.accept([metric("a", 0)])
        for step in range(1, 10):
            self.clock.advance(20)
            self.hub.accept([metric("a", step)])
        self.assertEqual(self.stalled(), [])

    def test_alerts_do_not_keep_a_run_alive(self) -> None:
        self.hub.accept([metric("a", 0)])
        self.clock.advance(20)
        self.hub.accept([{"type": "alert", "run": "a", "kind": "disk", "message": "full"}])
        self.clock.advance(10)
        self.assertEqual(len(self.stalled()), 1)

    def test_back_to_running_is_derived(self) -> None:
        """A metric from a stalled run makes it running again; no status is published for it."""
        self.hub.accept([metric("a", 1)])
        self.clock.advance(30)
        last = self.hub.last_id
        self.hub.accept([metric("a", 2)])
        self.assertEqual(self.runs.get("a").state, "running")  # type: ignore[union-attr]
        self.assertEqual(self.hub.last_id, last + 1)
        self.clock.advance(30)
        self.assertEqual(len(self.stalled()), 2)

    def test_created_runs_stall_paused_and_finished_do_not(self) -> None:
        self.hub.accept(
            [status("c", "created"), status("p", "paused"), status("f", "finished"), metric("r", 1)]
        )
        self.clock.advance(31)
        self.assertEqual(sorted(e["run"] for e in self.stalled()), ["c", "r"])

    def test_stop_stops_checking(self) -> None:
        self.hub.accept([metric("a", 1)])
        self.runs.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.stalled(), [])
        self.runs.startService()
        self.clock.advance(1)
        self.assertEqual(len(self.stalled()), 1)

    def test_stream_server_on_a_memory_reactor(self) -> None:
        """StreamServer wires its registry to its reactor and its stall_after option."""
        reactor = MemoryReactorClock()
        server = StreamServer({"listen": "tcp:0", "memory": True, "stall_after": 5}, reactor)
        self.successResultOf(server.start())
        server.hub.accept([metric("m", 1)])
        reactor.advance(4)
        self.assertEqual(server.runs.get("m").state, "running")  # type: ignore[union-attr]
        reactor.advance(1)
        self.assertEqual(server.runs.get("m").state, "stalled")  # type: ignore[union-attr]
        [record] = server.store.after(0, lambda r: r.type == "status")
        self.assertEqual(record.event["message"], "no event for 5 s")
        self.successResultOf(server.stop())
        self.assertFalse(server.runs.running)


class NanAlertTests(RegistryTestCase):
    def alerts(self) -> list[dict[str, Any]]:
        return self.events(type="alert")

    def test_one_alert_per_run_and_name(self) -> None:
        self.hub.accept([metric("a", 10), metric("a", 12, "NaN"), metric("a", 13, "NaN")])
        self.hub.accept([metric("a", 14, "NaN"), metric("a", 15, "-Infinity")])
        [alert] = self.alerts()
        self.assertEqual(
            {k: alert[k] for k in ("type", "run", "kind", "name", "message")},
            {
                "type": "alert",
                "run": "a",
                "kind": "nan",
                "name": "train/loss",
                "message": "train/loss is NaN at step 12",
            },
        )
        self.assertEqual(self.runs.nan_alerts_total, 1)

    def test_other_names_and_runs_alert_too(self) -> None:
        self.hub.accept(
            [
                metric("a", 1, "Infinity", name="grad/norm"),
                metric("a", 2, "NaN"),
                metric("b", 2, "NaN"),
                metric("b", 3, "NaN"),
            ]
        )
        messages = sorted((a["run"], a["message"]) for a in self.alerts())
        self.assertEqual(
            messages,
            [
                ("a", "grad/norm is Infinity at step 1"),
                ("a", "train/loss is NaN at step 2"),
                ("b", "train/loss is NaN at step 2"),
            ],
        )

    def test_alert_follows_its_batch(self) -> None:
        """The alert gets the next id after the batch that had the NaN."""
        _, _, last = self.hub.accept([metric("a", 1, "NaN"), metric("a", 2)])
        [alert] = self.alerts()
        self.assertEqual(alert["id"], last + 1)

    def test_finite_values_never_alert(self) -> None:
        self.hub.accept([metric("a", s, 1e308 * (s % 2) - 5) for s in range(50)])
        self.assertEqual(self.alerts(), [])

    def test_deleted_run_alerts_again(self) -> None:
        self.hub.accept([metric("a", 1, "NaN"), metric("b", 1, 1.0)])
        removed = self.successResultOf(self.runs.delete("a"))
        self.assertEqual(removed, 2)  # the metric and its alert
        self.assertIsNone(self.runs.get("a"))
        self.assertEqual([r.run for r in self.store.after(0, lambda r: True)], ["b"])
        self.hub.accept([metric("a", 2, "NaN")])
        self.assertEqual(len(self.alerts()), 1)

    def test_delete_unknown(self) -> None:
        self.assertIsNone(self.successResultOf(self.runs.delete("nope")))


class MemoryStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore(5)
        self.hub = Hub(self.store)

    def test_series(self) -> None:
        self.hub.accept(
            [
                metric("a", 1, 1.0),
                metric("a", 2, "NaN"),
                metric("b", 2, 9.0),
                metric("a", 3, 3, name="other"),
                metric("a", 4, 4.0),
            ]
        )
        points = self.store.series("a", "train/loss")
        self.assertEqual([(s, t) for s, _, t in points], [(1, 10.0), (2, 10.0), (4, 10.0)])
        self.assertEqual(points[0][1], 1.0)
        self.assertTrue(math.isnan(points[1][1]))
        self.assertEqual([p[0] for p in self.store.series("a", "train/loss", 2, 3)], [2])
        self.assertEqual([p[0] for p in self.store.series("a", "train/loss", 2)], [2, 4])
        self.assertEqual([p[0] for p in self.store.series("a", "train/loss", None, 1)], [1])
        self.assertEqual(self.store.series("a", "nope"), [])

    def test_delete_keeps_the_rest_in_order(self) -> None:
        self.hub.accept([metric("a", 1), metric("b", 1), metric("a", 2), metric("b", 2)])
        self.assertEqual(self.successResultOf(self.store.delete_run("a")), 2)
        self.assertEqual([r.id for r in self.store.after(0, lambda r: True)], [2, 4])
        self.assertEqual([r.id for r in self.store.after(2, lambda r: True)], [4])
        self.assertEqual(self.successResultOf(self.store.delete_run("a")), 0)

    def test_delete_does_not_look_like_trimming(self) -> None:
        """Deleting the oldest events leaves oldest_id: resuming clients get no reset."""
        self.hub.accept([metric("a", 1), metric("b", 1)])
        self.successResultOf(self.store.delete_run("a"))
        self.assertEqual(self.store.oldest_id, 1)
        self.successResultOf(self.store.delete_run("b"))
        self.assertEqual(self.store.oldest_id, 1)

    def test_trimming_moves_oldest_id(self) -> None:
        self.hub.accept([metric("a", s) for s in range(7)])
        self.assertEqual(self.store.oldest_id, 3)
        self.assertEqual(self.successResultOf(self.store.delete_run("a")), 5)
        self.assertEqual(self.store.oldest_id, 3)
        self.hub.accept([metric("a", s) for s in range(3)])
        self.assertEqual(self.store.oldest_id, 3)


points_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10_000),
        st.floats(allow_nan=False, allow_infinity=True, width=32),
        st.just(1.0),
    ),
    max_size=300,
)


class DownsampleTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(points=points_strategy, max_points=st.integers(min_value=2, max_value=120))
    def test_extremes_survive(self, points: list[Any], max_points: int) -> None:
        out, downsampled = downsample(points, max_points)
        self.assertLessEqual(len(out), max_points)
        self.assertEqual([p[0] for p in out], sorted(p[0] for p in out))
        self.assertEqual(downsampled, len(points) > max_points)
        if not downsampled:
            self.assertEqual(out, sorted(points, key=lambda p: p[0]))
            return
        remaining = list(points)
        for p in out:  # every output point is an input point, each used once
            remaining.remove(p)
        buckets = max_points // 2
        first = min(p[0] for p in points)
        span = max(p[0] for p in points) - first + 1
        by_bucket: dict[int, list[Any]] = {}
        for p in points:
            by_bucket.setdefault((p[0] - first) * buckets // span, []).append(p)
        kept: dict[int, list[float]] = {}
        for p in out:
            kept.setdefault((p[0] - first) * buckets // span, []).append(p[1])
        for b, members in by_bucket.items():
            values = [v for _, v, _ in members]
            self.assertIn(min(values), kept[b])
            self.assertIn(max(values), kept[b])
            self.assertLessEqual(len(kept[b]), 2)

    def test_spike_kept(self) -> None:
        points = [(s, 1.0, 0.0) for s in range(10_000)]
        points[7777] = (7777, 1e6, 0.0)
        points[1234] = (1234, -1e6, 0.0)
        out, downsampled = downsample(points, 100)
        self.assertTrue(downsampled)
        self.assertLessEqual(len(out), 100)
        self.assertIn((7777, 1e6, 0.0), out)
        self.assertIn((1234, -1e6, 0.0), out)

    def test_nan_counts_as_a_maximum(self) -> None:
        points = [(s, float(s), 0.0) for s in range(100)]
        points[50] = (50, math.nan, 0.0)
        out, _ = downsample(points, 10)
        self.assertTrue(any(math.isnan(v) for _, v, _ in out))

    def test_unsorted_input_sorted_by_step(self) -> None:
        out, downsampled = downsample([(3, 1.0, 0.0), (1, 2.0, 0.0), (2, 3.0, 0.0)], 10)
        self.assertEqual(([p[0] for p in out], downsampled), ([1, 2, 3], False))

    def test_max_points_below_two(self) -> None:
        self.assertRaises(ValueError, downsample, [], 1)


class RunPathTests(SynchronousTestCase):
    def test_split(self) -> None:
        cases = {
            b"resnet-3": ("resnet-3", None),
            b"team/resnet-3": ("team/resnet-3", None),
            b"team%2Fresnet-3": ("team/resnet-3", None),
            b"resnet-3/metrics/train/loss": ("resnet-3", "train/loss"),
            b"team/r/metrics/train%2Floss": ("team/r", "train/loss"),
            b"team%2Fr/metrics/train/loss": ("team/r", "train/loss"),
            b"a/metrics/b/metrics/c": ("a", "b/metrics/c"),
            b"a%2Fmetrics%2Fb/metrics/c": ("a/metrics/b", "c"),
            b"metrics/metrics/x": ("metrics", "x"),
            b"a/metrics": ("a/metrics", None),
        }
        for raw, expected in cases.items():
            self.assertEqual(split_run_path(raw.split(b"/")), expected, raw)


_STATES = ["created", "running", "paused", "finished", "failed", "stalled"]
_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-(2**63), 2**63 - 1)
)
_EVENTS = st.one_of(
    st.builds(
        lambda run, name, step, value, t: {
            "type": "metric",
            "run": run,
            "name": name,
            "step": step,
            "value": value,
            "time": t,
        },
        st.sampled_from(["a", "b"]),
        st.sampled_from(["loss", "acc"]),
        st.integers(0, 5),
        _VALUES,
        st.floats(0.0, 100.0),
    ),
    st.builds(
        lambda run, state, t: {"type": "status", "run": run, "state": state, "time": t},
        st.sampled_from(["a", "b"]),
        st.sampled_from(_STATES),
        st.floats(0.0, 100.0),
    ),
    st.builds(
        lambda run, t: {
            "type": "alert",
            "run": run,
            "kind": "nan",
            "name": "loss",
            "message": "m",
            "time": t,
        },
        st.sampled_from(["a", "b"]),
        st.floats(0.0, 100.0),
    ),
)


class BatchPathTests(SynchronousTestCase):
    """The registry's loop over a batch does for metrics exactly what ``_apply`` does."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(_EVENTS, max_size=30))
    def test_batch_loop_is_apply_one_by_one(self, events: list[dict[str, Any]]) -> None:
        from trainstream.hub import make_record

        records = [make_record(i + 1, e) for i, e in enumerate(events)]
        clock = Clock()
        batched = RunsService(Hub(MemoryStore(100)), clock, 30.0)
        single = RunsService(Hub(MemoryStore(100)), clock, 30.0)
        batch_alerts: list[dict[str, object]] = []
        batched._apply_all(records, batch_alerts)
        single_alerts: list[dict[str, object]] = []
        for record in records:
            single._apply(record, clock.seconds(), single_alerts)

        def state(service: RunsService) -> Any:
            return {
                name: (
                    info.state,
                    info.created,
                    info.updated,
                    info.last_seen,
                    info.last_step,
                    {m: s.to_json() for m, s in info.metrics.items()},
                )
                for name, info in service._runs.items()
            }

        self.assertEqual(repr(state(batched)), repr(state(single)))  # repr: NaN == NaN
        self.assertEqual(batch_alerts, single_alerts)
        self.assertEqual(batched._nan_alerted, single._nan_alerted)
