"""Helpers shared by the benchmark scripts: percentiles, machine facts, source checks."""

from __future__ import annotations

import filecmp
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TREE_PACKAGE = REPO_ROOT / "trainstream"


def wait_or_kill(proc: subprocess.Popen[Any], seconds: float) -> int:
    """Wait ``seconds`` for a child that was told to stop, then kill it; its exit code."""
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_line(label: str, values_ms: Sequence[float]) -> str:
    """One aligned line: n, median, p90, p99, max, in milliseconds."""
    if not values_ms:
        return f"  {label:<18} n=0"
    return (
        f"  {label:<18} n={len(values_ms):<5} "
        f"median={percentile(values_ms, 50):8.2f}  p90={percentile(values_ms, 90):8.2f}  "
        f"p99={percentile(values_ms, 99):8.2f}  max={max(values_ms):8.2f}  "
        f"min={min(values_ms):8.2f}  (ms)"
    )


def usable_cores() -> int:
    """The cores this process may run on (``os.cpu_count()`` where that cannot be asked)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_lines() -> list[str]:
    """What the figures were measured on."""
    usable = usable_cores()
    return [
        f"machine: nproc={usable} (cpu_count={os.cpu_count()}), {platform.machine()}, "
        f"{platform.system()} {platform.release()}",
        f"python:  {platform.python_implementation()} {platform.python_version()} "
        f"({sys.executable})",
    ]


def use_tree() -> None:
    """Import ``trainstream`` from the repository's working tree, not the installed copy."""
    sys.path.insert(0, str(REPO_ROOT))


def differing_files(package_dir: Path, other_dir: Path = TREE_PACKAGE) -> list[str]:
    """The ``.py`` files of the package that differ between two copies (empty when equal)."""
    if package_dir.resolve() == other_dir.resolve():
        return []
    names: set[str] = set()
    for root in (package_dir, other_dir):
        names.update(str(p.relative_to(root)) for p in root.rglob("*.py"))
    different = []
    for name in sorted(names):
        a, b = package_dir / name, other_dir / name
        if not (a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)):
            different.append(name)
    return different


def source_lines(package_file: str) -> list[str]:
    """Which trainstream is measured, and whether it matches the working tree."""
    package_dir = Path(package_file).resolve().parent
    lines = [f"trainstream: {package_dir}"]
    different = differing_files(package_dir)
    if different:
        lines.append(
            f"  WARNING: differs from the working tree {TREE_PACKAGE} in "
            f"{len(different)} file(s): {', '.join(different[:8])}"
            + (" ..." if len(different) > 8 else "")
            + " (pip install . to refresh, or pass --tree)"
        )
    return lines


# Before adaptive batching, for before/after figures in one run: the same
# code with the old timing rule put back (benchmarks only).

#: The old fixed delays: every run.log batch waited 50 ms, every POST 0.25 s.
OLD_INBOX_DELAY = 0.05
OLD_LINGER = 0.25


def use_old_inbox(inbox: Any, delay: float = OLD_INBOX_DELAY) -> Callable[[], None]:
    """
    Make an embedded server's ``Inbox`` hold every batch ``delay`` after its
    wake-up, idle or not (the rule before adaptive batching); returns the
    function that puts the adaptive rule back. Call it while nothing is queued.
    """
    window = inbox.window

    def wake() -> None:
        if inbox._timer is None or not inbox._timer.active():
            inbox._timer = inbox._clock.callLater(delay, inbox.drain)  # drain clears the flag

    inbox._wake = wake
    inbox.window = delay

    def restore() -> None:
        del inbox._wake
        inbox.window = window

    return restore


def old_publisher(*args: Any, **kw: Any) -> Any:
    """
    A ``Publisher`` that lets every batch linger ``OLD_LINGER`` (0.25 s),
    idle or not: the rule before adaptive batching.
    """
    from trainstream.client.publisher import Publisher

    class OldPublisher(Publisher):
        def _schedule(self, at_once: bool = False) -> None:
            self._last_post = self._clock.seconds()  # always "busy": now + linger
            super()._schedule(at_once)

    kw.setdefault("linger", OLD_LINGER)
    return OldPublisher(*args, **kw)


def plugin_on_path() -> None:
    """
    Put the repository on ``PYTHONPATH`` (for the children) unless it is:
    ``twistd`` finds the ``trainstream`` command in its ``twisted/plugins``.
    """
    # Absolute, so a relative entry (``PYTHONPATH=.``) names the same folder
    # for children that run in a folder of their own.
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(Path(p).resolve() == REPO_ROOT for p in paths):
        paths.insert(0, str(REPO_ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


# A redis-server of our own, for the cluster benches.

REDIS_SERVER = "/usr/bin/redis-server"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bound to 0, then closed)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """
    ``redis-server`` on a free loopback port (no RDB; ``appendonly`` as
    asked, in a temporary folder), ready once it answers PING; ``stop()``
    sends SIGTERM to its pid and waits (SIGKILL after ``seconds``).
    """

    def __init__(self, appendonly: str = "no", extra: Sequence[str] = (), port: int = 0) -> None:
        import tempfile
        import time

        if not Path(REDIS_SERVER).exists():
            raise SystemExit(f"{REDIS_SERVER} is missing: apt-get install -y redis-server")
        self.scratch = Path(tempfile.mkdtemp(prefix="trainstream-redis-"))
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", appendonly,
            "--dir", str(self.scratch),
            *extra,
        ]  # fmt: skip
        self.log_path = self.scratch / "redis.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise SystemExit(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, seconds: float = 10.0) -> int:
        """SIGTERM (redis-server then writes its AOF and exits), wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return wait_or_kill(self.proc, seconds)
