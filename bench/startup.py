"""
Benchmark: seconds from starting ``twistd -n trainstream`` to its first
``GET /api/health`` answer (target: under 0.5 s; for scale, Visdom takes
0.51 s and TensorBoard 1.33 s), and the imports that cost the most.

It prints figures and never fails on speed::

    .venv/bin/python bench/startup.py [--runs N] [--tree]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from _common import TREE_PACKAGE, machine_lines, source_lines

POLL_S = 0.002
RUN_DEADLINE_S = 20.0  # one start, from Popen to health
STOP_DEADLINE_S = 10.0  # SIGTERM to exit
LISTENERS = ("--sse", "--ws", "--rest")
IMPORTS = "import trainstream.tap, trainstream.server"

# Loopback only, whatever proxy the environment names.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Start:
    """One measured start of the server."""

    ports_file_s: float | None = None  # Popen -> ports file present
    health_s: float | None = None  # Popen -> first 200 from /api/health
    stop_s: float | None = None  # SIGTERM -> exit
    exit_code: int | None = None
    error: str | None = None


def find_twistd() -> Path:
    """The ``twistd`` script next to this interpreter, else the one on PATH."""
    sibling = Path(sys.executable).with_name("twistd")
    if sibling.exists():
        return sibling
    found = shutil.which("twistd")
    if found is None:
        raise SystemExit("no twistd next to sys.executable or on PATH")
    return Path(found)


def child_env(tree: bool, scratch: Path) -> dict[str, str]:
    """
    The children's environment. With ``tree``, ``trainstream`` comes from the
    working tree, through a directory holding only a symlink to the package
    (so the repository's ``twisted/plugins`` is not scanned or written to),
    and its bytecode is cached under ``scratch`` (the tree has no ``.pyc``
    when ``PYTHONDONTWRITEBYTECODE`` is set, and we write nothing there).
    """
    env = dict(os.environ)
    if tree:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
        src = scratch / "src"
        src.mkdir(exist_ok=True)
        link = src / "trainstream"
        if not link.exists():
            link.symlink_to(TREE_PACKAGE, target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def server_command(twistd: Path, ports_file: Path) -> list[str]:
    command = [str(twistd), "-n", "trainstream", "--memory"]
    for option in LISTENERS:
        command += [option, "tcp:0:interface=127.0.0.1"]
    return [*command, "--ports-file", str(ports_file)]


def health(url: str) -> bool:
    """One ``GET``: True on a 200 whose JSON says ok."""
    try:
        with _opener.open(url, timeout=2.0) as response:
            if response.status != 200:
                return False
            return bool(json.loads(response.read()).get("status") == "ok")
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop(proc: subprocess.Popen[bytes]) -> tuple[float | None, int | None]:
    """SIGTERM, then wait (bounded; SIGKILL after the deadline). Seconds to exit and the code."""
    if proc.poll() is not None:
        return None, proc.returncode
    t0 = perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_DEADLINE_S)
        return perf_counter() - t0, code
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_DEADLINE_S)
        return None, None


def start_once(
    command_prefix: Sequence[str], twistd: Path, env: dict[str, str], workdir: Path
) -> tuple[Start, subprocess.Popen[bytes], str]:
    """
    Start the server and poll until its first health answer. Returns the
    figures, the still running process and its ``rest`` URL (empty on error).
    """
    workdir.mkdir()
    ports_file = workdir / "ports.json"
    result = Start()
    separate_stderr = bool(command_prefix)  # -X importtime writes its table to stderr
    with (
        open(workdir / "output.log", "wb") as log,
        open(workdir / "stderr", "wb") if separate_stderr else nullcontext() as err,
    ):
        t0 = perf_counter()
        proc = subprocess.Popen(
            [*command_prefix, *server_command(twistd, ports_file)],
            cwd=workdir,  # twistd writes twistd.pid to its cwd
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=err if separate_stderr else subprocess.STDOUT,
        )
    deadline = t0 + RUN_DEADLINE_S
    while not ports_file.exists():
        if proc.poll() is not None or perf_counter() > deadline:
            result.error = "exited before the ports file" if proc.poll() is not None else "timeout"
            return result, proc, ""
        time.sleep(POLL_S)
    result.ports_file_s = perf_counter() - t0
    try:
        rest = json.loads(ports_file.read_text(encoding="utf-8"))["rest"]
    except (OSError, ValueError, KeyError) as e:
        result.error = f"unreadable ports file: {e!r}"
        return result, proc, ""
    while not health(rest + "/health"):
        if proc.poll() is not None or perf_counter() > deadline:
            result.error = "exited before health" if proc.poll() is not None else "timeout"
            return result, proc, rest
        time.sleep(POLL_S)
    result.health_s = perf_counter() - t0
    return result, proc, rest


def measure(
    runs: int, twistd: Path, env: dict[str, str], scratch: Path, warmup: bool
) -> list[Start]:
    """``runs`` starts, each stopped with SIGTERM before the next; a warm-up is not counted."""
    if warmup:
        result, proc, _ = start_once([], twistd, env, scratch / "warm-up")
        stop(proc)
        shown = f"{result.health_s * 1000:.1f} ms" if result.health_s else f"failed {result.error}"
        print(f"  warm-up (compiles bytecode into the scratch cache, not counted): {shown}")
    results = []
    for i in range(runs):
        workdir = scratch / f"run-{i}"
        result, proc, _ = start_once([], twistd, env, workdir)
        result.stop_s, result.exit_code = stop(proc)
        if result.error:
            tail = (workdir / "output.log").read_text(errors="replace")[-600:]
            result.error += f"; output tail: {tail!r}"
        results.append(result)
        shown = f"{result.health_s * 1000:7.1f} ms" if result.health_s else "  failed "
        print(
            f"  run {i + 1:>2}: health {shown}  (ports file "
            f"{(result.ports_file_s or float('nan')) * 1000:6.1f} ms, stop "
            f"{(result.stop_s or float('nan')) * 1000:6.1f} ms, exit {result.exit_code})"
            + (f"  ERROR {result.error}" if result.error else ""),
            flush=True,
        )
    return results


def floor(command: list[str], env: dict[str, str], cwd: Path, times: int = 5) -> float:
    """Median seconds to run a command to completion (what the interpreter alone costs)."""
    samples = []
    for _ in range(times):
        t0 = perf_counter()
        subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=30, check=False)
        samples.append(perf_counter() - t0)
    return statistics.median(samples)


@dataclass
class ImportCost:
    name: str
    depth: int
    self_us: int
    cumulative_us: int


def parse_importtime(stderr: str) -> list[ImportCost]:
    """The lines of ``-X importtime``: ``import time: self | cumulative | name``."""
    costs = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header
        raw_name = parts[2].rstrip()
        name = raw_name.lstrip()
        depth = (len(raw_name) - len(name) - 1) // 2
        costs.append(ImportCost(name, depth, int(parts[0]), int(parts[1])))
    return costs


def print_imports(title: str, costs: list[ImportCost], top: int = 10) -> None:
    total = sum(c.self_us for c in costs)
    print(f"{title}: {len(costs)} modules, {total / 1000:.1f} ms in all")
    print(f"  {'cumulative':>10} {'self':>8}  module (depth)")
    for c in sorted(costs, key=lambda c: c.cumulative_us, reverse=True)[:top]:
        print(f"  {c.cumulative_us / 1000:8.1f}ms {c.self_us / 1000:6.1f}ms  {c.name} ({c.depth})")
    by_package: Counter[str] = Counter()
    for c in costs:
        by_package[c.name.split(".", 1)[0]] += c.self_us
    print(
        "  self time by top-level package: "
        + ", ".join(f"{name} {us / 1000:.1f}" for name, us in by_package.most_common(top))
        + " (ms)"
    )


def import_costs(env: dict[str, str], cwd: Path) -> list[ImportCost]:
    """``-X importtime`` of what ``twistd trainstream`` imports from the package."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORTS],
        env=env,
        cwd=cwd,  # not the repository: "" on sys.path must not pick the working tree
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        print(f"  import failed: {completed.stderr[-600:]}")
    return parse_importtime(completed.stderr)


def twistd_import_costs(twistd: Path, env: dict[str, str], scratch: Path) -> list[ImportCost]:
    """``-X importtime`` of a whole ``twistd -n trainstream`` start, up to its first health."""
    workdir = scratch / "importtime-twistd"
    _, proc, _ = start_once([sys.executable, "-X", "importtime"], twistd, env, workdir)
    stop(proc)
    return parse_importtime((workdir / "stderr").read_text(errors="replace"))


def report(results: list[Start]) -> None:
    ok = [r.health_s * 1000 for r in results if r.health_s is not None]
    files = [r.ports_file_s * 1000 for r in results if r.ports_file_s is not None]
    stops = [r.stop_s * 1000 for r in results if r.stop_s is not None]
    print()
    print(f"runs: {len(results)}, failed: {len(results) - len(ok)}")
    for label, values in (
        ("Popen -> first /api/health 200", ok),
        ("Popen -> ports file", files),
        ("SIGTERM -> exit", stops),
    ):
        if values:
            print(
                f"  {label:<31} median {statistics.median(values):7.1f} ms  "
                f"min {min(values):7.1f}  max {max(values):7.1f}"
            )
    if ok:
        verdict = "under" if statistics.median(ok) < 500 else "OVER"
        print(f"  median is {verdict} the 0.5 s target (Visdom 0.51 s, TensorBoard 1.33 s)")
    if ok and len(ok) > 1:
        rest = statistics.median(ok[1:])
        print(f"  first run {ok[0]:.1f} ms (colder caches); median of the others {rest:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="starts to time (default 15)")
    parser.add_argument("--tree", action="store_true", help="run trainstream from the working tree")
    args = parser.parse_args(argv)
    twistd = find_twistd()

    with tempfile.TemporaryDirectory(prefix="trainstream-startup-") as tmp:
        scratch = Path(tmp)
        env = child_env(args.tree, scratch)
        where = subprocess.run(
            [sys.executable, "-c", "import trainstream; print(trainstream.__file__)"],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        print("trainstream startup benchmark: twistd -n trainstream -> first /api/health")
        for line in [*machine_lines(), *source_lines(where or str(TREE_PACKAGE / "x"))]:
            print(line)
        print(f"twistd:    {twistd}")
        print(f"command:   {' '.join(server_command(twistd, Path('TMP/ports.json')))}")
        print(
            "bytecode:  "
            + (
                f"cached in the scratch dir (PYTHONPYCACHEPREFIX={env['PYTHONPYCACHEPREFIX']})"
                if "PYTHONPYCACHEPREFIX" in env
                else "the installed __pycache__"
                + (" (PYTHONDONTWRITEBYTECODE is set)" if "PYTHONDONTWRITEBYTECODE" in env else "")
            )
        )
        print(f"polling:   every {POLL_S * 1000:.0f} ms for the ports file, then /api/health")
        sys.stdout.flush()

        results = measure(max(1, args.runs), twistd, env, scratch, warmup=args.tree)
        report(results)

        print()
        print("for scale, median wall time of (5 runs each):")
        for label, command in (
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("twistd --version", [str(twistd), "--version"]),
            (
                "python -c 'import trainstream.tap, trainstream.server'",
                [sys.executable, "-c", IMPORTS],
            ),
        ):
            print(f"  {label:<58} {floor(command, env, scratch) * 1000:7.1f} ms")

        print()
        print_imports(
            "python -X importtime -c 'import trainstream.tap, trainstream.server'",
            import_costs(env, scratch),
        )
        print()
        print_imports(
            "python -X importtime twistd -n trainstream ... (whole start, to first health)",
            twistd_import_costs(twistd, env, scratch),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
