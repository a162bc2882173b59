"""
The media events (``histogram``, ``image``, ``pr_curve``, ``layout``):
their rules (each refusal names the field), the builders of
``trainstream.integrations._media`` against torch's own TensorBoard code
(the same bins, the same pixels, the same curve), and the server: stored in
memory and in SQLite (and known again after a restart), filtered by type and
name over SSE and ``GET /api/events``, listed in ``GET /api/runs/{run}``.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import treq
from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import ANY_PORTS, connect_sse
from trainstream.events import EventError, Limits, encode_event, validate_event, validate_events
from trainstream.events.rules import MAX_MEDIA_BYTES
from trainstream.server import StreamServer

ROOT = Path(__file__).resolve().parent.parent


def need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        print(f"SKIPPED: {module} is not importable ({e})", file=sys.stderr)
        raise SkipTest(f"{module} is not importable ({e})") from e


def hist(**extra: Any) -> dict[str, Any]:
    return {
        "type": "histogram",
        "run": "r",
        "name": "w",
        "step": 1,
        "buckets": [[0, 1, 2]],
        **extra,
    }


def img(**extra: Any) -> dict[str, Any]:
    event = {"type": "image", "run": "r", "name": "i", "step": 0, "format": "png"}
    return {**event, "width": 2, "height": 3, "data": "iVBORw==", **extra}


def curve(**extra: Any) -> dict[str, Any]:
    event = {"type": "pr_curve", "run": "r", "name": "p", "step": 0}
    return {**event, "precision": [1, 0.5], "recall": [0, 1], "thresholds": [0, 1], **extra}


def layout(value: Any) -> dict[str, Any]:
    return {"type": "layout", "run": "r", "layout": value}


class RuleTests(SynchronousTestCase):
    """What a media event may be; a refusal names the event, the field and the problem."""

    def refused(self, event: dict[str, Any], field: str, words: str) -> None:
        with self.assertRaises(EventError) as caught:
            validate_event(event, 4)
        error = caught.exception
        self.assertEqual((error.index, error.field), (4, field), error.message)
        self.assertIn(words, error.message)
        self.assertTrue(error.message.startswith(f'event 4: field "{field}"'), error.message)

    def test_valid_are_normalized(self) -> None:
        out = validate_event(hist(min=0, max=1, num=2, sum=1, sum_squares=0.5), now=lambda: 5.0)
        self.assertEqual(list(out), ["type", "run", "time", "name", "step", "buckets", "min",
                                     "max", "num", "sum", "sum_squares"])  # fmt: skip
        self.assertEqual(out["buckets"], [[0.0, 1.0, 2.0]])
        self.assertEqual(validate_event(img(width=2.0))["width"], 2)
        self.assertEqual(validate_event(curve())["recall"], [0.0, 1.0])
        chart = {"c": {"t": ["Margin", ["v", "lo", "hi"]]}}
        self.assertEqual(validate_event(layout(chart))["layout"], chart)
        # null optional stats count as absent
        self.assertNotIn("min", validate_event(hist(min=None)))

    def test_histogram_refusals(self) -> None:
        self.refused(hist(buckets=[]), "buckets", "1..4096")
        self.refused(hist(buckets=[[0, 1]]), "buckets", "item 0 must be [left, right, count]")
        self.refused(hist(buckets=[[0, 1, -1]]), "buckets", "count >= 0")
        self.refused(hist(buckets=[[0, "1", 1]]), "buckets", "item 0: must be a finite number")
        self.refused(hist(buckets=[[0, 1, True]]), "buckets", "finite number")
        self.refused(hist(buckets=[[0, 2**64, 1]]), "buckets", "64 bits")
        self.refused(hist(buckets=[[0, 1, 1]] * 4097), "buckets", "1..4096")
        self.refused(hist(sum=float("inf")), "sum", "finite")
        self.refused(hist(step=-1), "step", ">= 0")
        self.refused(hist(name="a b"), "name", "use only letters")
        self.refused({**hist(), "value": 1}, "value", "unknown")

    def test_image_refusals(self) -> None:
        self.refused(img(format="gif"), "format", '"jpeg", "png"')
        self.refused(img(width=0), "width", "1..16384")
        self.refused(img(height=16385), "height", "1..16384")
        self.refused(img(width=True), "width", "integer")
        self.refused(img(data="iVBOR"), "data", "base64")
        self.refused(img(data="iV*O"), "data", "base64")
        self.refused(img(data=5), "data", "base64")
        event = img(data="A" * MAX_MEDIA_BYTES)
        with self.assertRaisesRegex(EventError, f"limit of {MAX_MEDIA_BYTES} bytes for media"):
            validate_event(event)
        # the media limit is its own: a metric's 64 KiB does not apply, and it can be set
        validate_event(img(data="A" * 100_000))
        with self.assertRaisesRegex(EventError, "limit of 50000 bytes for media"):
            validate_event(img(data="A" * 100_000), limits=Limits(max_media_bytes=50_000))

    def test_curve_and_layout_refusals(self) -> None:
        self.refused(curve(recall=[]), "recall", "1..4096")
        self.refused(curve(thresholds=[0, "x"]), "thresholds", "item 1: must be a finite number")
        self.refused(layout({}), "layout", "must be {category")
        self.refused(layout({"c": {}}), "layout", 'category "c"')
        self.refused(layout({"c": {"t": ["Bars", ["a"]]}}), "layout", '"Margin" or "Multiline"')
        self.refused(layout({"c": {"t": ["Multiline", []]}}), "layout", "1..256 tags")
        self.refused(layout({"c": {"t": ["Multiline", [""]]}}), "layout", "non-empty string")
        self.refused(layout({"c": {"t": "Multiline"}}), "layout", "[kind, [tag, ...]]")

    def test_metric_fast_path_unchanged(self) -> None:
        """A batch mixing media and metrics: each as validate_event makes it, in order."""
        metric = {"type": "metric", "run": "r", "name": "w", "step": 1, "value": 0.5, "time": 1.0}
        validate_events([metric])  # "r" and "w" seen valid: the fast path takes the next
        batch = [metric, hist(time=2.0), dict(metric, step=2)]
        self.assertEqual(validate_events(batch), [validate_event(e) for e in batch])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.floats(allow_nan=False, allow_infinity=False),
                st.floats(allow_nan=False, allow_infinity=False),
                st.floats(min_value=0, allow_infinity=False),
            ),
            min_size=1,
            max_size=20,
        )
    )
    def test_histograms_round_trip(self, buckets: list[tuple[float, float, float]]) -> None:
        """Any finite buckets with counts >= 0 are taken and come back from JSON as they were."""
        out = validate_event(hist(buckets=[list(b) for b in buckets]), now=lambda: 1.0)
        self.assertEqual(json.loads(encode_event(out))["buckets"], [list(b) for b in buckets])


class BuilderTests(SynchronousTestCase):
    """``_media`` makes what torch's TensorBoard writer makes."""

    def setUp(self) -> None:
        self.np = need("numpy")
        from trainstream.integrations import _media

        self.media = _media

    def test_histogram_like_torch(self) -> None:
        """The 'tensorflow' bins: the non-empty buckets are torch's, with its statistics."""
        need("torch.utils.tensorboard")
        from torch.utils.tensorboard.summary import make_histogram
        from torch.utils.tensorboard.writer import SummaryWriter as TorchWriter

        values = self.np.random.default_rng(1).normal(0, 0.05, 1000)
        bins = TorchWriter.__new__(TorchWriter)
        edges: list[float] = []
        v = 1e-12
        while v < 1e20:
            edges.append(v)
            v *= 1.1
        del bins
        proto = make_histogram(values, [-e for e in reversed(edges)] + [0] + edges)
        theirs = self.media.raw_buckets(proto.min, proto.max, proto.bucket_limit, proto.bucket)
        ours, stats = self.media.histogram_buckets(values)
        nonempty = [b for b in ours if b[2] > 0]
        self.assertEqual(nonempty, [b for b in theirs if b[2] > 0][: len(nonempty)])
        self.assertEqual(sum(b[2] for b in ours), 1000)
        self.assertEqual(stats["num"], proto.num)
        self.assertAlmostEqual(stats["sum_squares"], proto.sum_squares)
        self.assertEqual((stats["min"], stats["max"]), (proto.min, proto.max))
        # numpy's own bins: a count, a rule
        buckets, _ = self.media.histogram_buckets(self.np.arange(100), bins=10)
        self.assertEqual([b[2] for b in buckets], [10.0] * 10)
        self.assertEqual(len(self.media.histogram_buckets(values, bins="auto")[0]) > 3, True)
        few, _ = self.media.histogram_buckets(values, max_bins=7)
        self.assertLessEqual(len(few), 7)
        self.assertEqual(sum(b[2] for b in few), 1000)

    def test_images_like_torch(self) -> None:
        """CHW, HWC, HW, NCHW and NHWC give the pixels torch's writer encodes."""
        need("torch.utils.tensorboard")
        from torch.utils.tensorboard._utils import convert_to_HWC

        rng = self.np.random.default_rng(2)
        cases = [
            (rng.random((3, 5, 7)), "CHW"),
            (rng.random((1, 5, 7)), "CHW"),
            ((rng.random((5, 7, 3)) * 255).astype(self.np.uint8), "HWC"),
            (rng.random((5, 7)), "HW"),
            (rng.random((10, 3, 4, 6)), "NCHW"),
            (rng.random((3, 4, 6, 1)), "NHWC"),
        ]
        for array, form in cases:
            scale = 1 if array.dtype == self.np.uint8 else 255
            expected = (convert_to_HWC(array, form).astype(self.np.float32) * scale).clip(0, 255)
            ours = self.media.image_array(array, form)
            self.assertEqual(ours.dtype, self.np.uint8)
            self.assertTrue((ours == expected.astype(self.np.uint8)).all(), form)
        with self.assertRaisesRegex(ValueError, r"shape \(5, 7\) does not match dataformats 'CHW'"):
            self.media.image_array(rng.random((5, 7)), "CHW")

    def test_png_without_pillow_is_the_same_image(self) -> None:
        pil = need("PIL.Image")
        pixels = (self.np.random.default_rng(3).random((9, 13, 3)) * 255).astype(self.np.uint8)
        for array in (pixels, self.np.dstack([pixels, pixels[:, :, :1]])):
            decoded = pil.open(io.BytesIO(self.media._png_zlib(array)))
            self.assertEqual(decoded.size, (13, 9))
            self.assertTrue((self.np.asarray(decoded) == array).all())

    def test_large_image_is_scaled_to_fit(self) -> None:
        noise = (self.np.random.default_rng(4).random((800, 600, 3)) * 255).astype(self.np.uint8)
        png, width, height, scaled = self.media.fit_png(noise)
        self.assertTrue(scaled)
        self.assertEqual((width, height), (150, 200))
        event = self.media.image_event("r", "big", 0, png, width, height)
        self.assertLessEqual(len(encode_event(event)), MAX_MEDIA_BYTES)
        small = self.np.zeros((10, 10, 3), dtype=self.np.uint8)
        self.assertEqual(self.media.fit_png(small)[1:], (10, 10, False))

    def test_pr_curve_like_torch(self) -> None:
        need("torch.utils.tensorboard")
        from torch.utils.tensorboard.summary import compute_curve

        rng = self.np.random.default_rng(5)
        labels = rng.integers(0, 2, 200)
        scores = rng.random(200)
        precision, recall, thresholds = self.media.pr_curve(labels, scores, 50)
        theirs = compute_curve(labels, scores, num_thresholds=50)
        self.assertTrue(self.np.allclose(precision, theirs[4]))
        self.assertTrue(self.np.allclose(recall, theirs[5]))
        self.assertEqual(len(thresholds), 50)
        self.assertEqual((thresholds[0], thresholds[-1]), (0.0, 1.0))

    def test_figure_like_torch(self) -> None:
        """A matplotlib figure renders to torch's pixels; closed when asked, kept when not."""
        need("torch.utils.tensorboard")
        need("matplotlib")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torch.utils.tensorboard._utils import figure_to_image

        def figure() -> Any:
            fig = plt.figure(figsize=(2, 1.5), dpi=50)
            fig.gca().plot([0, 1, 2], [2, 0, 1])
            return fig

        ours = self.media.figure_array(figure(), close=True)
        theirs = figure_to_image(figure(), close=True)  # CHW
        self.assertEqual(ours.shape, (75, 100, 3))
        self.assertTrue((ours == theirs.transpose(1, 2, 0)).all())
        self.assertEqual(plt.get_fignums(), [])
        kept = figure()
        self.media.figure_array(kept, close=False)
        self.assertEqual(plt.get_fignums(), [kept.number])
        plt.close(kept)

    def test_module_imports_no_numpy(self) -> None:
        """Importing the writer loads neither numpy, torch, matplotlib nor Pillow."""
        code = (
            "import sys, trainstream.integrations.tensorboard\n"
            "print(sorted(m for m in ('numpy', 'torch', 'matplotlib', 'PIL') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        self.assertEqual(out.stdout.strip(), "[]")


class ServerTests(TestCase):
    """Media events in a server: stored, filtered, listed; SQLite knows them after a restart."""

    timeout = 60

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def start(self, **config: Any) -> Deferred[None]:
        self.server = StreamServer({**ANY_PORTS, **config}, reactor)
        self.addCleanup(self.server.stop)
        started: Deferred[None] = self.server.start()
        return started

    @property
    def api(self) -> str:
        return str(self.server.urls["rest"])

    async def post(self, events: list[dict[str, Any]]) -> None:
        response = await treq.post(
            self.api + "/events",
            json.dumps(events).encode(),
            headers={"content-type": "application/json"},
            pool=self.pool,
        )
        self.assertEqual(response.code, 200, await response.text())

    async def get(self, path: str) -> Any:
        response = await treq.get(self.api + path, pool=self.pool)
        self.assertEqual(response.code, 200, await response.text())
        return json.loads(await response.text())

    def batch(self) -> list[dict[str, Any]]:
        png = base64.b64encode(b"\x89PNG fake bytes").decode()
        return [
            {"type": "metric", "run": "m/1", "name": "loss", "step": 0, "value": 1.0},
            hist(run="m/1", name="w", step=0),
            hist(run="m/1", name="b", step=0),
            img(run="m/1", name="grid", step=0, data=png),
            img(run="m/1", name="grid", step=1, data=png),
            img(run="m/1", name="other", step=0, data=png),
            curve(run="m/1", name="cat", step=3),
            layout({"c": {"t": ["Multiline", ["loss"]]}}) | {"run": "m/1"},
        ]

    async def check(self) -> None:
        detail = await self.get("/runs/m%2F1")
        self.assertEqual(sorted(detail["images"]), ["grid", "other"])
        self.assertEqual(sorted(detail["histograms"]), ["b", "w"])
        grid = detail["images"]["grid"]
        self.assertEqual((grid["count"], grid["last_step"]), (2, 1))
        self.assertEqual([s for s, _ in grid["steps"]], [0, 1])
        self.assertEqual(detail["pr_curves"]["cat"]["last_step"], 3)
        self.assertEqual(detail["layout"], {"c": {"t": ["Multiline", ["loss"]]}})
        # one image by its id, as the dashboard fetches it
        _, second = grid["steps"][1]
        page = await self.get(f"/events?after={second - 1}&limit=1&run=m/1&type=image")
        self.assertEqual([(e["id"], e["name"], e["step"]) for e in page["events"]],
                         [(second, "grid", 1)])  # fmt: skip
        page = await self.get("/events?type=histogram")
        self.assertEqual(sorted(e["name"] for e in page["events"]), ["b", "w"])
        page = await self.get("/events?type=image&name=grid")
        self.assertEqual([e["step"] for e in page["events"]], [0, 1])

    def test_memory(self) -> Deferred[None]:
        async def go() -> None:
            await self.start(memory=True)
            sse = await connect_sse(self.server.urls["sse"] + "?type=image&name=grid")
            self.addCleanup(lambda: sse.transport.loseConnection())
            await self.post(self.batch())
            await sse.wait_for(2)
            self.assertEqual([(e["type"], e["step"]) for e in sse.events],
                             [("image", 0), ("image", 1)])  # fmt: skip
            await self.check()

        return Deferred.fromCoroutine(go())

    def test_sqlite_and_restart(self) -> Deferred[None]:
        """Stored in SQLite; a new server on the file lists the media again."""
        db = os.path.abspath(self.mktemp())

        async def go() -> None:
            await self.start(db=db, memory=False)
            self.assertEqual(type(self.server.hub.store).__name__, "SQLiteStore")
            await self.post(self.batch())
            await self.check()
            await self.server.stop()
            await self.start(db=db, memory=False)
            await self.check()

        return Deferred.fromCoroutine(go())
