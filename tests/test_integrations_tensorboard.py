"""
``trainstream.integrations.tensorboard.SummaryWriter`` against a real server:
TensorBoard's calls from a training thread arrive as trainstream events; its
methods and signatures are torch's (and tensorboardX's where they overlap);
run names are what TensorBoard shows; the PyTorch tutorial runs with only its
import changed, from torch's writer and from tensorboardX's.
"""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.util
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from decimal import Decimal
from fractions import Fraction
from inspect import Parameter
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS
from trainstream.events import EventError
from trainstream.integrations.tensorboard import SummaryWriter, _default_run, sanitize
from trainstream.server import StreamServer

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["add_scalar", "add_scalars", "add_text", "add_hparams", "flush", "close"]
#: What a parameter we add after torch's may be.
KEYWORDS = (Parameter.KEYWORD_ONLY, Parameter.VAR_KEYWORD)


def public_methods(cls: type) -> dict[str, list[str]]:
    """Each public method's parameter names (``self`` left out)."""
    return {
        name: [p for p in inspect.signature(fn).parameters if p != "self"]
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def need(module: str) -> Any:
    """``module`` imported, or SkipTest saying it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        print(f"SKIPPED: {module} is not importable ({e})", file=sys.stderr)
        raise SkipTest(f"{module} is not importable ({e})") from e


def torch_signatures() -> dict[str, list[tuple[str, Any, Any]]]:
    """
    ``(name, kind, default)`` of each parameter of torch's SummaryWriter
    methods: imported, or read from torch's source with ``ast`` when its
    ``tensorboard`` dependency is missing; SkipTest without torch.
    """
    names = ["__init__", *METHODS, "__enter__", "__exit__"]
    try:
        from torch.utils.tensorboard import SummaryWriter as TorchWriter
    except ImportError as e:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            reason = f"torch is not importable ({e}); signatures not compared"
            print(f"SKIPPED: {reason}", file=sys.stderr)
            raise SkipTest(reason) from e
        source = Path(spec.submodule_search_locations[0]) / "utils/tensorboard/writer.py"
        return source_signatures(source.read_text(encoding="utf-8"), "SummaryWriter", names)
    return {name: parameters(getattr(TorchWriter, name)) for name in names}


def parameters(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def source_signatures(
    source: str, class_name: str, names: list[str]
) -> dict[str, list[tuple[str, Any, Any]]]:
    """The same as ``parameters`` for methods of a class, from its source."""
    [cls] = [
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name
    ]
    out = {}
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in names:
            a = fn.args
            plain = a.posonlyargs + a.args
            defaults = [Parameter.empty] * (len(plain) - len(a.defaults)) + [
                ast.literal_eval(d) for d in a.defaults
            ]
            params = [
                (arg.arg, Parameter.POSITIONAL_OR_KEYWORD, default)
                for arg, default in zip(plain, defaults, strict=True)
            ]
            params += [
                (
                    arg.arg,
                    Parameter.KEYWORD_ONLY,
                    Parameter.empty if d is None else ast.literal_eval(d),
                )
                for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
            ]
            if a.kwarg is not None:
                params.append((a.kwarg.arg, Parameter.VAR_KEYWORD, Parameter.empty))
            out[fn.name] = params
    return out


class WriterTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    def writer(self, run: str) -> SummaryWriter:
        writer = SummaryWriter(url=self.server.urls["rest"], run=run)
        self.addCleanup(lambda: deferToThread(writer.close))
        return writer

    def events(self, run: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            r.event
            for r in self.server.hub.store.after(0, lambda r: r.run == run)
            if kind is None or r.type == kind
        ]

    def metrics(self, run: str, name: str) -> list[tuple[int, float]]:
        return [(e["step"], e["value"]) for e in self.events(run, "metric") if e["name"] == name]

    def test_scalars_text_hparams(self) -> Deferred[None]:
        """Every call from a training thread arrives with its name, step and value."""

        def train() -> None:
            with self.writer("tb") as w:
                for step in range(5):
                    w.add_scalar("train/loss", 1.0 / (step + 1), step)
                    w.add_scalar("lr", Fraction(1, 10), global_step=step, walltime=1000.0 + step)
                w.add_scalar("Loss (val)", Decimal("0.25"), 4)  # float()-able, sanitized
                w.add_scalars("run_14h", {"xsinx": 1.0, "xcosx": 2.0}, 7)
                w.add_text("notes", "hello world", 3)
                w.add_text("notes", "no step")
                w.add_hparams({"lr": 0.1, "bsize": 32, "opt": "adam", "amp": True}, {"hp/acc": 0.9})
                w.flush()

        async def go() -> None:
            await deferToThread(train)
            self.assertEqual(
                self.metrics("tb", "train/loss"), [(s, 1.0 / (s + 1)) for s in range(5)]
            )
            self.assertEqual(self.metrics("tb", "lr"), [(s, 0.1) for s in range(5)])
            times = [e["time"] for e in self.events("tb", "metric") if e["name"] == "lr"]
            self.assertEqual(times, [1000.0 + s for s in range(5)])
            self.assertEqual(self.metrics("tb", "Loss__val_"), [(4, 0.25)])
            # add_scalars: one sub-run per tag, each with the main tag as metric
            self.assertEqual(self.metrics("tb/run_14h_xsinx", "run_14h"), [(7, 1.0)])
            self.assertEqual(self.metrics("tb/run_14h_xcosx", "run_14h"), [(7, 2.0)])
            texts = [e["message"] for e in self.events("tb", "log")]
            self.assertEqual(texts, ["notes (step 3): hello world", "notes: no step"])
            [hparams] = self.events("tb", "hparams")
            self.assertEqual(
                hparams["params"], {"lr": 0.1, "bsize": 32, "opt": "adam", "amp": True}
            )
            self.assertEqual(self.metrics("tb", "hp/acc"), [(0, 0.9)])
            for run in ("tb", "tb/run_14h_xsinx", "tb/run_14h_xcosx"):
                states = [e["state"] for e in self.events(run, "status")]
                self.assertEqual(states, ["created", "running", "finished"], run)

        return Deferred.fromCoroutine(go())

    def test_step_none_counts_per_tag(self) -> Deferred[None]:
        """Without global_step each tag counts 0, 1, 2...; an explicit step resets it."""

        def train() -> None:
            w = self.writer("auto")
            for _ in range(3):
                w.add_scalar("a", 1.0)
            w.add_scalar("b", 2.0)
            w.add_scalar("a", 3.0, 10)
            w.add_scalar("a", 4.0)
            w.add_scalars("pair", {"x": 1, "y": 2})
            w.add_scalars("pair", {"x": 3})
            w.close()

        async def go() -> None:
            await deferToThread(train)
            self.assertEqual([s for s, _ in self.metrics("auto", "a")], [0, 1, 2, 10, 11])
            self.assertEqual(self.metrics("auto", "b"), [(0, 2.0)])
            self.assertEqual(self.metrics("auto/pair_x", "pair"), [(0, 1), (1, 3)])
            self.assertEqual(self.metrics("auto/pair_y", "pair"), [(0, 2)])

        return Deferred.fromCoroutine(go())

    def test_hparams_with_run_name_and_failure(self) -> Deferred[None]:
        """run_name is a sub-run; an exception leaving the block marks the runs failed."""

        def train() -> None:
            try:
                with self.writer("hp") as w:
                    w.add_hparams(
                        {"lr": Fraction(1, 4)}, {"m": 1.5}, run_name="trial 1", global_step=9
                    )
                    w.add_hparams({"lr": 0.5}, {"m": 2.5}, "trial 2", 4)  # tensorboardX's order
                    raise KeyError("boom")
            except KeyError:
                pass
            with self.assertRaises(RuntimeError):
                w.add_scalar("late", 1.0, 0)

        async def go() -> None:
            await deferToThread(train)
            [hparams] = self.events("hp/trial_1", "hparams")
            self.assertEqual(hparams["params"], {"lr": 0.25})
            self.assertEqual(self.metrics("hp/trial_1", "m"), [(9, 1.5)])
            [hparams] = self.events("hp/trial_2", "hparams")
            self.assertEqual(hparams["params"], {"lr": 0.5})
            self.assertEqual(self.metrics("hp/trial_2", "m"), [(4, 2.5)])
            for run in ("hp", "hp/trial_1", "hp/trial_2"):
                last = self.events(run, "status")[-1]
                self.assertEqual(last["state"], "failed")
                self.assertEqual(last["message"], "KeyError: 'boom'")

        return Deferred.fromCoroutine(go())

    def test_two_log_dirs_are_two_runs(self) -> Deferred[None]:
        """runs/exp1/train and runs/exp2/train: the runs exp1/train and exp2/train, no rewind."""

        def train() -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                w = SummaryWriter("runs/x", url=self.server.urls["rest"], bogus=1, write_to_disk=0)
                w.close()
            self.assertEqual([str(c.message) for c in caught], [
                "SummaryWriter: keyword(s) bogus ignored"])  # fmt: skip
            for log_dir in ("runs/exp1/train", "runs/exp2/train"):
                w = SummaryWriter(log_dir, url=self.server.urls["rest"])
                for step in range(3):
                    w.add_scalar("loss", 1.0 / (step + 1), step)
                self.assertEqual(w.get_logdir(), log_dir)
                self.assertEqual(w.file_writer.get_logdir(), log_dir)
                w.close()

        async def go() -> None:
            await deferToThread(train)
            for run in ("exp1/train", "exp2/train"):
                self.assertEqual([s for s, _ in self.metrics(run, "loss")], [0, 1, 2], run)
                states = self.events(run, "status")
                self.assertEqual([e["state"] for e in states], ["created", "running", "finished"])
                self.assertFalse(any("rewind_to" in e for e in states), run)
            self.assertEqual(self.events("train"), [])

        return Deferred.fromCoroutine(go())

    def test_media(self) -> Deferred[None]:
        """Histograms, images, PR curves and layouts arrive as media events; the run lists them."""
        np = need("numpy")
        torch = need("torch")
        need("matplotlib").use("Agg")
        plt = need("matplotlib.pyplot")
        warned: list[str] = []

        def train() -> None:
            w = self.writer("media")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                values = torch.tensor([0.5, 1.5, 1.5, 2.5, 100.0])
                w.add_histogram("w", values, 3)
                w.add_histogram("w", np.arange(10.0), bins=5)  # numpy's int bins, step counted
                w.add_histogram_raw("raw", 0, 10, 5, 20, 100, [1, 5, 10], [1, 2, 2], 7)
                w.add_image("chw", torch.ones(3, 4, 6) * 0.5, 0)
                w.add_image("hwc", np.full((4, 6, 3), 255, dtype=np.uint8), 0, dataformats="HWC")
                w.add_image("hw", np.zeros((4, 6)), 0, dataformats="HW")
                w.add_images("grid", torch.rand(10, 1, 5, 7), 2)  # 8 columns, 2 rows
                w.add_images("nhwc", np.zeros((2, 5, 7, 3)), 2, dataformats="NHWC")
                w.add_image("big", np.random.default_rng(0).random((3, 700, 700)), 0)
                w.add_pr_curve("pr", np.array([1, 0, 1, 1]), np.array([0.9, 0.1, 0.8, 0.3]), 0, 5)
                w.add_custom_scalars_multilinechart(["loss", "acc"], "main", "both")
                figures = [plt.figure(figsize=(2, 1), dpi=40) for _ in range(3)]
                w.add_figure("fig", figures[0], 0)
                w.add_figure("figs", figures[1:], 0)  # a list: one grid
                for _ in range(3):
                    w.add_graph(object())
                    w.add_video("v", None)
                w.add_audio("a", None)
                w.add_embedding(None)
                w.add_mesh("m", None)
                w.add_onnx_graph("model.onnx")
                w.file_writer.add_summary(object())
                w.flush()
            warned.extend(str(c.message) for c in caught)

        async def go() -> None:
            await deferToThread(train)
            hist = {(e["name"], e["step"]): e for e in self.events("media", "histogram")}
            self.assertEqual(sorted(hist), [("raw", 7), ("w", 3), ("w", 4)])  # 4: counted on
            w3 = hist["w", 3]
            self.assertEqual(sum(b[2] for b in w3["buckets"]), 5)
            self.assertEqual((w3["min"], w3["max"], w3["num"], w3["sum"]), (0.5, 100.0, 5, 106.0))
            self.assertEqual(w3["sum_squares"], 0.25 + 2.25 * 2 + 6.25 + 10000)
            # TensorBoard's edges around the values; runs of empty buckets merged
            self.assertLessEqual(w3["buckets"][0][0], 0.5)
            self.assertGreaterEqual(w3["buckets"][-1][1], 100.0)
            self.assertEqual(len(hist["w", 4]["buckets"]), 5)
            self.assertEqual(hist["raw", 7]["buckets"], [[0, 1, 1], [1, 5, 2], [5, 10, 2]])
            images = {e["name"]: e for e in self.events("media", "image")}
            sizes = {name: (e["width"], e["height"]) for name, e in images.items()}
            self.assertEqual(
                sizes,
                {
                    "chw": (6, 4),
                    "hwc": (6, 4),
                    "hw": (6, 4),
                    "grid": (56, 10),
                    "nhwc": (14, 5),
                    "fig": (80, 40),
                    "figs": (160, 40),
                    "big": sizes["big"],
                },
            )
            self.assertLess(sizes["big"][0], 700)  # scaled to fit the media limit
            self.assertEqual(plt.get_fignums(), [])  # close=True closed them
            from PIL import Image

            png = Image.open(io.BytesIO(base64.b64decode(images["chw"]["data"])))
            self.assertEqual((png.format, png.size), ("PNG", (6, 4)))
            self.assertEqual(png.convert("RGB").getpixel((0, 0)), (127, 127, 127))
            [curve] = self.events("media", "pr_curve")
            self.assertEqual(curve["thresholds"], [0, 0.25, 0.5, 0.75, 1])
            self.assertEqual(curve["recall"][0], 1.0)
            self.assertAlmostEqual(curve["precision"][0], 0.75)
            [layout] = self.events("media", "layout")
            self.assertEqual(layout["layout"], {"main": {"both": ["Multiline", ["loss", "acc"]]}})
            # one warning per skipped method, naming it; one for the scaled image
            for method in ("add_graph", "add_video", "add_audio", "add_embedding", "add_mesh"):
                self.assertEqual(sum(f"SummaryWriter.{method}:" in m for m in warned), 1, method)
            self.assertEqual(sum("'big'" in m for m in warned), 1, warned)
            detail = self.server.runs.get("media").detail()  # type: ignore[union-attr]
            self.assertEqual(sorted(detail["images"]), sorted(sizes))  # type: ignore[arg-type]
            self.assertEqual(
                detail["histograms"]["w"]["steps"],
                [[3, hist["w", 3]["id"]], [4, hist["w", 4]["id"]]],
            )  # type: ignore[index]
            self.assertEqual(detail["layout"], layout["layout"])

        return Deferred.fromCoroutine(go())

    def test_bad_media_raise_at_once(self) -> Deferred[None]:
        """A wrong shape or an empty histogram names the problem; nothing is sent."""
        np = need("numpy")

        def train() -> None:
            w = self.writer("badmedia")
            with self.assertRaisesRegex(ValueError, "dataformats 'CHW'"):
                w.add_image("x", np.zeros((4, 4)))
            with self.assertRaisesRegex(ValueError, "empty"):
                w.add_histogram("h", [])
            with self.assertRaisesRegex(ValueError, "NaN"):
                w.add_histogram("h", [1.0, float("nan")])
            with self.assertRaisesRegex(ValueError, "3 tags"):
                w.add_custom_scalars_marginchart(["a", "b"])
            w.flush()

        async def go() -> None:
            await deferToThread(train)
            kinds = {e["type"] for e in self.events("badmedia")}
            self.assertEqual(kinds, {"status"})

        return Deferred.fromCoroutine(go())

    def test_bad_values_raise_at_once(self) -> Deferred[None]:
        def train() -> None:
            w = self.writer("bad")
            with self.assertRaises(EventError):
                w.add_scalar("x", 1.0, -1)
            with self.assertRaises(ValueError):
                w.add_scalar("x", "not a number", 0)
            with self.assertRaises(TypeError):
                w.add_hparams([("lr", 1)], {})  # type: ignore[arg-type]

        return deferToThread(train)


class TorchCompatibilityTests(SynchronousTestCase):
    def test_signatures_match_torch(self) -> None:
        """Each method takes torch's parameters: same names, kinds, order and defaults."""
        theirs = torch_signatures()
        for name in [*METHODS, "__enter__", "__exit__"]:
            ours = parameters(getattr(SummaryWriter, name))
            # torch's parameters, then only keyword-only ones (tensorboardX's names)
            self.assertEqual(ours[: len(theirs[name])], theirs[name], name)
            extra = ours[len(theirs[name]) :]
            self.assertTrue(all(k in KEYWORDS for _, k, _ in extra), (name, extra))
        # the constructor: torch's parameters, then our keyword-only ones
        ours = parameters(SummaryWriter.__init__)
        self.assertEqual(ours[: len(theirs["__init__"])], theirs["__init__"])
        self.assertTrue(all(kind in KEYWORDS for _, kind, _ in ours[len(theirs["__init__"]) :]))

    def test_every_public_method_of_torch(self) -> None:
        """
        The same public methods as torch's writer, each with torch's parameter
        names in torch's order (ours may add keyword-only ones after them).
        """
        try:
            from torch.utils.tensorboard import SummaryWriter as TorchWriter
        except ImportError as e:
            raise SkipTest(f"torch.utils.tensorboard is not importable ({e})") from e
        theirs = public_methods(TorchWriter)
        ours = public_methods(SummaryWriter)
        self.assertEqual(sorted(set(theirs) - set(ours)), [])
        self.assertGreaterEqual(len(theirs), 25)
        for name, params in theirs.items():
            self.assertEqual(ours[name][: len(params)], params, name)
            extra = dict(inspect.signature(getattr(SummaryWriter, name)).parameters)
            for p in ours[name][len(params) :]:
                self.assertIn(extra[p].kind, KEYWORDS, (name, p))
        self.assertTrue(callable(SummaryWriter._get_file_writer))

    def test_tensorboardx_methods_where_they_overlap(self) -> None:
        """Every tensorboardX parameter of a method we share can be passed by its name."""
        try:
            from tensorboardX import SummaryWriter as XWriter
        except ImportError as e:
            raise SkipTest(f"tensorboardX is not importable ({e})") from e
        theirs = public_methods(XWriter)
        ours = public_methods(SummaryWriter)
        shared = set(theirs) & set(ours)
        self.assertGreaterEqual(len(shared), 25)
        for name in sorted(shared):
            missing = [p for p in theirs[name] if p not in ours[name] and p != "kwargs"]
            self.assertEqual(missing, [], name)
        # the constructor: tensorboardX's logdir is ours too
        self.assertIn("logdir", inspect.signature(SummaryWriter.__init__).parameters)

    def test_source_signatures_reads_like_inspect(self) -> None:
        """The ast fallback agrees with inspect on our own class."""
        source = (ROOT / "trainstream/integrations/tensorboard.py").read_text(encoding="utf-8")
        names = ["__init__", *METHODS, "__enter__", "__exit__"]
        from_source = source_signatures(source, "SummaryWriter", names)
        for name in names:
            self.assertEqual(from_source[name], parameters(getattr(SummaryWriter, name)), name)

    def test_torch_tensors_are_scalars(self) -> None:
        try:
            import torch
        except ImportError as e:
            print(f"SKIPPED: torch is not importable ({e})", file=sys.stderr)
            raise SkipTest(f"torch is not importable ({e})") from e
        from trainstream.integrations.tensorboard import _scalar

        self.assertEqual(_scalar(torch.tensor(0.5)), 0.5)
        self.assertEqual(_scalar(torch.tensor([2]).sum()), 2.0)


class NamingTests(SynchronousTestCase):
    def test_sanitize(self) -> None:
        self.assertEqual(sanitize("train/loss"), "train/loss")
        self.assertEqual(sanitize("Loss (train) é"), "Loss__train___")
        self.assertEqual(sanitize("//x"), "x")
        self.assertEqual(sanitize(""), "_")
        self.assertEqual(len(sanitize("a" * 500)), 256)
        self.assertEqual(len(sanitize("a" * 500, 128)), 128)

    def test_run_name_from_log_dir(self) -> None:
        """The run is log_dir as ``tensorboard --logdir ROOT`` shows it."""
        self.assertEqual(_default_run("runs/exp 1", ""), "exp 1")
        self.assertEqual(_default_run("/tmp/runs/exp1/", ""), "exp1")
        self.assertEqual(_default_run("runs/exp1/train", ""), "exp1/train")
        self.assertEqual(_default_run("/data/x/runs/exp2/train", ""), "exp2/train")
        self.assertEqual(_default_run("logs/fit/20240101", ""), "fit/20240101")
        self.assertEqual(_default_run("exp1", ""), "exp1")
        self.assertEqual(_default_run("/abs/exp1", ""), "exp1")
        self.assertEqual(_default_run("/data/tb/a/b", "", "/data/tb"), "a/b")
        self.assertEqual(_default_run("/elsewhere/a/b", "", "/data/tb"), "b")  # not under it
        os.environ["TRAINSTREAM_LOGDIR_ROOT"] = "/data/tb"
        self.addCleanup(os.environ.pop, "TRAINSTREAM_LOGDIR_ROOT")
        self.assertEqual(_default_run("/data/tb/c/d", ""), "c/d")
        default = _default_run(None, "_lr0.1")
        self.assertRegex(default, r"^[A-Z][a-z]{2}\d\d_\d\d-\d\d-\d\d_.+_lr0\.1$")

    def test_module_does_not_import_torch(self) -> None:
        code = "import sys, trainstream.integrations.tensorboard\nprint('torch' in sys.modules)\n"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        self.assertEqual(out.stdout.strip(), "False")


class EmbeddedTests(SynchronousTestCase):
    """Without ``url`` the writer uses the process-wide embedded server (in a child process)."""

    def test_embedded_server(self) -> None:
        code = textwrap.dedent(
            """
            import json, trainstream
            from trainstream.integrations.tensorboard import SummaryWriter
            config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True}
            w = SummaryWriter("runs/emb", server_config=config)
            for step in range(3):
                w.add_scalar("loss", step / 2, step)
            w.flush()
            store = trainstream.get_stream_server_manager().server.hub.store
            events = [r.event for r in store.after(0, lambda r: r.run == "emb")]
            url = w.dashboard_url
            w.close()
            manager = trainstream.get_stream_server_manager()
            print(json.dumps({"events": events, "url": url, "refcount": manager.refcount}))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        metrics = [(e["step"], e["value"]) for e in result["events"] if e["type"] == "metric"]
        self.assertEqual(metrics, [(0, 0.0), (1, 0.5), (2, 1.0)])
        self.assertTrue(result["url"].startswith("http://127.0.0.1:"))
        self.assertEqual(result["refcount"], 0)


TORCH_IMPORT = "from torch.utils.tensorboard import SummaryWriter"
TBX_IMPORT = "from tensorboardX import SummaryWriter"
OUR_IMPORT = "from trainstream.integrations.tensorboard import SummaryWriter"
TUTORIAL_RUN = "fashion_mnist_experiment_1"


class TutorialTests(TestCase):
    """
    ``examples/tensorboard_tutorial.py`` (the PyTorch TensorBoard tutorial:
    an image grid, the graph, the loss, weight histograms, PR curves) runs
    with torch's writer and with tensorboardX's, and then with only its
    import changed to ours: the run holds all of it; add_graph warns once.
    """

    timeout = 240

    def setUp(self) -> Deferred[None]:
        need("torch")
        self.source = (ROOT / "examples" / "tensorboard_tutorial.py").read_text(encoding="utf-8")
        self.assertEqual(self.source.count(TORCH_IMPORT), 1)
        self.server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def run_script(self, source: str) -> tuple[str, str, Path]:
        """Run ``source`` in a new directory; its stdout, stderr and the directory."""
        from twisted.internet.utils import getProcessOutputAndValue

        where = Path(self.mktemp()).resolve()
        where.mkdir(parents=True)
        (where / "tutorial.py").write_text(source, encoding="utf-8")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TRAINSTREAM_URL": self.server.urls["rest"],
            "HOME": str(where),
        }
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [str(where / "tutorial.py"), "--batches", "50"],
            env=env,
            path=str(where),
        )
        self.assertEqual(code, 0, err.decode()[-3000:])
        return out.decode(), err.decode(), where

    def check_run(self, stderr: str) -> None:
        events = [r.event for r in self.server.hub.store.after(0, lambda r: r.run == TUTORIAL_RUN)]
        loss = [e["step"] for e in events if e["type"] == "metric" and e["name"] == "training_loss"]
        self.assertEqual(loss, list(range(10, 101, 10)))
        histograms: dict[str, list[int]] = {}
        for e in events:
            if e["type"] == "histogram":
                histograms.setdefault(e["name"], []).append(e["step"])
        names = [n for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for n in
                 (f"{layer}.weight", f"{layer}.bias")]  # fmt: skip
        self.assertEqual(histograms, {name: [50, 100] for name in names})
        [grid] = [e for e in events if e.get("name") == "four_fashion_mnist_images"]
        self.assertEqual((grid["type"], grid["width"], grid["height"]), ("image", 8 * 28, 2 * 28))
        if importlib.util.find_spec("matplotlib") is not None:  # the tutorial's figures
            figures = [e for e in events if e.get("name") == "predictions_vs._actuals"]
            self.assertEqual(
                [(e["type"], e["step"]) for e in figures], [("image", 50), ("image", 100)]
            )
            self.assertEqual((figures[0]["width"], figures[0]["height"]), (800, 250))
        curves = [e["name"] for e in events if e["type"] == "pr_curve"]
        self.assertEqual(len(curves), 10)
        self.assertIn("T-shirt/top", curves)
        self.assertEqual([e["state"] for e in events if e["type"] == "status"][-1], "finished")
        self.assertEqual(stderr.count("SummaryWriter.add_graph:"), 1, stderr)
        self.assertEqual(stderr.count("SummaryWriter.add_embedding:"), 1, stderr)

    def test_torch_tutorial(self) -> Deferred[None]:
        async def go() -> None:
            need("torch.utils.tensorboard")
            _, _, where = await self.run_script(self.source)  # as written: torch's event files
            self.assertTrue(list(where.glob(f"runs/{TUTORIAL_RUN}/events.out.tfevents.*")))
            self.assertEqual(self.server.hub.store.after(0, lambda r: True), [])
            _, err, _ = await self.run_script(self.source.replace(TORCH_IMPORT, OUR_IMPORT))
            self.check_run(err)

        return Deferred.fromCoroutine(go())

    def test_tensorboardx_tutorial(self) -> Deferred[None]:
        async def go() -> None:
            need("tensorboardX")
            tbx = self.source.replace(TORCH_IMPORT, TBX_IMPORT)
            _, _, where = await self.run_script(tbx)  # a tensorboardX script: its event files
            self.assertTrue(list(where.glob(f"runs/{TUTORIAL_RUN}/events.out.tfevents.*")))
            _, err, _ = await self.run_script(tbx.replace(TBX_IMPORT, OUR_IMPORT))
            self.check_run(err)

        return Deferred.fromCoroutine(go())
