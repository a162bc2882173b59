"""
The examples are documentation that runs: each, in a child process, publishes
to a real server started here (``--url``), or starts its own (embedded).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.clients import ANY_PORTS
from trainstream.service import StreamServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        reason = "torch is not importable; examples/train_torch.py not run"
        print(f"SKIPPED: {reason}", file=sys.stderr)
        raise SkipTest(reason)


class ExampleTests(TestCase):
    timeout = 180

    def setUp(self) -> Deferred[None]:
        self.server = StreamServer(ANY_PORTS, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def run_example(self, script: str, *args: str) -> str:
        """Run ``examples/SCRIPT ARGS``; its stdout once it has exited 0."""
        data = tempfile.mkdtemp(prefix="trainstream-example-")  # embedded history goes here
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": data, "HOME": data}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [str(EXAMPLES / script), *args], env=env, path=str(ROOT)
        )
        self.assertEqual(code, 0, f"{script} exited {code}:\n{err.decode()[-3000:]}")
        return out.decode()

    def events(self, run: str, kind: str) -> list[dict[str, Any]]:
        return [
            r.event
            for r in self.server.hub.store.after(0, lambda r: r.run == run)
            if r.type == kind
        ]

    def steps(self, run: str) -> dict[str, list[int]]:
        by_name: dict[str, list[int]] = {}
        for e in self.events(run, "metric"):
            by_name.setdefault(e["name"], []).append(e["step"])
        return by_name

    def test_plain_loop_remote(self) -> Deferred[None]:
        async def go() -> None:
            await self.run_example(
                "plain_loop.py", "--url", self.server.urls["rest"], "--run", "r", "--steps", "20"
            )
            steps = self.steps("r")
            for name in ("train/loss", "train/accuracy", "lr"):
                self.assertEqual(steps[name], list(range(20)), name)
            losses = [e["value"] for e in self.events("r", "metric") if e["name"] == "train/loss"]
            self.assertLess(losses[-1], losses[0])
            self.assertEqual(self.events("r", "hparams")[0]["params"]["steps"], 20)
            states = [e["state"] for e in self.events("r", "status")]
            self.assertEqual(states, ["created", "running", "finished"])

        return Deferred.fromCoroutine(go())

    def test_train_torch_remote(self) -> Deferred[None]:
        need_torch()

        async def go() -> None:
            await self.run_example(
                "train_torch.py", "--url", self.server.urls["rest"], "--run", "t", "--steps", "20"
            )
            steps = self.steps("t")
            for name in ("train/loss", "train/acc", "lr"):
                self.assertEqual(steps[name], list(range(20)), name)
            acc = [e["value"] for e in self.events("t", "metric") if e["name"] == "train/acc"]
            self.assertTrue(all(0.0 <= a <= 1.0 for a in acc), acc)
            self.assertEqual(self.events("t", "hparams")[0]["params"]["steps"], 20)
            states = [e["state"] for e in self.events("t", "status")]
            self.assertEqual(states, ["created", "running", "finished"])

        return Deferred.fromCoroutine(go())

    def test_embedded(self) -> Deferred[None]:
        """Without --url each example starts a server itself, prints its URL and exits 0."""

        async def go() -> None:
            listen = ["--listen", "tcp:0:interface=127.0.0.1"]
            out = await self.run_example("plain_loop.py", "--steps", "20", *listen)
            self.assertRegex(out, r"dashboard: http://127\.0\.0\.1:\d+/")
            if importlib.util.find_spec("torch") is not None:
                out = await self.run_example("train_torch.py", "--steps", "20", *listen)
                self.assertRegex(out, r"dashboard: http://127\.0\.0\.1:\d+/")
            else:
                print("SKIPPED: torch is not importable; train_torch.py embedded not run")

        return Deferred.fromCoroutine(go())
