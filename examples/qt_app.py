"""
A desktop app in the shape of the original tool ("AI model factory"): a Qt
window whose QThread trains several runs in a row, getting the embedded
server for each run and releasing it after (as that app did), with the
live monitor widget beside it.

    pip install 'trainstream[qt]'
    python examples/qt_app.py                     # the window stays open when done
    QT_QPA_PLATFORM=offscreen python examples/qt_app.py --runs 3 --steps 200

Offscreen (or with --exit) it exits when the last run is done: 0 if every
run was shown whole by the monitor and every port was free again after each
release, 1 otherwise. Each run binds the same ports as the first (as the
original app's fixed ports did), so a port left busy fails the next run.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import socket
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from PySide6.QtCore import QThread, QTimer, Signal
from PySide6.QtWidgets import (
    QApplication,
    QLabel,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

import trainstream
from trainstream.qt import StreamMonitor

METRICS = ("train/loss", "train/accuracy", "lr")


def plain_bind(port: int) -> str | None:
    """Bind as a plain script (or Windows) would, without SO_REUSEADDR: why not, or None."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return None
    except OSError as e:
        return str(e)
    finally:
        s.close()


def bound_ports(urls: dict[str, str]) -> dict[str, int]:
    return {role: urlsplit(urls[role]).port or 0 for role in ("sse", "ws", "rest")}


def pinned(endpoint: str, port: int) -> str:
    """``tcp:0...`` with the port the first run got, so every run binds the same ports."""
    return re.sub(r"^tcp:0(?=:|$)", f"tcp:{port}", endpoint)


class Trainer(QThread):
    """
    Trains ``runs`` runs in a row in its own thread; for each one it gets
    the embedded server, logs, finishes, waits (bounded) until the monitor
    shows the whole run, releases the server, then checks its ports are free.
    """

    said = Signal(str)
    step_done = Signal(int)
    run_done = Signal(str)

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.monitor_saw = threading.Event()
        #: What the monitor showed of each run, written by the GUI thread.
        self.shown: dict[str, str] = {}
        self.problems: list[str] = []

    def config(self) -> dict[str, Any]:
        a = self.args
        config: dict[str, Any] = {"sse": a.sse, "ws": a.ws, "rest": a.rest}
        if a.memory:
            config["memory"] = True
        if a.db:
            config["db"] = a.db
        return config

    def run(self) -> None:
        config = self.config()
        for index in range(1, self.args.runs + 1):
            name = f"{self.args.prefix}-{index}"
            server = trainstream.get_stream_server(config)  # refcount +1; ports bound
            ports = bound_ports(server.urls)
            if index == 1:
                for role in ("sse", "ws", "rest"):
                    config[role] = pinned(config[role], ports[role])
            self.said.emit(f"{name}: serving on ports {ports['sse']} {ports['ws']} {ports['rest']}")
            self.train(server, name, index)
            self.monitor_saw.clear()
            self.run_done.emit(name)
            seen = self.monitor_saw.wait(self.args.monitor_wait)
            trainstream.release_stream_server()  # refcount -1: at 0 every port is free
            busy = {role: why for role, p in ports.items() if (why := plain_bind(p)) is not None}
            shown = "shown whole by the monitor" if seen else "NOT shown whole by the monitor"
            free = "ports free after release" if not busy else f"ports still busy: {busy}"
            self.said.emit(f"{name}: finished, {self.args.steps} steps, {shown}, {free}")
            if not seen:
                self.problems.append(f"{name}: the monitor showed {self.shown.get(name, '-')}")
            if busy:
                self.problems.append(f"{name}: {free}")

    def train(self, server: trainstream.StreamServer, name: str, index: int) -> None:
        steps, rng = self.args.steps, random.Random(index)
        lr0 = 0.1 / index
        run = server.run(name, hparams={"lr": lr0, "steps": steps})
        run.status("running")
        loss = 2.0
        for step in range(steps):
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = loss * (1 - 2 * lr / (1 + index * 0.2)) + rng.gauss(0, 0.01) * lr0
            accuracy = 1 - min(1.0, max(0.0, loss / 2))
            run.log({"train/loss": loss, "train/accuracy": accuracy, "lr": lr}, step=step)
            if step % 10 == 0:
                self.step_done.emit(step)
            if self.args.delay:
                time.sleep(self.args.delay)
        run.finish()
        run.flush()  # every event is stored before the server may go


class Window(QMainWindow):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.setWindowTitle("AI model factory (trainstream example)")
        # The manager: whichever server runs, across the get/release of each run.
        self.monitor = StreamMonitor(trainstream.get_stream_server_manager())
        self.trainer = Trainer(args)
        self.waiting: str | None = None

        left = QWidget()
        layout = QVBoxLayout(left)
        layout.addWidget(QLabel(f"<b>Training {args.runs} runs of {args.steps} steps</b>"))
        self.progress = QProgressBar()
        self.progress.setRange(0, args.steps)
        layout.addWidget(self.progress)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        layout.addWidget(self.log, 1)

        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.monitor)
        splitter.setStretchFactor(1, 3)
        self.setCentralWidget(splitter)
        self.resize(1300, 800)

        self.trainer.said.connect(self.say)
        self.trainer.step_done.connect(self.progress.setValue)
        self.trainer.run_done.connect(self.wait_for_monitor)
        self.trainer.finished.connect(self.done)
        self.check = QTimer(self)
        self.check.timeout.connect(self.check_monitor)
        self.check.start(100)

    def say(self, line: str) -> None:
        self.log.appendPlainText(line)
        print(line, flush=True)

    def wait_for_monitor(self, name: str) -> None:
        self.progress.setValue(self.args.steps)
        self.waiting = name

    def check_monitor(self) -> None:
        """GUI thread: has the monitor got the run whole (its state, every point)?"""
        name = self.waiting
        if name is None:
            return
        model = self.monitor.model
        info = model.runs.get(name)
        counts = {m: len(model.points(name, m)[0]) for m in METRICS}
        links = {r: self.monitor.link_status(r).state for r in ("sse", "ws", "rest")}
        state = info.state if info is not None else "unknown"
        self.trainer.shown[name] = f"state {state}, points {counts}, links {links}"
        whole = all(n == self.args.steps for n in counts.values())
        if info is not None and info.state == "finished" and whole:
            self.waiting = None
            self.trainer.monitor_saw.set()

    def done(self) -> None:
        for line in self.trainer.problems:
            self.say(f"problem: {line}")
        self.say("all runs done" + ("" if self.trainer.problems else ": every check passed"))
        if self.args.screenshot:
            self.monitor.refresh()
            self.grab().save(self.args.screenshot)
        if self.args.exit:
            self.monitor.stop()
            QApplication.instance().exit(1 if self.trainer.problems else 0)  # type: ignore[union-attr]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs trained in a row (default 3)")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds per step (0.01)")
    parser.add_argument("--prefix", default="factory", help="the runs' name prefix")
    parser.add_argument("--sse", default="tcp:8888:interface=127.0.0.1", help="SSE endpoint")
    parser.add_argument("--ws", default="tcp:8889:interface=127.0.0.1", help="WebSocket endpoint")
    parser.add_argument("--rest", default="tcp:8890:interface=127.0.0.1", help="REST endpoint")
    parser.add_argument("--memory", action="store_true", help="keep history in RAM only")
    parser.add_argument("--db", help="the history file (default: one in the user's data dir)")
    parser.add_argument(
        "--monitor-wait", type=float, default=30.0, help="seconds to wait for the monitor per run"
    )
    parser.add_argument("--screenshot", help="save the window as this PNG when done")
    parser.add_argument("--exit", action="store_true", help="exit when done (offscreen: always)")
    args = parser.parse_args()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        args.exit = True

    app = QApplication(sys.argv[:1])
    window = Window(args)
    window.show()
    QTimer.singleShot(0, window.trainer.start)
    code = app.exec()
    window.trainer.wait(10_000)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except trainstream.TrainstreamError as e:  # a busy port, a history in use: one line
        raise SystemExit(f"qt_app.py: {e}") from None
