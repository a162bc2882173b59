"""
Benchmark: what ``run.log()`` costs the training thread (targets: median
<= 1 us for one scalar, <= 5 us for a dict of ten), against a bare
``deque.append`` and the creation of one event dict, all in one process run.

The server is the real embedded one (``get_stream_server``, reactor in
crochet's thread). Each sample times a batch of calls with
``perf_counter_ns`` and divides; cases are interleaved round by round so
they share the machine's noise, and ``run.flush()`` (not timed) between
batches starts each batch with an idle reactor, as a burst of logging in a
training step would. It prints figures and never fails on speed::

    PYTHONPATH=. .venv/bin/python bench/log_cost.py [--quick] [--rounds N] [--batch N]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from _common import machine_lines, percentile, source_lines, use_tree

LISTEN = "tcp:0:interface=127.0.0.1"
TEN = [f"train/m{i}" for i in range(10)]


def per_call_ns(fn: Callable[[int], None], batch: int) -> float:
    """Nanoseconds per call of ``fn(i)``, over one batch of ``batch`` calls."""
    t0 = time.perf_counter_ns()
    for i in range(batch):
        fn(i)
    return (time.perf_counter_ns() - t0) / batch


def cases(run: Any) -> dict[str, tuple[Callable[[int], None], int]]:
    """Each case: a function of the step, and the events one call queues."""
    queue: deque[object] = deque()
    one = {"train/loss": 0.5}
    ten = dict.fromkeys(TEN, 0.5)

    def loop_only(i: int) -> None:
        pass

    def deque_append(i: int) -> None:
        queue.append(i)
        if len(queue) > 10_000:
            queue.clear()

    def event_dict(i: int) -> None:
        queue.append(
            {"type": "metric", "run": "bench", "time": 0.0, "name": "n", "step": i, "value": 0.5}
        )
        if len(queue) > 10_000:
            queue.clear()

    steps = itertools.count()  # steps only go up, as in training (a step going back is a rewind)

    def log_one(i: int) -> None:
        run.log(one, step=next(steps))

    def log_ten(i: int) -> None:
        run.log(ten, step=next(steps))

    return {
        "loop + call only": (loop_only, 0),
        "deque.append": (deque_append, 0),
        "event dict + append": (event_dict, 0),
        "run.log(1 scalar)": (log_one, 1),
        "run.log(dict of 10)": (log_ten, 10),
        HELD + "run.log(1 scalar)": (log_one, 1),
        HELD + "run.log(dict of 10)": (log_ten, 10),
    }


HELD = "held: "


@contextmanager
def reactor_held(reactor: Any) -> Iterator[None]:
    """
    Keep the reactor thread blocked (off the GIL) for the block: what the
    training thread's own work costs, without the publishing it triggers
    competing for the GIL.
    """
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    reactor.callFromThread(hold)
    entered.wait(30)
    try:
        yield
    finally:
        release.set()


class GcTimer:
    """Counts the garbage collector's pauses (they land on whichever thread allocates)."""

    def __init__(self) -> None:
        self.pauses_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses_ms[info["generation"]].append((time.perf_counter() - self._t0) * 1000)

    def line(self) -> str:
        parts = [
            f"gen{g}: {len(v)} x, max {max(v, default=0.0):.2f} ms, total {sum(v):.1f} ms"
            for g, v in self.pauses_ms.items()
        ]
        return "  GC pauses during the rounds: " + "; ".join(parts)


def single_calls(server: Any, run: Any, n: int) -> dict[str, list[float]]:
    """
    One call at a time, each after ``flush()`` (reactor idle, not timed): every
    call then wakes the reactor, as one ``log()`` per training step does.
    """
    one = {"train/loss": 0.5}
    ten = dict.fromkeys(TEN, 0.5)
    wake = server.reactor.callFromThread
    first = 10**9  # above every step the rounds logged
    out: dict[str, list[float]] = {
        "callFromThread(noop)": [],
        "run.log(1 scalar)": [],
        "run.log(dict of 10)": [],
    }
    calls: list[tuple[list[float], Callable[[int], object]]] = [
        (out["callFromThread(noop)"], lambda i: wake(_noop)),
        (out["run.log(1 scalar)"], lambda i: run.log(one, step=first + i)),
        (out["run.log(dict of 10)"], lambda i: run.log(ten, step=first + i)),
    ]
    clock = time.perf_counter_ns
    for i in range(n):
        for samples, call in calls:
            run.flush()
            t0 = clock()
            call(i)
            samples.append(float(clock() - t0))
    run.flush()
    return out


def _noop() -> None:
    pass


def show(label: str, samples: list[float]) -> str:
    return (
        f"  {label:<27} n={len(samples):<5} median={percentile(samples, 50) / 1000:7.3f}  "
        f"p90={percentile(samples, 90) / 1000:7.3f}  p99={percentile(samples, 99) / 1000:7.3f}  "
        f"max={max(samples) / 1000:7.3f}  min={min(samples) / 1000:7.3f}  (us/call)"
    )


def top(profile: cProfile.Profile, limit: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join("    " + line for line in lines[start:] if line.strip())


def profile_run(server: Any, run: Any, calls: int, reactor_call: Any) -> None:
    """cProfile a scalar-heavy run: the training thread, and the reactor thread apart."""
    training = cProfile.Profile()
    reactor_side = cProfile.Profile()
    reactor_call(reactor_side.enable)
    t0 = time.perf_counter()
    training.enable()
    for i in range(calls):
        run.log({"train/loss": 0.5}, step=2 * 10**9 + i)
        if i % 1000 == 999:
            run.flush()
    run.flush()
    training.disable()
    elapsed = time.perf_counter() - t0
    reactor_call(reactor_side.disable)
    print(f"\nprofile: {calls} run.log(1 scalar) calls + flush every 1000 in {elapsed:.2f} s")
    print("  training thread, top 10 by tottime:")
    print(top(training, 10))
    print("  reactor thread (publishing what was queued), top 10 by tottime:")
    print(top(reactor_side, 10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="samples per case (300)")
    parser.add_argument("--batch", type=int, default=1000, help="calls per sample (1000)")
    parser.add_argument("--single", type=int, default=3000, help="single timed calls (3000)")
    parser.add_argument("--profile-calls", type=int, default=100_000, help="(100000)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batch, args.profile_calls, args.single = 30, 200, 10_000, 300
    use_tree()
    import crochet

    import trainstream
    from trainstream.embedded import get_stream_server, release_stream_server

    print("log_cost: run.log() on the training thread")
    for line in [*machine_lines(), *source_lines(trainstream.__file__)]:
        print("  " + line)
    print(f"  rounds={args.rounds} batch={args.batch} (one sample = one batch, per call)")
    print(f"  '{HELD}': the reactor thread is kept blocked during the batch (no GIL contention)")

    server = get_stream_server({"sse": LISTEN, "ws": LISTEN, "rest": LISTEN, "memory": True})

    def reactor_call(fn: Callable[[], object]) -> None:
        crochet.run_in_reactor(fn)().wait(10)

    try:
        run = server.run("bench")
        run.flush()
        first_id = server.hub.last_id
        table = cases(run)
        samples: dict[str, list[float]] = {label: [] for label in table}
        expected = 0
        for fn, _ in table.values():  # warm-up, not counted
            per_call_ns(fn, args.batch)
            run.flush()
        expected += sum(k for _, k in table.values()) * args.batch
        gc.collect()
        t0 = time.perf_counter()
        with GcTimer() as gc_timer:
            for _ in range(args.rounds):
                for label, (fn, events) in table.items():
                    if label.startswith(HELD):
                        with reactor_held(server.reactor):
                            samples[label].append(per_call_ns(fn, args.batch))
                    else:
                        samples[label].append(per_call_ns(fn, args.batch))
                    expected += events * args.batch
                    if events:
                        run.flush()
        elapsed = time.perf_counter() - t0
        run.flush()
        print(f"\nper call, {elapsed:.1f} s of rounds (cases interleaved):")
        for label, values in samples.items():
            print(show(label, values))
        print(gc_timer.line())
        with GcTimer() as gc_single:
            singles = single_calls(server, run, args.single)
        expected += 11 * args.single
        got = server.hub.last_id - first_id
        print(f"one call at a time, each waking the reactor ({args.single} each, timed singly):")
        for label, values in singles.items():
            print(show(label, values))
        print(gc_single.line().replace("the rounds", "these calls"))
        for prefix in ("", HELD):
            one = percentile(samples[prefix + "run.log(1 scalar)"], 50) / 1000
            ten = percentile(samples[prefix + "run.log(dict of 10)"], 50) / 1000
            print(
                f"  target{', ' + prefix[:-2] if prefix else ''}: 1 scalar median <= 1 us: "
                f"{one:.3f} us ({'met' if one <= 1 else 'NOT met'}); dict of 10 <= 5 us: "
                f"{ten:.3f} us ({'met' if ten <= 5 else 'NOT met'})"
            )
        print(
            f"  events: {expected} logged, {got} stored after flush "
            f"({'all arrived' if got == expected else 'MISMATCH'}); "
            f"reactor wake-ups: {server.inbox.wakeups}"
        )
        profile_run(server, run, args.profile_calls, reactor_call)
    finally:
        release_stream_server()
    return 0


if __name__ == "__main__":
    sys.exit(main())
