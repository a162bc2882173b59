"""
The one-line start (``trainstream.init``/``log``/``finish``) and the runs an
exception marks ``failed``, seen from outside: scripts run as child
processes, publishing to a server in this test's reactor (through
``$TRAINSTREAM_URL`` or ``url=``) or to an embedded server whose SQLite file
is read once the script has exited.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.clients import ANY_PORTS, free_port
from trainstream.api import Event, RunAPI
from trainstream.integrations import _failure
from trainstream.server import StreamServer

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 120
#: The embedded server of a child: any port, a history file given per test.
EMBEDDED = '{"listen": "tcp:0:interface=127.0.0.1", "db": sys.argv[1]}'


def run_child(
    code: str, *args: str, env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script file (so its name is the run's default stem)."""
    directory = cwd or tempfile.mkdtemp(prefix="trainstream-quick-")
    script = os.path.join(directory, "train_script.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(code))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for name in ("TRAINSTREAM_URL", "TRAINSTREAM_TOKEN", "TRAINSTREAM_SYSTEM_METRICS"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=directory,
        timeout=CHILD_TIMEOUT_S,
    )


def stored_events(db: str) -> list[dict[str, Any]]:
    """Every event of an embedded server's history file, in id order (read after exit)."""
    connection = sqlite3.connect(db)
    try:
        columns = [c[1] for c in connection.execute("PRAGMA table_info(events)")]
        rows = connection.execute("SELECT * FROM events ORDER BY 1").fetchall()
    finally:
        connection.close()
    out = []
    for row in rows:
        for value in row:
            if isinstance(value, str) and value.startswith("{"):
                out.append(json.loads(value))
                break
        else:
            raise AssertionError(f"no JSON column in events {columns}")
    return out


def statuses(events: list[dict[str, Any]], run: str) -> list[tuple[str, str | None]]:
    return [
        (e["state"], e.get("message")) for e in events if e["type"] == "status" and e["run"] == run
    ]


class EmbeddedScriptTests(SynchronousTestCase):
    """Scripts on their own embedded server; its history file read after they exit."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="trainstream-quick-")
        self.db = os.path.join(self.tmp, "history.sqlite3")

    def test_init_log_finish(self) -> None:
        """
        A default name from the script, ``config`` as hparams, steps that count
        by themselves and follow an explicit one, ``finished``, the server released.
        """
        out = run_child(
            f"""
            import json, sys, trainstream
            run = trainstream.init(config={{"lr": 0.1, "opt": {{"eps": 1e-8}}, "tags": [1]}},
                                   server_config={EMBEDDED})
            assert trainstream.current_run() is run
            for i in range(3):
                trainstream.log({{"loss": 1.0 / (i + 1)}})
            trainstream.log({{"loss": 0.1}}, step=10)
            trainstream.log({{"loss": 0.05}})
            trainstream.finish()
            trainstream.finish()  # nothing left to end
            manager = trainstream.get_stream_server_manager()
            print(json.dumps({{"name": run.name, "where": run.where, "refcount": manager.refcount,
                               "current": trainstream.current_run() is None}}))
            """,
            self.db,
            cwd=self.tmp,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        result = json.loads(out.stdout.splitlines()[-1])
        self.assertRegex(result["name"], r"^train_script-\d{8}-\d{6}-[0-9a-f]{4}$")
        self.assertEqual(
            (result["where"], result["refcount"], result["current"]), ("config", 0, True)
        )
        events = stored_events(self.db)
        name = result["name"]
        steps = [e["step"] for e in events if e["type"] == "metric" and e["name"] == "loss"]
        self.assertEqual(steps, [0, 1, 2, 10, 11])
        (hparams,) = [e for e in events if e["type"] == "hparams"]
        self.assertEqual(hparams["params"], {"lr": 0.1, "opt/eps": 1e-8})  # the list left out
        self.assertEqual(
            statuses(events, name), [("created", None), ("running", None), ("finished", None)]
        )

    def test_exception_marks_run_failed(self) -> None:
        """
        An exception that ends the script: the run is ``failed`` with its
        message, and the traceback is still printed (the previous hook ran).
        """
        out = run_child(
            f"""
            import sys, trainstream
            trainstream.init("boom-run", server_config={EMBEDDED})
            trainstream.log({{"loss": 1.0}})
            raise ValueError("loss is nan at step 1")
            """,
            self.db,
        )
        self.assertEqual(out.returncode, 1)
        self.assertIn("Traceback (most recent call last)", out.stderr)
        self.assertIn("ValueError: loss is nan at step 1", out.stderr)
        self.assertEqual(
            statuses(stored_events(self.db), "boom-run")[-1],
            ("failed", "ValueError: loss is nan at step 1"),
        )

    def test_script_ending_without_finish_finishes(self) -> None:
        out = run_child(
            f"""
            import sys, trainstream
            trainstream.init("no-finish", server_config={EMBEDDED})
            trainstream.log({{"loss": 1.0}})
            """,
            self.db,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(statuses(stored_events(self.db), "no-finish")[-1], ("finished", None))

    def test_training_thread_exception(self) -> None:
        """
        An exception ending the thread that opened the run marks it failed
        (``threading.excepthook``, which still prints); the script goes on.
        """
        out = run_child(
            f"""
            import sys, threading, trainstream

            def train():
                trainstream.init("thread-run", server_config={EMBEDDED})
                trainstream.log({{"loss": 1.0}})
                raise RuntimeError("CUDA out of memory")

            t = threading.Thread(target=train)
            t.start()
            t.join()
            print("main goes on")
            """,
            self.db,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("main goes on", out.stdout)
        self.assertIn("RuntimeError: CUDA out of memory", out.stderr)
        self.assertEqual(
            statuses(stored_events(self.db), "thread-run")[-1],
            ("failed", "RuntimeError: CUDA out of memory"),
        )

    def test_second_init(self) -> None:
        """
        A second ``init`` with another name finishes the first run; with the
        same name it returns the current run, its step going on.
        """
        out = run_child(
            f"""
            import json, sys, trainstream
            a = trainstream.init("a", server_config={EMBEDDED})
            trainstream.log({{"x": 1}})
            again = trainstream.init("a", config={{"lr": 2}})
            trainstream.log({{"x": 2}})
            b = trainstream.init("b", server_config={EMBEDDED})
            trainstream.log({{"x": 3}})
            print(json.dumps({{"same": again is a, "a_closed": a.closed, "b": b.where}}))
            trainstream.finish()
            """,
            self.db,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        result = json.loads(out.stdout.splitlines()[-1])
        self.assertEqual(result, {"same": True, "a_closed": True, "b": "config"})
        events = stored_events(self.db)
        self.assertEqual(
            [(e["run"], e["step"]) for e in events if e["type"] == "metric"],
            [("a", 0), ("a", 1), ("b", 0)],
        )
        self.assertEqual(statuses(events, "a")[-1], ("finished", None))
        self.assertEqual(statuses(events, "b")[-1], ("finished", None))

    def test_user_errors_are_one_line(self) -> None:
        out = run_child(
            """
            import trainstream
            for call in (lambda: trainstream.log({"x": 1}),
                         lambda: trainstream.init(config=[1, 2]),
                         lambda: trainstream.init(url="http://h:1", server_config={})):
                try:
                    call()
                except Exception as e:
                    print(type(e).__name__, e)
            """
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(
            out.stdout.splitlines(),
            [
                "TrainstreamError trainstream.log(): no run; call trainstream.init() first",
                "TypeError trainstream.init(): config must be a dict (or argparse.Namespace) "
                "of hyperparameters, not list",
                "ValueError trainstream.init(): server_config is for the embedded server, not url=",
            ],
        )


class RemoteTestCase(TestCase):
    """A server in this test's reactor; the child scripts publish to it."""

    timeout = 240
    config: dict[str, Any] = ANY_PORTS

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(self.config, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    @property
    def url(self) -> str:
        return str(self.server.urls["rest"]).removesuffix("/api")

    def child(
        self, code: str, *args: str, **env: str
    ) -> Deferred[subprocess.CompletedProcess[str]]:
        """The child runs in a thread, so this reactor serves its requests meanwhile."""
        return deferToThread(run_child, code, *args, env=env)

    def events(self, run: str) -> list[dict[str, Any]]:
        return [r.event for r in self.server.hub.store.after(0, lambda r: r.run == run)]


class RemoteScriptTests(RemoteTestCase):
    def test_env_url_and_failure(self) -> None:
        """
        ``$TRAINSTREAM_URL``: the same script publishes there (loading no
        Twisted); its exception marks the run failed.
        """

        async def go() -> None:
            out = await self.child(
                """
                import sys, trainstream
                run = trainstream.init("env-run", config={"lr": 0.5})
                heavy = ("twisted", "IPython", "psutil", "torch")
                print(run.where, [m for m in heavy if m in sys.modules])
                for i in range(3):
                    trainstream.log({"loss": float(i)})
                raise KeyError("missing batch")
                """,
                TRAINSTREAM_URL=self.url,
            )
            self.assertEqual(out.returncode, 1, out.stderr)
            self.assertEqual(out.stdout.split(), ["env", "[]"])  # no reactor: a publisher
            events = self.events("env-run")
            self.assertEqual([e["step"] for e in events if e["type"] == "metric"], [0, 1, 2])
            self.assertEqual(
                statuses(events, "env-run"),
                [("created", None), ("running", None), ("failed", "KeyError: 'missing batch'")],
            )

        return Deferred.fromCoroutine(go())

    def test_finds_the_local_server(self) -> None:
        """
        Neither url nor ``$TRAINSTREAM_URL``: a trainstream server answering
        at the discovery URL is used; a port where no trainstream answers
        (a plain web page, nothing) is not.
        """
        plain = Resource()
        plain.putChild(b"api", Resource())  # /api/health: 404, not trainstream's health
        port = reactor.listenTCP(0, Site(plain), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        other = f"http://127.0.0.1:{port.getHost().port}"

        async def go() -> None:
            from trainstream.quick import find_local_server

            self.assertEqual(await deferToThread(find_local_server, self.url + "/"), self.url)
            self.assertIsNone(await deferToThread(find_local_server, other))
            self.assertIsNone(await deferToThread(find_local_server, "http://127.0.0.1:1"))
            out = await self.child(
                """
                import sys, trainstream, trainstream.quick as quick
                from trainstream.quick import find_local_server
                quick.DISCOVER_URL = sys.argv[1]
                run = trainstream.init("found-run")
                trainstream.log({"loss": 1.0})
                print(run.where, run.dashboard_url)
                trainstream.finish()
                print("refcount", trainstream.get_stream_server_manager().refcount)
                """,
                self.url,
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(
                out.stdout.split(), ["found", self.url + "/?run=found-run", "refcount", "0"]
            )
            self.assertEqual(statuses(self.events("found-run"), "found-run")[-1][0], "finished")

        return Deferred.fromCoroutine(go())


class ExampleTests(RemoteTestCase):
    def example(self, *args: str) -> Deferred[subprocess.CompletedProcess[str]]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRAINSTREAM_URL": self.url}
        return deferToThread(
            subprocess.run,
            [sys.executable, str(ROOT / "examples" / "quickstart.py"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=CHILD_TIMEOUT_S,
        )

    def test_quickstart(self) -> Deferred[None]:
        """examples/quickstart.py publishes through ``$TRAINSTREAM_URL``; ``--fail-at`` fails it."""

        async def go() -> None:
            out = await self.example("--run", "qs", "--steps", "50")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout.split(), ["run", "qs:", self.url + "/?run=qs"])
            events = self.events("qs")
            loss = [e["step"] for e in events if e.get("name") == "train/loss"]
            self.assertEqual(loss, list(range(50)))
            self.assertEqual(statuses(events, "qs")[-1], ("finished", None))
            out = await self.example("--run", "qs-fail", "--fail-at", "20")
            self.assertEqual(out.returncode, 1)
            self.assertEqual(
                statuses(self.events("qs-fail"), "qs-fail")[-1],
                ("failed", "RuntimeError: stopped at step 20 (--fail-at)"),
            )

        return Deferred.fromCoroutine(go())


class TokenServerTests(RemoteTestCase):
    config = {**ANY_PORTS, "token": "s3cret"}

    def test_found_server_needs_a_token(self) -> None:
        """A found server that needs a token: one line says so; with the token it works."""

        async def go() -> None:
            code = """
                import sys, trainstream, trainstream.quick as quick
                quick.DISCOVER_URL = sys.argv[1]
                try:
                    run = trainstream.init("tok-run")
                except trainstream.TrainstreamError as e:
                    print("error:", e)
                else:
                    print(run.where)
                    trainstream.finish()
                """
            out = await self.child(code, self.url)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn(f"the trainstream server running at {self.url} needs a token", out.stdout)
            self.assertEqual(out.stdout.count("\n"), 1)
            out = await self.child(code, self.url, TRAINSTREAM_TOKEN="s3cret")
            self.assertEqual(out.stdout.split(), ["found"], out.stderr)
            self.assertEqual(statuses(self.events("tok-run"), "tok-run")[-1][0], "finished")

        return Deferred.fromCoroutine(go())

    def test_env_url_with_a_wrong_token_fails_at_init(self) -> None:
        """
        ``$TRAINSTREAM_URL`` to a server whose token was not given (or not
        its own): ``init()`` says so at once, rather than a run whose every
        event is refused in silence; the right token works.
        """

        async def go() -> None:
            code = """
                import trainstream
                try:
                    trainstream.init("env-tok")
                except trainstream.TrainstreamError as e:
                    print("error:", e)
                else:
                    trainstream.log({"loss": 1.0})
                    trainstream.finish()
                    print("ok")
                """
            for token, said in (("", "none was given"), ("nope", "refused the one given")):
                out = await self.child(code, TRAINSTREAM_URL=self.url, TRAINSTREAM_TOKEN=token)
                self.assertEqual(out.returncode, 0, out.stderr)
                self.assertIn(
                    f"the trainstream server at {self.url} ($TRAINSTREAM_URL={self.url}) "
                    f"needs a token and {said} (HTTP 401): set $TRAINSTREAM_TOKEN",
                    out.stdout,
                )
                self.assertEqual(out.stderr, "")
            out = await self.child(code, TRAINSTREAM_URL=self.url, TRAINSTREAM_TOKEN="s3cret")
            self.assertEqual((out.stdout, out.stderr), ("ok\n", ""))
            self.assertEqual(self.events("env-tok")[-1]["state"], "finished")

        return Deferred.fromCoroutine(go())


class UnreachableServerTests(TestCase):
    timeout = 120

    def test_nothing_answers_at_the_env_url(self) -> None:
        """
        ``$TRAINSTREAM_URL`` where nothing listens: the training goes on,
        but stderr says at once that events wait, what ``finish()`` waits
        for once it has waited a second, and how many events were never
        delivered (before this, the run vanished in silence).
        """
        port = free_port()

        async def go() -> None:
            code = """
                import trainstream
                run = trainstream.init("lost", flush_timeout=1.5)
                for step in range(5):
                    trainstream.log({"loss": 1.0})
                trainstream.finish()
                print("done", run.sink.undelivered)
                """
            out = await deferToThread(
                run_child, code, env={"TRAINSTREAM_URL": f"http://127.0.0.1:{port}"}
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout, "done 8\n")  # created, running, 5 metrics, finished
            lines = out.stderr.splitlines()
            self.assertEqual(len(lines), 3, out.stderr)
            self.assertIn(f"publisher lost: 127.0.0.1:{port} unreachable", lines[0])
            self.assertIn("events are kept (up to 100,000) and sent again", lines[0])
            self.assertIn(
                f"waiting up to 0.5 s more for 127.0.0.1:{port} to take 8 events", lines[1]
            )
            self.assertIn(f"8 events not delivered to 127.0.0.1:{port}", lines[2])

        return Deferred.fromCoroutine(go())


# The integrations: an exception that ends training marks their run failed.

FRAMEWORK_SCRIPTS = {
    "writer": """
        import sys
        from trainstream.integrations.tensorboard import SummaryWriter

        writer = SummaryWriter(url=sys.argv[1], run="tb-fail")  # no with block, no close()
        for step in range(5):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
            if step == 2:
                raise RuntimeError("writer boom at step 2")
    """,
    "keras": """
        import os, sys
        os.environ["KERAS_BACKEND"] = "torch"
        import numpy as np, keras
        from trainstream.integrations.keras import TrainstreamCallback

        class Boom(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 2:
                    raise RuntimeError("keras boom at batch 2")

        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        x, y = np.zeros((32, 4), "float32"), np.zeros((32, 1), "float32")
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[TrainstreamCallback(run="keras-fail", url=sys.argv[1]), Boom()])
    """,
    "transformers": """
        import sys, torch
        from transformers import Trainer, TrainingArguments, TrainerCallback
        from trainstream.integrations.transformers import TrainstreamCallback

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
            def forward(self, x, labels=None):
                loss = torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), labels)
                return {"loss": loss}

        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 32
            def __getitem__(self, i):
                return {"x": torch.zeros(4), "labels": torch.tensor(0.0)}

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 2:
                    raise RuntimeError("hf boom at step 2")

        args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4,
                                 max_steps=5, logging_steps=1, report_to="none",
                                 save_strategy="no", use_cpu=True)
        trainer = Trainer(model=Model(), args=args, train_dataset=Data(),
                          callbacks=[TrainstreamCallback(run="hf-fail", url=sys.argv[1]), Boom()])
        trainer.train()
    """,
    "lightning": """
        import sys, torch, lightning.pytorch as pl
        from torch.utils.data import DataLoader, TensorDataset
        from trainstream.integrations.lightning import TrainstreamLogger

        class Tiny(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
            def training_step(self, batch, index):
                if self.global_step == 2:
                    raise RuntimeError("lightning boom at step 2")
                x, y = batch
                loss = torch.nn.functional.mse_loss(self.layer(x), y)
                self.log("loss", loss)
                return loss
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.zeros(40, 4), torch.zeros(40, 1)), batch_size=4)
        trainer = pl.Trainer(max_steps=5, accelerator="cpu", log_every_n_steps=1,
                             logger=TrainstreamLogger(run="pl-fail", url=sys.argv[1]),
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=sys.argv[2])
        trainer.fit(Tiny(), data)
    """,
}


class IntegrationFailureTests(RemoteTestCase):
    def fails(self, framework: str, run: str, message: str) -> Deferred[None]:
        from importlib.util import find_spec

        modules = () if framework == "writer" else (framework, "torch")
        for module in modules:  # looked for, not imported: the child imports them
            if find_spec(module) is None:
                reason = f"{module} is not installed: pip install '.[{framework}]'"
                print(f"SKIPPED: {reason}", file=sys.stderr)
                raise SkipTest(reason)

        async def go() -> None:
            out = await self.child(FRAMEWORK_SCRIPTS[framework], self.url, tempfile.mkdtemp())
            self.assertNotEqual(out.returncode, 0, out.stdout)
            self.assertIn(message, out.stderr)  # the traceback is still printed
            states = statuses(self.events(run), run)
            self.assertEqual(states[-1], ("failed", message), out.stderr[-3000:])
            self.assertIn(("running", None), states)

        return Deferred.fromCoroutine(go())

    def test_summary_writer(self) -> Deferred[None]:
        return self.fails("writer", "tb-fail", "RuntimeError: writer boom at step 2")

    def test_keras(self) -> Deferred[None]:
        return self.fails("keras", "keras-fail", "RuntimeError: keras boom at batch 2")

    def test_transformers(self) -> Deferred[None]:
        return self.fails("transformers", "hf-fail", "RuntimeError: hf boom at step 2")

    def test_lightning(self) -> Deferred[None]:
        return self.fails("lightning", "pl-fail", "RuntimeError: lightning boom at step 2")


# The hook itself, in this process.


class Recorder(RunAPI):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.events: list[Event] = []
        self.flushed: list[float] = []

    def _enqueue(self, events: list[Event]) -> None:
        self.events.extend(events)


class HookTests(SynchronousTestCase):
    def test_message(self) -> None:
        self.assertEqual(_failure.failure_message(RuntimeError("x")), "RuntimeError: x")
        self.assertEqual(_failure.failure_message(KeyboardInterrupt()), "KeyboardInterrupt")
        self.assertEqual(len(_failure.failure_message(ValueError("y" * 5000))), 2000)

    def test_thread_hook_fails_only_that_threads_runs(self) -> None:
        """
        A thread's exception fails the runs watched from it, flushed, and
        forgets them; a run watched elsewhere, or forgotten, is untouched;
        the previous ``threading.excepthook`` still runs.
        """
        mine, other, ended = Recorder("mine"), Recorder("other"), Recorder("ended")
        _failure.watch(other)
        self.addCleanup(_failure.forget, other)
        seen: list[str] = []
        original = _failure._previous_threading
        _failure._previous_threading = lambda args: seen.append(str(args.exc_value))
        self.addCleanup(setattr, _failure, "_previous_threading", original)

        def train() -> None:
            _failure.watch(mine, lambda run, seconds: mine.flushed.append(seconds))
            _failure.watch(ended)
            _failure.forget(ended)
            raise RuntimeError("boom")

        self.assertIs(threading.excepthook, _failure._threading_hook)
        thread = threading.Thread(target=train)
        thread.start()
        thread.join(10)
        self.assertEqual(seen, ["boom"])
        self.assertEqual(
            [(e["state"], e["message"]) for e in mine.events], [("failed", "RuntimeError: boom")]
        )
        self.assertEqual(mine.flushed, [_failure.EXIT_FLUSH_S])
        self.assertEqual((other.events, ended.events), ([], []))
        self.assertNotIn(mine, _failure.watched())
        self.assertIn(other, _failure.watched())

    def test_watched_runs_are_weak(self) -> None:
        import gc

        run = Recorder("gone")
        _failure.watch(run)
        self.assertIn(run, _failure.watched())
        count = len(_failure.watched())
        del run
        gc.collect()
        self.assertEqual(len(_failure.watched()), count - 1)
