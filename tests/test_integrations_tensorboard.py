"""
``trainstream.integrations.tensorboard.SummaryWriter`` against a real server:
TensorBoard's scalar/text/hparams calls from a training thread arrive as
trainstream events; its signatures match torch's when torch is installed.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
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
            for run in ("hp", "hp/trial_1"):
                last = self.events(run, "status")[-1]
                self.assertEqual(last["state"], "failed")
                self.assertEqual(last["message"], "KeyError: 'boom'")

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
            self.assertEqual(parameters(getattr(SummaryWriter, name)), theirs[name], name)
        # the constructor: torch's parameters, then our keyword-only ones
        ours = parameters(SummaryWriter.__init__)
        self.assertEqual(ours[: len(theirs["__init__"])], theirs["__init__"])
        self.assertTrue(
            all(kind is Parameter.KEYWORD_ONLY for _, kind, _ in ours[len(theirs["__init__"]) :])
        )

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
        self.assertEqual(_default_run("runs/exp 1", ""), "exp 1")
        self.assertEqual(_default_run("/tmp/runs/exp1/", ""), "exp1")
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
