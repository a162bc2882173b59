"""
Benchmark: what trainstream costs a user who runs ``pip install .``.

- the size of a new venv after ``pip install SOURCE``, less the empty venv's,
  and the largest installed distributions;
- the wall time of ``python -c "import trainstream"`` (median of 5) and of
  ``import trainstream.server, trainstream.tap`` (what a server loads), with
  ``-X importtime``'s top offenders;
- the idle RSS of ``twistd -n trainstream --memory`` and of an embedded
  server (``get_stream_server({"memory": True, ...})``), median of 3, and
  whether TLS (OpenSSL, cryptography, service_identity), Autobahn's WAMP,
  rich or numpy were loaded.

It prints figures and never fails on them::

    .venv/bin/python bench/footprint.py [--source DIR] [--venv DIR] [--keep]

``--venv DIR`` measures an existing venv (no install); otherwise a new one is
made in a temporary directory from the interpreter this script runs on, and
``pip`` uses its configured index.
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
from pathlib import Path
from time import perf_counter

from _common import REPO_ROOT, machine_lines, wait_or_kill

IMPORT_RUNS = 5
RSS_RUNS = 3
SETTLE_S = 1.0  # idle time after the first health answer, before RSS is read
DEADLINE_S = 30.0
#: Top-level packages whose presence in ``sys.modules`` the figures report.
WATCHED = {
    "TLS": ("OpenSSL", "cryptography", "service_identity", "twisted.internet._sslverify"),
    "WAMP": ("autobahn.wamp", "autobahn.twisted.wamp"),
    "autobahn": ("autobahn",),
    "rich": ("rich",),
    "numpy": ("numpy",),
    "uplot": ("uplot",),
}
LOOPBACK = "tcp:0:interface=127.0.0.1"
#: ``twistd``, writing the names in ``sys.modules`` to ``$FOOTPRINT_MODULES``
#: on SIGUSR2 (``-X importtime`` would also list imports that failed).
TWISTD_CHILD = """
import json, os, signal, sys
def dump(*_):
    with open(os.environ["FOOTPRINT_MODULES"] + ".part", "w") as f:
        json.dump(sorted(sys.modules), f)
    os.replace(os.environ["FOOTPRINT_MODULES"] + ".part", os.environ["FOOTPRINT_MODULES"])
signal.signal(signal.SIGUSR2, dump)
sys.argv[0] = "twistd"
from twisted.scripts.twistd import run
run()
"""

# Loopback only, whatever proxy the environment names.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: Run in the measured venv: start an embedded server, wait, report.
EMBEDDED_CHILD = f"""
import json, sys, time
import trainstream
server = trainstream.get_stream_server(config={{
    "memory": True, "demo": False,
    "sse": {LOOPBACK!r}, "ws": {LOOPBACK!r}, "rest": {LOOPBACK!r},
}})
time.sleep({SETTLE_S})
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps({{"rss_kib": rss, "modules": sorted(sys.modules)}}))
sys.stdout.flush()
trainstream.release_stream_server()
"""


def du_kib(path: Path) -> int:
    """Disk use of a tree in KiB (``du -sk``: blocks, as a user sees them)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def base_python() -> str:
    """The interpreter a new venv is made from (not this venv's wrapper)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def make_venv(where: Path) -> tuple[bool, float]:
    t0 = perf_counter()
    done = subprocess.run(
        [base_python(), "-m", "venv", str(where)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(f"  venv failed: {done.stderr[-400:]}")
    return done.returncode == 0, perf_counter() - t0


def site_packages(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[0] if found else None


def largest_distributions(venv: Path, top: int = 12) -> list[tuple[str, int]]:
    """Top-level entries of site-packages, grouped by distribution, largest first."""
    site = site_packages(venv)
    if site is None:
        return []
    sizes: Counter[str] = Counter()
    for entry in site.iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            name = name.split("-", 1)[0]
        name = name.removesuffix(".py").removesuffix(".libs").lstrip("_").lower()
        sizes[name.replace("-", "_")] += du_kib(entry)
    return sizes.most_common(top)


def install(source: Path, venv: Path) -> None:
    """Make ``venv`` and ``pip install source`` into it, printing sizes and times."""
    print("venv size after pip install (du -sk)")
    empty = venv.parent / "empty-venv"
    ok, seconds = make_venv(empty)
    empty_kib = du_kib(empty) if ok else 0
    print(f"  empty venv:                {mib(empty_kib)} (made in {seconds:.1f} s)")
    shutil.rmtree(empty, ignore_errors=True)
    ok, _ = make_venv(venv)
    if not ok:
        return
    t0 = perf_counter()
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = perf_counter() - t0
    if done.returncode != 0:
        print(f"  pip install failed after {seconds:.1f} s: {done.stderr[-800:]}")
        return
    full = du_kib(venv)
    print(f"  after pip install {source}: {mib(full)} (pip took {seconds:.1f} s)")
    print(f"  trainstream's share:       {mib(full - empty_kib)}")
    print(
        "  largest distributions: "
        + ", ".join(f"{name} {mib(kib)}" for name, kib in largest_distributions(venv))
    )


def import_times(python: Path, statement: str, cwd: Path) -> None:
    """Median wall time of ``python -c statement`` and its ``-X importtime`` offenders."""
    walls = []
    for _ in range(IMPORT_RUNS):
        t0 = perf_counter()
        done = subprocess.run(
            [str(python), "-c", statement], cwd=cwd, capture_output=True, text=True, check=False
        )
        walls.append(perf_counter() - t0)
        if done.returncode != 0:
            print(f"  {statement!r} failed: {done.stderr[-400:]}")
            return
    base = statistics.median(_wall([str(python), "-c", "pass"], cwd) for _ in range(IMPORT_RUNS))
    print(
        f"  python -c {statement!r}: median {statistics.median(walls) * 1000:.0f} ms "
        f"(min {min(walls) * 1000:.0f}; python -c pass: {base * 1000:.0f} ms)"
    )
    done = subprocess.run(
        [str(python), "-X", "importtime", "-c", statement],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            raw = parts[2].rstrip()
            rows.append((int(parts[1]), int(parts[0]), raw.strip(), (len(raw) - len(raw.lstrip()))))
    by_package: Counter[str] = Counter()
    for _, self_us, name, _ in rows:
        by_package[name.split(".", 1)[0]] += self_us
    total = sum(r[1] for r in rows)
    print(
        f"    -X importtime: {len(rows)} modules, {total / 1000:.0f} ms self time; by package: "
        + ", ".join(f"{n} {us / 1000:.0f}" for n, us in by_package.most_common(8))
        + " (ms)"
    )
    top = sorted((r for r in rows if r[3] <= 3), reverse=True)[:6]  # depth 1
    print(
        "    largest first-level imports: "
        + ", ".join(f"{name} {cum / 1000:.0f}" for cum, _, name, _ in top)
        + " (ms, cumulative)"
    )


def _wall(command: list[str], cwd: Path) -> float:
    t0 = perf_counter()
    subprocess.run(command, cwd=cwd, capture_output=True, check=False)
    return perf_counter() - t0


def loaded(modules: set[str]) -> str:
    """Which of ``WATCHED`` a process loaded."""
    found = []
    for label, names in WATCHED.items():
        hits = [n for n in names if n in modules or any(m.startswith(n + ".") for m in modules)]
        found.append(f"{label} {'yes (' + ', '.join(hits) + ')' if hits else 'no'}")
    return "; ".join(found)


def health(url: str) -> bool:
    try:
        with _opener.open(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def proc_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def twistd_once(venv: Path, work: Path) -> tuple[int | None, set[str], str]:
    """Start ``twistd -n trainstream --memory``, wait for health, read RSS, stop it."""
    work.mkdir(parents=True)
    ports = work / "ports.json"
    modules_file = work / "modules.json"
    command = [
        str(venv / "bin" / "python"),
        "-c",
        TWISTD_CHILD,
        "-n",
        "--pidfile=",
        "trainstream",
        "--memory",
        *("--sse", LOOPBACK, "--ws", LOOPBACK, "--rest", LOOPBACK),
        "--ports-file",
        str(ports),
    ]
    with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
        proc = subprocess.Popen(
            command,
            cwd=work,
            env={**os.environ, "FOOTPRINT_MODULES": str(modules_file)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = perf_counter() + DEADLINE_S
        rest = None
        while perf_counter() < deadline and proc.poll() is None:
            if rest is None and ports.exists():
                try:
                    rest = json.loads(ports.read_text())["rest"]
                except (OSError, ValueError, KeyError):
                    rest = None
            if rest is not None and health(rest + "/health"):
                break
            time.sleep(0.01)
        else:
            tail = (work / "stdout").read_text(errors="replace")[-400:]
            return None, set(), f"no health answer (exit {proc.poll()}): {tail!r}"
        time.sleep(SETTLE_S)
        rss = proc_rss_kib(proc.pid)
        proc.send_signal(signal.SIGUSR2)
        until = perf_counter() + 5.0
        while not modules_file.exists() and perf_counter() < until:
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            wait_or_kill(proc, 10)
    try:
        modules = set(json.loads(modules_file.read_text()))
    except (OSError, ValueError):
        modules = set()
    return rss, modules, ""


def embedded_once(venv: Path, work: Path) -> tuple[int | None, set[str], str]:
    work.mkdir(parents=True)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", EMBEDDED_CHILD],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        report = json.loads(done.stdout.strip().splitlines()[0])
    except (IndexError, ValueError):
        return None, set(), f"exit {done.returncode}: {done.stderr[-400:]!r}"
    return int(report["rss_kib"]), set(report["modules"]), ""


def idle_rss(venv: Path, scratch: Path) -> None:
    print(f"idle RSS, {SETTLE_S:.0f} s after the first health answer (median of {RSS_RUNS})")
    for label, once in (
        ("twistd -n trainstream --memory", lambda w: twistd_once(venv, w)),
        ("embedded get_stream_server(memory)", lambda w: embedded_once(venv, w)),
    ):
        samples, modules, errors = [], set(), []
        if label.startswith("twistd"):
            # twistd's first start after an install writes Twisted's plugin
            # cache, importing every plugin (Autobahn's too): not counted.
            rss, _, error = once(scratch / "twistd-warm-up")
            print(f"  (first twistd start, builds the plugin cache: {mib(rss) if rss else error})")
        for i in range(RSS_RUNS):
            rss, mods, error = once(scratch / f"{label.split()[0]}-{i}")
            if rss is not None:
                samples.append(rss)
            if error:
                errors.append(error)
            modules |= mods
        shown = (
            f"median {mib(statistics.median(samples))} (runs: {', '.join(mib(s) for s in samples)})"
            if samples
            else "n/a"
        )
        print(f"  {label:<36} {shown}")
        if modules:
            print(f"    {len(modules)} modules; loaded: {loaded(modules)}")
        for error in errors[:2]:
            print(f"    failed: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="what to pip install")
    parser.add_argument("--venv", type=Path, help="measure this venv; install nothing")
    parser.add_argument("--keep", action="store_true", help="keep the new venv (path printed)")
    args = parser.parse_args(argv)

    print("trainstream footprint: venv size, import time, idle RSS")
    for line in machine_lines():
        print(line)
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-footprint-"))
    try:
        if args.venv is not None:
            venv = args.venv.resolve()
            print(f"venv: {venv} (given; nothing installed)")
            print(f"  size: {mib(du_kib(venv))}")
        else:
            venv = scratch / "venv"
            print(f"source: {args.source.resolve()}")
            install(args.source.resolve(), venv)
        python = venv / "bin" / "python"
        if not python.exists():
            print("no interpreter in the venv: nothing more to measure")
            return 0
        print()
        print(f"import time (median of {IMPORT_RUNS}, from {scratch}, bytecode compiled)")
        subprocess.run(
            [str(python), "-c", "import trainstream.server, trainstream.tap"],
            cwd=scratch,
            capture_output=True,
            check=False,
        )  # compile once
        import_times(python, "import trainstream", scratch)
        import_times(python, "import trainstream.server, trainstream.tap", scratch)
        print()
        idle_rss(venv, scratch)
    finally:
        if args.keep and args.venv is None:
            print(f"kept: {scratch / 'venv'}")
            for child in scratch.iterdir():
                if child.name != "venv":
                    shutil.rmtree(child, ignore_errors=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
