"""
The framework integrations driven by the real frameworks, on tiny models for
a few steps, publishing over HTTP to a real server in the trial reactor
(training runs in a thread): Lightning's logger, the transformers Trainer
callback and the Keras callback. A framework that is not installed skips
its tests, saying so (``pip install '.[lightning,transformers,keras]'``,
torch first: see the README).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS
from trainstream.integrations._target import metrics_of, number, params_of, sanitize
from trainstream.server import StreamServer

ROOT = Path(__file__).resolve().parent.parent


def need(module: str, extra: str) -> Any:
    """Import ``module``, or skip the test saying what is missing and how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a framework failing to start
        reason = (
            f"{module} is not importable ({type(e).__name__}: {e}); "
            f"install it with: pip install torch==2.13.0 && pip install '.[{extra}]'"
        )
        print(f"SKIPPED: {reason}", file=sys.stderr)
        raise SkipTest(reason) from e


class FrameworkTestCase(TestCase):
    timeout = 180

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(self.server.stop)
        self.tmp = tempfile.mkdtemp(prefix="trainstream-fw-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        return self.server.start()

    @property
    def url(self) -> str:
        return str(self.server.urls["rest"])

    def events(self, run: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            r.event
            for r in self.server.hub.store.after(0, lambda r: r.run == run)
            if kind is None or r.type == kind
        ]

    def steps(self, run: str, name: str) -> list[int]:
        return [e["step"] for e in self.events(run, "metric") if e["name"] == name]

    def states(self, run: str) -> list[str]:
        return [e["state"] for e in self.events(run, "status")]

    def train(self, fn: Callable[[], Any]) -> Deferred[Any]:
        """Run ``fn`` in a thread, so this reactor serves its HTTP calls."""
        return deferToThread(fn)


class LightningTests(FrameworkTestCase):
    def model_and_data(self, pl: Any, fail_at: int | None = None) -> tuple[Any, Any]:
        torch = need("torch", "lightning")
        from torch.utils.data import DataLoader, TensorDataset

        class Tiny(pl.LightningModule):  # type: ignore[misc]
            def __init__(self, lr: float = 0.1, opt: dict[str, Any] | None = None) -> None:
                super().__init__()
                self.save_hyperparameters()
                self.layer = torch.nn.Linear(4, 1)

            def training_step(self, batch: Any, index: int) -> Any:
                if fail_at is not None and self.global_step == fail_at:
                    raise RuntimeError("boom")
                x, y = batch
                loss = torch.nn.functional.mse_loss(self.layer(x), y)
                self.log("train loss", loss)  # a space: sanitized to train_loss
                return loss

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
        return Tiny(opt={"betas": [0.9, 0.99], "eps": 1e-8}), DataLoader(data, batch_size=4)

    def fit(self, pl: Any, logger: Any, fail_at: int | None = None) -> None:
        model, loader = self.model_and_data(pl, fail_at)
        trainer = pl.Trainer(
            max_steps=5,
            accelerator="cpu",
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=self.tmp,
        )
        trainer.fit(model, loader)

    def test_trainer_publishes(self) -> Deferred[None]:
        pl = need("lightning.pytorch", "lightning")
        from trainstream.integrations.lightning import TrainstreamLogger

        logger = TrainstreamLogger(url=self.url, run="pl run", version=3)
        self.addCleanup(lambda: deferToThread(logger.close))
        self.assertEqual((logger.name, logger.version), ("pl run", 3))

        async def go() -> None:
            await self.train(lambda: self.fit(pl, logger))
            self.assertEqual(logger.name, "pl_run")
            run = logger.experiment
            self.assertIsNotNone(run)
            self.assertTrue(await self.train(run.flush))
            (hparams,) = self.events("pl_run", "hparams")
            self.assertEqual(hparams["params"]["lr"], 0.1)
            self.assertEqual(hparams["params"]["opt/eps"], 1e-8)
            self.assertNotIn("opt/betas", hparams["params"])  # a list: left out
            self.assertEqual(self.steps("pl_run", "train_loss"), [0, 1, 2, 3, 4])
            self.assertEqual(self.steps("pl_run", "epoch"), [0, 1, 2, 3, 4])
            losses = [e["value"] for e in self.events("pl_run", "metric") if e["name"] != "epoch"]
            self.assertTrue(all(isinstance(v, float) for v in losses))
            self.assertEqual(self.states("pl_run"), ["created", "running", "finished"])

        return Deferred.fromCoroutine(go())

    def test_failure_marks_run_failed(self) -> Deferred[None]:
        pl = need("lightning.pytorch", "lightning")
        from trainstream.integrations.lightning import TrainstreamLogger

        logger = TrainstreamLogger(url=self.url, run="pl-fail")
        self.addCleanup(lambda: deferToThread(logger.close))

        async def go() -> None:
            with self.assertRaises(RuntimeError):
                await self.train(lambda: self.fit(pl, logger, fail_at=2))
            self.assertTrue(await self.train(logger.experiment.flush))
            self.assertEqual(self.steps("pl-fail", "train_loss"), [0, 1])
            self.assertEqual(self.states("pl-fail")[-1], "failed")

        return Deferred.fromCoroutine(go())

    def test_pytorch_lightning_package(self) -> Deferred[None]:
        """With the older ``pytorch_lightning`` name, ``PLTrainstreamLogger`` fits its Trainer."""
        pl = need("pytorch_lightning", "lightning")
        from trainstream.integrations import lightning as integration

        logger = integration.PLTrainstreamLogger(url=self.url, run="pl-old")
        self.assertIsInstance(logger, pl.loggers.Logger)
        self.addCleanup(lambda: deferToThread(logger.close))

        async def go() -> None:
            await self.train(lambda: self.fit(pl, logger))
            self.assertTrue(await self.train(logger.experiment.flush))
            self.assertEqual(self.steps("pl-old", "train_loss"), [0, 1, 2, 3, 4])
            self.assertEqual(self.states("pl-old")[-1], "finished")

        return Deferred.fromCoroutine(go())


class TransformersTests(FrameworkTestCase):
    def test_trainer_publishes(self) -> Deferred[None]:
        transformers = need("transformers", "transformers")
        torch = need("torch", "transformers")
        need("accelerate", "transformers")  # the Trainer needs it
        from trainstream.integrations.transformers import TrainstreamCallback

        callback = TrainstreamCallback(url=self.url, run="hf")
        self.addCleanup(lambda: deferToThread(callback.close))

        class Data(torch.utils.data.Dataset):  # type: ignore[misc]
            def __init__(self) -> None:
                generator = torch.Generator().manual_seed(0)
                self.ids = torch.randint(0, 100, (32, 8), generator=generator)
                self.labels = torch.randint(0, 2, (32,), generator=generator)

            def __len__(self) -> int:
                return 32

            def __getitem__(self, i: int) -> dict[str, Any]:
                return {"input_ids": self.ids[i], "labels": self.labels[i]}

        def fit() -> None:
            torch.manual_seed(0)
            config = transformers.BertConfig(  # built here: nothing from the hub
                vocab_size=100,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=16,
                num_labels=2,
            )
            model = transformers.BertForSequenceClassification(config)
            args = transformers.TrainingArguments(
                output_dir=self.tmp,
                max_steps=5,
                logging_steps=1,
                per_device_train_batch_size=4,
                learning_rate=1e-3,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
            )
            trainer = transformers.Trainer(
                model=model, args=args, train_dataset=Data(), callbacks=[callback]
            )
            trainer.train()

        async def go() -> None:
            await self.train(fit)
            (hparams,) = self.events("hf", "hparams")
            self.assertEqual(hparams["params"]["learning_rate"], 1e-3)
            self.assertEqual(hparams["params"]["max_steps"], 5)
            self.assertEqual(self.steps("hf", "loss"), [1, 2, 3, 4, 5])
            self.assertEqual(self.steps("hf", "learning_rate"), [1, 2, 3, 4, 5])
            self.assertEqual(self.steps("hf", "train_runtime"), [5])
            states = self.states("hf")
            self.assertEqual((states[:2], states[-1]), (["created", "running"], "finished"))
            epochs = [e.get("epoch") for e in self.events("hf", "status")]
            self.assertIn(1, epochs)  # on_epoch_end (5 steps of 8 end the epoch early)

        return Deferred.fromCoroutine(go())


class KerasTests(FrameworkTestCase):
    def keras(self) -> Any:
        os.environ.setdefault("KERAS_BACKEND", "torch")
        keras = need("keras", "keras")
        backend = keras.backend.backend()
        if backend not in ("torch", "jax", "tensorflow"):
            reason = f"keras backend {backend!r} cannot fit a model"
            print(f"SKIPPED: {reason}", file=sys.stderr)
            raise SkipTest(reason)
        need(backend, "keras")
        return keras

    def test_fit_publishes(self) -> Deferred[None]:
        keras = self.keras()
        import numpy as np

        from trainstream.integrations.keras import TrainstreamCallback

        callback = TrainstreamCallback(url=self.url, run="keras")
        self.addCleanup(lambda: deferToThread(callback.close))

        def fit() -> None:
            keras.utils.set_random_seed(0)
            rng = np.random.default_rng(0)
            x = rng.normal(size=(32, 4)).astype("float32")
            y = rng.normal(size=(32, 1)).astype("float32")
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
            model.fit(
                x,
                y,
                batch_size=8,
                epochs=2,
                validation_data=(x[:8], y[:8]),
                verbose=0,
                callbacks=[callback],
            )

        async def go() -> None:
            await self.train(fit)
            (hparams,) = self.events("keras", "hparams")
            self.assertEqual(hparams["params"]["epochs"], 2)
            self.assertEqual(hparams["params"]["steps"], 4)
            self.assertAlmostEqual(hparams["params"]["optimizer/learning_rate"], 0.01)
            self.assertEqual(self.steps("keras", "loss"), list(range(8)))
            self.assertEqual(self.steps("keras", "mae"), list(range(8)))
            self.assertEqual(self.steps("keras", "epoch/loss"), [4, 8])
            self.assertEqual(self.steps("keras", "epoch/val_loss"), [4, 8])
            statuses = self.events("keras", "status")
            self.assertEqual([e.get("epoch") for e in statuses], [None, None, 1, 2, None])
            self.assertEqual(self.states("keras")[-1], "finished")

        return Deferred.fromCoroutine(go())

    def test_update_freq_epoch(self) -> Deferred[None]:
        keras = self.keras()
        import numpy as np

        from trainstream.integrations.keras import TrainstreamCallback

        with self.assertRaises(ValueError):
            TrainstreamCallback(url=self.url, update_freq=0)
        callback = TrainstreamCallback(url=self.url, run="keras-epochs", update_freq="epoch")
        self.addCleanup(lambda: deferToThread(callback.close))

        def fit() -> None:
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            x = np.zeros((16, 2), "float32")
            model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[callback])

        async def go() -> None:
            await self.train(fit)
            names = {e["name"] for e in self.events("keras-epochs", "metric")}
            self.assertEqual(names, {"epoch/loss"})

        return Deferred.fromCoroutine(go())


class HelperTests(SynchronousTestCase):
    """The shared conversions, with no framework."""

    def test_numbers(self) -> None:
        import numpy as np

        self.assertEqual(number(3), 3)
        self.assertEqual(number(np.float32(0.5)), 0.5)
        self.assertIs(type(number(np.float64(0.5))), float)
        self.assertEqual(number(np.int64(7)), 7)
        self.assertEqual(number(np.array([2.0])), 2.0)
        for bad in (True, None, "1.5", np.zeros(3), [1.0], object()):
            self.assertIsNone(number(bad), bad)
        self.assertEqual(number(2**70), float(2**70))

    def test_metrics_and_params(self) -> None:
        self.assertEqual(
            metrics_of({"val loss": 1, "a/b": 2.5, "name": "text", "ok": False}, "e/"),
            {"e/val_loss": 1, "e/a/b": 2.5},
        )
        self.assertEqual(sanitize("/a b"), "a_b")
        self.assertEqual(
            params_of(
                {
                    "lr": 0.1,
                    "opt": {"eps": 1e-8, "betas": (0.9, 0.99)},
                    "name": "x" * 2000,
                    "nan": float("nan"),
                    "flag": True,
                    "none": None,
                    "": 1,
                }
            ),
            {"lr": 0.1, "opt/eps": 1e-8, "name": "x" * 1000, "flag": True, "none": None},
        )

    def test_embedded_and_no_framework_imported(self) -> None:
        """Without ``url`` the run is on the embedded server, released on close (child process)."""
        code = textwrap.dedent(
            """
            import json, sys, trainstream
            from trainstream.integrations._target import open_run
            config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True}
            run = open_run("emb run", server_config=config, hparams={"lr": 0.5})
            run.status("running")
            run.log({"loss": 1.5}, 0)
            run.finish()
            run.flush()
            store = trainstream.get_stream_server_manager().server.hub.store
            events = [r.event for r in store.after(0, lambda r: r.run == "emb_run")]
            run.close()
            run.close()
            frameworks = ("torch", "lightning", "transformers", "keras")
            loaded = [m for m in frameworks if m in sys.modules]
            manager = trainstream.get_stream_server_manager()
            print(json.dumps({"events": events, "refcount": manager.refcount, "loaded": loaded}))
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
        kinds = [e["type"] for e in result["events"]]
        self.assertEqual(kinds, ["status", "hparams", "status", "metric", "status"])
        self.assertEqual(result["refcount"], 0)
        self.assertEqual(result["loaded"], [])

    def test_options_checked_at_once(self) -> None:
        from trainstream.integrations._target import open_run

        with self.assertRaises(ValueError):
            open_run("r", url="http://127.0.0.1:1", server_config={"memory": True})
        with self.assertRaises(ValueError):
            open_run("r", token="t")
