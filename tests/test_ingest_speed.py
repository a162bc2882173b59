"""
The shortcuts of the ingest path keep every rule of the slow path: the
batch validator's fast path for plain metrics gives what ``validate_event``
gives (the same dict, the same error), records made positionally equal
those made by keyword, and the recent-events cache counts the same bytes.
"""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from trainstream.events import EventError, Limits, validate_event, validate_events
from trainstream.events.rules import MAX_NAME_LENGTH, MAX_RUN_LENGTH
from trainstream.hub import make_record
from trainstream.store.cache import RECORD_OVERHEAD, RecentEvents
from trainstream.store.filter import Filter
from trainstream.store.records import Record

PROPERTY = settings(max_examples=300, deadline=None)


class Name(str):
    """A str subclass: validation returns a plain str for it."""


names = st.one_of(
    st.sampled_from(["loss", "m0", "train/acc", "a" * MAX_NAME_LENGTH, "a" * (MAX_RUN_LENGTH + 1)]),
    st.text(alphabet="ab/._:-", min_size=0, max_size=4),
    st.builds(Name, st.sampled_from(["loss", "run-1"])),
    st.integers(0, 3),
    st.none(),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**64), 2**64),
    st.booleans(),
    st.sampled_from(["NaN", "Infinity", "x", None]),
)
metric_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["metric", "metric", "status", Name("metric")]),
        "run": names,
        "name": names,
        "step": numbers,
        "value": numbers,
        "time": numbers,
    },
    optional={"rank": numbers, "extra": st.just(1)},
)


def outcome(call: object) -> object:
    """What a validation call gives: its result, or its error's message and fields."""
    assert callable(call)
    try:
        return ("ok", call())
    except EventError as e:
        return ("error", str(e), e.index, e.field, e.detail)


def same(a: object, b: object) -> bool:
    """Equal, counting NaN equal to NaN and types as part of the value."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


class FastPathTests(SynchronousTestCase):
    @PROPERTY
    @given(st.lists(metric_like, min_size=1, max_size=4), st.booleans())
    def test_batch_validation_is_per_event_validation(
        self, items: list[dict[str, object]], seen: bool
    ) -> None:
        """
        ``validate_events`` gives what ``validate_event`` gives for each
        event, in order, or the first one's error, word for word; names seen
        before (the fast path's case) or not.
        """
        if seen:  # a first pass makes the valid names known
            for item in items:
                outcome(lambda item=item: validate_event(item))
        expected: object = []
        for index, item in enumerate(items):
            one = outcome(lambda item=item, index=index: validate_event(item, index))
            if one[0] == "error":
                expected = one
                break
            assert isinstance(expected, list)
            expected.append(one[1])
        got = outcome(lambda: validate_events(items))
        want = expected if isinstance(expected, tuple) else ("ok", expected)
        self.assertTrue(same(got, want), f"{got!r} != {want!r}")

    def test_fast_path_result(self) -> None:
        """A plain metric comes back as validate_event makes it: a new dict, same order."""
        item = {"value": 0.5, "time": 3.0, "step": 7, "name": "m0", "run": "r", "type": "metric"}
        validate_event(item)  # its names are now known
        (event,) = validate_events([item])
        self.assertEqual(list(event), ["type", "run", "time", "name", "step", "value"])
        self.assertEqual(event, validate_event(item))
        self.assertIsNot(event, item)

    def test_size_limit_still_applies(self) -> None:
        """A limit small enough that run + name might not fit is checked as before."""
        item = {"type": "metric", "run": "r" * 100, "name": "n" * 100, "step": 1, "value": 0.5}
        item["time"] = 1.0
        validate_event(item)
        limits = Limits(max_event_bytes=250)
        self.assertEqual(
            outcome(lambda: validate_events([item], limits)),
            outcome(lambda: validate_event(item, 0, limits)),
        )

    def test_bad_values_are_refused_with_the_slow_path_words(self) -> None:
        validate_event({"type": "metric", "run": "r", "name": "m", "step": 1, "value": 1.0})
        for field, bad in (("time", math.inf), ("time", -1.0), ("step", -1), ("step", True)):
            item: dict[str, object] = {
                "type": "metric",
                "run": "r",
                "name": "m",
                "step": 1,
                "value": 0.5,
                "time": 1.0,
            }
            item[field] = bad
            got = outcome(lambda item=item: validate_events([{"type": "log"}, item][1:]))
            self.assertEqual(got[0], "error", (field, bad))
            self.assertEqual(got, outcome(lambda item=item: validate_event(item)))


class RecordTests(SynchronousTestCase):
    def test_make_record(self) -> None:
        """A record as the Hub makes it: the id first in the event, its JSON once."""
        event = {"type": "metric", "run": "r", "time": 1.5, "name": "m", "step": 2, "value": 0.25}
        record = make_record(9, event, 3)
        text = '{"id":9,"type":"metric","run":"r","time":1.5,"name":"m","step":2,"value":0.25}'
        self.assertEqual(
            record,
            Record(
                id=9,
                type="metric",
                run="r",
                name="m",
                event={"id": 9, **event},
                json=text,
                size=len(text),
                segment=3,
            ),
        )
        self.assertEqual(record.event, {"id": 9, **event})
        self.assertEqual(record.size, len(text))
        status = make_record(10, {"type": "status", "run": "r", "time": 1.0, "state": "running"})
        self.assertIsNone(status.name)
        self.assertEqual(status.segment, 0)

    def test_cache_counts_bytes_and_slims(self) -> None:
        event = {"type": "metric", "run": "r", "time": 1.5, "name": "m", "step": 2, "value": 0.25}
        records = [make_record(i, {**event, "step": i}) for i in range(1, 6)]
        cache = RecentEvents(max_bytes=10**6)
        self.assertFalse(cache.extend(records))
        self.assertEqual(cache.bytes, sum(r.size + RECORD_OVERHEAD for r in records))
        self.assertEqual([r.id for r in cache], [1, 2, 3, 4, 5])
        self.assertEqual(list(cache), records)
        held = cache.get(3)
        assert held is not None
        self.assertIsNone(held._event)
        self.assertEqual(held.event, records[2].event)
        small = RecentEvents(max_bytes=2 * (records[0].size + RECORD_OVERHEAD))
        self.assertTrue(small.extend(records))
        self.assertEqual([r.id for r in small], [4, 5])


globs = st.lists(st.sampled_from(["", "*", "run-*", "r?", "m[01]", "train/*", "r"]), max_size=3)
kinds = st.lists(st.sampled_from(["", "*", "metric", "status", "log", "alert"]), max_size=3)
records = st.lists(
    st.builds(
        lambda i, kind, run, name: Record(i, kind, run, name, None, "{}"),
        st.integers(1, 10**6),
        st.sampled_from(["metric", "status", "log", "alert", "hparams"]),
        st.sampled_from(["r", "r1", "run-2", "x"]),
        st.sampled_from([None, "m0", "m1", "train/loss", "val"]),
    ),
    max_size=8,
)


class FilterSelectTests(SynchronousTestCase):
    @PROPERTY
    @given(globs, globs, kinds, records)
    def test_select_is_matches(
        self, runs: list[str], names: list[str], types: list[str], batch: list[Record]
    ) -> None:
        """What the Hub hands a filter's subscribers is what ``matches`` lets through."""
        flt = Filter(tuple(runs), tuple(names), tuple(types))
        self.assertEqual(flt.select(batch), [r for r in batch if flt.matches(r)])
        self.assertEqual(flt.select(iter(batch)), [r for r in batch if flt.matches(r)])
