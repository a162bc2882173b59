"""
Benchmark: how much logging slows a real training loop, that of
``examples/train_torch.py`` (a small MLP on CPU, batch 128), logging three
scalars per step (``train/loss``, ``train/acc``, ``lr``) with:

- ``none``: no logging (the baseline);
- ``embedded``: trainstream's embedded server, one ``run.log({...3})`` per step;
- ``remote``: ``trainstream.client.Publisher`` to a ``twistd trainstream``
  subprocess (another process on this machine), one ``log`` per step;
- ``ts-writer``: trainstream's drop-in ``SummaryWriter`` (remote), 3 ``add_scalar``;
- ``torch-tb``: ``torch.utils.tensorboard.SummaryWriter``, 3 ``add_scalar``;
- ``tensorboardX``: ``tensorboardX.SummaryWriter``, 3 ``add_scalar``;
- ``embedded-old``, ``remote-old`` (only when asked for in ``--modes``): the
  same as ``embedded`` and ``remote`` with the timing rule of before adaptive
  batching put back (every batch held 50 ms; every POST after a 0.25 s
  linger), for before/after figures in one run.

All in one process run; the modes are interleaved, round by round, so they
share the machine's noise. A step's time runs from one step's end to the
next's, logging included. The flush/close after each loop is timed apart
(it is not part of the loop). torch runs on one thread by default
(``--threads``), which makes step times stable on a shared machine.
It prints figures and never fails on speed::

    PYTHONPATH=. .venv/bin/python bench/overhead.py [--steps 2000] [--rounds 3]
        [--cycles 30 [--block 200]]

``--cycles C`` adds a finer pairing, for a machine whose speed drifts within
a round: one training loop in which the modes take turns, ``--block``
steps each (the turn order rotating), ``C`` times round; every mode's
logger is open throughout. The first ``SETTLE`` steps of each turn are not
counted (the previous mode's batch may still be in the reactor). It prints
each mode's median step over its turns and the slowdown paired turn by turn
with the ``none`` turn of the same cycle (``embedded-old`` cannot take part:
it changes the one embedded server's timing rule).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import (
    REPO_ROOT,
    machine_lines,
    old_publisher,
    percentile,
    plugin_on_path,
    source_lines,
    use_old_inbox,
    use_tree,
)

use_tree()
sys.path.insert(0, str(REPO_ROOT / "examples"))

import torch  # noqa: E402
import train_torch  # noqa: E402

import trainstream  # noqa: E402
from trainstream.client import Publisher  # noqa: E402
from trainstream.integrations.tensorboard import SummaryWriter  # noqa: E402

Log = Callable[[int, float, float, float], None]
MODES = ["none", "embedded", "remote", "ts-writer", "torch-tb", "tensorboardX"]
#: Accepted by --modes too: before adaptive batching.
OLD_MODES = ["embedded-old", "remote-old"]


@contextmanager
def logger(mode: str, name: str, env: dict[str, Any]) -> Iterator[tuple[Log, list[Any]]]:
    """The per-step log function of a mode, and (filled on exit) the close time."""
    closing: list[Any] = []
    log: Log
    if mode == "none":

        def log(step: int, loss: float, acc: float, lr: float) -> None:
            pass

        yield log, closing
        return
    if mode in ("embedded", "remote", "embedded-old", "remote-old"):
        restore = None
        if mode == "embedded":
            run: Any = env["server"].run(name)
        elif mode == "embedded-old":
            restore = use_old_inbox(env["server"].inbox)
            run = env["server"].run(name)
        elif mode == "remote":
            run = Publisher(env["url"], name, flush_at_exit=0)
        else:
            run = old_publisher(env["url"], name, flush_at_exit=0)
        run.status("running")

        def log(step: int, loss: float, acc: float, lr: float) -> None:
            run.log({"train/loss": loss, "train/acc": acc, "lr": lr}, step)

        yield log, closing
        t0 = time.perf_counter()
        run.finish()
        if mode.startswith("embedded"):
            run.flush()
        elif not run.close(60):
            raise SystemExit(f"remote: not everything was stored: {run.last_error}")
        closing.append(time.perf_counter() - t0)
        if restore is not None:
            restore()
        return
    if mode == "ts-writer":
        writer: Any = SummaryWriter(url=env["url"], run=name)
    elif mode == "torch-tb":
        from torch.utils.tensorboard import SummaryWriter as TorchWriter

        writer = TorchWriter(log_dir=str(Path(env["tmp"]) / name))
    else:
        from tensorboardX import SummaryWriter as XWriter

        writer = XWriter(logdir=str(Path(env["tmp"]) / name))
    add = writer.add_scalar

    def log(step: int, loss: float, acc: float, lr: float) -> None:
        add("train/loss", loss, step)
        add("train/acc", acc, step)
        add("lr", lr, step)

    yield log, closing
    t0 = time.perf_counter()
    writer.close()
    closing.append(time.perf_counter() - t0)


class Loop:
    """One loop's figures, in ms: wall time of each step, CPU per step, flush/close after."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.log_us: list[float] = []  # each log call's own time, on the training thread
        self.thread_cpu = 0.0
        self.process_cpu = 0.0
        self.close = 0.0


def measure(mode: str, steps: int, name: str, env: dict[str, Any]) -> Loop:
    """One loop of ``steps`` training steps logged by ``mode``."""
    loop = Loop()
    times = loop.times
    log_us = loop.log_us
    ns = time.perf_counter_ns
    with logger(mode, name, env) as (log, closing):
        last = [0.0]

        def timed(step: int, loss: float, acc: float, lr: float) -> None:
            started = ns()
            log(step, loss, acc, lr)
            log_us.append((ns() - started) / 1000.0)
            now = time.perf_counter()
            if step:
                times.append((now - last[0]) * 1000.0)
            last[0] = now

        gc.collect()
        thread0, process0 = time.thread_time(), time.process_time()
        last[0] = time.perf_counter()
        train_torch.train(steps, timed)
        loop.thread_cpu = (time.thread_time() - thread0) * 1000.0 / steps
        loop.process_cpu = (time.process_time() - process0) * 1000.0 / steps
    loop.close = closing[0] * 1000.0 if closing else 0.0
    return loop


#: Steps at the start of each interleaved turn that are not counted.
SETTLE = 20


def interleaved(modes: list[str], block: int, cycles: int, env: dict[str, Any]) -> None:
    """One loop, the modes taking turns of ``block`` steps (see the module's text)."""
    from contextlib import ExitStack

    order = [m for m in modes if m != "embedded-old"]
    if order[0] != "none":
        order.insert(0, "none")
    turns: dict[str, list[list[float]]] = {m: [] for m in order}
    with ExitStack() as stack:
        logs = {m: stack.enter_context(logger(m, f"interleaved-{m}", env))[0] for m in order}
        plan = [
            order[(c + i) % len(order)] for c in range(cycles) for i in range(len(order))
        ]  # rotating, so no mode always follows the same one
        state = {"turn": -1, "last": 0.0}
        ns = time.perf_counter

        def timed(step: int, loss: float, acc: float, lr: float) -> None:
            turn, k = divmod(step, block)
            mode = plan[turn]
            if turn != state["turn"]:
                state["turn"] = turn
                turns[mode].append([])
            logs[mode](step, loss, acc, lr)
            now = ns()
            if k >= SETTLE:
                turns[mode][-1].append((now - state["last"]) * 1000.0)
            state["last"] = now

        gc.collect()
        state["last"] = ns()
        train_torch.train(len(plan) * block, timed)
    print(
        f"\n  interleaved: one loop, turns of {block} steps ({SETTLE} not counted) x "
        f"{len(order)} modes x {cycles} cycles"
    )
    base = turns["none"]
    for mode in order:
        pooled = [t for turn in turns[mode] for t in turn]
        line = f"    {mode:<13} median {statistics.median(pooled):6.3f} ms/step"
        if mode != "none":
            r = sorted(
                statistics.median(a) / statistics.median(b)
                for a, b in zip(turns[mode], base, strict=True)
            )
            q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
            line += f"   / none paired by cycle x{statistics.median(r):5.3f} ({q1:.2f}-{q3:.2f})"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--cycles", type=int, default=0, help="interleaved turns, each mode once per cycle (0: off)"
    )
    parser.add_argument("--block", type=int, default=200, help="steps per interleaved turn")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, the first is the baseline (default all of: {', '.join(MODES)}; "
        f"also {', '.join(OLD_MODES)})",
    )
    args = parser.parse_args()
    plugin_on_path()  # the remote modes' twistd finds the plugin of this tree
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES + OLD_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}: choose from {MODES + OLD_MODES}")
    torch.set_num_threads(args.threads)

    from _stream import ServerProcess

    for line in machine_lines():
        print(line)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} thread(s))")
    for line in source_lines(trainstream.__file__):
        print(line)
    print(f"{args.steps} steps x {args.rounds} rounds, modes interleaved: {', '.join(modes)}")

    remote = ServerProcess()
    tmp = tempfile.TemporaryDirectory(prefix="trainstream-overhead-")
    server = trainstream.get_stream_server({"listen": "tcp:0:interface=127.0.0.1", "memory": True})
    env = {"server": server, "url": remote.urls["rest"], "tmp": tmp.name}
    loops: dict[str, list[Loop]] = {m: [] for m in modes}
    try:
        measure("none", min(args.steps, 300), "warmup", env)
        for r in range(args.rounds):
            for mode in modes:
                loops[mode].append(measure(mode, args.steps, f"overhead-{mode}-{r}", env))
            print(
                f"  round {r + 1}: median ms/step "
                + ", ".join(f"{m}={statistics.median(loops[m][-1].times):.3f}" for m in modes),
                flush=True,
            )
        if args.cycles > 0:
            interleaved(modes, max(args.block, SETTLE + 10), args.cycles, env)
    finally:
        trainstream.release_stream_server()
        code = remote.stop()
        tmp.cleanup()
    report(loops, modes)
    problems = remote.problems()
    print(f"  twistd exited {code} (-15: our SIGTERM); server log problems: {len(problems)}")
    for line in problems[:5]:
        print("   ", line)


def report(loops: dict[str, list[Loop]], modes: list[str]) -> None:
    """One line per mode; ratios are to the first mode (``none``)."""
    rows = {}
    for mode in modes:
        pooled = [t for loop in loops[mode] for t in loop.times]
        rows[mode] = (
            statistics.median(pooled),
            min(statistics.median(loop.times) for loop in loops[mode]),
            statistics.mean(pooled),
            statistics.median(loop.thread_cpu for loop in loops[mode]),
            statistics.median(loop.process_cpu for loop in loops[mode]),
            percentile(pooled, 90),
            statistics.median(loop.close for loop in loops[mode]),
        )
    base = rows[modes[0]]
    print()
    print(f"  ms per step; (xN) = ratio to {modes[0]!r}, the slowdown of the training loop")
    print(
        f"  {'mode':<13} {'median':>15} {'best round':>15} {'mean':>15} "
        f"{'train-thread CPU':>17} {'process CPU':>15} {'p90':>7}  close"
    )
    for mode in modes:
        row = rows[mode]
        cells = [f"{row[i]:6.3f} (x{row[i] / base[i]:4.2f})" for i in range(5)]
        print(
            f"  {mode:<13} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {cells[3]:>17} "
            f"{cells[4]:>15} {row[5]:7.3f}  {row[6]:.1f} ms"
        )
    print(
        "  median/best round/mean: wall time per step, logging included; "
        "train-thread CPU: the training thread's own CPU time;"
    )
    print(
        "  process CPU: all threads of this process (a remote server's CPU is not counted); "
        "close: flush/close after the loop."
    )
    print("  the log call itself on the training thread (us, one call of 3 scalars per step):")
    for mode in modes:
        pooled = [t for loop in loops[mode] for t in loop.log_us]
        print(
            f"    {mode:<13} p50 {percentile(pooled, 50):7.2f}  p99 {percentile(pooled, 99):7.2f}"
            f"  max {max(pooled, default=0.0):8.1f}"
        )
    paired_report(loops, modes)


def paired_report(loops: dict[str, list[Loop]], modes: list[str]) -> None:
    """
    Slowdowns paired round by round: each round's median step of a mode over
    that of the baseline (and of a new policy over its old one) in the same
    round, then the median over rounds. A shared machine's speed drifts from
    minute to minute; modes of one round share it, so these ratios are the
    steadiest figure when rounds disagree.
    """

    def ratios(mode: str, base: str) -> list[float]:
        return sorted(
            statistics.median(a.times) / statistics.median(b.times)
            for a, b in zip(loops[mode], loops[base], strict=True)
        )

    pairs = [(m, modes[0]) for m in modes[1:]]
    pairs += [(m, m + "-old") for m in modes if m + "-old" in modes]
    print(f"  paired by round (median over {len(loops[modes[0]])} rounds, quartiles):")
    for mode, base in pairs:
        r = ratios(mode, base)
        q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
        print(f"    {mode + ' / ' + base:<26} x{statistics.median(r):5.3f}  ({q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main()
