"""
System metrics (``trainstream.system``): sampled by a thread of their own at
a short interval, GPU metrics through a fake ``pynvml`` put in
``sys.modules`` (this machine has no GPU), one warning without psutil, and
``init(system_metrics=...)`` logging them until ``finish()``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_quick import run_child, stored_events
from trainstream.api import Event, RunAPI
from trainstream.system import DEFAULT_INTERVAL, ENV, INTERVAL_ENV, SystemMonitor, interval_from

DEADLINE_S = 20.0
BASE = {
    "system/cpu_percent",
    "system/memory_percent",
    "system/process_cpu_percent",
    "system/process_rss_mb",
}


class Recorder(RunAPI):
    """A run that keeps what it is given, and the thread that gave it."""

    def __init__(self) -> None:
        super().__init__("sys")
        self.events: list[Event] = []
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def _enqueue(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend(events)
            self.threads.add(threading.get_ident())

    def samples(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        with self.lock:
            for e in self.events:
                out.setdefault(int(e["step"]), {})[str(e["name"])] = float(e["value"])  # type: ignore[call-overload]
        return out


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def fake_nvml(fail_init: bool = False) -> types.ModuleType:
    """A ``pynvml`` with two GPUs: 40 % and 90 % busy, 1 GiB of 4 GiB and 3 of 4 used."""
    nvml = types.ModuleType("pynvml")
    calls: list[str] = []
    gib = 1024**3

    def init() -> None:
        calls.append("init")
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=(40, 90)[h], memory=10
    )
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=(1, 3)[h] * gib, total=4 * gib, free=0
    )
    nvml.calls = calls  # type: ignore[attr-defined]
    return nvml


class MonitorTests(SynchronousTestCase):
    def monitor(self, interval: float = 0.02) -> tuple[Recorder, SystemMonitor]:
        run = Recorder()
        monitor = SystemMonitor(run, interval)
        self.addCleanup(monitor.stop)
        return run, monitor

    def use_nvml(self, module: Any) -> None:
        previous = sys.modules.get("pynvml")
        sys.modules["pynvml"] = module
        self.addCleanup(
            lambda: (
                sys.modules.__setitem__("pynvml", previous)
                if previous is not None
                else sys.modules.pop("pynvml", None)
            )
        )

    def test_samples_off_the_calling_thread(self) -> None:
        """CPU and memory metrics, steps 0, 1, 2..., from a daemon thread of their own."""
        self.use_nvml(None)  # no GPU library: import fails
        run, monitor = self.monitor()
        self.assertTrue(monitor.start())
        wait_for("3 samples", lambda: len(run.samples()) >= 3)
        monitor.stop()
        self.assertFalse(monitor.running)
        samples = run.samples()
        self.assertEqual(sorted(samples)[:3], [0, 1, 2])
        self.assertEqual(set(samples[0]), BASE)
        self.assertGreater(samples[0]["system/process_rss_mb"], 1.0)
        self.assertTrue(0.0 <= samples[0]["system/memory_percent"] <= 100.0)
        self.assertNotIn(threading.get_ident(), run.threads)
        self.assertFalse(any(t.name == "trainstream-system-sys" for t in threading.enumerate()))

    def test_gpu_metrics(self) -> None:
        """With the NVIDIA library, each GPU's utilisation and memory; shut down on stop."""
        nvml = fake_nvml()
        self.use_nvml(nvml)
        run, monitor = self.monitor()
        monitor.start()
        wait_for("a sample", lambda: len(run.samples()) >= 1)
        monitor.stop()
        first = run.samples()[0]
        self.assertEqual(first["system/gpu0/utilization_percent"], 40.0)
        self.assertEqual(first["system/gpu1/utilization_percent"], 90.0)
        self.assertEqual(first["system/gpu0/memory_used_mb"], 1024.0)
        self.assertEqual(first["system/gpu1/memory_percent"], 75.0)
        self.assertLessEqual(BASE, set(first))
        self.assertEqual((nvml.calls[0], nvml.calls[-1]), ("init", "shutdown"))  # type: ignore[attr-defined]

    def test_no_gpu_driver(self) -> None:
        """``nvmlInit`` failing (no driver): CPU metrics only."""
        self.use_nvml(fake_nvml(fail_init=True))
        run, monitor = self.monitor()
        monitor.start()
        wait_for("a sample", lambda: len(run.samples()) >= 1)
        monitor.stop()
        self.assertEqual(set(run.samples()[0]), BASE)

    def test_without_psutil_one_warning(self) -> None:
        import trainstream.system as system

        previous = sys.modules.get("psutil")
        sys.modules["psutil"] = None  # type: ignore[assignment]
        self.addCleanup(sys.modules.__setitem__, "psutil", previous)
        self.patch(system, "_warned", False)
        run, monitor = self.monitor()
        self.assertFalse(monitor.start())
        self.assertFalse(SystemMonitor(run).start())
        warnings = self.flushWarnings()
        self.assertEqual(len(warnings), 1)
        self.assertIn("pip install 'trainstream[system]'", warnings[0]["message"])
        self.assertFalse(monitor.running)

    def test_interval_option_and_env(self) -> None:
        self.assertEqual(interval_from(True), DEFAULT_INTERVAL)
        self.assertEqual(interval_from(0.5), 0.5)
        self.assertIsNone(interval_from(False))
        self.assertIsNone(interval_from(0))
        with self.assertRaises(ValueError):
            interval_from(-1)
        saved = {k: os.environ.pop(k, None) for k in (ENV, INTERVAL_ENV)}
        self.addCleanup(
            lambda: [os.environ.__setitem__(k, v) for k, v in saved.items() if v is not None]
        )
        self.assertIsNone(interval_from(None))
        os.environ[ENV] = "1"
        self.assertEqual(interval_from(None), DEFAULT_INTERVAL)
        os.environ[INTERVAL_ENV] = "2.5"
        self.assertEqual(interval_from(None), 2.5)
        os.environ[INTERVAL_ENV] = "soon"
        with self.assertRaises(ValueError) as caught:
            interval_from(None)
        self.assertIn(INTERVAL_ENV, str(caught.exception))
        os.environ.pop(ENV)
        os.environ.pop(INTERVAL_ENV)


class InitTests(SynchronousTestCase):
    def test_init_logs_system_metrics_until_finish(self) -> None:
        """
        ``init(system_metrics=0.05)``: ``system/*`` metrics of the run while
        it runs, none after ``finish()``; the env var turns them on for an
        adapter's run too.
        """
        import tempfile

        tmp = tempfile.mkdtemp(prefix="trainstream-sys-")
        db = os.path.join(tmp, "history.sqlite3")
        out = run_child(
            """
            import json, sys, time, trainstream
            from trainstream.integrations._target import open_run
            config = {"listen": "tcp:0:interface=127.0.0.1", "db": sys.argv[1]}
            run = trainstream.init("sys-run", server_config=config, system_metrics=0.05)
            deadline = time.monotonic() + 20
            while run.system.samples < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            trainstream.finish()
            after = run.system.samples
            other = open_run("env-run", server_config=config)  # TRAINSTREAM_SYSTEM_METRICS
            other.status("running")
            while other.system.samples < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            other.finish()
            other.close()
            print(json.dumps({"after": after, "stopped": not run.system.running}))
            """,
            db,
            env={"TRAINSTREAM_SYSTEM_METRICS": "1", "TRAINSTREAM_SYSTEM_INTERVAL": "0.05"},
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        import json

        result = json.loads(out.stdout.splitlines()[-1])
        self.assertGreaterEqual(result["after"], 3)
        self.assertTrue(result["stopped"])
        events = stored_events(db)
        for run in ("sys-run", "env-run"):
            names = {e["name"] for e in events if e["type"] == "metric" and e["run"] == run}
            self.assertLessEqual(BASE, names, run)
        steps = [
            e["step"]
            for e in events
            if e["type"] == "metric" and e["run"] == "sys-run" and e["name"] == "system/cpu_percent"
        ]
        self.assertEqual(steps, list(range(result["after"])))
