"""
Tests for :mod:`trainstream.events`: validation, normalization, the codec,
the one JSON decoder of REST bodies and WebSocket messages.
"""

from __future__ import annotations

import copy
import enum
import json
import math
import string
from fractions import Fraction
from typing import NoReturn

import attrs
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from trainstream.events import (
    EVENT_TYPES,
    LEVELS,
    NAME_PATTERN,
    NON_FINITE,
    STATES,
    BodyTooLarge,
    EventError,
    Limits,
    UnsupportedMediaType,
    codec,
    decode_body,
    decode_json,
    encode_event,
    encode_json,
    validate_event,
    validate_events,
)
from trainstream.events.validate import METRIC_SIZE_OVERHEAD

PROPERTY = settings(max_examples=200, deadline=None)

NOW = 1764412345.5
INT_MAX = 2**63 - 1
INT_MIN = -(2**63)
NON_FINITE_STRINGS = ("NaN", "Infinity", "-Infinity")


def fixed_now() -> float:
    return NOW


def refuse_constant(name: str) -> NoReturn:
    raise AssertionError(f"{name} literal in JSON text")


def strict_loads(text: str) -> object:
    """
    Parse JSON text, failing on the NaN/Infinity literals strict JSON lacks.
    """
    return json.loads(text, parse_constant=refuse_constant)


# --- strategies -------------------------------------------------------------

NAME_CHARS = string.ascii_letters + string.digits + "._:/-"
FIRST_NAME_CHARS = NAME_CHARS.replace("/", "")
BAD_NAME_CHARS = st.characters().filter(lambda c: c not in NAME_CHARS)


def valid_names(max_size: int) -> st.SearchStrategy[str]:
    return st.builds(
        lambda first, rest: first + rest,
        st.sampled_from(FIRST_NAME_CHARS),
        st.text(NAME_CHARS, max_size=max_size - 1),
    )


runs = valid_names(128)
metric_names = valid_names(256)
texts = st.text(st.characters(codec="utf-8"), max_size=50)
naturals = st.integers(0, INT_MAX)
int64s = st.integers(INT_MIN, INT_MAX)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
times = st.one_of(
    st.integers(0, INT_MAX),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
)
metric_values = st.one_of(int64s, finite_floats, st.sampled_from(NON_FINITE_STRINGS))
scalars = st.one_of(st.none(), st.booleans(), int64s, finite_floats, texts)
param_dicts = st.dictionaries(texts.filter(bool), scalars, max_size=6)

REQUIRED: dict[str, tuple[str, ...]] = {
    "metric": ("name", "step", "value"),
    "status": ("state",),
    "log": ("level", "message"),
    "hparams": ("params",),
    "alert": ("kind", "message"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "metric": ("rank",),
    "status": ("epoch", "message"),
    "log": (),
    "hparams": (),
    "alert": ("name",),
}
ALL_FIELDS = frozenset(
    {"type", "run", "time", "id", "rewind_to"}
    | {f for fields in REQUIRED.values() for f in fields}
    | {f for fields in OPTIONAL.values() for f in fields}
)


def event_strategy(
    event_type: str,
    required: dict[str, st.SearchStrategy[object]],
    optional: dict[str, st.SearchStrategy[object]],
) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {"type": st.just(event_type), "run": runs, **required},
        optional={"time": times, **optional},
    )


EVENTS_BY_TYPE: dict[str, st.SearchStrategy[dict[str, object]]] = {
    "metric": event_strategy(
        "metric",
        {"name": metric_names, "step": naturals, "value": metric_values},
        {"rank": naturals},
    ),
    "status": event_strategy(
        "status",
        {"state": st.sampled_from(sorted(STATES))},
        {"epoch": int64s, "message": texts},
    ),
    "log": event_strategy("log", {"level": st.sampled_from(sorted(LEVELS)), "message": texts}, {}),
    "hparams": event_strategy("hparams", {"params": param_dicts}, {}),
    "alert": event_strategy(
        "alert",
        {"kind": texts.filter(bool), "message": texts},
        {"name": metric_names},
    ),
}
valid_events = st.one_of(*EVENTS_BY_TYPE.values())

# Values of the wrong kind, per field.
lists = st.lists(st.integers(), max_size=2)
dicts = st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
not_strings = st.one_of(st.integers(), st.floats(), st.booleans(), lists, dicts)
# A float with no fraction in range is that integer (``3.0`` is 3).
not_naturals = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=INT_MAX + 1),
    st.integers(-(10**6), 10**6).map(lambda n: n + 0.5),
    st.floats().filter(lambda f: not (f.is_integer() and 0 <= f <= INT_MAX)),
    st.booleans(),
    st.text(max_size=5),
    lists,
    dicts,
)
not_int64s = st.one_of(
    st.integers(max_value=INT_MIN - 1),
    st.integers(min_value=INT_MAX + 1),
    st.integers(-(10**6), 10**6).map(lambda n: n + 0.5),
    st.floats().filter(lambda f: not (f.is_integer() and INT_MIN <= f <= INT_MAX)),
    st.booleans(),
    st.text(max_size=5),
    lists,
    dicts,
)


def not_in(choices: frozenset[str]) -> st.SearchStrategy[object]:
    return st.one_of(not_strings, st.text(max_size=10).filter(lambda s: s not in choices))


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
bad_param_values = st.one_of(
    lists,
    dicts,
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(min_value=INT_MAX + 1),
    st.integers(max_value=INT_MIN - 1),
    surrogates,
)
WRONG_VALUES: dict[str, st.SearchStrategy[object]] = {
    "type": not_in(EVENT_TYPES),
    "run": not_strings,
    "name": not_strings,
    "message": not_strings,
    "kind": not_strings,
    "state": not_in(STATES),
    "level": not_in(LEVELS),
    "step": not_naturals,
    "rank": not_naturals,
    "epoch": not_int64s,
    "value": st.one_of(
        st.booleans(),
        lists,
        dicts,
        st.text(max_size=10).filter(lambda s: s not in NON_FINITE_STRINGS),
        st.integers(min_value=INT_MAX + 1),
        st.integers(max_value=INT_MIN - 1),
    ),
    "time": st.one_of(
        st.text(max_size=5),
        st.booleans(),
        lists,
        dicts,
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(max_value=-1e-300),
        st.integers(max_value=-1),
        st.integers(min_value=INT_MAX + 1),
    ),
    "params": st.one_of(
        lists,
        st.text(max_size=5),
        st.integers(),
        st.booleans(),
        st.dictionaries(st.just(""), scalars, min_size=1),
        st.dictionaries(texts.filter(bool), bad_param_values, min_size=1),
    ),
}


def bad_names(max_length: int) -> st.SearchStrategy[tuple[str, str]]:
    """
    Invalid names, each with a fragment the error message must contain.
    """
    half = max_length // 2
    return st.one_of(
        st.just(("", "must not be empty")),
        st.text(NAME_CHARS, min_size=max_length + 1, max_size=max_length + 20).map(
            lambda s: (s, f"at most {max_length} characters")
        ),
        valid_names(max_length - 1).map(lambda s: ("/" + s, 'start with "/"')),
        st.builds(
            lambda prefix, bad, suffix: (prefix + bad + suffix, "contains"),
            st.text(FIRST_NAME_CHARS, max_size=1).flatmap(
                lambda first: st.text(NAME_CHARS, max_size=half - 1).map(
                    lambda rest: first + rest if first else ""
                )
            ),
            BAD_NAME_CHARS,
            st.text(NAME_CHARS, max_size=half - 1),
        ),
    )


@attrs.frozen
class Mutation:
    """
    One thing wrong with an otherwise valid event.
    """

    item: dict[str, object]
    field: str
    fragment: str
    limits: Limits = attrs.field(factory=Limits)


KIND_TYPES: dict[str, tuple[str, ...]] = {
    "wrong_value": tuple(REQUIRED),
    "unknown": tuple(REQUIRED),
    "server": tuple(REQUIRED),
    "missing": tuple(REQUIRED),
    "bad_run": tuple(REQUIRED),
    "oversize": tuple(REQUIRED),
    "non_finite_time": tuple(REQUIRED),
    "bad_name": ("metric", "alert"),
    "bad_step": ("metric",),
    "surrogate": ("status", "log", "hparams", "alert"),
}


def mutate(data: st.DataObject, item: dict[str, object], kind: str | None = None) -> Mutation:
    """
    Break ``item`` in exactly one way, of ``kind`` or one chosen by ``data``.
    """
    draw = data.draw
    event_type = str(item["type"])
    item = dict(item)
    if kind is None:
        kind = draw(st.sampled_from([k for k, t in KIND_TYPES.items() if event_type in t]))
    assert event_type in KIND_TYPES[kind], (kind, event_type)

    if kind == "wrong_value":
        fields = ["type", "run", "time", *REQUIRED[event_type], *OPTIONAL[event_type]]
        field = draw(st.sampled_from(fields))
        required = field in ("type", "run", *REQUIRED[event_type])
        wrong = WRONG_VALUES[field]
        item[field] = draw(st.one_of(wrong, st.none()) if required else wrong)
        return Mutation(item, field, "")
    if kind == "unknown":
        allowed = {"type", "run", "time", *REQUIRED[event_type], *OPTIONAL[event_type]}
        others = sorted(ALL_FIELDS - allowed - {"id", "rewind_to"})
        field = draw(
            st.one_of(
                st.sampled_from(others),
                st.text(max_size=30).filter(lambda s: s not in ALL_FIELDS),
            )
        )
        item[field] = draw(scalars)
        return Mutation(item, field, "unknown")
    if kind == "server":
        field = "rewind_to" if event_type == "status" and draw(st.booleans()) else "id"
        item[field] = draw(naturals)
        return Mutation(item, field, "by the server")
    if kind == "missing":
        field = draw(st.sampled_from(["type", "run", *REQUIRED[event_type]]))
        del item[field]
        return Mutation(item, field, "missing")
    if kind in ("bad_run", "bad_name"):
        field = "run" if kind == "bad_run" else "name"
        name, fragment = draw(bad_names(128 if field == "run" else 256))
        item[field] = name
        return Mutation(item, field, fragment)
    if kind == "bad_step":
        step, fragment = draw(
            st.one_of(
                st.integers(max_value=-1).map(lambda n: (n, ">= 0")),
                st.integers(0, 10**6).map(lambda n: (n + 0.5, "integer")),
                st.booleans().map(lambda b: (b, "integer")),
            )
        )
        item["step"] = step
        return Mutation(item, "step", fragment)
    if kind == "non_finite_time":
        item["time"] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return Mutation(item, "time", "finite")
    if kind == "surrogate":
        field = {"status": "message", "log": "message", "hparams": "params"}.get(
            event_type
        ) or draw(st.sampled_from(["kind", "message"]))
        bad = draw(surrogates)
        if field == "params":
            assert isinstance(item["params"], dict)
            params = dict(item["params"])
            params["x" + bad if draw(st.booleans()) else "key"] = "x" + bad
            item["params"] = params
        else:
            text = str(item.get(field, ""))
            at = draw(st.integers(0, len(text)))
            item[field] = text[:at] + bad + text[at:]
        return Mutation(item, field, "surrogate")
    # Oversize: the limit is in bytes of UTF-8, so "é" counts twice.
    if event_type == "metric":
        limits = Limits(max_event_bytes=draw(st.integers(50, 150)))
        item["name"] = "a" * 256
        field = "name"
    else:
        limits = Limits(max_event_bytes=draw(st.integers(400, 2000)))
        big = "é" * limits.max_event_bytes
        if event_type == "hparams":
            field = "params"
            assert isinstance(item["params"], dict)
            item["params"] = {**item["params"], "big": big}
        else:
            field = "kind" if event_type == "alert" and draw(st.booleans()) else "message"
            item[field] = big
    return Mutation(item, field, f"over the limit of {limits.max_event_bytes} bytes", limits)


def passes(item: object, limits: Limits) -> bool:
    try:
        validate_event(item, limits=limits)
    except EventError:
        return False
    return True


# --- tests ------------------------------------------------------------------

EXAMPLES: dict[str, dict[str, object]] = {
    "metric": {
        "type": "metric",
        "run": "resnet-3",
        "time": 1764412345.123,
        "name": "train/loss",
        "step": 1200,
        "value": 0.4311,
        "rank": 2,
    },
    "status": {
        "type": "status",
        "run": "resnet-3",
        "state": "running",
        "epoch": 3,
        "message": "resumed",
    },
    "log": {"type": "log", "run": "r", "level": "warning", "message": "lr → 0 ☃"},
    "hparams": {
        "type": "hparams",
        "run": "r:1/a.b_c-d",
        "time": 12,
        "params": {"lr": 3e-4, "layers": 12, "opt": "adam", "amp": True, "seed": None},
    },
    "alert": {
        "type": "alert",
        "run": "r",
        "kind": "nan",
        "message": "loss is NaN",
        "name": "train/loss",
    },
    # The media types (tests/test_media.py tests them further).
    "histogram": {"type": "histogram", "run": "r", "name": "w", "step": 1, "buckets": [[0, 1, 2]]},
    "image": {
        "type": "image",
        "run": "r",
        "name": "i",
        "step": 0,
        "format": "png",
        "width": 1,
        "height": 1,
        "data": "iVBO",
    },
    "pr_curve": {
        "type": "pr_curve",
        "run": "r",
        "name": "p",
        "step": 0,
        "precision": [1, 0.5],
        "recall": [0, 1],
        "thresholds": [0, 1],
    },
    "layout": {"type": "layout", "run": "r", "layout": {"c": {"t": ["Multiline", ["a", "b"]]}}},
}


class ValidEventTests(SynchronousTestCase):
    """
    Valid events are accepted, normalized and encoded as strict JSON.
    """

    def test_examples_round_trip(self) -> None:
        """
        An example of every type comes back from the codec with its fields.
        """
        self.assertEqual(set(EXAMPLES), EVENT_TYPES)
        for event_type, item in EXAMPLES.items():
            out = validate_event(item, now=fixed_now)
            decoded = strict_loads(encode_event(out))
            expected = {**item, "time": float(item.get("time", NOW))}  # type: ignore[arg-type]
            self.assertEqual(decoded, expected, event_type)
            self.assertIsInstance(out["time"], float)

    @PROPERTY
    @given(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from([0.0, -0.0, 1e9, 1e9 + 0.5]), st.floats(0.0, 1e12)),
                st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers()),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def test_metric_text_is_the_encoders(self, points: list[tuple[float, float | int]]) -> None:
        """
        The direct way for metrics (which keeps the last time's text) writes
        what the encoder writes, call after call: 0.0 and -0.0 too.
        """
        for i, (t, value) in enumerate(points):
            event = {"id": i, "type": "metric", "run": "r", "time": t, "name": "n", "step": i}
            event["value"] = value
            self.assertEqual(encode_event(event), encode_json(event))

    def test_key_order(self) -> None:
        """
        ``type``, ``run`` and ``time`` come first, then the type's fields.
        """
        item = {"value": 1, "step": 2, "name": "n", "run": "r", "type": "metric"}
        out = validate_event(item, now=fixed_now)
        self.assertEqual(list(out), ["type", "run", "time", "name", "step", "value"])
        text = encode_event(out)
        self.assertEqual(
            text,
            '{"type":"metric","run":"r","time":1764412345.5,"name":"n","step":2,"value":1}',
        )

    def test_non_finite_values(self) -> None:
        """
        ``"NaN"`` and the infinities become floats, and strings again in JSON.
        """
        for sent, check in [
            ("NaN", math.isnan),
            ("Infinity", lambda v: v == math.inf),
            ("-Infinity", lambda v: v == -math.inf),
            (math.nan, math.isnan),
            (math.inf, lambda v: v == math.inf),
            (-math.inf, lambda v: v == -math.inf),
        ]:
            item = {"type": "metric", "run": "r", "name": "n", "step": 0, "value": sent}
            out = validate_event(item)
            self.assertIsInstance(out["value"], float)
            self.assertTrue(check(out["value"]), sent)
            text = encode_event(out)
            expected = sent if isinstance(sent, str) else encode_json(sent)[1:-1]
            self.assertIn(f'"value":"{expected}"', text)
            self.assertEqual(strict_loads(text)["value"], expected)  # type: ignore[index]

    def test_time_from_now(self) -> None:
        """
        A missing or null ``time`` is set from ``now()``; an int becomes a float.
        """
        item = {"type": "log", "run": "r", "level": "info", "message": "m"}
        self.assertEqual(validate_event(item, now=lambda: 7)["time"], 7.0)
        self.assertEqual(validate_event({**item, "time": None}, now=fixed_now)["time"], NOW)
        out = validate_event({**item, "time": 5}, now=fixed_now)
        self.assertEqual(out["time"], 5.0)
        self.assertIs(type(out["time"]), float)

    def test_null_optional_is_absent(self) -> None:
        """
        An optional field given as null is left out of the normalized event.
        """
        item = {
            "type": "status",
            "run": "r",
            "state": "paused",
            "epoch": None,
            "message": None,
        }
        self.assertEqual(
            validate_event(item, now=fixed_now),
            {"type": "status", "run": "r", "time": NOW, "state": "paused"},
        )

    def test_python_numbers_normalized(self) -> None:
        """
        Other real numbers from Python callers become plain ``int``/``float``.
        """

        class Step(enum.IntEnum):
            FIRST = 4

        item = {
            "type": "metric",
            "run": "r",
            "name": "n",
            "step": Step.FIRST,
            "value": Fraction(1, 4),
            "time": Fraction(3, 2),
        }
        out = validate_event(item)
        self.assertEqual((out["step"], out["value"], out["time"]), (4, 0.25, 1.5))
        self.assertIs(type(out["step"]), int)
        self.assertIs(type(out["value"]), float)
        self.assertEqual(encode_event(out).count('"step":4,'), 1)

    def test_limits_at_the_edges(self) -> None:
        """
        Names of exactly the maximum length and 64-bit extremes are accepted.
        """
        item = {
            "type": "metric",
            "run": "r" * 128,
            "name": "n" * 256,
            "step": INT_MAX,
            "value": INT_MIN,
            "rank": 0,
            "time": 0,
        }
        out = validate_event(item)
        self.assertEqual(strict_loads(encode_event(out)), {**item, "time": 0.0})

    def test_size_limit_is_inclusive(self) -> None:
        """
        An event of exactly ``max_event_bytes`` bytes is accepted.
        """
        item = {"type": "log", "run": "r", "time": 1.0, "level": "info", "message": ""}
        size = len(encode_event(validate_event(item)).encode("utf-8"))
        limits = Limits(max_event_bytes=size + 10)
        out = validate_event({**item, "message": "é" * 5}, limits=limits)
        self.assertEqual(len(encode_event(out).encode("utf-8")), size + 10)
        with self.assertRaises(EventError) as cm:
            validate_event({**item, "message": "é" * 5 + "x"}, limits=limits)
        self.assertIn(f"{size + 11} bytes", cm.exception.message)

    def test_input_not_mutated(self) -> None:
        """
        Validation returns new dicts and leaves its input as it was.
        """
        items = [copy.deepcopy(item) for item in EXAMPLES.values()]
        before = copy.deepcopy(items)
        out = validate_events(items)
        self.assertEqual(items, before)
        for item, result in zip(items, out, strict=True):
            self.assertIsNot(item, result)
        self.assertIsNot(out[3]["params"], items[3]["params"])

    def test_empty_batch(self) -> None:
        """
        An empty batch is valid and gives no events; a tuple works like a list.
        """
        self.assertEqual(validate_events([]), [])
        self.assertEqual(
            validate_events((EXAMPLES["log"],), now=fixed_now),
            [validate_event(EXAMPLES["log"], now=fixed_now)],
        )

    @PROPERTY
    @given(valid_events)
    def test_valid_events_round_trip(self, item: dict[str, object]) -> None:
        """
        Every valid event validates; its encoding is strict JSON that gives
        back every field the publisher sent, and validates to the same event.
        """
        before = copy.deepcopy(item)
        out = validate_event(item, now=fixed_now)
        self.assertEqual(item, before)
        self.assertEqual(list(out)[:3], ["type", "run", "time"])
        self.assertIsInstance(out["time"], float)
        self.assertNotIn("id", out)
        text = encode_event(out)
        decoded = strict_loads(text)
        assert isinstance(decoded, dict)
        self.assertEqual(set(decoded), set(item) | {"time"})
        for key, value in item.items():
            if key == "time":
                self.assertEqual(decoded["time"], float(value))  # type: ignore[arg-type]
            else:
                self.assertEqual(decoded[key], value, key)
        self.assertEqual(encode_event(validate_event(decoded)), text)

    @PROPERTY
    @given(EVENTS_BY_TYPE["metric"])
    def test_metric_size_bound(self, item: dict[str, object]) -> None:
        """
        The size bound that lets metric events skip encoding really holds.
        """
        out = validate_event(item)
        size = len(encode_event(out).encode("utf-8"))
        bound = len(str(item["run"])) + len(str(item["name"]))
        self.assertLessEqual(size, bound + METRIC_SIZE_OVERHEAD)

    @PROPERTY
    @given(st.lists(valid_events, max_size=5))
    def test_valid_batches(self, items: list[dict[str, object]]) -> None:
        """
        A valid batch gives one normalized event per item, in order.
        """
        out = validate_events(items, now=fixed_now)
        self.assertEqual(out, [validate_event(i, now=fixed_now) for i in items])


class InvalidEventTests(SynchronousTestCase):
    """
    Every kind of mistake is refused with an error naming the index and field.
    """

    def assert_refused(self, mutation: Mutation, index: int = 0) -> EventError:
        with self.assertRaises(EventError) as cm:
            validate_event(mutation.item, index, mutation.limits)
        error: EventError = cm.exception
        self.assertEqual(error.field, mutation.field)
        self.assertEqual(error.index, index)
        self.assertIn(json.dumps(mutation.field), error.message)
        self.assertIn(mutation.fragment, error.message)
        self.assertTrue(error.message.startswith(f"event {index}: "), error.message)
        self.assertEqual(str(error), error.message)
        return error

    def test_step_examples(self) -> None:
        """
        The protocol's own example message, and fractions and bools as steps.
        A float with no fraction is that integer (JSON Schema and JavaScript
        see no difference between ``3`` and ``3.0``).
        """
        item = dict(EXAMPLES["metric"])
        self.assertEqual(validate_event({**item, "step": 3.0})["step"], 3)
        self.assertIs(type(validate_event({**item, "step": 3.0})["step"]), int)
        for step, shown in [
            (-1, "-1"),
            (3.5, "3.5"),
            (True, "true"),
            ("3", '"3"'),
        ]:
            error = self.assert_refused(Mutation({**item, "step": step}, "step", "integer >= 0"), 3)
            self.assertEqual(
                error.message,
                f'event 3: field "step" must be an integer >= 0, got {shown}',
            )
            self.assertEqual(error.to_json(), {"error": error.message, "index": 3})

    def test_run_examples(self) -> None:
        """
        Each broken run name gets its own explanation.
        """
        item = dict(EXAMPLES["log"])
        for run, fragment in [
            ("", "must not be empty"),
            ("r" * 129, "at most 128 characters, got 129"),
            ("/abs", 'must not start with "/"'),
            ("a b", 'contains " " at position 1'),
            ("a\nb", 'contains "\\n" at position 1'),
            ("é", 'contains "\\u00e9" at position 0'),
            (7, "must be a string, got 7"),
            (None, "must be a string, got null"),
        ]:
            self.assert_refused(Mutation({**item, "run": run}, "run", fragment))

    def test_unknown_fields_named(self) -> None:
        """
        Every unknown field is named, and the allowed ones are listed.
        """
        item = {**EXAMPLES["log"], "colour": 1, "size": 2}
        error = self.assert_refused(Mutation(item, "colour", "unknown"))
        self.assertIn('"size"', error.message)
        self.assertIn("level, message, run, time, type", error.message)

    def test_non_string_key(self) -> None:
        """
        A Python caller's non-string key is named, though it has no field name.
        """
        with self.assertRaises(EventError) as cm:
            item: dict[object, object] = {k: v for k, v in EXAMPLES["log"].items()}
            item[5] = "x"
            validate_event(item)
        self.assertIsNone(cm.exception.field)
        self.assertIn("field 5 is unknown", cm.exception.message)

    def test_not_an_object(self) -> None:
        """
        An item that is not an object is refused with its index.
        """
        for item, shown in [([], "an array"), ("x", '"x"'), (None, "null"), (1, "1")]:
            with self.assertRaises(EventError) as cm:
                validate_events([EXAMPLES["log"], item])
            self.assertEqual(cm.exception.index, 1)
            self.assertEqual(cm.exception.message, f"event 1: must be a JSON object, got {shown}")

    def test_batch_not_a_list(self) -> None:
        """
        A batch must be an array; the error has no index.
        """
        with self.assertRaises(EventError) as cm:
            validate_events(EXAMPLES["log"])
        self.assertIsNone(cm.exception.index)
        self.assertEqual(cm.exception.to_json(), {"error": cm.exception.message})
        self.assertIn("must be a JSON array, got an object", cm.exception.message)

    def test_oversize_counts_bytes(self) -> None:
        """
        The event limit counts UTF-8 bytes, not characters, and is a 400 error.
        """
        limits = Limits(max_event_bytes=200)
        item = {**EXAMPLES["log"], "message": "☃" * 60}  # 60 chars, 180 bytes
        error = self.assert_refused(
            Mutation(item, "message", "over the limit of 200 bytes", limits)
        )
        self.assertNotIsInstance(error, BodyTooLarge)
        self.assertIn("(182 bytes)", error.message)

    def check_mutations(self, data: st.DataObject, kind: str) -> None:
        """
        Break a valid event of a type ``kind`` applies to, and check the error.
        """
        event_type = data.draw(st.sampled_from(KIND_TYPES[kind]))
        item = data.draw(EVENTS_BY_TYPE[event_type])
        self.assert_refused(mutate(data, item, kind), data.draw(st.integers(0, 10**6)))

    @PROPERTY
    @given(st.data())
    def test_wrong_value_refused(self, data: st.DataObject) -> None:
        """
        A field of the wrong kind, out of range, or null when required.
        """
        self.check_mutations(data, "wrong_value")

    @PROPERTY
    @given(st.data())
    def test_unknown_field_refused(self, data: st.DataObject) -> None:
        """
        A field the type does not have, including other types' fields.
        """
        self.check_mutations(data, "unknown")

    @PROPERTY
    @given(st.data())
    def test_server_field_refused(self, data: st.DataObject) -> None:
        """
        ``id`` (any type) and ``rewind_to`` (status) belong to the server.
        """
        self.check_mutations(data, "server")

    @PROPERTY
    @given(st.data())
    def test_missing_field_refused(self, data: st.DataObject) -> None:
        """
        Each required field, when missing.
        """
        self.check_mutations(data, "missing")

    @PROPERTY
    @given(st.data())
    def test_bad_run_refused(self, data: st.DataObject) -> None:
        """
        Empty, too long, a bad character, or a leading ``/`` in ``run``.
        """
        self.check_mutations(data, "bad_run")

    @PROPERTY
    @given(st.data())
    def test_bad_name_refused(self, data: st.DataObject) -> None:
        """
        The same mistakes in a metric's or alert's ``name``.
        """
        self.check_mutations(data, "bad_name")

    @PROPERTY
    @given(st.data())
    def test_bad_step_refused(self, data: st.DataObject) -> None:
        """
        Negative, float and bool steps.
        """
        self.check_mutations(data, "bad_step")

    @PROPERTY
    @given(st.data())
    def test_non_finite_time_refused(self, data: st.DataObject) -> None:
        """
        A float NaN or infinity as ``time``.
        """
        self.check_mutations(data, "non_finite_time")

    @PROPERTY
    @given(st.data())
    def test_lone_surrogate_refused(self, data: st.DataObject) -> None:
        """
        Text that UTF-8 cannot encode, in messages, kinds and params.
        """
        self.check_mutations(data, "surrogate")

    @PROPERTY
    @given(st.data())
    def test_oversize_refused(self, data: st.DataObject) -> None:
        """
        An event over ``max_event_bytes``, naming its largest field.
        """
        self.check_mutations(data, "oversize")

    def test_time_examples(self) -> None:
        """
        ``time`` must be a finite number >= 0 and not a bool.
        """
        item = dict(EXAMPLES["log"])
        for time, fragment in [
            (-1, "must be >= 0, got -1"),
            (-0.5, "must be >= 0, got -0.5"),
            (math.nan, "must be a finite number, got NaN"),
            (-math.inf, "must be a finite number, got -Infinity"),
            (True, "must be a number of Unix seconds, got true"),
            ("1", 'must be a number of Unix seconds, got "1"'),
            (2**63, "must fit in 64 bits"),
        ]:
            self.assert_refused(Mutation({**item, "time": time}, "time", fragment))

    def test_params_examples(self) -> None:
        """
        ``params`` values must be finite JSON scalars, under non-empty keys.
        """
        item = dict(EXAMPLES["hparams"])
        for params, fragment in [
            ({"lr": math.nan}, 'value of "lr" must be a finite number, got NaN'),
            ({"lr": -math.inf}, 'value of "lr" must be a finite number, got -Infinity'),
            ({"n": 2**64}, 'value of "n" must fit in 64 bits'),
            ({"a": [1]}, 'value of "a" must be a string, number, boolean or null, got an array'),
            ({"a": {"b": 1}}, "got an object"),
            ({"": 1}, 'keys must be non-empty strings, got ""'),
            ({"\ud800": 1}, 'key "\\ud800" contains a lone surrogate'),
            ([["lr", 1]], "must be an object, got an array"),
        ]:
            self.assert_refused(Mutation({**item, "params": params}, "params", fragment))

    def test_value_examples(self) -> None:
        """
        ``value`` is a number or one of three exact strings; never a bool.
        """
        item = dict(EXAMPLES["metric"])
        for value, shown in [
            ("nan", '"nan"'),
            ("inf", '"inf"'),
            (True, "true"),
            ([1.0], "an array"),
        ]:
            error = self.assert_refused(Mutation({**item, "value": value}, "value", ""))
            self.assertTrue(error.message.endswith(f"got {shown}"), error.message)
        self.assert_refused(
            Mutation({**item, "value": None}, "value", "is required and must not be null")
        )

    @PROPERTY
    @given(
        st.data(),
        valid_events,
        st.lists(valid_events, max_size=4),
        st.lists(valid_events, max_size=4),
    )
    def test_batch_reports_first_bad_index(
        self,
        data: st.DataObject,
        item: dict[str, object],
        before: list[dict[str, object]],
        after: list[dict[str, object]],
    ) -> None:
        """
        In a batch, the first bad item's index is reported, nothing is
        returned and no item is changed.
        """
        mutation = mutate(data, item)
        before = [i for i in before if passes(i, mutation.limits)]
        later_mistake: bool = data.draw(st.booleans())
        if after and later_mistake:
            after[0] = mutate(data, after[0]).item  # a later mistake too
        batch = [*before, mutation.item, *after]
        snapshot = copy.deepcopy(batch)
        with self.assertRaises(EventError) as cm:
            validate_events(batch, mutation.limits)
        self.assertEqual(cm.exception.index, len(before))
        self.assertEqual(cm.exception.field, mutation.field)
        self.assertTrue(cm.exception.message.startswith(f"event {len(before)}: "))
        self.assertEqual(batch, snapshot)

    @PROPERTY
    @given(
        st.recursive(
            st.one_of(scalars, st.floats(), st.characters()),
            lambda children: st.one_of(
                st.lists(children, max_size=3),
                st.dictionaries(
                    st.one_of(st.sampled_from(sorted(ALL_FIELDS)), st.text(max_size=4)),
                    children,
                    max_size=4,
                ),
            ),
            max_leaves=12,
        )
    )
    def test_any_input_gives_event_or_event_error(self, item: object) -> None:
        """
        Arbitrary input never raises anything but :class:`EventError`, and
        the error's JSON answer is always encodable as UTF-8.
        """
        try:
            out = validate_event(item)
        except EventError as e:
            self.assertTrue(e.message.startswith("event 0: "))
            encode_json(e.to_json()).encode("utf-8")
        else:
            self.assertIn(out["type"], EVENT_TYPES)
            strict_loads(encode_event(out))


class DecodeBodyTests(SynchronousTestCase):
    """
    Request bodies: size, content type, UTF-8, strict JSON, an array.
    """

    def assert_body_refused(
        self, body: bytes, fragment: str, content_type: str | None = "application/json"
    ) -> EventError:
        with self.assertRaises(EventError) as cm:
            decode_body(body, content_type)
        self.assertIn(fragment, cm.exception.message)
        self.assertIsNone(cm.exception.index)
        self.assertNotIsInstance(cm.exception, BodyTooLarge)
        error: EventError = cm.exception
        return error

    def test_array_decoded(self) -> None:
        """
        A JSON array is returned as a list, whatever its items are.
        """
        body = json.dumps([EXAMPLES["metric"], 1]).encode()
        self.assertEqual(decode_body(body, "application/json"), [EXAMPLES["metric"], 1])

    def test_content_types_accepted(self) -> None:
        """
        JSON media types, with parameters and in any case.
        """
        for content_type in [
            "application/json",
            "Application/JSON; charset=UTF-8",
            'application/json;charset="utf-8"',
            "application/vnd.trainstream+json",
            "application/x.events+json; version=1",
        ]:
            self.assertEqual(decode_body(b"[1]", content_type), [1], content_type)

    def test_content_types_refused(self) -> None:
        """
        Other media types, and other charsets, are refused by name.
        """
        for content_type in [
            "",
            "text/plain",
            "text/x.events+json",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            "application/jsonp",
            "application/+json",
            "*/*",
            "*/x+json",
            "json",
        ]:
            self.assert_body_refused(
                b"[1]", f"Content-Type {json.dumps(content_type)} is not JSON", content_type
            )
        self.assert_body_refused(
            b"[1]", 'charset "latin-1" is not supported', "application/json; charset=latin-1"
        )

    def test_missing_content_type_refused(self) -> None:
        """
        No Content-Type is refused (415): a page of another site may send
        a body without one and no preflight.
        """
        with self.assertRaises(UnsupportedMediaType) as cm:
            decode_body(b"[1]", None)
        self.assertIn("Content-Type is missing", cm.exception.message)

    def test_invalid_utf8(self) -> None:
        """
        Bytes that are not UTF-8 (including encoded surrogates) are refused.
        """
        self.assert_body_refused(b'["ok", "\xff"]', "not valid UTF-8: invalid start byte at byte 8")
        self.assert_body_refused(b'["\xed\xa0\x80"]', "not valid UTF-8")
        self.assert_body_refused(b'["\xc3"]', "not valid UTF-8")

    def test_invalid_json(self) -> None:
        """
        Syntax errors name the problem and where it is.
        """
        self.assert_body_refused(
            b'[{"type": ]', "not valid JSON: Expecting value at line 1 column 11"
        )
        self.assert_body_refused(b"[1]\n[2]", "Extra data at line 2 column 1")
        self.assert_body_refused(b"['x']", "not valid JSON")
        self.assert_body_refused(b'["a\x01"]', "Invalid control character")

    def test_non_finite_literals(self) -> None:
        """
        NaN and the infinities are not JSON numbers: the error says what to send.
        """
        for literal in NON_FINITE_STRINGS:
            body = b'[{"value": ' + literal.encode() + b"}]"
            self.assert_body_refused(
                body, f'{literal} is not a JSON number; send the string "{literal}"'
            )

    def test_top_level_not_array(self) -> None:
        """
        A single object is refused with a hint; other values are refused too.
        """
        error = self.assert_body_refused(
            json.dumps(EXAMPLES["log"]).encode(), "must be a JSON array of events"
        )
        self.assertIn("got an object; wrap a single event in [...]", error.message)
        for body, shown in [(b"1", "1"), (b'"x"', '"x"'), (b"null", "null"), (b"true", "true")]:
            error = self.assert_body_refused(body, f"array of events, got {shown}")
            self.assertNotIn("wrap", error.message)

    def test_empty_body(self) -> None:
        """
        An empty or blank body is refused as empty.
        """
        self.assert_body_refused(b"", "body is empty")
        self.assert_body_refused(b" \r\n", "body is empty")

    def test_other_refusals(self) -> None:
        """
        Byte order marks, duplicate keys, deep nesting and huge numbers.
        """
        self.assert_body_refused(b"\xef\xbb\xbf[]", "byte order mark")
        self.assert_body_refused(b'[{"run": "a", "run": "b"}]', 'duplicate key "run"')
        self.assert_body_refused(b"[" * 100_000, "nested too deeply")
        self.assert_body_refused(b"[" + b"9" * 5000 + b"]", "too many digits")

    def test_body_too_large(self) -> None:
        """
        A body over the limit is a :class:`BodyTooLarge` naming size and limit,
        checked before anything else; a body at the limit is fine.
        """
        limits = Limits(max_body_bytes=10)
        self.assertEqual(decode_body(b"[1,2,3,45]", "application/json", limits), [1, 2, 3, 45])
        with self.assertRaises(BodyTooLarge) as cm:
            decode_body(b"\xff" * 11, "text/plain", limits)
        self.assertIsInstance(cm.exception, EventError)
        self.assertEqual(
            cm.exception.message,
            "request body is 11 bytes, over the limit of 10 bytes; send fewer events per request",
        )
        self.assertEqual(cm.exception.to_json(), {"error": cm.exception.message})

    def test_default_limits(self) -> None:
        """
        The protocol's defaults: 64 KiB per event, 8 MiB per body.
        """
        self.assertEqual(Limits(), Limits(65536, 8 * 1024 * 1024))
        self.assertRaises(ValueError, Limits, max_event_bytes=0)
        self.assertRaises(ValueError, Limits, max_body_bytes=-1)
        with self.assertRaises(BodyTooLarge):
            decode_body(b" " * (8 * 1024 * 1024 + 1), None)

    @PROPERTY
    @given(st.lists(valid_events, max_size=5))
    def test_encoded_batches_decode(self, items: list[dict[str, object]]) -> None:
        """
        A batch encoded by :func:`encode_json` decodes to the same batch.
        """
        body = encode_json(items).encode("utf-8")
        self.assertEqual(decode_body(body, "application/json"), items)

    @PROPERTY
    @given(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)))
    def test_any_bytes_give_list_or_event_error(self, body: bytes) -> None:
        """
        Arbitrary bytes never raise anything but :class:`EventError`.
        """
        try:
            result = decode_body(body, "application/json")
        except EventError as e:
            self.assertTrue(e.message.startswith("body "), e.message)
        else:
            self.assertIsInstance(result, list)


JSON_VALUES = st.recursive(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(),
        st.text(max_size=5),
        st.booleans(),
        st.none(),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
    ),
    max_leaves=12,
)


class DecodeJsonTests(SynchronousTestCase):
    """
    The one decoder: it sees every key, so duplicates are refused however
    they are spaced or nested; otherwise it is plain (C) ``json``.
    """

    def refused(self, text: bytes, subject: str = "body") -> EventError:
        with self.assertRaises(EventError) as cm:
            decode_json(text, subject)
        error: EventError = cm.exception
        self.assertEqual(error.message, f"{subject} {error.detail}")
        return error

    def test_duplicates_however_spaced(self) -> None:
        for text in (
            b'{"run":"a","run":"b"}',
            b'{"run":"a","run" :"b"}',
            b'{"run":"a","run"\n:"b"}',
            b'{"run":"a",\t"run"\r\n :  "b"}',
            b'[{"value":1,"step":2,"value" :3}]',
            b'{"a":{"b":[{"c":1,"c":2}]}}',
            b'{"\\u0072un":"a","run":"b"}',
        ):
            error = self.refused(text)
            self.assertIn("is not valid JSON: duplicate key", error.detail, text)

    def test_same_detail_whatever_the_subject(self) -> None:
        for text in (b'{"a":1,"a":2}', b"[NaN]", b"[1,]", b"\xff", b"\xef\xbb\xbf[]", b" "):
            body, message = self.refused(text, "body"), self.refused(text, "message")
            self.assertEqual(body.detail, message.detail, text)
            self.assertEqual(message.message, "message " + message.detail)

    def test_a_colon_in_a_string_is_no_key(self) -> None:
        text = b'[{"message":"a\\": \\":","x" : {"y": "\\":"}}]'
        self.assertEqual(decode_json(text), json.loads(text))

    @PROPERTY
    @given(JSON_VALUES, st.sampled_from(["", " ", "\n", "\t "]))
    def test_same_as_plain_json_without_duplicates(self, value: object, space: str) -> None:
        """On JSON with no duplicate key, the result is the C decoder's, spacing aside."""
        text = json.dumps(value, separators=("," + space, space + ":" + space))
        self.assertEqual(decode_json(text.encode()), json.loads(text))

    @PROPERTY
    @given(
        st.dictionaries(st.text(max_size=4), JSON_VALUES, min_size=1, max_size=3),
        st.data(),
    )
    def test_any_duplicate_refused(self, obj: dict[str, object], data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(obj)))
        inner = json.dumps(obj)[1:-1]
        text = "[{" + inner + ", " + json.dumps(key) + " : 1}]"
        error = self.refused(text.encode())
        self.assertIn(f"duplicate key {json.dumps(key[:40])}"[:30], error.message)


class MetricDecodeTests(SynchronousTestCase):
    """
    Text that begins with a metric event takes the C decoder with no hook
    and a count of colons against pairs; duplicates are refused all the same.
    """

    METRIC = '{"type":"metric","run":"r","time":1.5,"name":"loss","step":1,"value":0.5}'

    def test_a_metric_batch_is_read_without_the_hooked_decoder(self) -> None:
        class Refusing:
            def decode(self, text: str) -> NoReturn:
                raise AssertionError("the hooked decoder was used")

        self.patch(codec, "_decoder", Refusing())
        batch = f"[{self.METRIC},{self.METRIC}]"
        self.assertEqual(decode_json(batch.encode()), json.loads(batch))
        message = f'{{"op":"publish","ref":7,"events":[{self.METRIC}]}}'
        self.assertEqual(decode_json(message.encode()), json.loads(message))

    def test_duplicates_in_metric_batches_are_refused(self) -> None:
        m = self.METRIC
        for text in (
            f'[{m},{{"type":"metric","run":"a","run":"b"}}]',  # in an event
            f'[{m[:-1]},"value":1}}]',  # the last key again
            f'{{"op":"publish","op":"publish","events":[{m}]}}',  # in the message
            f'{{"op":"publish","events":[{m},{m[:-1]},"step":2}}]}}',
            f'[{m[:-1]},"x":{{"a":1,"a":2}}}}]',  # nested deeper
            '[{"type":"metric","run":"a:b","run":"c"}]',  # and a colon in a string
            '[{"type":"metric","\\u0072un":"a","run":"b"}]',  # an escaped key
        ):
            with self.assertRaises(EventError, msg=text) as cm:
                decode_json(text.encode())
            self.assertIn("is not valid JSON: duplicate key", cm.exception.detail, text)

    def test_a_duplicate_is_named_before_a_later_fault(self) -> None:
        for tail in (", x", ", NaN]"):
            text = '[{"type":"metric","a":1,"a":2}' + tail
            with self.assertRaises(EventError) as cm:
                decode_json(text.encode())
            self.assertIn('duplicate key "a"', cm.exception.detail, text)

    def test_colons_in_strings_and_nested_objects_decode_the_same(self) -> None:
        m = self.METRIC[:-1]
        for text in (
            f'[{m},"tag":"a:b"}}]',
            f'[{m},"x":{{"y":{{"z":1}}}}}}]',
            f'[{m}}},{{"type":"log","message":"epoch 1: done"}}]',
            f'[{m}}}, 1, "s:", [{{"a": 1}}]]',
        ):
            self.assertEqual(decode_json(text.encode()), json.loads(text), text)

    @PROPERTY
    @given(
        st.dictionaries(st.text(max_size=4), JSON_VALUES, min_size=1, max_size=3),
        st.data(),
    )
    def test_any_duplicate_after_a_metric_refused(
        self, obj: dict[str, object], data: st.DataObject
    ) -> None:
        key = data.draw(st.sampled_from(sorted(obj)))
        inner = json.dumps(obj)[1:-1]
        text = f'[{self.METRIC}, {{"type": "metric", {inner}, {json.dumps(key)}: 1}}]'
        with self.assertRaises(EventError) as cm:
            decode_json(text.encode())
        self.assertIn("duplicate key", cm.exception.message)

    @PROPERTY
    @given(st.lists(JSON_VALUES, max_size=4))
    def test_same_as_plain_json_after_a_metric(self, values: list[object]) -> None:
        text = json.dumps([json.loads(self.METRIC), *values])
        self.assertEqual(decode_json(text.encode()), json.loads(text))


class RulesDefinedOnceTests(SynchronousTestCase):
    """The alphabet, the NaN strings and the limits each have one home."""

    def test_name_pattern_is_the_validators(self) -> None:
        import re

        pattern = re.compile(NAME_PATTERN)
        for name in ("train/loss", "a:b.c-d_e", "/lead", "sp ace", "é", "ok/"):
            valid = True
            try:
                validate_event({"type": "metric", "run": name, "name": "n", "step": 0, "value": 0})
            except EventError:
                valid = False
            self.assertEqual(bool(pattern.fullmatch(name)), valid, name)

    def test_openapi_uses_them(self) -> None:
        from trainstream.web.openapi import openapi_document

        schemas = openapi_document()["components"]["schemas"]
        self.assertEqual(schemas["RunName"]["pattern"], f"^{NAME_PATTERN}$")
        text = json.dumps(schemas)
        for name in NON_FINITE:
            self.assertIn(json.dumps(name), text)


class EncodeTests(SynchronousTestCase):
    """
    The codec writes compact, strict JSON with non-finite floats as strings.
    """

    def test_non_finite_anywhere(self) -> None:
        """
        NaN and infinities in nested lists, tuples and dicts become strings.
        """
        obj = {"a": [1.5, math.nan, (math.inf,)], "b": {"c": -math.inf}, "d": "é"}
        text = encode_json(obj)
        self.assertEqual(text, '{"a":[1.5,"NaN",["Infinity"]],"b":{"c":"-Infinity"},"d":"é"}')
        self.assertEqual(encode_json(math.nan), '"NaN"')

    def test_circular_refused(self) -> None:
        """
        A circular structure is a ``ValueError``, not endless recursion.
        """
        loop: list[object] = [math.nan]
        loop.append(loop)
        self.assertRaises(ValueError, encode_json, loop)

    def test_not_json(self) -> None:
        """
        Objects JSON cannot represent are a ``TypeError``.
        """
        self.assertRaises(TypeError, encode_json, {"a": object()})

    @PROPERTY
    @given(
        st.recursive(
            st.one_of(st.floats(), st.integers(), st.text(max_size=5), st.none()),
            lambda children: st.one_of(
                st.lists(children, max_size=3),
                st.dictionaries(st.text(max_size=4), children, max_size=3),
            ),
            max_leaves=10,
        )
    )
    def test_always_strict_json(self, obj: object) -> None:
        """
        Any JSON-able object encodes to strict, compact JSON, with non-finite
        floats replaced by their strings and everything else kept.
        """

        def expected(value: object) -> object:
            if isinstance(value, float) and not math.isfinite(value):
                return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            if isinstance(value, list):
                return [expected(v) for v in value]
            if isinstance(value, dict):
                return {k: expected(v) for k, v in value.items()}
            return value

        text = encode_json(obj)
        self.assertEqual(strict_loads(text), expected(obj))
        compact = json.dumps(expected(obj), ensure_ascii=False, separators=(",", ":"))
        self.assertEqual(text, compact)


class EventErrorTests(SynchronousTestCase):
    """
    :class:`EventError` carries what the HTTP answer needs.
    """

    def test_attributes_and_json(self) -> None:
        """
        Message, index and field are kept; JSON omits a missing index.
        """
        error = EventError("event 2: bad", 2, "step")
        self.assertIsInstance(error, ValueError)
        self.assertEqual((error.message, error.index, error.field), ("event 2: bad", 2, "step"))
        self.assertEqual(error.to_json(), {"error": "event 2: bad", "index": 2})
        self.assertEqual(EventError("body").to_json(), {"error": "body"})
        self.assertEqual(str(BodyTooLarge("big")), "big")
        self.assertTrue(issubclass(BodyTooLarge, EventError))


class FastMetricEncodingTests(SynchronousTestCase):
    """The direct metric writer gives exactly the encoder's text."""

    @settings(max_examples=300, deadline=None)
    @given(
        run=st.text(min_size=1, max_size=20),
        name=st.text(min_size=1, max_size=20),
        step=st.integers(0, 2**63 - 1),
        value=st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats()),
        time_=st.floats(min_value=0, allow_infinity=False, allow_nan=False),
    )
    def test_same_text_as_the_encoder(
        self, run: str, name: str, step: int, value: float, time_: float
    ) -> None:
        from trainstream.events import encode_event, encode_json

        event = {
            "id": 7,
            "type": "metric",
            "run": run,
            "time": time_,
            "name": name,
            "step": step,
            "value": value,
        }
        self.assertEqual(encode_event(event), encode_json(event))
        self.assertEqual(json.loads(encode_event(event))["run"], run)
