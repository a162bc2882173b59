"""
Benchmark: how much of a second core this machine gives when both are busy.

A server and its SQLite writer process (or a publisher and a server) run on
two cores at once, so a figure measured with one of them alone does not add
up. This times the same pure-Python loop in one process alone, then in as
many processes as there are usable cores at once, rounds in turn, and
prints the median of each and the cores' worth of work done together
(``processes x alone / together``: 2.0 on two free cores). It prints
figures and never fails on them::

    .venv/bin/python bench/cores.py [--rounds 5] [--loops 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from _common import machine_lines, usable_cores


def spin(loops: int) -> float:
    """Seconds of wall time for ``loops`` additions in this process."""
    started = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    rounds = max(1, min(args.rounds, 50))
    loops = max(100_000, min(args.loops, 200_000_000))
    cores = usable_cores()
    print("cores: one busy process alone, then one per usable core at once")
    for line in machine_lines():
        print("  " + line)
    alone: list[float] = []
    together: list[float] = []
    with ProcessPoolExecutor(max_workers=cores) as pool:
        list(pool.map(spin, [loops // 10] * cores))  # the workers are up before timing
        for _ in range(rounds):
            alone.append(pool.submit(spin, loops).result())
            together.append(statistics.median(pool.map(spin, [loops] * cores)))
    a, t = statistics.median(alone), statistics.median(together)
    runs = ", ".join(f"{v:.3f}" for v in alone)
    print(f"  alone:    {a:.3f} s ({runs})")
    runs = ", ".join(f"{v:.3f}" for v in together)
    print(f"  together: {t:.3f} s each, {cores} at once ({runs})")
    print(f"  each runs at {a / t:.2f}x its speed alone: {cores * a / t:.2f} cores' worth of work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
