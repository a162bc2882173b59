"""
Following TensorBoard logdirs (``trainstream.follow``): the record framing,
the decoding, the follower's state and restarts with a sink in memory; then
as people run it, with event files written by ``torch.utils.tensorboard``
and by tensorboardX while it runs: ``python -m trainstream follow`` against
a ``twistd`` server, and ``twistd trainstream --logdir``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from trainstream.follow.decode import Decoder, load_protos
from trainstream.follow.follower import Follower, State, Stopped, run_name
from trainstream.follow.records import frame, read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PROTOS = load_protos()
#: A point flushed by the writer is on the server within this (the target is 1 s;
#: slack for a loaded 2-core machine).
LATENCY_BOUND = 3.0


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# Event files made by hand (no torch): the protos TensorBoard writes.


def scalar(tag: str, value: float, step: int, wall: float = 1000.0) -> bytes:
    event = PROTOS.event(wall_time=wall + step, step=step)
    event.summary.value.add(tag=tag, simple_value=value)
    return frame(event.SerializeToString())


def new_style_scalar(tag: str, value: float, step: int, first: bool) -> bytes:
    event = PROTOS.event(wall_time=2000.0 + step, step=step)
    v = event.summary.value.add(tag=tag)
    if first:
        v.metadata.plugin_data.plugin_name = "scalars"
    v.tensor.dtype = 1
    v.tensor.float_val.append(value)
    return frame(event.SerializeToString())


def text(tag: str, message: str, step: int) -> bytes:
    event = PROTOS.event(wall_time=3000.0, step=step)
    v = event.summary.value.add(tag=tag)
    v.metadata.plugin_data.plugin_name = "text"
    v.tensor.dtype = 7
    v.tensor.string_val.append(message.encode())
    return frame(event.SerializeToString())


def hparams(params: dict[str, Any]) -> bytes:
    data = PROTOS.hparams_plugin_data(version=0)
    for k, val in params.items():
        if isinstance(val, str):
            data.session_start_info.hparams[k].string_value = val
        elif isinstance(val, bool):
            data.session_start_info.hparams[k].bool_value = val
        else:
            data.session_start_info.hparams[k].number_value = val
    event = PROTOS.event(wall_time=4000.0, step=0)
    v = event.summary.value.add(tag="_hparams_/session_start_info")
    v.metadata.plugin_data.plugin_name = "hparams"
    v.metadata.plugin_data.content = data.SerializeToString()
    v.tensor.dtype = 7
    return frame(event.SerializeToString())


def other_plugin(tag: str, step: int) -> bytes:
    event = PROTOS.event(wall_time=5000.0, step=step)
    v = event.summary.value.add(tag=tag)
    v.metadata.plugin_data.plugin_name = "mesh"
    v.tensor.dtype = 1
    v.tensor.float_val.extend([1.0, 2.0])
    return frame(event.SerializeToString())


def header() -> bytes:
    return frame(PROTOS.event(wall_time=999.0, file_version="brain.Event:2").SerializeToString())


def append(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)


class RecordTests(SynchronousTestCase):
    def test_records_partial_and_damaged(self) -> None:
        """Whole records are read from an offset; a partial one waits; damage is said."""
        records = scalar("a", 1.0, 0) + scalar("a", 2.0, 1)
        got, end, damage = read_records(io.BytesIO(records), 0, 1 << 20)
        self.assertEqual((len(got), end, damage), (2, len(records), None))
        self.assertEqual(got[0][1] + len(scalar("a", 2.0, 1)), end)
        # The writer is mid-flush: the last record is cut anywhere.
        for cut in range(1, len(scalar("a", 2.0, 1))):
            partial = io.BytesIO(records[: len(records) - cut])
            got, end, damage = read_records(partial, 0, 1 << 20)
            self.assertEqual((len(got), damage), (1, None))
            self.assertEqual(end, got[0][1])
        # From the offset of the second record: only it.
        got, _, _ = read_records(io.BytesIO(records), end, 1 << 20)
        self.assertEqual(len(got), 1)
        # A byte changed in the second record's data: the first is kept, the rest said damaged.
        broken = bytearray(records)
        broken[-6] ^= 0xFF
        got, end, damage = read_records(io.BytesIO(bytes(broken)), 0, 1 << 20)
        self.assertEqual(len(got), 1)
        assert damage is not None
        self.assertIn(f"at byte {end}", damage)
        self.assertIn("checksum", damage)
        # The budget: at least one record per call, then stop.
        got, end, _ = read_records(io.BytesIO(records), 0, 1)
        self.assertEqual(len(got), 1)


class DecodeTests(SynchronousTestCase):
    def decode(self, *records: bytes, decoder: Decoder | None = None) -> list[dict[str, Any]]:
        decoder = decoder or Decoder(PROTOS)
        out: list[dict[str, Any]] = []
        for record in records:
            data = read_records(io.BytesIO(record), 0, 1 << 20)[0][0][0]
            out.extend(decoder.events("r", data))
        return out

    def test_every_kind(self) -> None:
        decoder = Decoder(PROTOS)
        events = self.decode(
            header(),
            scalar("train/loss (avg)", 0.5, 3),
            scalar("x", float("nan"), 4),
            new_style_scalar("acc", 0.25, 1, first=True),
            new_style_scalar("acc", 0.5, 2, first=False),  # no metadata: remembered
            text("note", "hello", 7),
            hparams({"lr": 0.1, "opt": "adam", "bn": True}),
            other_plugin("m", 1),
            other_plugin("m", 2),
            decoder=decoder,
        )
        self.assertEqual(
            events[:4],
            [
                {"type": "metric", "run": "r", "time": 1003.0, "name": "train/loss__avg_",
                 "step": 3, "value": 0.5},
                {"type": "metric", "run": "r", "time": 1004.0, "name": "x", "step": 4,
                 "value": "NaN"},
                {"type": "metric", "run": "r", "time": 2001.0, "name": "acc", "step": 1,
                 "value": 0.25},
                {"type": "metric", "run": "r", "time": 2002.0, "name": "acc", "step": 2,
                 "value": 0.5},
            ],
        )  # fmt: skip
        self.assertEqual(events[4]["message"], "note (step 7): hello")
        self.assertEqual(events[5]["params"], {"lr": 0.1, "opt": "adam", "bn": True})
        self.assertEqual(len(events), 6)
        self.assertEqual(decoder.skipped, [("r", "m", "mesh")])  # once per tag
        self.assertEqual(decoder.plugins["r"]["acc"], "scalars")


class FakeSink:
    """A server in memory; ``crash_after_store`` stores a batch, then dies before answering."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.crash_after_store = False
        self.queries = 0

    def identity(self) -> tuple[str, int]:
        return "epoch-1", len(self.events)

    def send(self, events: list[dict[str, Any]]) -> int:
        for event in events:
            self.events.append({**event, "id": len(self.events) + 1})
        if self.crash_after_store:
            raise Stopped("killed after the store, before the answer")
        return len(self.events)

    def stored_since(self, after_id: int, runs: set[str]) -> list[dict[str, Any]]:
        self.queries += 1
        return [e for e in self.events if e["id"] > after_id and e["run"] in runs]

    def points(self) -> Counter[tuple[str, str, int]]:
        return Counter((e["run"], e["name"], e["step"]) for e in self.events if "step" in e)


class FollowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logdir = os.path.join(self.mktemp(), "logs")
        os.makedirs(self.logdir)
        self.state = os.path.join(self.mktemp() + "-state.json")
        self.reports: list[tuple[str, str]] = []

    def follower(self, sink: FakeSink) -> Follower:
        follower = Follower(
            self.logdir, sink, lambda *r: self.reports.append(r), self.state, protos=PROTOS
        )
        follower.start()
        return follower

    def test_runs_files_and_names(self) -> None:
        """Existing runs load; new files and runs are picked up; names are TensorBoard's."""
        train = os.path.join(self.logdir, "exp1", "train", "events.out.tfevents.1.host")
        root = os.path.join(self.logdir, "events.out.tfevents.1.host")
        append(train, header() + scalar("loss", 1.0, 0) + scalar("loss", 0.9, 1))
        append(root, scalar("loss", 5.0, 0))
        append(os.path.join(self.logdir, "exp1", "notes.txt"), b"not an event file")
        sink = FakeSink()
        follower = self.follower(sink)
        follower.poll()
        self.assertEqual(
            sink.points(),
            Counter({("exp1/train", "loss", 0): 1, ("exp1/train", "loss", 1): 1,
                     ("logs", "loss", 0): 1}),
        )  # fmt: skip
        # A new point, a new file in a run (a restarted writer), a new run.
        append(train, scalar("loss", 0.8, 2))
        append(train.replace(".1.host", ".2.host"), scalar("loss", 0.7, 3))
        append(os.path.join(self.logdir, "exp2", "eval", "x.tfevents.9"), scalar("acc", 0.5, 0))
        follower.poll()
        steps = sorted(s for r, n, s in sink.points() if r == "exp1/train")
        self.assertEqual(steps, [0, 1, 2, 3])
        self.assertIn(("exp2/eval", "acc", 0), sink.points())
        self.assertEqual(max(sink.points().values()), 1)
        self.assertEqual(run_name(self.logdir, self.logdir), "logs")

    def test_partial_record_then_damaged_file(self) -> None:
        """A record cut by a flush is read once whole; a damaged file is said once, others go on."""
        good = os.path.join(self.logdir, "a", "events.out.tfevents.1")
        bad = os.path.join(self.logdir, "b", "events.out.tfevents.1")
        record = scalar("loss", 0.5, 1)
        append(good, scalar("loss", 1.0, 0) + record[:7])
        broken = bytearray(scalar("loss", 2.0, 1))
        broken[-5] ^= 0xFF
        append(bad, scalar("loss", 2.0, 0) + bytes(broken) + scalar("loss", 2.0, 2))
        sink = FakeSink()
        follower = self.follower(sink)
        follower.poll()
        append(good, record[7:])
        follower.poll()
        follower.poll()
        self.assertEqual(
            sorted(sink.points()), [("a", "loss", 0), ("a", "loss", 1), ("b", "loss", 0)]
        )
        errors = [m for level, m in self.reports if level == "error"]
        self.assertEqual(len(errors), 1, self.reports)
        self.assertIn(bad, errors[0])
        self.assertIn("damaged", errors[0])
        # Still said damaged after a restart, and not read again.
        append(bad, scalar("loss", 2.0, 3))
        self.follower(sink).poll()
        self.assertEqual(len([m for level, m in self.reports if level == "error"]), 1)

    def test_restart_resumes_and_plugins_are_remembered(self) -> None:
        """A restart reads on from the acknowledged offsets, knowing each tag's plugin."""
        path = os.path.join(self.logdir, "run", "events.out.tfevents.1")
        append(path, new_style_scalar("acc", 0.1, 0, first=True) + scalar("loss", 1.0, 0))
        sink = FakeSink()
        self.follower(sink).poll()
        append(path, new_style_scalar("acc", 0.2, 1, first=False) + scalar("loss", 0.9, 1))
        self.follower(sink).poll()
        self.assertEqual(
            sorted(sink.points()),
            [("run", "acc", 0), ("run", "acc", 1), ("run", "loss", 0), ("run", "loss", 1)],
        )
        self.assertEqual(max(sink.points().values()), 1)
        self.assertEqual(json.load(open(self.state))["pending"], None)

    def test_killed_between_store_and_state(self) -> None:
        """
        Killed after the server stored a batch but before the state moved:
        the restart compares that batch with the server and sends only what
        it lacks (a text line too; points at the same step at another time are kept).
        """
        path = os.path.join(self.logdir, "run", "events.out.tfevents.1")
        append(path, scalar("loss", 1.0, 0) + scalar("loss", 0.9, 1))
        sink = FakeSink()
        self.follower(sink).poll()
        # The next batch: stored, then the follower dies before it saves.
        append(path, scalar("loss", 0.8, 2) + text("note", "hi", 2) + scalar("loss", 0.7, 3))
        sink.crash_after_store = True
        self.assertRaises(Stopped, self.follower(sink).poll)
        self.assertIsNotNone(json.load(open(self.state))["pending"])
        sink.crash_after_store = False
        # Written while it was down: a rewind to step 2 (same step, another time) and more.
        append(path, scalar("loss", 0.5, 2, wall=1500.0) + scalar("loss", 0.4, 4))
        restarted = self.follower(sink)
        restarted.poll()
        self.assertEqual(restarted.deduplicated, 3)
        self.assertEqual([e["type"] for e in sink.events].count("log"), 1)
        counts = sink.points()
        self.assertEqual(
            counts,
            Counter({("run", "loss", 0): 1, ("run", "loss", 1): 1, ("run", "loss", 2): 2,
                     ("run", "loss", 3): 1, ("run", "loss", 4): 1}),
        )  # fmt: skip
        self.assertEqual(json.load(open(self.state))["pending"], None)
        # Without a crash, nothing is compared.
        queries = sink.queries
        append(path, scalar("loss", 0.3, 5))
        restarted.poll()
        self.assertEqual(sink.queries, queries)

    def test_another_history_gets_everything(self) -> None:
        path = os.path.join(self.logdir, "run", "events.out.tfevents.1")
        append(path, scalar("loss", 1.0, 0))
        sink = FakeSink()
        self.follower(sink).poll()
        state = State.load(self.state, self.logdir, "another-epoch")
        self.assertEqual(state.offsets, {})


class WriterFilesTests(SynchronousTestCase):
    """What the real writers put in event files, as the follower reads it."""

    def read(self, kind: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        import numpy as np

        if kind == "torch":
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        logdir = os.path.join(self.mktemp(), "runs")
        w = SummaryWriter(os.path.join(logdir, "exp1", "train"))
        for step in range(3):
            w.add_scalar("loss", 1.0 / (step + 1), step)
        if kind == "torch":
            w.add_scalar("acc", 0.5, 2, new_style=True)
        w.add_text("note", "hello", 1)
        w.add_histogram("weights", np.arange(100.0), 2)
        w.add_image("img", np.zeros((3, 4, 5)), 2)
        w.add_pr_curve("pr", np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.6, 0.4]), 2)
        w.add_custom_scalars({"Losses": {"both": ["Multiline", ["loss", "acc"]]}})
        w.add_hparams({"lr": 0.1, "opt": "adam"}, {"hp/acc": 0.9})
        w.close()
        reports: list[tuple[str, str]] = []
        sink = FakeSink()
        state = os.path.join(self.mktemp() + ".json")
        follower = Follower(logdir, sink, lambda *r: reports.append(r), state, protos=PROTOS)
        follower.start()
        while follower.poll():
            pass
        return sink.events, reports

    def check(self, kind: str) -> None:
        events, reports = self.read(kind)
        by_type = Counter(e["type"] for e in events)
        metrics = [(e["run"], e["name"], e["step"]) for e in events if e["type"] == "metric"]
        expected = [("exp1/train", "loss", s) for s in range(3)]
        if kind == "torch":
            expected.append(("exp1/train", "acc", 2))
        self.assertEqual([m for m in metrics if m[1] != "hp/acc"], expected)
        # add_hparams: the params and their metrics in a sub-run, as TensorBoard shows them.
        (hp,) = [e for e in events if e["type"] == "hparams"]
        self.assertEqual(hp["params"], {"lr": 0.1, "opt": "adam"})
        self.assertTrue(str(hp["run"]).startswith("exp1/train/"), hp)
        self.assertIn((hp["run"], "hp/acc", 0), metrics)
        (log,) = [e for e in events if e["type"] == "log"]
        self.assertIn("(step 1): hello", log["message"])
        self.assertEqual((by_type["histogram"], by_type["image"]), (1, 1), (by_type, reports))
        (image,) = [e for e in events if e["type"] == "image"]
        self.assertEqual((image["name"], image["step"], image["width"]), ("img", 2, 5))
        (histogram,) = [e for e in events if e["type"] == "histogram"]
        self.assertEqual((histogram["min"], histogram["max"], histogram["num"]), (0, 99, 100))
        (curve,) = [e for e in events if e["type"] == "pr_curve"]
        self.assertEqual((curve["name"], curve["step"], len(curve["thresholds"])), ("pr", 2, 127))
        self.assertEqual((curve["recall"][0], curve["recall"][-1]), (1.0, 0.0))
        (layout,) = [e for e in events if e["type"] == "layout"]
        self.assertEqual(layout["layout"], {"Losses": {"both": ["Multiline", ["loss", "acc"]]}})
        self.assertEqual([r for r in reports if r[0] != "info"], [])

    def test_torch(self) -> None:
        self.check("torch")

    def test_tensorboardx(self) -> None:
        self.check("tensorboardX")


# Processes: a twistd server, writers, the follow command.

WRITER = textwrap.dedent(
    """
    import glob, os, sys, time
    from trainstream.follow.decode import load_protos
    from trainstream.follow.records import read_records
    kind, logdir = sys.argv[1], sys.argv[2]
    if kind == "torch":
        from torch.utils.tensorboard import SummaryWriter
    else:
        from tensorboardX import SummaryWriter
    Event = load_protos().event
    writers = {}

    def on_disk(run, step):
        # tensorboardX's flush() does not wait for its queue: its worker
        # thread writes later. The time a point is flushed is when the file has it.
        for path in glob.glob(os.path.join(logdir, run, "*tfevents*")):
            with open(path, "rb") as f:
                records = read_records(f, 0, 1 << 30)[0]
            if any(Event.FromString(data).step == step for data, _ in records):
                return True
        return False

    print("ready", flush=True)
    for line in sys.stdin:
        cmd, run, first, end = line.split()
        w = writers.get(run) or writers.setdefault(run, SummaryWriter(logdir + "/" + run))
        for step in range(int(first), int(end)):
            w.add_scalar("loss", 1.0 / (step + 1), step)
        deadline = time.monotonic() + 30
        while True:
            w.flush()
            if on_disk(run, int(end) - 1) or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        print("flushed", time.time(), flush=True)
    """
)


class Proc:
    """A child process, stopped by its pid in the test's cleanup."""

    def __init__(self, test: SynchronousTestCase, args: list[str], **popen: Any) -> None:
        self.proc = subprocess.Popen(args, **popen)
        test.addCleanup(self.stop)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def wait_until(what: str, check: Any, timeout: float = 60.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


class Processes(SynchronousTestCase):
    """A twistd server, writers and the follow command, each stopped by its pid."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.base = base
        self.logdir = os.path.join(base, "logs")
        os.makedirs(self.logdir)
        self.env = child_env(XDG_DATA_HOME=os.path.join(base, "xdg"))

    def server(self, *args: str) -> tuple[Proc, str]:
        ports = os.path.join(self.base, f"ports-{time.monotonic_ns()}.json")
        log = open(os.path.join(self.base, "twistd.log"), "ab")
        self.addCleanup(log.close)
        proc = Proc(
            self,
            [TWISTD, "-n", "--pidfile=", "trainstream", "--listen", "tcp:0:interface=127.0.0.1",
             "--ports-file", ports, *args],
            env=self.env, cwd=self.base, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until("the server listens", lambda: os.path.exists(ports), 60, 0.05)
        with open(ports) as f:
            url = json.load(f)["rest"][: -len("/api")]
        return proc, url

    def follow(self, url: str) -> Proc:
        log = open(os.path.join(self.base, "follow.log"), "ab")
        self.addCleanup(log.close)
        return Proc(
            self,
            [sys.executable, "-m", "trainstream", "follow", self.logdir, "--url", url,
             "--state", os.path.join(self.base, "follow-state.json")],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def writer(self, kind: str) -> Any:
        proc = Proc(
            self,
            [sys.executable, "-c", WRITER, kind, self.logdir],
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.assertEqual(proc.proc.stdout.readline().strip(), "ready")  # type: ignore[union-attr]

        def command(line: str) -> str:
            proc.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
            proc.proc.stdin.flush()  # type: ignore[union-attr]
            return proc.proc.stdout.readline().strip()  # type: ignore[union-attr]

        return command

    def last_step(self, url: str, run: str) -> int:
        info = get(f"{url}/api/runs/{quote(run, safe='')}")
        if info is None or "loss" not in info["metrics"]:
            return -1
        return int(info["metrics"]["loss"]["last_step"])

    def steps(self, url: str, run: str) -> list[int]:
        body = get(
            f"{url}/api/runs/{quote(run, safe='')}/metrics/loss?segments=all&max_points=100000"
        )
        return sorted(p[0] for p in body["points"])


class LiveTests(Processes):
    """Writers flush while a follower runs: the points reach the server, once each."""

    def live(self, kind: str, mode: str) -> None:
        """
        ``mode`` ``cli``: ``python -m trainstream follow`` against a server
        (--memory), killed with SIGKILL and started again; ``server``:
        ``twistd trainstream --logdir`` (a history file), killed and started
        again on the same file.
        """
        write = self.writer(kind)
        self.assertTrue(write("write exp1/train 0 5").startswith("flushed"))
        db = os.path.join(self.base, "history.sqlite3")
        if mode == "cli":
            server, url = self.server("--memory")
            follower = self.follow(url)
        else:
            server, url = self.server("--db", db, "--logdir", self.logdir)
            follower = server
        # The existing points are loaded.
        wait_until("existing points", lambda: self.last_step(url, "exp1/train") == 4)
        # New points, each seen within the bound of its flush.
        latencies = []
        for step in range(5, 15):
            flushed = float(write(f"write exp1/train {step} {step + 1}").split()[1])
            wait_until(f"step {step}", lambda s=step: self.last_step(url, "exp1/train") == s, 10)
            latencies.append(time.time() - flushed)
        median = statistics.median(latencies)
        print(f"{kind}/{mode}: flush to REST, median {median:.3f} s, max {max(latencies):.3f} s")
        self.assertLess(max(latencies), LATENCY_BOUND, latencies)
        # A new run.
        write("write exp2/train 0 3")
        wait_until("a new run", lambda: self.last_step(url, "exp2/train") == 2, 10)
        # Killed (SIGKILL), written to meanwhile, started again: none twice, none missing.
        follower.stop(signal.SIGKILL)
        write("write exp1/train 15 20")
        write("write exp2/train 3 5")
        if mode == "cli":
            follower = self.follow(url)
        else:
            server, url = self.server("--db", db, "--logdir", self.logdir)
        wait_until("points written while down", lambda: self.last_step(url, "exp1/train") == 19)
        wait_until("the new run's too", lambda: self.last_step(url, "exp2/train") == 4)
        self.assertEqual(self.steps(url, "exp1/train"), list(range(20)))
        self.assertEqual(self.steps(url, "exp2/train"), list(range(5)))
        info = get(f"{url}/api/runs/{quote('exp1/train', safe='')}")
        self.assertEqual(info["metrics"]["loss"]["count"], 20)
        # No false "resumed from a checkpoint": no rewind status was ever made.
        events = get(f"{url}/api/events?after=0&type=status&limit=1000")["events"]
        self.assertEqual([e for e in events if "rewind_to" in e], [])

    def test_torch_writer_cli(self) -> None:
        self.live("torch", "cli")

    def test_tensorboardx_writer_cli(self) -> None:
        self.live("tensorboardX", "cli")

    def test_torch_writer_server_logdir(self) -> None:
        self.live("torch", "server")

    def test_tensorboardx_writer_server_logdir(self) -> None:
        self.live("tensorboardX", "server")


class HTTPSinkTests(Processes):
    """The follow command's sink against a real server (no writer process)."""

    def test_killed_between_store_and_state(self) -> None:
        """
        The server stored a batch (200) but the follower died before saving
        its state: the restarted follower asks the server (REST, every
        segment) and sends only the points it lacks.
        """
        import threading

        from trainstream.follow.sinks import HTTPSink

        _, url = self.server("--memory")
        path = os.path.join(self.logdir, "exp", "events.out.tfevents.1")
        append(path, scalar("loss", 1.0, 0) + scalar("loss", 0.9, 1))
        state = os.path.join(self.base, "state.json")

        class Killed(HTTPSink):
            def send(self, events: list[dict[str, Any]]) -> int | None:
                super().send(events)
                raise KeyboardInterrupt("killed after the 200, before the state")

        def follower(sink_class: type[HTTPSink]) -> Follower:
            stop = threading.Event()
            sink = sink_class(url, None, lambda *r: None, stop)
            self.addCleanup(sink.close)
            f = Follower(self.logdir, sink, lambda *r: None, state, protos=PROTOS, stop=stop)
            f.start()
            return f

        follower(HTTPSink).poll()
        append(path, scalar("loss", 0.8, 2) + text("note", "once", 2) + scalar("loss", 0.7, 3))
        self.assertRaises(KeyboardInterrupt, follower(Killed).poll)
        append(path, scalar("loss", 0.6, 4))
        restarted = follower(HTTPSink)
        restarted.poll()
        self.assertEqual((restarted.deduplicated, restarted.sent), (3, 1))
        body = get(f"{url}/api/runs/exp/metrics/loss?segments=all")
        self.assertEqual([p[0] for p in body["points"]], [0, 1, 2, 3, 4])
        logs = get(f"{url}/api/events?after=0&type=log")["events"]
        self.assertEqual([e["message"] for e in logs], ["note (step 2): once"])

    def test_refused_token_is_one_line(self) -> None:
        _, url = self.server("--memory", "--token", "s3cret")
        result = subprocess.run(
            [sys.executable, "-m", "trainstream", "follow", self.logdir, "--url", url,
             "--state", os.path.join(self.base, "s.json")],
            env=child_env(TRAINSTREAM_TOKEN=""), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("trainstream follow: HTTP 401", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class OnceTests(SynchronousTestCase):
    def test_once_gives_up_on_a_server_that_stays_down(self) -> None:
        """
        ``follow --once`` (a script's, a cron job's) exits 1 with one line
        once the server has been unreachable for its patience; it retried
        forever before.
        """
        import socket

        from trainstream.cli.follow import FollowOptions, run_follow

        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        logdir = self.mktemp()
        os.makedirs(os.path.join(logdir, "exp"))
        append(os.path.join(logdir, "exp", "events.out.tfevents.1"), scalar("loss", 1.0, 0))
        options = FollowOptions(
            logdir,
            url=f"http://127.0.0.1:{port}",
            state=os.path.join(logdir, "state.json"),
            once=True,
            patience=1.0,
        )
        err = io.StringIO()
        started = time.monotonic()
        code = run_follow(options, err)
        took = time.monotonic() - started
        self.assertEqual(code, 1, err.getvalue())
        self.assertIn(f"server http://127.0.0.1:{port}: unreachable", err.getvalue())
        self.assertIn("gave up after 1 s", err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        self.assertLess(took, 10)


class ServiceTests(TestCase):
    """``--logdir`` in one process: the follow service on a server with a history file."""

    def test_service_follows_restarts_and_deduplicates(self) -> Deferred[None]:
        from twisted.internet import reactor

        from trainstream.server import StreamServer

        logdir = os.path.join(os.path.abspath(self.mktemp()), "logs")
        path = os.path.join(logdir, "exp", "train", "events.out.tfevents.1")
        append(path, scalar("loss", 1.0, 0) + scalar("loss", 0.9, 1))
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        # The service keeps its state in the user's data dir: a temporary one.
        self.patch(os, "environ", {**os.environ, "XDG_DATA_HOME": os.path.abspath(self.mktemp())})
        config = {"listen": "tcp:0:interface=127.0.0.1", "db": db, "logdir": logdir}
        server = StreamServer(config, reactor)
        self.addCleanup(server.stop)

        def steps() -> list[int]:
            return [p[0] for p in server.store.series("exp/train", "loss")]

        async def until(what: str, check: Any) -> None:
            deadline = time.monotonic() + 30
            while not check():
                if time.monotonic() > deadline:
                    raise AssertionError(f"not within 30 s: {what}")
                d: Deferred[None] = Deferred()
                reactor.callLater(0.02, d.callback, None)
                await d

        async def go() -> None:
            await server.start()
            service = server.getServiceNamed("follow")
            await until("the existing points", lambda: steps() == [0, 1])
            await server.stop()  # the round under way ends before the history closes
            self.assertFalse(service.running)
            await server.start()
            append(path, scalar("loss", 0.8, 2))
            await until("a new point after a restart", lambda: steps() == [0, 1, 2])
            # The next batch is committed, then its state cannot be saved (as
            # if killed there): the next round compares it with the store.
            follower = service.follower
            acknowledge = follower.acknowledge
            failed: list[bool] = []

            def fail_once(read: Any) -> None:
                if not failed:
                    failed.append(True)
                    raise OSError("disk full (the test)")
                acknowledge(read)

            follower.acknowledge = fail_once
            append(path, scalar("loss", 0.7, 3) + text("t", "once", 3) + scalar("loss", 0.6, 4))
            await until(
                "the batch, then the retry", lambda: failed and follower.state.pending is None
            )
            self.assertEqual(follower.deduplicated, 3)
            logs = server.store.after(0, lambda r: r.type == "log")
            self.assertEqual([r.event["message"] for r in logs], ["t (step 3): once"])
            append(path, scalar("loss", 0.5, 5))
            await until("the next point", lambda: steps()[-1:] == [5])
            self.assertEqual(steps(), [0, 1, 2, 3, 4, 5])

        return Deferred.fromCoroutine(go())
