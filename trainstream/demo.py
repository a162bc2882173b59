"""
A synthetic training run, so a new user sees live data (``--demo``).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from trainstream.hub import Hub


class DemoService(Service):
    """
    Publishes a loss, accuracy and learning-rate curve a few times a second,
    with an epoch status every ``steps_per_epoch`` steps and a new run after
    ``epochs`` epochs.
    """

    def __init__(
        self,
        hub: Hub,
        clock: Any,
        interval: float = 0.25,
        steps_per_epoch: int = 100,
        epochs: int = 10,
        seed: int = 0,
    ) -> None:
        self.hub = hub
        self.interval = interval
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self._random = random.Random(seed)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._run_number = 0
        self._step = 0
        self._run = ""
        self._started = time.strftime("%Y%m%d-%H%M%S", time.gmtime(clock.seconds()))

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._new_run()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        if self._run:  # not left "running" for good: the next start begins a new run
            self.hub.accept(
                [
                    {
                        "type": "status",
                        "run": self._run,
                        "state": "paused",
                        "message": "the server stopped; a new demo run starts with it",
                    }
                ]
            )
            self._run = ""

    def _new_run(self) -> None:
        self._run_number += 1
        self._step = 0
        # Named after this start, so a persistent history's earlier demo runs
        # stay as they were (the same name with steps from 0 again would be
        # taken for a checkpoint rewind).
        self._run = f"demo-{self._started}-{self._run_number}"
        self.hub.accept(
            [
                {"type": "status", "run": self._run, "state": "created"},
                {
                    "type": "hparams",
                    "run": self._run,
                    "params": {"lr": 3e-4, "batch_size": 64, "model": "synthetic-mlp"},
                },
                {"type": "status", "run": self._run, "state": "running", "epoch": 0},
            ]
        )

    def tick(self) -> None:
        """Publish one step."""
        step = self._step
        total = self.steps_per_epoch * self.epochs
        progress = step / total
        noise = self._random.gauss(0.0, 1.0)
        loss = 2.3 * math.exp(-4.0 * progress) + 0.08 + 0.04 * noise
        accuracy = min(0.99, 0.1 + 0.85 * (1 - math.exp(-5.0 * progress)) + 0.01 * noise)
        lr = 3e-4 * 0.5 * (1 + math.cos(math.pi * progress))
        events: list[object] = [
            {"type": "metric", "run": self._run, "name": n, "step": step, "value": v}
            for n, v in (("train/loss", loss), ("train/accuracy", accuracy), ("train/lr", lr))
        ]
        self._step += 1
        if self._step % self.steps_per_epoch == 0:
            epoch = self._step // self.steps_per_epoch
            events.append(
                {
                    "type": "log",
                    "run": self._run,
                    "level": "info",
                    "message": f"epoch {epoch} done, loss {loss:.4f}",
                }
            )
            if epoch >= self.epochs:
                events.append({"type": "status", "run": self._run, "state": "finished"})
                self.hub.accept(events)
                self._new_run()
                return
            events.append({"type": "status", "run": self._run, "state": "running", "epoch": epoch})
        self.hub.accept(events)
