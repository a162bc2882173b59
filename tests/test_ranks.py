"""
Distributed ranks: aggregates across ranks (a property against brute force,
and units on a Hub without a reactor), lagging-rank alerts, and
``GET /api/runs/{run}/ranks`` on a real server.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.test_streaming import ServerTestCase, d
from trainstream.hub import Hub
from trainstream.ranks import RanksService, aggregate, aggregate_name
from trainstream.server import StreamServer
from trainstream.store import Record
from trainstream.store.memory import MemoryStore
from trainstream.web.rest import split_ranks_path


def ranked(
    run: str, rank: int, step: int, value: Any, name: str = "train/loss", time: float = 5.0
) -> dict[str, Any]:
    return {
        "type": "metric",
        "run": run,
        "name": name,
        "step": step,
        "value": value,
        "rank": rank,
        "time": time,
    }


def aggregates(hub: Hub, after: int = 0) -> list[dict[str, object]]:
    def match(r: Record) -> bool:
        return r.type == "metric" and "rank" not in r.event

    return [r.event for r in hub.store.after(after, match)]


def alerts(hub: Hub) -> list[dict[str, object]]:
    return [r.event for r in hub.store.after(0, lambda r: r.type == "alert")]


def by_step(events: list[dict[str, object]]) -> dict[int, dict[str, object]]:
    """step -> {stat: value} of aggregate events of ``train/loss``."""
    out: dict[int, dict[str, object]] = {}
    for e in events:
        name = str(e["name"])
        stat = name.rsplit(":", 1)[1]
        out.setdefault(int(str(e["step"])), {})[stat] = e["value"]
    return out


class AggregatePropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(2, 5),
        st.data(),
        st.randoms(use_true_random=False),
    )
    def test_aggregates_equal_brute_force(
        self, n_ranks: int, data: st.DataObject, rnd: random.Random
    ) -> None:
        """
        Each rank reports its own increasing steps, interleaved at random
        across ranks. With ``min_ranks`` the number of ranks, exactly the
        steps every rank reported are aggregated, once each, in order, with
        the brute-force mean/min/max of the values the ranks gave for them.
        """
        number = st.one_of(
            st.integers(-1000, 1000),
            st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        )
        per_rank: dict[int, list[tuple[int, float]]] = {}
        for rank in range(n_ranks):
            steps = data.draw(st.sets(st.integers(1, 25), max_size=15))
            values = data.draw(st.lists(number, min_size=len(steps) + 1, max_size=len(steps) + 1))
            per_rank[rank] = list(zip([0, *sorted(steps)], values, strict=True))
        events = [ranked("r", rank, *per_rank[rank][0]) for rank in range(n_ranks)]
        queues = {rank: list(points[1:]) for rank, points in per_rank.items()}
        while any(queues.values()):
            rank = rnd.choice([r for r, q in queues.items() if q])
            events.append(ranked("r", rank, *queues[rank].pop(0)))
        hub = Hub(MemoryStore(100_000))
        # The world size is known (min_ranks): no step completes with fewer.
        RanksService(hub, lag_steps=10_000, min_ranks=n_ranks)
        # Publish in random batch sizes: batches must not matter.
        i = 0
        while i < len(events):
            n = rnd.randint(1, 4)
            hub.accept(events[i : i + n])
            i += n

        expected: dict[int, list[float]] = {}
        for step in range(26):
            given_at = [dict(points).get(step) for points in per_rank.values()]
            values = [float(v) for v in given_at if v is not None]
            if len(values) == n_ranks:
                expected[step] = values
        published = aggregates(hub)
        got = by_step(published)
        self.assertEqual(sorted(got), sorted(expected))
        self.assertEqual(len(published), 3 * len(expected))
        steps_in_order = [int(str(e["step"])) for e in published]
        self.assertEqual(steps_in_order, sorted(steps_in_order))
        for step, values in expected.items():
            stats = got[step]
            mean = sum(values) / len(values)
            self.assertTrue(
                math.isclose(float(str(stats["mean"])), mean, rel_tol=1e-9, abs_tol=1e-6),
                (stats, values),
            )
            self.assertEqual(stats["min"], min(values))
            self.assertEqual(stats["max"], max(values))

    @given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=20), st.randoms())
    def test_order_does_not_matter(self, values: list[float], rnd: random.Random) -> None:
        shuffled = list(values)
        rnd.shuffle(shuffled)
        a, b = aggregate(values), aggregate(shuffled)
        for x, y in zip(a, b, strict=True):
            self.assertTrue(x == y or (math.isnan(x) and math.isnan(y)), (a, b))

    def test_non_finite(self) -> None:
        self.assertTrue(all(math.isnan(v) for v in aggregate([1.0, math.nan, 2.0])))
        mean, low, high = aggregate([1.0, math.inf])
        self.assertEqual((mean, low, high), (math.inf, 1.0, math.inf))
        mean, low, high = aggregate([-math.inf, math.inf])
        self.assertTrue(math.isnan(mean))
        self.assertEqual((low, high), (-math.inf, math.inf))
        self.assertRaises(ValueError, aggregate, [])


class RanksServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = Hub(MemoryStore(10_000))
        self.ranks = RanksService(self.hub, lag_steps=100)

    def test_aggregates_published_when_every_rank_reported(self) -> None:
        hub = self.hub
        hub.accept([ranked("r", 0, 9, 1.0), ranked("r", 1, 9, 3.0)])
        # Ranks are known from their first event: step 9 is complete for 0 and 1.
        self.assertEqual(by_step(aggregates(hub)), {9: {"mean": 2.0, "min": 1.0, "max": 3.0}})
        before = hub.last_id
        hub.accept([ranked("r", 2, 9, 5.0), ranked("r", 0, 10, 1.0), ranked("r", 1, 10, 3.0)])
        self.assertEqual(aggregates(hub, before), [])  # rank 2 is known now
        hub.accept([ranked("r", 2, 10, 8.0)])
        published = aggregates(hub, before)
        self.assertEqual(
            [(e["name"], e["step"], e["value"]) for e in published],
            [
                ("train/loss:mean", 10, 4.0),
                ("train/loss:min", 10, 1.0),
                ("train/loss:max", 10, 8.0),
            ],
        )
        self.assertTrue(all("rank" not in e and e["run"] == "r" for e in published))
        self.assertEqual(published[0]["time"], 5.0)
        hub.accept([ranked("r", 0, 11, 2.0), ranked("r", 1, 11, 2.0)])
        self.assertEqual(len(aggregates(hub, before)), 3)
        hub.accept([ranked("r", 2, 11, 2.0)])
        self.assertEqual(by_step(aggregates(hub))[11], {"mean": 2.0, "min": 2.0, "max": 2.0})
        self.assertEqual(self.ranks.aggregates_total, 9)
        snap = self.ranks.snapshot("r")
        self.assertEqual(snap["ranks"], [0, 1, 2])
        self.assertEqual(
            snap["metrics"],
            {
                "train/loss": {
                    "step": 11,
                    "mean": 2.0,
                    "min": 2.0,
                    "max": 2.0,
                    "by_rank": {"0": [11, 2.0], "1": [11, 2.0], "2": [11, 2.0]},
                }
            },
        )
        self.assertEqual(snap["behind"], [])
        # The aggregates are ordinary metrics of the run; they are not aggregated again.
        self.assertEqual(self.ranks.series("r", "train/loss:mean"), None)

    def test_runs_and_names_are_apart(self) -> None:
        self.hub.accept(
            [
                ranked("a", 0, 1, 1.0),
                ranked("b", 1, 1, 5.0),
                ranked("a", 0, 1, 1.0, name="acc"),
                ranked("a", 1, 1, 3.0),
            ]
        )
        self.assertEqual(
            [(e["run"], e["name"], e["value"]) for e in aggregates(self.hub)][:1],
            [("a", "train/loss:mean", 2.0)],
        )
        self.assertEqual(len(aggregates(self.hub)), 3)

    def test_single_rank_is_not_aggregated(self) -> None:
        self.hub.accept([ranked("r", 0, s, 1.0) for s in range(5)])
        self.assertEqual(aggregates(self.hub), [])
        # A second rank joining later completes the steps it reports.
        self.hub.accept([ranked("r", 1, 4, 3.0)])
        self.assertEqual(by_step(aggregates(self.hub)), {4: {"mean": 2.0, "min": 1.0, "max": 3.0}})

    def test_skipped_steps_are_dropped_and_pending_is_bounded(self) -> None:
        ranks = RanksService(Hub(MemoryStore(10_000)), max_pending=10)
        hub = ranks.hub
        hub.accept([ranked("r", 0, s, 1.0) for s in range(50)] + [ranked("r", 1, 0, 1.0)])
        series = ranks.series("r", "train/loss")
        assert series is not None
        self.assertEqual(len(series.pending), 10)
        hub.accept([ranked("r", 1, 49, 1.0)])
        self.assertEqual(series.pending, {})
        self.assertEqual(sorted(by_step(aggregates(hub))), [49])

    def test_rewind_withdraws_a_ranks_values(self) -> None:
        hub = self.hub
        hub.accept([ranked("r", 0, s, 100.0 + s) for s in range(5)])
        hub.accept([ranked("r", 1, s, 100.0 + s) for s in range(3)])
        self.assertEqual(sorted(by_step(aggregates(hub))), [0, 1, 2])
        # Both resume from a checkpoint at step 2; rank 0's old 3 and 4 are stale.
        before = hub.last_id
        hub.accept([ranked("r", 0, s, float(s)) for s in range(2, 5)])
        hub.accept([ranked("r", 1, s, 10.0 + s) for s in range(2, 5)])
        got = by_step(aggregates(hub, before))
        self.assertEqual(sorted(got), [2, 3, 4])
        self.assertEqual(got[3], {"mean": 8.0, "min": 3.0, "max": 13.0})

    def test_nan_aggregate(self) -> None:
        self.hub.accept([ranked("r", 0, 1, "NaN"), ranked("r", 1, 1, 1.0)])
        values = [e["value"] for e in aggregates(self.hub)]
        self.assertEqual(len(values), 3)
        self.assertTrue(all(isinstance(v, float) and math.isnan(v) for v in values))
        self.assertIn('"value":"NaN"', self.hub.store.after(0, lambda r: True)[-1].json)

    def test_long_name_is_aggregated_for_rest_only(self) -> None:
        name = "x" * 252
        self.hub.accept([ranked("r", 0, 1, 1.0, name=name), ranked("r", 1, 1, 3.0, name=name)])
        self.assertEqual(aggregates(self.hub), [])
        series = self.ranks.series("r", name)
        assert series is not None
        self.assertEqual(series.complete, (1, 2.0, 1.0, 3.0))
        ok = "y" * 251
        self.hub.accept([ranked("r", 0, 1, 1.0, name=ok), ranked("r", 1, 1, 3.0, name=ok)])
        self.assertEqual(len(aggregates(self.hub)), 3)
        self.assertEqual(aggregates(self.hub)[0]["name"], aggregate_name(ok, "mean"))

    def test_behind_alert_once_until_caught_up(self) -> None:
        hub = self.hub
        hub.accept([ranked("r", r, 0, 1.0) for r in range(4)])
        for step in range(50, 251, 50):
            hub.accept([ranked("r", r, step, 1.0) for r in range(3)])
        found = alerts(hub)
        self.assertEqual(len(found), 1)
        self.assertEqual(
            {k: found[0][k] for k in ("run", "kind", "name", "message")},
            {
                "run": "r",
                "kind": "rank_behind",
                "name": "train/loss",
                "message": "rank 3 is 150 steps behind on train/loss",
            },
        )
        hub.accept([ranked("r", 0, 300, 1.0), ranked("r", 3, 100, 1.0)])
        self.assertEqual(len(alerts(hub)), 1)  # still behind: no second alert
        snap = self.ranks.snapshot("r")
        self.assertEqual(
            snap["behind"],
            [{"rank": 3, "name": "train/loss", "step": 100, "lead_step": 300, "behind_by": 200}],
        )
        hub.accept([ranked("r", 3, 200, 1.0)])  # exactly lag_steps behind: caught up
        self.assertEqual(self.ranks.snapshot("r")["behind"], [])
        hub.accept([ranked("r", 0, 301, 1.0)])
        found = alerts(hub)
        self.assertEqual(len(found), 2)
        self.assertEqual(found[1]["message"], "rank 3 is 101 steps behind on train/loss")
        self.assertEqual(self.ranks.behind_alerts_total, 2)

    def test_leader_rewind_clears_behind(self) -> None:
        hub = self.hub
        hub.accept([ranked("r", 0, 500, 1.0), ranked("r", 1, 100, 1.0)])
        self.assertEqual(len(self.ranks.snapshot("r")["behind"]), 1)  # type: ignore[arg-type]
        hub.accept([ranked("r", 0, 150, 1.0)])  # the leader resumed from a checkpoint
        self.assertEqual(self.ranks.snapshot("r")["behind"], [])
        self.assertEqual(len(alerts(hub)), 1)

    def test_replays_a_memory_history_without_publishing(self) -> None:
        hub = self.hub
        hub.accept([ranked("r", 0, 1, 1.0), ranked("r", 1, 1, 3.0), ranked("r", 1, 400, 3.0)])
        count = hub.last_id
        again = RanksService(hub)
        again.load()  # as startService does, once the store is open
        self.assertEqual(hub.last_id, count)
        self.assertEqual(again.snapshot("r"), self.ranks.snapshot("r"))
        again.forget("r")
        self.assertEqual(again.snapshot("r")["metrics"], {})

    def test_interleaved_ranks_are_not_a_rewind(self) -> None:
        """Ranks a few steps apart must not look like a checkpoint rewind."""
        self.hub.accept([ranked("r", 0, 10, 1.0), ranked("r", 1, 9, 1.0)])
        statuses = [r.event for r in self.hub.store.after(0, lambda r: r.type == "status")]
        self.assertEqual(statuses, [])


class SplitRanksPathTests(SynchronousTestCase):
    def test_split(self) -> None:
        self.assertEqual(split_ranks_path([b"r", b"ranks"]), "r")
        self.assertEqual(split_ranks_path([b"a", b"b", b"ranks"]), "a/b")
        self.assertEqual(split_ranks_path([b"a%2Fb", b"ranks"]), "a/b")
        self.assertIsNone(split_ranks_path([b"ranks"]))  # the run named "ranks"
        self.assertIsNone(split_ranks_path([b"a%2Franks"]))
        self.assertIsNone(split_ranks_path([b"r", b"metrics", b"ranks"]))  # metric "ranks"
        self.assertIsNone(split_ranks_path([b"r", b"metrics", b"a", b"ranks"]))
        self.assertIsNone(split_ranks_path([b"r"]))


def ranks_of(server: StreamServer) -> RanksService:
    """The server's RanksService; added here until ``service.py`` makes one."""
    ranks = getattr(server, "ranks", None)
    if ranks is None:
        ranks = RanksService(server.hub)
        vars(server)["ranks"] = ranks
    assert isinstance(ranks, RanksService)
    return ranks


class RestRanksTests(ServerTestCase):
    def test_get_ranks(self) -> Deferred[None]:
        async def go() -> None:
            ranks_of(self.server)
            hub = self.server.hub
            hub.accept([ranked("dist/run", r, 0, float(r)) for r in range(3)])
            for step in range(50, 201, 50):
                hub.accept([ranked("dist/run", r, step, float(r)) for r in range(2)])
            for path in ("/api/runs/dist/run/ranks", "/api/runs/dist%2Frun/ranks"):
                code, body = await self.get_json(path)
                self.assertEqual(code, 200, body)
                self.assertEqual(body["run"], "dist/run")
                self.assertEqual(body["ranks"], [0, 1, 2])
                self.assertEqual(
                    body["metrics"]["train/loss"],
                    {
                        # Step 0 completed once ranks 0 and 1 had sent it, before
                        # rank 2 was known; steps 50.. wait for rank 2.
                        "step": 0,
                        "mean": 0.5,
                        "min": 0.0,
                        "max": 1.0,
                        "by_rank": {"0": [200, 0.0], "1": [200, 1.0], "2": [0, 2.0]},
                    },
                )
                self.assertEqual(
                    body["behind"],
                    [
                        {
                            "rank": 2,
                            "name": "train/loss",
                            "step": 0,
                            "lead_step": 200,
                            "behind_by": 200,
                        }
                    ],
                )
            # The aggregates are metric histories of the run like any other.
            code, body = await self.get_json("/api/runs/dist/run/metrics/train/loss:mean")
            self.assertEqual((code, body["points"][0][:2]), (200, [0, 0.5]))
            code, body = await self.get_json("/api/runs/nope/ranks")
            self.assertEqual(code, 404)
            self.assertIn("nope", body["error"])
            # A run without ranks: empty, not an error.
            hub.accept([{"type": "log", "run": "plain", "level": "info", "message": "hi"}])
            code, body = await self.get_json("/api/runs/plain/ranks")
            self.assertEqual(
                (code, body), (200, {"run": "plain", "ranks": [], "metrics": {}, "behind": []})
            )

        return d(go())


class AggregateOverflowTests(SynchronousTestCase):
    def test_mean_of_the_largest_floats(self) -> None:
        """
        A sum past the largest float falls back to a scaled sum that fits,
        for any count (found by hypothesis: three of the largest float).
        """
        top = sys.float_info.max
        for values in ([top] * 3, [top] * 5, [top] * 100, [top, top, -top], [top / 3] * 7):
            mean, low, high = aggregate(values)
            self.assertTrue(low <= mean <= high, (values[:3], mean))
            self.assertTrue(math.isfinite(mean))
        self.assertEqual(aggregate([top] * 5)[0], top)
