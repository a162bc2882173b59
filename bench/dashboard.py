"""
Benchmark: the dashboard under load, in a real headless Chromium.

A ``twistd -n trainstream --db <temp file>`` subprocess (SQLite keeps every
point; the memory store would keep only its newest ``max_history``) is given
20 metrics x 100,000 points of history over ``POST /api/events``. Then
Debian's Chromium (Selenium, ``/usr/bin/chromedriver``) opens the page,
and while 1,000 live events/s arrive (spread over the 20 metrics) the page
counts its animation frames (``requestAnimationFrame``) and its long tasks
(``PerformanceObserver('longtask')``: main-thread tasks over 50 ms, which is
what makes a page feel stuck). Prints figures; never fails on speed::

    PYTHONPATH=. .venv/bin/python bench/dashboard.py [--points 100000] [--metrics 20]
        [--rate 1000] [--seconds 20] [--screenshot PATH]

Headless Chromium renders in software with no display vsync; its frame rate
ceiling is about 60 fps, as on a desktop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import machine_lines
from startup import child_env, find_twistd

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RUN = "bench/dashboard"
BATCH = 40_000  # events per POST at history time (well under the 8 MiB body limit)


def start_server(scratch: Path) -> tuple[subprocess.Popen[bytes], str]:
    ports = scratch / "ports.json"
    command = [
        str(find_twistd()),
        "-n",
        "--pidfile=",
        "trainstream",
        f"--db={scratch / 'history.sqlite3'}",
        "--listen=tcp:0:interface=127.0.0.1",
        f"--ports-file={ports}",
    ]
    log = open(scratch / "twistd.log", "wb")
    proc = subprocess.Popen(
        command, cwd=scratch, env=child_env(True, scratch), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while not ports.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit((scratch / "twistd.log").read_text(errors="replace")[-2000:])
        time.sleep(0.02)
    urls = json.loads(ports.read_text())
    return proc, urls["rest"].rsplit("/api", 1)[0]


def post(base: str, events: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        base + "/api/events",
        data=json.dumps(events, separators=(",", ":")).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def value(m: int, step: int) -> float:
    return (1.0 + m / 10) / (1.0 + step / 5000) + 0.02 * ((step * 7919 + m) % 101) / 101


def publish_history(base: str, metrics: int, points: int) -> float:
    started = time.monotonic()
    now = time.time() - points * 0.01
    batch: list[dict[str, Any]] = [
        {"type": "hparams", "run": RUN, "params": {"lr": 3e-4, "metrics": metrics}}
    ]
    for step in range(points):
        for m in range(metrics):
            batch.append(
                {
                    "type": "metric",
                    "run": RUN,
                    "name": f"m{m:02d}/loss",
                    "step": step,
                    "value": value(m, step),
                    "time": now + step * 0.01,
                }
            )
        if len(batch) >= BATCH:
            post(base, batch)
            batch = []
    if batch:
        post(base, batch)
    return time.monotonic() - started


class LivePublisher(threading.Thread):
    """``rate`` metric events/s in 20 POSTs a second, round robin over the metrics."""

    def __init__(self, base: str, metrics: int, first_step: int, rate: int) -> None:
        super().__init__(daemon=True)
        self.base, self.metrics, self.step, self.rate = base, metrics, first_step, rate
        self.stop = threading.Event()
        self.sent = 0
        self.behind = 0.0

    def run(self) -> None:
        ticks_per_s = 20
        per_tick = max(1, self.rate // ticks_per_s)
        start = time.monotonic()
        tick = 0
        while not self.stop.is_set():
            events = []
            for _ in range(per_tick):
                m = self.sent % self.metrics
                events.append(
                    {
                        "type": "metric",
                        "run": RUN,
                        "name": f"m{m:02d}/loss",
                        "step": self.step,
                        "value": value(m, self.step),
                    }
                )
                self.sent += 1
                if m == self.metrics - 1:
                    self.step += 1
            post(self.base, events)
            tick += 1
            delay = start + tick / ticks_per_s - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                self.behind = max(self.behind, -delay)


PROBE = """
if (!window.__bench) {
  window.__bench = {frames: 0, longTasks: []};
  const count = () => { window.__bench.frames++; requestAnimationFrame(count); };
  requestAnimationFrame(count);
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__bench.longTasks.push(e.duration);
  }).observe({entryTypes: ["longtask"]});
}
"""

READ = """
const b = window.__bench;
return {frames: b.frames, at: performance.now(), long: b.longTasks.length};
"""


def browser(profile: str) -> Any:
    os.environ["SE_AVOID_BROWSER_DOWNLOAD"] = "true"
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_for(driver: Any, script: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout} s waiting for: {script}")


def measure(driver: Any, seconds: float) -> dict[str, Any]:
    """Frames and long tasks (ms each) during the next ``seconds``."""
    driver.execute_script(PROBE)
    before = driver.execute_script(READ)
    time.sleep(seconds)
    after = driver.execute_script(READ)
    long = driver.execute_script(
        f"return window.__bench.longTasks.slice({before['long']}, {after['long']})"
    )
    return {
        "frames": after["frames"] - before["frames"],
        "ms": after["at"] - before["at"],
        "long": long,
    }


def figures(label: str, m: dict[str, Any]) -> str:
    long = m["long"]
    seconds = m["ms"] / 1000
    return (
        f"{label}: {m['frames'] / seconds:.1f} fps over {seconds:.1f} s; long tasks: "
        f"{len(long)}, total {sum(long):.0f} ms ({sum(long) / seconds / 10:.1f}% of the time), "
        f"max {max(long, default=0):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="history points per metric")
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--rate", type=int, default=1000, help="live events per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="live measuring time")
    parser.add_argument("--screenshot", default=None, help="save the page here at the end")
    args = parser.parse_args()
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise SystemExit("needs apt-get install -y chromium chromium-driver")

    for line in machine_lines():
        print(line)
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-bench-dashboard-"))
    profile = tempfile.mkdtemp(prefix="trainstream-bench-chromium-")
    proc, base = start_server(scratch)
    driver = None
    try:
        total = args.metrics * args.points
        took = publish_history(base, args.metrics, args.points)
        print(
            f"history: {args.metrics} metrics x {args.points:,} points = {total:,} events "
            f"stored in {took:.1f} s ({total / took:,.0f}/s) on SQLite"
        )
        driver = browser(profile)
        opened = time.monotonic()
        driver.get(base + "/")
        wait_for(
            driver,
            "const s = window.trainstream && window.trainstream.status();"
            f"return s && !s.loading && s.charts.length === {args.metrics} && s.drawn.length > 0;",
            120,
        )
        print(f"page: history loaded and first charts drawn in {time.monotonic() - opened:.2f} s")
        idle = measure(driver, min(5.0, args.seconds))
        print(figures("idle (no live events)", idle))

        live = LivePublisher(base, args.metrics, args.points, args.rate)
        live.start()
        loaded = measure(driver, args.seconds)
        live.stop.set()
        live.join()
        sent_rate = live.sent / (loaded["ms"] / 1000)
        print(
            figures(f"live ({sent_rate:,.0f} events/s sent)", loaded)
            + (
                f"; publisher fell behind by up to {live.behind:.2f} s"
                if live.behind > 0.05
                else ""
            )
        )
        last_step = live.step - 1
        caught = wait_for(
            driver,
            f"const p = window.trainstream.points({json.dumps(RUN)}, 'm00/loss');"
            f"return p && p[p.length - 1] >= {last_step - 1} && p.length;",
            30,
        )
        status = driver.execute_script("return window.trainstream.status()")
        print(
            f"page caught up: m00/loss holds {caught:,} points (history downsampled + live), "
            f"last id {status['lastId']:,}, {len(status['drawn'])} charts drawn (visible ones)"
        )
        heap = driver.execute_script(
            "return performance.memory ? performance.memory.usedJSHeapSize : null"
        )
        if heap:
            print(f"page JS heap: {heap / 2**20:.1f} MiB")
        if args.screenshot:
            driver.save_screenshot(args.screenshot)
            print(f"screenshot: {args.screenshot}")
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
